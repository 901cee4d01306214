"""bitsandbytes 8/4-bit loading of the backbone, k-bit training preparation, and what runs where.

The head (and DeBERTa's pooler) is never quantized: it is new, trained in full and saved with the
adapter, so it stays in full precision.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from peftkit.errors import UserError


def require_bitsandbytes(bits: int) -> None:
    """Fail early, with the fix, when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"`quantization.bits: {bits}` needs bitsandbytes, which is not installed. "
            "Install it with `pip install 'peftkit[bnb]'` (or `pip install bitsandbytes`), or remove `quantization.bits`."
        )


def bnb_config(bits: int | None, *, quant_type: str, double_quant: bool, compute_dtype: str, skip_modules: list[str]) -> Any:
    """A ``BitsAndBytesConfig`` for the backbone, or ``None`` when not quantizing."""
    if bits is None:
        return None
    require_bitsandbytes(bits)
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        llm_int8_skip_modules=skip_modules,
    )


def check_4bit_widths(model_config: Any, bits: int | None) -> None:
    """bitsandbytes' 4-bit CPU kernels need layer widths that are multiples of 64."""
    if bits != 4 or torch.cuda.is_available():
        return
    widths = {k: getattr(model_config, k, None) for k in ("hidden_size", "intermediate_size")}
    bad = {k: v for k, v in widths.items() if isinstance(v, int) and v % 64}
    if bad:
        raise UserError(f"4-bit quantization on CPU needs layer widths that are multiples of 64; this model has {bad}. Use `quantization.bits: 8` or a GPU.")


def disable_cpu_repacking(model: nn.Module) -> int:
    """Keep 4-bit weights in their training layout on CPU.

    bitsandbytes' CPU path repacks NF4 weights for AVX512-BF16 after the first forward under
    ``no_grad`` (an eval pass); the repacked layout breaks later training steps and merges. Turning
    the flag off on each ``Linear4bit`` keeps one layout throughout. Returns how many were changed.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def prepare_for_kbit_training(model: nn.Module, *, gradient_checkpointing: bool) -> nn.Module:
    """peft's k-bit preparation (norms in fp32, inputs that require grad), then the CPU fix."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    if not torch.cuda.is_available():
        disable_cpu_repacking(model)
    return model


def check_quantization(model_config: Any, bits: int | None, precision: str) -> None:
    """Every quantization check that needs only ``config.json``: package, widths, DeBERTa + autocast."""
    if bits is None:
        return
    require_bitsandbytes(bits)
    check_4bit_widths(model_config, bits)
    if precision != "no" and str(getattr(model_config, "model_type", "")).startswith("deberta"):
        raise UserError(f"`train.precision: {precision}` with `quantization.bits: {bits}` breaks DeBERTa's attention "
                        "(its fp32 mask value overflows the half-precision scores). Set `train.precision: no`: the quantized "
                        "layers already compute in `quantization.compute_dtype`.")
