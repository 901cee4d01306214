"""Merge one or several adapters into the full-precision base, save a plain Transformers model, prove it.

    peftkit merge runs/lora_deberta --out merged/                     # one adapter, verified
    peftkit merge runs/a runs/b --weights 0.5 0.5 --method cat --out merged/

The proof: the saved folder is reloaded from disk into a fresh model and its logits are compared
with the adapter model's on a verification batch (the run's validation rows, or generated inputs
of the right shape). Above ``--tolerance`` nothing is left at ``--out``: everything is written to a
temporary sibling folder and renamed into place only after the check passed.

Heads with several adapters: peft's ``add_weighted_adapter`` refuses adapters that each trained a
head (``modules_to_save``). peftkit loads the adapters without their heads, combines the adapter
weights with peft, and builds the head itself: by default the weighted average of the heads'
weights (weights normalised to sum to 1), or with ``--head-from NAME`` the head of one adapter.
The combined merged model is verified against the combined unmerged one.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit import artifacts, checkpoint
from peftkit.config import Config
from peftkit.errors import UserError, guarded
from peftkit.inference import encode_images, encode_texts, forward_logits

EXIT_VERIFY_FAILED = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Max |logit difference| accepted by default: fp32 only sees summation-order noise; half types
# round every weight (bf16 keeps 8 bits of mantissa, fp16 11), so their logits move visibly.
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}

# Combination methods of peft's LoRA add_weighted_adapter, and what each needs.
COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_EQUAL_RANK = {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
USES_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
# Which adapter methods peft can combine, and with which combinations. DoRA's magnitude vector,
# LoHa/LoKr and AdaLoRA have no weighted combination in peft.
MULTI_METHODS: dict[str, tuple[str, ...]] = {"lora": COMBINATIONS, "rslora": COMBINATIONS, "ia3": ("linear",)}
# What happens to a single model folder of each method.
SINGLE_ACTION = {"lora": "merged", "dora": "merged", "rslora": "merged", "ia3": "merged", "loha": "merged", "lokr": "merged",
                 "adalora": "merged", "full": "copied (full fine-tuning: the whole model was trained, nothing to merge)",
                 "freeze": "copied (linear probe: only the head was trained, nothing to merge)"}
VERIFY_SAMPLES = 32


@dataclass
class Source:
    """One model folder to merge, read without loading any weights."""

    name: str
    folder: Path
    config: Config
    labels: list[str]
    metrics: dict[str, Any]
    adapter_config: dict[str, Any] | None

    @property
    def method(self) -> str:
        return self.config.adapter.method

    @property
    def rank(self) -> int | None:
        ac = self.adapter_config or {}
        ranks = [ac.get("r"), *(ac.get("rank_pattern") or {}).values()]
        ranks = [r for r in ranks if isinstance(r, int)]
        return max(ranks) if ranks else None

    def summary(self) -> dict[str, Any]:
        ac = self.config.adapter
        return {"name": self.name, "folder": str(self.folder), "method": ac.method, "r": self.rank, "alpha": ac.alpha,
                "dropout": ac.dropout, "target_modules": sorted((self.adapter_config or {}).get("target_modules") or []),
                "modules_to_save": (self.adapter_config or {}).get("modules_to_save"),
                "trained_quantization": self.config.quantization.bits, "metrics": self.metrics}


def read_source(path: str | Path) -> Source:
    """A run directory or model folder, its config, labels, metrics and adapter settings."""
    read = artifacts.read_model_folder(Path(path))
    folder = read.folder
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    adapter_file = folder / "adapter_config.json"
    adapter_config = json.loads(adapter_file.read_text()) if adapter_file.is_file() else None
    run_name = folder.parent.name if folder.name in ("best", "last", "model") else folder.name
    return Source(re.sub(r"\W", "_", run_name) or "adapter", folder, read.config, read.labels, metrics, adapter_config)


# --------------------------------------------------------------------------------------------
# Verification batch and comparison
# --------------------------------------------------------------------------------------------


def verification_batches(config: Config, processor: Any, model_config: Any, *, samples: int,
                         batch_size: int = 16) -> tuple[list[dict[str, torch.Tensor]], str]:
    """The run's validation rows when its data can be read, else generated inputs of the right shape."""
    from peftkit.data import splits_for

    dc, is_text = config.data, config.model.task == "text-classification"
    try:
        # The same carve as training (seed, label column), limited to `samples` verification rows.
        splits = splits_for(dc.model_copy(update={"test": None, "max_eval_samples": samples}), seed=config.train.seed)
        ds = splits.validation
        if is_text:
            pairs = list(ds[dc.text_pair_column]) if dc.text_pair_column else None
            batches = encode_texts(processor, list(ds[dc.text_column]), pairs, max_length=dc.max_length, batch_size=batch_size)
        else:
            batches = encode_images(processor, list(ds[dc.image_column]), batch_size=batch_size)
        return batches, f"{len(ds)} rows of the run's validation data ({dc.validation or 'carved from ' + dc.train})"
    except (UserError, KeyError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    g = torch.Generator().manual_seed(0)
    if is_text:
        length = min(dc.max_length, 32)
        ids = torch.randint(0, int(model_config.vocab_size), (samples, length), generator=g)
        batches = [{"input_ids": ids[i:i + batch_size], "attention_mask": torch.ones_like(ids[i:i + batch_size])}
                   for i in range(0, samples, batch_size)]
    else:
        size, channels = int(model_config.image_size), int(getattr(model_config, "num_channels", 3))
        pixels = torch.rand(samples, channels, size, size, generator=g) * 2 - 1
        batches = [{"pixel_values": pixels[i:i + batch_size]} for i in range(0, samples, batch_size)]
    return batches, f"{samples} generated inputs (the run's data could not be read: {reason})"


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Max and mean absolute logit difference, and the share of rows whose argmax agrees."""
    diff = (reference - other).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "argmax_agreement": float((reference.argmax(-1) == other.argmax(-1)).float().mean()), "samples": int(reference.shape[0])}


# --------------------------------------------------------------------------------------------
# Building the model to merge
# --------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """An unmerged model (adapter active) and what is saved with it."""

    model: nn.Module
    processor: Any
    config: Config  # the (first) run's config: task, data for verification, max length
    labels: list[str]
    is_adapter: bool
    info: dict[str, Any] = field(default_factory=dict)


def prepare_single(src: Source, base: str | None) -> Prepared:
    """One adapter on the full-precision base (whatever precision it was trained on), head and pooler applied."""
    if src.method not in SINGLE_ACTION:
        raise UserError(f"{src.folder}: adapter method `{src.method}` cannot be merged; methods peftkit merges: {sorted(SINGLE_ACTION)}.")
    trained = artifacts.load_trained(src.folder, quantized=False, base_path=base)
    return Prepared(trained.model, trained.processor, src.config, trained.labels, trained.is_adapter,
                    {"action": SINGLE_ACTION[src.method]})


def check_compatible(sources: list[Source], weights: list[float], method: str, density: float | None, head_from: str | None) -> None:
    """Everything that would make a multi-adapter merge fail or be meaningless, before any weights are read."""
    first = sources[0]
    if len(weights) != len(sources):
        raise UserError(f"`--weights` has {len(weights)} values for {len(sources)} adapters; give one weight per adapter.")
    for src in sources:
        allowed = MULTI_METHODS.get(src.method)
        if allowed is None:
            raise UserError(f"{src.folder} is a `{src.method}` adapter; peft combines only {sorted(MULTI_METHODS)} adapters "
                            "(DoRA, LoHa, LoKr and AdaLoRA have no weighted combination). Merge it on its own, without other adapters.")
        if method not in allowed:
            raise UserError(f"`--method {method}` does not apply to `{src.method}` adapters; use one of {list(allowed)}.")
    families = {"ia3" if s.method == "ia3" else "lora" for s in sources}
    if len(families) > 1:
        raise UserError(f"The adapters mix methods {[s.method for s in sources]}; LoRA and (IA)3 adapters cannot be combined.")
    for src in sources[1:]:
        if src.config.model.task != first.config.model.task:
            raise UserError(f"{src.folder} is a {src.config.model.task} model, {first.folder} a {first.config.model.task} one; combine adapters of one task.")
        if src.labels != first.labels:
            raise UserError(f"{src.folder} has labels {src.labels}, {first.folder} has {first.labels}; only adapters trained "
                            "on the same label set (same names, same order) can share one head.")
        if _base_key(src.config.model.name) != _base_key(first.config.model.name):
            raise UserError(f"{src.folder} was trained on `{src.config.model.name}`, {first.folder} on `{first.config.model.name}`; "
                            "adapters of different base models cannot be combined.")
    ranks = {s.name: s.rank for s in sources}
    if method in NEEDS_EQUAL_RANK and families == {"lora"} and len(set(ranks.values())) > 1:
        raise UserError(f"`--method {method}` needs adapters of equal rank; these have {ranks}. Use `--method cat` or `--method svd`.")
    if density is not None and not 0 < density <= 1:
        raise UserError(f"`--density {density}` must be in (0, 1]: the share of adapter weights kept.")
    if density is None and method in USES_DENSITY:
        raise UserError(f"`--method {method}` prunes adapter weights; give `--density` (e.g. 0.5, the share kept).")
    if head_from is not None and head_from not in {s.name for s in sources}:
        raise UserError(f"`--head-from {head_from}` names no adapter; the adapters are named {[s.name for s in sources]}.")
    if head_from is None and abs(sum(weights)) < 1e-8:
        raise UserError("The weights sum to 0, so no weighted head exists; pick one adapter's head with `--head-from NAME`.")


def _base_key(name: str) -> str:
    path = Path(name)
    return str(path.resolve()) if path.exists() else name


def _split_state(state: dict[str, torch.Tensor], to_save: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter weights, head weights); head keys lose peft's ``base_model.model.`` prefix."""
    adapter, head = {}, {}
    for key, value in state.items():
        inner = key.removeprefix("base_model.model.")
        if any(inner.startswith(m + ".") for m in to_save):
            head[inner] = value
        else:
            adapter[key] = value
    return adapter, head


def combine_heads(heads: dict[str, dict[str, torch.Tensor]], weights: dict[str, float], head_from: str | None) -> dict[str, torch.Tensor]:
    """One adapter's head, or the weighted average of all heads (weights normalised to sum to 1)."""
    if head_from is not None:
        return dict(heads[head_from])
    names = list(heads)
    keys = set(heads[names[0]])
    for name in names[1:]:
        if set(heads[name]) != keys or any(heads[name][k].shape != heads[names[0]][k].shape for k in keys):
            raise UserError(f"Adapters `{names[0]}` and `{name}` saved different head modules or shapes; pick one head with `--head-from`.")
    total = sum(weights.values())
    return {k: sum(heads[n][k].float() * (weights[n] / total) for n in names) for k in keys}


def prepare_multi(sources: list[Source], weights: list[float], method: str, density: float | None, head_from: str | None,
                  base: str | None, seed: int = 0) -> Prepared:
    """Base + every adapter without its head, peft's weighted combination active, and peftkit's combined head."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    from peftkit.models import load_backbone, load_processor

    first = sources[0]
    mc = first.config.model
    base_name = base or mc.name
    model = load_backbone(base_name, mc.task, first.labels, dtype="float32", revision=mc.revision, trust_remote_code=mc.trust_remote_code)
    heads, adapter_states, peft_configs = {}, {}, {}
    for src in sources:
        cfg = PeftConfig.from_pretrained(str(src.folder))
        to_save = list(cfg.modules_to_save or [])
        cfg.modules_to_save, cfg.inference_mode = None, True  # heads are combined by peftkit (peft refuses them)
        peft_configs[src.name] = cfg
        try:
            state = load_file(str(src.folder / "adapter_model.safetensors"))
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise UserError(f"{src.folder}/adapter_model.safetensors cannot be read ({str(exc)[:200]}); the checkpoint is damaged.") from None
        adapter_states[src.name], heads[src.name] = _split_state(state, to_save)
    weight_of = {s.name: w for s, w in zip(sources, weights, strict=True)}
    head = combine_heads(heads, weight_of, head_from)
    unexpected = model.load_state_dict(head, strict=False).unexpected_keys
    if unexpected:
        raise UserError(f"Head weights {unexpected[:5]} do not fit the base model `{base_name}`; the adapters were trained on another model.")

    names = [s.name for s in sources]
    peft_model = PeftModel(model, peft_configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, peft_configs[name])
    for name in names:
        result = set_peft_model_state_dict(peft_model, adapter_states[name], adapter_name=name)
        stray = [k for k in result.unexpected_keys if name in k or "lora_" in k or "ia3_" in k]
        if stray:
            raise UserError(f"Adapter `{name}` holds weights {stray[:3]} for modules the base `{base_name}` lacks; it belongs to another base.")
    # peft builds the combined adapter from the first one's config with lora_alpha == r, i.e. scale 1;
    # inherited use_rslora would rescale it by sqrt(r). Each loaded adapter's own scale is already
    # fixed in its layers, so the flag is cleared on the configs only.
    for name in names:
        if getattr(peft_model.peft_config[name], "use_rslora", False):
            peft_model.peft_config[name].use_rslora = False
    # dare_* prune at random; a fixed seed makes the merged model reproducible.
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"combination_type": method} if first.method != "ia3" else {}
    if density is not None and method in USES_DENSITY:
        kwargs["density"] = density
    peft_model.base_model.add_weighted_adapter(names, weights, "combined", **kwargs)
    peft_model.set_adapter("combined")
    for name in names:
        peft_model.delete_adapter(name)
    processor = load_processor(str(first.folder), mc.task)
    head_desc = f"head of `{head_from}`" if head_from else "weighted average of the adapters' heads (weights normalised to sum 1)"
    info = {"action": "merged", "combination": {"method": method, "weights": weight_of, "density": density, "seed": seed},
            "head": head_desc, "head_modules": sorted({k.rsplit(".", 1)[0] for k in head})}
    return Prepared(peft_model.eval(), processor, first.config, first.labels, True, info)


def merge_weights(model: nn.Module, is_adapter: bool) -> nn.Module:
    """Fold the active adapter into the base weights and drop the peft wrappers (plain models pass through)."""
    if not is_adapter:
        return model
    _install_trained_heads(model)
    return model.merge_and_unload()


def _install_trained_heads(model: nn.Module) -> None:
    """Put each trained ``modules_to_save`` copy (head, pooler) in place of its peft wrapper.

    peft's (IA)3 unload copies ``.weight`` from the unwrapped module, which DeBERTa's ContextPooler
    lacks; swapping the trained copies in first gives every method the same, simple path.
    """
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            trained = module.modules_to_save[module.active_adapters[0]]
            setattr(model.get_submodule(parent_name) if parent_name else model, child, trained)


# --------------------------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------------------------


@dataclass
class MergeRequest:
    sources: list[str]
    out: Path
    base: str | None = None
    dtype: str = "fp32"
    tolerance: float | None = None
    verify: bool = True
    weights: list[float] | None = None
    method: str = "linear"
    density: float | None = None
    head_from: str | None = None
    samples: int = VERIFY_SAMPLES
    overwrite: bool = False


def run_merge(req: MergeRequest) -> dict[str, Any]:
    """Merge, save to a temporary folder, verify against the unmerged model, rename into place.

    Returns the report; raises :class:`VerificationFailed` (leaving nothing at ``req.out``) when the
    reloaded model differs from the adapter model by more than the tolerance.
    """
    from peftkit.models import TASKS

    t0 = time.time()
    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"`--out {out}` is a file; give a folder path for the merged model.")
    if out.exists() and any(out.iterdir()) and not req.overwrite:
        raise UserError(f"`--out {out}` already exists and is not empty; pass `--overwrite` or choose another folder.")
    if req.dtype not in DTYPES:
        raise UserError(f"`--dtype {req.dtype}` is not one of {sorted(DTYPES)}.")
    if req.samples < 1:
        raise UserError("`--samples` must be at least 1.")
    tolerance = DEFAULT_TOLERANCE[req.dtype] if req.tolerance is None else req.tolerance
    sources = [read_source(s) for s in req.sources]
    _dedupe_names(sources)
    multi = len(sources) > 1
    if multi:
        weights = req.weights or [1.0 / len(sources)] * len(sources)
        check_compatible(sources, weights, req.method, req.density, req.head_from)
        prepared = prepare_multi(sources, weights, req.method, req.density, req.head_from, req.base)
    else:
        if req.weights or req.head_from:
            raise UserError("`--weights` and `--head-from` combine several adapters; give two or more adapter folders, or drop them.")
        prepared = prepare_single(sources[0], req.base)
    task = prepared.config.model.task
    model_config = getattr(prepared.model, "config", None)
    batches, batch_desc = verification_batches(prepared.config, prepared.processor, model_config, samples=req.samples)
    print(f"[peftkit] {prepared.info['action']}: {', '.join(str(s.folder) for s in sources)} | verifying on {batch_desc}", file=sys.stderr)

    reference = forward_logits(prepared.model, batches)
    quantized = None
    if not multi and sources[0].config.quantization.bits and prepared.is_adapter:
        quantized = _quantized_logits(sources[0], req.base, batches)

    merged = merge_weights(prepared.model, prepared.is_adapter)
    in_memory = compare(reference, forward_logits(merged, batches))
    merged = merged.to(DTYPES[req.dtype])
    if task == "text-classification":
        # The saved tokenizer truncates where training did, also for users of plain transformers.
        prepared.processor.model_max_length = prepared.config.data.max_length

    tmp = checkpoint.begin(out)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        prepared.processor.save_pretrained(tmp)
        del merged
        verification: dict[str, Any] = {"skipped": True}
        if req.verify:
            # A fresh object from disk: catches a lost head, a wrong dtype or a missing file, not just the merge math.
            reloaded = TASKS[task].auto_model.from_pretrained(tmp, dtype=DTYPES[req.dtype], use_safetensors=True)
            reloaded_logits = forward_logits(reloaded, batches)
            verification = {**compare(reference, reloaded_logits), "in_memory_merge": in_memory, "inputs": batch_desc}
            if quantized is not None:
                quantized = {**compare(quantized, reloaded_logits), "bits": sources[0].config.quantization.bits,
                             "meaning": "merged full-precision model vs the quantized model the adapter was trained with"}
        report = {
            "out": str(out), "task": task, "labels": prepared.labels,
            "base": req.base or prepared.config.model.name, "dtype": req.dtype, "tolerance": tolerance,
            "sources": [s.summary() for s in sources], **prepared.info,
            "verification": verification, "quantized_reference": quantized,
            "passed": None if not req.verify else verification["max_abs_diff"] <= tolerance,
            "seconds": round(time.time() - t0, 2),
        }
        if report["passed"] is False:
            raise VerificationFailed(report)
        checkpoint.write_json(tmp / "merge_report.json", report)
        (tmp / "README.md").write_text(model_card(report))
        checkpoint.commit(out)  # replaces an existing --out (with --overwrite) only now, atomically
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


class VerificationFailed(Exception):
    """The reloaded merged model does not answer like the adapter model."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report
        v = report["verification"]
        super().__init__(f"max |logit diff| {v['max_abs_diff']:.3g} > tolerance {report['tolerance']:.3g} "
                         f"(argmax agreement {v['argmax_agreement']:.1%}, merge in memory: {v['in_memory_merge']['max_abs_diff']:.3g})")


def _dedupe_names(sources: list[Source]) -> None:
    seen: dict[str, int] = {}
    for src in sources:
        count = seen.get(src.name, 0)
        seen[src.name] = count + 1
        if count:
            src.name = f"{src.name}_{count + 1}"


def _quantized_logits(src: Source, base: str | None, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Logits of the model as it was trained: the adapter on the 8/4-bit base."""
    trained = artifacts.load_trained(src.folder, quantized=True, base_path=base)
    logits = forward_logits(trained.model, batches)
    del trained
    return logits


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def model_card(report: dict[str, Any]) -> str:
    """README.md of the merged model: base, adapter settings, training metrics, verification numbers."""
    auto = "AutoModelForSequenceClassification" if report["task"] == "text-classification" else "AutoModelForImageClassification"
    proc = "AutoTokenizer" if report["task"] == "text-classification" else "AutoImageProcessor"
    lines = [
        "---", "library_name: transformers", f"pipeline_tag: {report['task']}", f"base_model: {report['base']}", "---", "",
        f"# Merged {report['task']} model", "",
        f"Base model `{report['base']}` with the adapter(s) below merged into its weights ({report['action']}) by `peftkit merge`. "
        f"Saved as {report['dtype']} safetensors; a plain Transformers model (no peft needed).", "",
        f"Labels: {', '.join(f'`{label}`' for label in report['labels'])}", "", "## Adapters", "",
        "| name | method | r | alpha | dropout | trained on | target modules | trained in full |", "|---|---|---|---|---|---|---|---|",
    ]
    for s in report["sources"]:
        quant = f"{s['trained_quantization']}-bit base" if s["trained_quantization"] else "full-precision base"
        lines.append(f"| {s['name']} | {s['method']} | {s['r']} | {s['alpha']} | {s['dropout']} | {quant} | "
                     f"{len(s['target_modules'])} | {', '.join(s['modules_to_save'] or []) or '-'} |")
    if "combination" in report:
        c = report["combination"]
        density = "" if c["density"] is None else f", density {c['density']}"
        lines += ["", f"Combined with peft's `add_weighted_adapter` (`{c['method']}`, weights {c['weights']}{density}). "
                  f"Head ({', '.join(report['head_modules'])}): {report['head']}."]
    lines += ["", "## Training metrics", ""]
    for s in report["sources"]:
        lines.append(f"- {s['name']}: `{json.dumps(s['metrics'])}`")
    v = report["verification"]
    lines += ["", "## Verification", ""]
    if v.get("skipped"):
        lines.append("Skipped (`--no-verify`).")
    else:
        lines += [
            f"The saved folder was reloaded from disk and compared with the unmerged adapter model on {v['inputs']}.", "",
            "| | max abs logit diff | mean abs diff | identical argmax |", "|---|---|---|---|",
            f"| reloaded merged vs adapter model | {v['max_abs_diff']:.3g} | {v['mean_abs_diff']:.3g} | {v['argmax_agreement']:.1%} |",
            f"| in-memory merge vs adapter model | {v['in_memory_merge']['max_abs_diff']:.3g} | {v['in_memory_merge']['mean_abs_diff']:.3g} | "
            f"{v['in_memory_merge']['argmax_agreement']:.1%} |",
        ]
        q = report.get("quantized_reference")
        if q:
            lines.append(f"| reloaded merged vs the {q['bits']}-bit model it was trained as | {q['max_abs_diff']:.3g} | "
                         f"{q['mean_abs_diff']:.3g} | {q['argmax_agreement']:.1%} |")
        lines += ["", f"Tolerance {report['tolerance']:g} (max abs diff): passed."]
        if q:
            lines.append(f"The adapter was trained on {'an' if q['bits'] == 8 else 'a'} {q['bits']}-bit base and merged into the full-precision one; the last row is what the merge costs.")
    lines += ["", "## Use", "", "```python", f"from transformers import {auto}, {proc}",
              f'model = {auto}.from_pretrained("{report["out"]}")', f'processor = {proc}.from_pretrained("{report["out"]}")', "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of ``peftkit merge``."""
    # No abbreviations: a removed option (`--head weighted`) must not silently become another (`--head-from`).
    p = argparse.ArgumentParser(prog="peftkit merge", allow_abbrev=False, description="Merge adapter(s) into the base, save a plain Transformers model, verify it.")
    p.add_argument("sources", nargs="+", help="run directories or model folders (best/, last/); several to combine adapters")
    p.add_argument("--out", required=True, help="output folder (written atomically; nothing is left there if verification fails)")
    p.add_argument("--base", default=None, help="base model folder, when it moved since training (default: the run's model.name)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    p.add_argument("--tolerance", type=float, default=None, help=f"max abs logit difference accepted (default per dtype: {DEFAULT_TOLERANCE})")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True, help="reload and compare with the adapter model")
    p.add_argument("--samples", type=int, default=VERIFY_SAMPLES, help="rows in the verification batch")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per adapter (default: equal)")
    p.add_argument("--method", choices=COMBINATIONS, default="linear", help="peft combination of several LoRA adapters")
    p.add_argument("--density", type=float, default=None, help="share of weights kept by ties/dare/magnitude_prune")
    # The weighted average is the default head and has no flag of its own: a flag that only restates
    # the default is never read, and `--head` would also be argparse's abbreviation of `--head-from`.
    p.add_argument("--head-from", default=None, metavar="NAME",
                   help="use this adapter's head instead of the weighted average of all heads (the default); "
                        "adapter names are the run folder names")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return p.parse_args(argv)


def cli_main(argv: list[str]) -> int:
    """Entry point of ``peftkit merge``; exit 0 verified, 2 user error, 3 verification failed."""
    args = parse_args(argv)
    req = MergeRequest(sources=args.sources, out=Path(args.out), base=args.base, dtype=args.dtype, tolerance=args.tolerance,
                       verify=args.verify, weights=args.weights, method=args.method, density=args.density, head_from=args.head_from,
                       samples=args.samples, overwrite=args.overwrite)
    outcome: dict[str, Any] = {}

    def work() -> None:
        outcome["report"] = run_merge(req)

    try:
        code = guarded(work, debug=args.debug)
    except VerificationFailed as failed:
        print(f"\npeftkit: merge verification FAILED: {failed}. Nothing was written to {args.out}.\n"
              + json.dumps(failed.report["verification"], indent=2), file=sys.stderr)
        return EXIT_VERIFY_FAILED
    if code == 0:
        print(summary_line(outcome["report"]))
    return code


def summary_line(report: dict[str, Any]) -> str:
    """What a user reads after a merge."""
    v, q = report["verification"], report.get("quantized_reference")
    text = f"[peftkit] {report['action']} -> {report['out']} ({report['dtype']})"
    if v.get("skipped"):
        return text + " | verification skipped"
    text += (f" | verified: max |logit diff| {v['max_abs_diff']:.3g} <= {report['tolerance']:g}, "
             f"argmax identical on {v['argmax_agreement']:.1%} of {v['samples']}")
    if q:
        text += f" | vs the {q['bits']}-bit trained model: max diff {q['max_abs_diff']:.3g}, argmax {q['argmax_agreement']:.1%}"
    return text
