"""Memory: an analytic estimate of peak training memory before a run, a plan that fits a budget, and the measured peak.

The estimate needs the model's ``config.json`` only: the module tree is built on the meta device
(no weights read or allocated) to count parameters, trainable parameters and quantizable linear
layers exactly; everything else is arithmetic on the ``train:``/``data:``/``quantization:`` settings:

    weights       parameters x bytes (fp32/bf16; 1 byte + a per-row scale in 8-bit; 0.5 byte + block constants in 4-bit)
    gradients     trainable parameters x their dtype's bytes (divided over processes under ZeRO-2/3)
    optimizer     AdamW: two fp32 moments (8 bytes/parameter); 8-bit AdamW: ~2 bytes (tensors < 4096 elements stay 32-bit)
    activations   tensors autograd keeps for backward, per encoder layer, from micro-batch x tokens x hidden/intermediate
                  (+ DeBERTa's relative-attention tensors), with or without checkpointing, + a backward working set
    peak          weights + optimizer + the larger of gradients and activations (the backward frees a layer's
                  activations as it fills its gradients)
    overhead      10% for allocator fragmentation and temporaries; a CUDA context of 0.5 GiB when checking a
                  GPU budget (it is outside ``torch.cuda.max_memory_allocated``)

    peftkit estimate --config qlora_deberta.yaml --gpu-memory 8GiB --processes 1
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import resource
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from peftkit.errors import UserError, guarded

GiB = 2**30
MiB = 2**20
OVERHEAD_FRACTION = 0.10
CUDA_CONTEXT_BYTES = 512 * MiB
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit optimizer state for smaller tensors
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def peak_memory(device: torch.device) -> dict[str, object]:
    """The measured peak, with the method named: CUDA's peak allocation, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "method": "torch.cuda.max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return {"bytes": int(rss if sys.platform == "darwin" else rss * 1024), "method": "peak RSS of the training process (getrusage)"}


# ------------------------------------------------------------------------------------------------
# Activation models: fp32 elements autograd saves per token and encoder layer
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerActivations:
    """Saved elements per token of one encoder layer, as ``a*hidden + b*intermediate``, by training mode.

    Modes: ``full`` (every weight trains: linear inputs are saved), ``adapter`` (frozen or quantized
    base with adapters on the linear layers: adapter inputs and dropout copies are saved too),
    ``frozen`` (nothing in the layer trains, gradients only flow through it to earlier adapters).
    Counted from the tensors transformers 5.25's implementations hand to autograd.
    """

    full: tuple[float, float]
    adapter: tuple[float, float]
    frozen: tuple[float, float]
    relative_attention: bool = False  # DeBERTa's disentangled attention: s^2 scores and relative-position terms


# ViT and BERT-like layers use fused scaled-dot-product attention (no s^2 tensor is kept);
# DeBERTa's eager disentangled attention keeps its scores, probabilities and c2p/p2c terms.
ACTIVATIONS: dict[str, LayerActivations] = {
    "vit": LayerActivations(full=(8, 2), adapter=(12, 3), frozen=(6, 1)),
    "deberta-v2": LayerActivations(full=(11, 2), adapter=(15, 3), frozen=(7, 1), relative_attention=True),
}
DEFAULT_ACTIVATIONS = ACTIVATIONS["vit"]


def _relative_terms(cfg: Any, batch: int, seq: int, mode: str) -> float:
    """Bytes of DeBERTa's per-layer attention tensors that are not linear in tokens x hidden."""
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    scores = 3 * batch * heads * seq * seq * 4 + batch * seq * seq + 2 * seq * seq * 8  # scores/probs, mask, gather index
    if not getattr(cfg, "relative_attention", False):
        return scores
    buckets = getattr(cfg, "position_buckets", -1)
    span = buckets if buckets > 0 else (cfg.max_relative_positions if cfg.max_relative_positions > 0 else cfg.max_position_embeddings)
    kinds = len(getattr(cfg, "pos_att_type", None) or ()) / 2  # c2p and p2c each add one set
    rel = 2 * span
    per_kind = batch * heads * seq * rel * 4 + batch * hidden * rel * 4 + (rel * hidden * 4 if mode != "frozen" else 0)
    return scores + 2 * kinds * per_kind


# ------------------------------------------------------------------------------------------------
# What the model holds (counted once on the meta device) and what a run chooses (the plan varies it)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFacts:
    """Parameter counts of the model with its adapter, and the shapes activations depend on."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    tokens: int  # sequence length (text: data.max_length) or patches + 1 (images)
    weight_dtype_bytes: int
    trainable: int
    trainable_tensor_sizes: tuple[int, ...]
    frozen_plain: int  # frozen parameters never quantized (embeddings, norms, biases, head originals)
    quantizable: int  # weights of frozen linear layers outside the head
    quantizable_rows: int  # their output features (8-bit keeps one fp32 scale per row)
    largest_linear: int
    adapter_mode: str  # full / adapter / frozen / none
    config: Any


@dataclass(frozen=True)
class Setup:
    """The knobs the planner may turn."""

    micro_batch: int
    grad_accum: int
    checkpointing: bool
    optimizer: str
    bits: int | None
    double_quant: bool
    precision: str
    processes: int = 1
    zero: int = 0
    offload: bool = False


@dataclass
class Estimate:
    """Peak training memory per process, in bytes, by component."""

    rows: dict[str, float]
    cpu_offloaded: float
    device: str

    @property
    def total(self) -> float:
        return sum(self.rows.values())

    @property
    def device_total(self) -> float:
        """What must fit on the card: the total plus the CUDA context."""
        return self.total + (CUDA_CONTEXT_BYTES if self.device == "cuda" else 0)


def model_facts(config: Any, num_labels: int | None = None) -> ModelFacts:
    """Count parameters on the meta device: nothing is downloaded beyond ``config.json``, nothing allocated."""
    from peftkit.adapters import AdapterSpec, inject
    from peftkit.models import architecture_for, head_modules, load_backbone, load_model_config

    mc, ac = config.model, config.adapter
    labels = list(mc.labels or [f"label_{i}" for i in range(num_labels or 2)])
    model_config = load_model_config(mc.name, revision=mc.revision, trust_remote_code=mc.trust_remote_code)
    arch = architecture_for(model_config.model_type)
    model = load_backbone(mc.name, mc.task, labels, dtype=mc.dtype, revision=mc.revision, trust_remote_code=mc.trust_remote_code, meta=True)
    heads = head_modules(model, arch)
    model, _ = inject(model, arch, AdapterSpec.from_section(ac))
    return facts_of_model(config, model, model_config, heads)


def facts_of_model(config: Any, model: nn.Module, model_config: Any, heads: list[str]) -> ModelFacts:
    """:class:`ModelFacts` of a model already built on the meta device, its adapter injected.

    ``heads`` are the head modules found before injection (:func:`peftkit.models.head_modules`):
    quantization skips them, so their linear layers are not counted as quantizable.
    """
    from peftkit.models import architecture_for

    mc, ac = config.model, config.adapter
    head_names = {h.split(".")[-1] for h in heads} | set(architecture_for(model_config.model_type).head)
    quantizable_ids: dict[int, int] = {}
    rows = largest = 0
    for name, module in model.named_modules():
        parts = set(name.split("."))
        if isinstance(module, nn.Linear) and not module.weight.requires_grad and not parts & head_names and "original_module" not in parts:
            quantizable_ids[id(module.weight)] = module.out_features
            rows += module.out_features
            largest = max(largest, module.weight.numel())
    trainable_sizes, frozen_plain, quantizable = [], 0, 0
    for param in model.parameters():
        if param.requires_grad:
            trainable_sizes.append(param.numel())
        elif id(param) in quantizable_ids:
            quantizable += param.numel()
        else:
            frozen_plain += param.numel()
    mode = {"full": "full", "freeze": "none"}.get(ac.method, "adapter")
    return ModelFacts(
        model_type=model_config.model_type, hidden=model_config.hidden_size,
        intermediate=getattr(model_config, "intermediate_size", 4 * model_config.hidden_size),
        layers=model_config.num_hidden_layers, heads=model_config.num_attention_heads,
        tokens=_tokens(config, model_config), weight_dtype_bytes=DTYPE_BYTES[mc.dtype], trainable=sum(trainable_sizes),
        trainable_tensor_sizes=tuple(trainable_sizes), frozen_plain=frozen_plain, quantizable=quantizable,
        quantizable_rows=rows, largest_linear=largest, adapter_mode=mode, config=model_config,
    )


def _tokens(config: Any, model_config: Any) -> int:
    if config.model.task == "image-classification":
        image, patch = model_config.image_size, model_config.patch_size
        image = image[0] if isinstance(image, (list, tuple)) else image
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return (image // patch) ** 2 + 1  # patches + [CLS]
    # Batches are padded to their longest row; max_length is the worst case the peak must survive.
    return min(config.data.max_length, getattr(model_config, "max_position_embeddings", config.data.max_length))


def setup_from_config(config: Any, processes: int = 1) -> Setup:
    """The run's own choices, as the starting point of an estimate or a plan."""
    tc, qc = config.train, config.quantization
    return Setup(micro_batch=tc.batch_size, grad_accum=tc.grad_accum, checkpointing=tc.gradient_checkpointing, optimizer=tc.optimizer,
                 bits=qc.bits, double_quant=qc.double_quant, precision=tc.precision, processes=processes)


# ------------------------------------------------------------------------------------------------
# The arithmetic
# ------------------------------------------------------------------------------------------------

def estimate(f: ModelFacts, s: Setup, device: str = "cuda") -> Estimate:
    """Peak memory of one training process for ``f`` under ``s``."""
    n = max(s.processes, 1)
    shard = n if s.zero else 1
    # Weights. k-bit preparation casts every non-quantized parameter to fp32.
    plain_bytes = 4 if s.bits else f.weight_dtype_bytes
    if s.bits == 8:
        quantized = f.quantizable * 1 + f.quantizable_rows * 4
    elif s.bits == 4:
        blocks = f.quantizable / 64
        constants = blocks * 1 + (blocks / 256) * 4 if s.double_quant else blocks * 4
        quantized = f.quantizable * 0.5 + constants
    else:
        quantized = f.quantizable * plain_bytes
    trainable_bytes = 4 if f.adapter_mode != "full" else f.weight_dtype_bytes
    weights = quantized + f.frozen_plain * plain_bytes + f.trainable * trainable_bytes
    if s.zero == 3:
        weights /= n
    grads = f.trainable * trainable_bytes / (shard if s.zero >= 2 else 1)
    if n > 1 and s.zero == 0:
        grads *= 2  # DDP's bucketed copy of the gradients for the all-reduce
    if s.optimizer == "adamw":
        optim = f.trainable * 2 * trainable_bytes
    else:
        optim = _adam8_bytes(f.trainable_tensor_sizes)
    optim /= shard
    offloaded = 0.0
    if s.offload:
        offloaded, optim = optim, 0.0
    rows = {
        "weights": weights,
        "gradients": grads,
        "optimizer states": optim,
        **activation_rows(f, s),
    }
    # The backward frees each layer's activations as it fills that layer's gradients, so the two
    # peak at different moments: count only the larger (it matters for full fine-tuning).
    rows["not simultaneous"] = -min(grads, rows["activations"] + rows["backward working set"])
    rows["overhead (10%)"] = OVERHEAD_FRACTION * sum(rows.values())
    return Estimate(rows, offloaded, device)


def _adam8_bytes(sizes: tuple[int, ...]) -> float:
    # Two uint8 moments plus an fp32 absmax per 256-element block, for tensors bitsandbytes quantizes.
    return sum(k * (2 + 8 / 256) if k >= BNB_MIN_8BIT_SIZE else 8 * k for k in sizes)


def activation_rows(f: ModelFacts, s: Setup) -> dict[str, float]:
    """Saved activations of the encoder layers, the rest of the model, and the backward working set."""
    b, t, h = s.micro_batch, f.tokens, f.hidden
    act_bytes = 4 if s.precision == "no" else 2
    model = ACTIVATIONS.get(f.model_type, DEFAULT_ACTIVATIONS)
    mode = f.adapter_mode if not (f.adapter_mode == "none" and (s.checkpointing or s.bits)) else "frozen"
    if mode == "none":  # linear probe: nothing below the head needs gradients
        return {"activations": 4 * b * t * h * act_bytes, "backward working set": 0.0}
    a_h, a_i = getattr(model, mode)
    per_layer = b * t * (a_h * h + a_i * f.intermediate) * act_bytes
    if model.relative_attention:
        per_layer += _relative_terms(f.config, b, t, mode) * act_bytes / 4
    # bitsandbytes' 8-bit matmul keeps each frozen linear layer's input for its backward (q/k/v
    # share one): attention input, attention output, feed-forward input and hidden. It stores them
    # on its autograd context, not through save_for_backward, so checkpointing does not free them.
    int8_inputs = b * t * (3 * h + f.intermediate) * act_bytes if s.bits == 8 else 0.0
    per_layer += int8_inputs
    outside = 4 * b * t * h * act_bytes  # embeddings (+ layer norm, dropout), pooler, logits
    if s.checkpointing:
        # Each layer's input (one layer is recomputed at a time), plus the 8-bit inputs above.
        saved = f.layers * (b * t * h * act_bytes + int8_inputs) + outside
        working = 2 * per_layer  # the recomputed layer and the gradients flowing through it
    else:
        saved = f.layers * per_layer + outside
        working = per_layer
    if s.bits:
        working += 2 * f.largest_linear * 4  # a dequantized weight in the forward and in the backward
    return {"activations": saved, "backward working set": working}


# ------------------------------------------------------------------------------------------------
# The plan: the cheapest set of changes that fits a budget
# ------------------------------------------------------------------------------------------------

# Relative cost of each change (slower steps, lower accuracy, more setup), cheapest first.
COSTS = {"optimizer": 1, "checkpointing": 3, "halve_batch": 2, "bits8": 4, "bits4": 5, "zero2": 3, "zero3": 5, "offload": 8}


def candidate_setups(base: Setup, *, allow_quantization: bool) -> list[tuple[int, Setup, list[str]]]:
    """Every combination of changes, with its cost and a description of each change."""
    out = []
    batches = []
    mb = base.micro_batch
    while mb >= 1:
        batches.append(mb)
        if mb == 1:
            break
        mb = max(mb // 2, 1)
    bits_options = [base.bits] + ([8, 4] if allow_quantization and base.bits is None else [4] if allow_quantization and base.bits == 8 else [])
    zeros = [0] + ([2, 3] if base.processes > 1 else [])
    for ckpt, opt8, mb, bits, zero, offload in itertools.product(
        {base.checkpointing, True}, {base.optimizer != "adamw", True}, batches, bits_options, zeros, (False, True)
    ):
        if offload and (zero == 0):
            continue  # offload needs DeepSpeed ZeRO
        setup = replace(base, checkpointing=ckpt, optimizer=base.optimizer if not opt8 or base.optimizer != "adamw" else "adamw_8bit",
                        micro_batch=mb, grad_accum=base.grad_accum * (base.micro_batch // mb), bits=bits, zero=zero, offload=offload)
        cost, changes = 0, []
        if ckpt and not base.checkpointing:
            cost += COSTS["checkpointing"]
            changes.append("train.gradient_checkpointing=true")
        if setup.optimizer != base.optimizer:
            cost += COSTS["optimizer"]
            changes.append("train.optimizer=adamw_8bit")
        if mb != base.micro_batch:
            cost += COSTS["halve_batch"] * int(math.log2(base.micro_batch // mb))
            changes.append(f"train.batch_size={mb} train.grad_accum={setup.grad_accum}")
        if bits != base.bits:
            cost += COSTS[f"bits{bits}"]
            changes.append(f"quantization.bits={bits}")
        if zero:
            cost += COSTS[f"zero{zero}"] + (COSTS["offload"] if offload else 0)
            changes.append(f"DeepSpeed ZeRO-{zero}{' with optimizer offload to CPU' if offload else ''} (accelerate config)")
        out.append((cost, setup, changes))
    return sorted(out, key=lambda c: (c[0], -c[1].micro_batch))


def plan(f: ModelFacts, base: Setup, budget: float, device: str = "cuda") -> tuple[Setup, list[str], Estimate] | None:
    """The cheapest setup whose estimate fits ``budget`` bytes, or None when nothing does."""
    for _, setup, changes in candidate_setups(base, allow_quantization=f.adapter_mode != "full"):
        est = estimate(f, setup, device)
        if est.device_total <= budget:
            return setup, changes, est
    return None


# ------------------------------------------------------------------------------------------------
# Reporting and the CLI
# ------------------------------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    """Bytes as GiB (or MiB below 1 GiB)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


def describe(s: Setup) -> str:
    """One line naming the setup an estimate is for."""
    base = f"{s.bits}-bit base" if s.bits else "full-precision base"
    zero = f", ZeRO-{s.zero}{' + offload' if s.offload else ''}" if s.zero else ""
    return (f"micro-batch {s.micro_batch} x accum {s.grad_accum} x {s.processes} proc, {base}, optimizer {s.optimizer}, "
            f"checkpointing {'on' if s.checkpointing else 'off'}, precision {s.precision}{zero}")


def format_table(f: ModelFacts, s: Setup, est: Estimate) -> str:
    """The breakdown table a user reads before a run."""
    lines = [f"estimated peak training memory per process: {describe(s)}",
             f"  parameters: {f.trainable + f.frozen_plain + f.quantizable:,} ({f.trainable:,} trainable, {f.quantizable:,} in quantizable linear layers); "
             f"{f.tokens} tokens x {f.hidden} hidden x {f.layers} layers"]
    width = max(len(k) for k in est.rows) + 2
    for key, value in est.rows.items():
        lines.append(f"  {key:<{width}}{fmt_bytes(value):>12}")
    lines.append(f"  {'total':<{width}}{fmt_bytes(est.total):>12}")
    if est.device == "cuda":
        lines.append(f"  {'+ CUDA context':<{width}}{fmt_bytes(CUDA_CONTEXT_BYTES):>12}  -> {fmt_bytes(est.device_total)} on the card")
    if est.cpu_offloaded:
        lines.append(f"  optimizer states offloaded to CPU RAM: {fmt_bytes(est.cpu_offloaded)}")
    return "\n".join(lines)


def parse_size(text: str) -> float:
    """``8GiB``, ``16GB``, ``8G``, ``7500MiB`` or plain bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise UserError(f"`--gpu-memory {text}` is not a size; write it like `8GiB`, `16GB` or `24000MiB`.")
    value, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    # `8GB` is decimal; `8GiB` and a bare `8G` (as most users mean it) are binary.
    decimal = bool(unit) and not binary and text.strip().upper().endswith("B")
    return value * (1000 if decimal else 1024) ** " KMGT".index(unit or " ")


def report(config: Any, *, processes: int = 1, budget: float | None = None, device: str = "cuda",
           num_labels: int | None = None, facts: ModelFacts | None = None) -> str:
    """The estimate of a config, and with ``budget`` the plan that fits it.

    ``facts``: the model already counted (:func:`facts_of_model`), so it is not built a second time.
    """
    facts = facts if facts is not None else model_facts(config, num_labels)
    base = setup_from_config(config, processes)
    est = estimate(facts, base, device)
    text = format_table(facts, base, est)
    if budget is None:
        return text
    if est.device_total <= budget:
        return text + f"\n\nfits in {fmt_bytes(budget)} as configured ({fmt_bytes(budget - est.device_total)} to spare)."
    found = plan(facts, base, budget, device)
    if found is None:
        return text + (f"\n\nnothing fits in {fmt_bytes(budget)}: even the smallest setup needs more. "
                       "Use a smaller model, a larger card, or more processes with ZeRO-3 and offload.")
    setup, changes, planned = found
    overrides = " ".join(c for c in changes if "=" in c and "ZeRO" not in c)
    launch = [c for c in changes if "ZeRO" in c]
    lines = [text, "", f"does not fit in {fmt_bytes(budget)}; cheapest changes that fit:"]
    lines += [f"  - {c}" for c in changes]
    lines += ["", format_table(facts, setup, planned), ""]
    if overrides:
        lines.append(f"run with: accelerate launch peftkit/train.py --config {{config}} {overrides}")
    if launch:
        lines.append("and launch with a DeepSpeed accelerate config: " + "; ".join(launch))
    return "\n".join(lines)


def startup_line(config: Any, *, processes: int, device: str, num_labels: int | None = None) -> str:
    """The one-line estimate printed at the start of a training run."""
    facts = model_facts(config, num_labels)
    setup = setup_from_config(config, processes)
    est = estimate(facts, setup, device)
    parts = ", ".join(f"{k.split(' (')[0]} {fmt_bytes(v)}" for k, v in est.rows.items())
    where = f"{fmt_bytes(est.device_total)} with the CUDA context" if device == "cuda" else "on top of the Python/torch runtime"
    return (f"estimated peak memory per process {fmt_bytes(est.total)} ({where}): {parts} "
            f"| details and a plan for a budget: peftkit estimate --config CONFIG --gpu-memory 8GiB")


def print_estimate(config: Any, *, processes: int, device: str, num_labels: int | None = None) -> None:
    """Print the estimate at the start of a training run; a model it cannot count never stops the run."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        # Under ZeRO-3 init, building even a meta model enters deepspeed.zero.Init, a collective the
        # other processes never join (this runs on the main process only): it would hang or abort the run.
        print("[peftkit] memory estimate skipped under ZeRO-3; run `peftkit estimate --config CONFIG --processes N` instead")
        return
    try:
        # Building the meta model runs weight initialisers, which draw from the global RNG that a
        # resume has just restored; without the fork a resumed run would not match an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            line = startup_line(config, processes=processes, device="cuda" if device == "cuda" else "cpu", num_labels=num_labels)
    except Exception as exc:  # advice only: the run itself has already validated and loaded the model
        line = f"memory estimate unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    print(f"[peftkit] {line}")


def cli_main(argv: list[str]) -> int:
    """``peftkit estimate --config X [overrides] [--gpu-memory 8GiB] [--processes N] [--device cuda|cpu]``."""
    p = argparse.ArgumentParser(prog="peftkit estimate", description="Estimate peak training memory; plan what fits a budget.")
    p.add_argument("--config", required=True, help="YAML path, or the name of a shipped config under configs/")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides (they win over the YAML)")
    p.add_argument("--gpu-memory", default=None, help="budget per GPU, e.g. 8GiB or 16GB; prints a plan that fits")
    p.add_argument("--processes", type=int, default=1, help="data-parallel processes (ZeRO shards over them)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda adds the CUDA context to the budget check")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = p.parse_args(argv)

    def run() -> None:
        from peftkit.config import load_config

        if args.processes < 1:
            raise UserError(f"`--processes {args.processes}` must be at least 1.")
        config = load_config(args.config, args.overrides)
        budget = parse_size(args.gpu_memory) if args.gpu_memory else None
        print(report(config, processes=args.processes, budget=budget, device=args.device).replace("{config}", str(args.config)))

    return guarded(run, debug=args.debug)
