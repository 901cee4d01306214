"""Parameter groups (no decay on biases and norms, head LR, layer-wise LR decay), optimizers, schedules."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler

from peftkit.errors import UserError
from peftkit.models import Architecture, layer_index


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # Biases, norm scales and other 1-D tensors are not regularised (standard BERT/ViT practice).
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def _is_head(name: str, heads: list[str]) -> bool:
    return any(name.startswith(h + ".") or f".{h}." in name for h in heads)


def param_groups(
    model: nn.Module,
    arch: Architecture,
    *,
    lr: float,
    weight_decay: float,
    heads: list[str],
    head_lr: float | None = None,
    layer_decay: float = 1.0,
    num_layers: int = 0,
) -> list[dict[str, Any]]:
    """AdamW groups for the trainable parameters.

    The head trains at ``head_lr`` (``lr`` when unset). Encoder layer k of L trains at
    ``lr * layer_decay ** (L + 1 - (k + 1))`` and the embeddings at ``lr * layer_decay ** (L + 1)``,
    so lower, more general layers move less (discriminative fine-tuning, as in ELECTRA/BEiT).
    """
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_head(name, heads):
            group_lr = head_lr or lr
        else:
            depth = num_layers + 1 - layer_index(name, arch, num_layers)
            group_lr = lr * layer_decay ** max(depth, 0)
        decay = 0.0 if _no_decay(name, param) else weight_decay
        key = (group_lr, decay == 0.0)
        group = groups.setdefault(key, {"params": [], "names": [], "lr": group_lr, "weight_decay": decay})
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise UserError("No parameter is trainable; check `adapter.method` and `adapter.modules_to_save`.")
    return list(groups.values())


def make_optimizer(groups: list[dict[str, Any]], name: str, lr: float) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA and CPU), or bitsandbytes' 8-bit / paged 8-bit AdamW."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if name == "adamw":
        # The fused kernel runs on CPU too (torch >= 2.4): 4-5x faster per step than the per-tensor
        # loop torch picks there by default (benchmarks/README.md, "fused AdamW").
        devices = {p.device.type for g in clean for p in g["params"]}
        fused = len(devices) == 1 and devices <= {"cuda", "cpu"}
        return torch.optim.AdamW(clean, lr=lr, fused=fused or None)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"`train.optimizer: {name}` needs bitsandbytes: `pip install 'peftkit[bnb]'`, or use `train.optimizer: adamw`.")
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(clean, lr=lr)


def warmup_steps(total: int, ratio: float, steps: int | None) -> int:
    """Explicit warm-up steps win over the ratio."""
    return steps if steps is not None else round(total * ratio)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, *, total_steps: int, warmup: int) -> Any:
    """Linear warm-up, then cosine, linear or constant."""
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
