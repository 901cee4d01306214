"""``peftkit validate``: the plan of a run without loading a single weight; ``peftkit configs``: the shipped recipes.

``validate`` reads the config, the data and the backbone's ``config.json``, builds the model on the
meta device (shapes only), injects the adapter and prints what training would do: matched modules,
trainable parameters and their share, effective batch, steps, the memory estimate where one is
available, and a few data rows after preprocessing. Every check the real run makes before heavy work
runs here too, so a config that validates fails, if at all, only for lack of memory or time.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.config import CONFIG_DIR, Config, load_config
from peftkit.errors import guarded

# First words of a comment line that is the command running the config, not its description.
COMMAND_WORDS = ("accelerate", "python", "peftkit", "torchrun", "srun", "deepspeed", "$")


@dataclass
class Plan:
    """What ``validate`` found, as printed (kept for tests and for callers that want the numbers)."""

    labels: list[str]
    model_type: str
    target_modules: list[str]
    trained_in_full: list[str]
    trainable: int
    total: int
    train_rows: int
    validation_rows: int
    test_rows: int | None
    processes: int
    effective_batch: int
    steps_per_epoch: int
    total_steps: int
    memory: str | None
    preview: list[str]


def plan(config: Config, *, processes: int = 1, preview_rows: int = 3) -> Plan:
    """Run every pre-flight check of ``config`` and return the plan; reads no weights."""
    from peftkit.adapters import AdapterSpec, count_parameters, inject
    from peftkit.data import infer_labels, prepared_for, splits_for
    from peftkit.loop import plan_steps
    from peftkit.models import (
        _prefers_safetensors,
        architecture_for,
        head_modules,
        load_backbone,
        load_model_config,
        load_processor,
        resolve_name,
    )
    from peftkit.quant import check_quantization

    tc, mc, ac, dc, qc = config.train, config.model, config.adapter, config.data, config.quantization
    splits = splits_for(dc, seed=tc.seed)
    labels = infer_labels(splits.train, dc.label_column, mc.labels)
    model_config = load_model_config(mc.name, revision=mc.revision, trust_remote_code=mc.trust_remote_code)
    arch = architecture_for(model_config.model_type)
    processor = load_processor(mc.name, mc.task, revision=mc.revision, trust_remote_code=mc.trust_remote_code)
    prepared = prepared_for(config, processor=processor, labels=labels, splits=splits, augment=False)
    check_quantization(model_config, qc.bits, tc.precision)

    # Same step arithmetic as the recipe: micro-batches per process, then optimizer steps.
    total_steps, per_epoch = plan_steps(len(prepared.train), batch_size=tc.batch_size, grad_accum=tc.grad_accum,
                                        processes=processes, epochs=tc.epochs, max_steps=tc.max_steps)

    # The real run reads weights only from safetensors; say so now rather than after the data is ready.
    _prefers_safetensors(resolve_name(mc.name))
    # Shapes only: the meta device allocates nothing, so this works for models larger than memory.
    model = load_backbone(mc.name, mc.task, labels, dtype=mc.dtype, revision=mc.revision,
                          trust_remote_code=mc.trust_remote_code, meta=True)
    heads = head_modules(model, arch)  # before injection: peft renames and wraps them
    spec = AdapterSpec.from_section(ac, total_steps)
    model, targets = inject(model, arch, spec)
    trainable, total = count_parameters(model)

    return Plan(
        labels=labels, model_type=model_config.model_type, target_modules=targets.modules, trained_in_full=targets.to_save,
        trainable=trainable, total=total, train_rows=len(prepared.train), validation_rows=len(prepared.validation),
        test_rows=None if prepared.test is None else len(prepared.test), processes=processes,
        effective_batch=tc.batch_size * tc.grad_accum * processes, steps_per_epoch=per_epoch, total_steps=total_steps,
        memory=_memory_estimate(config, processes, model, model_config, heads),
        preview=_preview(prepared.train, mc.task, processor, labels, preview_rows),
    )


def _memory_estimate(config: Config, processes: int, model: Any, model_config: Any, heads: list[str]) -> str | None:
    """The estimator's table (as ``peftkit estimate`` prints it); the dry run never fails because of it.

    Counted from the plan's meta model (adapter injected, ``heads`` found before injection), so the
    model is built once: the same backbone and adapter the estimator would build for itself.
    """
    import torch

    from peftkit import memory

    try:
        facts = memory.facts_of_model(config, model, model_config, heads)
        return str(memory.report(config, processes=processes, device="cuda" if torch.cuda.is_available() else "cpu", facts=facts))
    except Exception as exc:  # an estimate is advice; its failure must not hide the rest of the plan
        return f"unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"


def _preview(ds: Any, task: str, processor: Any, labels: list[str], rows: int) -> list[str]:
    """A few training rows as the model will see them (tokens after truncation, or pixel tensors)."""
    out = []
    for i in range(min(rows, len(ds))):
        row = ds[i]
        label = labels[int(row["labels"])]
        if task == "text-classification":
            ids = list(row["input_ids"])
            tokens = processor.convert_ids_to_tokens(ids)
            shown = " ".join(tokens[:24]) + (" ..." if len(tokens) > 24 else "")
            out.append(f"row {i}: label {label!r} | {len(ids)} tokens | {shown}")
        else:
            pixels = row["pixel_values"]
            out.append(f"row {i}: label {label!r} | pixel_values {tuple(pixels.shape)} "
                       f"(min {float(pixels.min()):.2f}, max {float(pixels.max()):.2f})")
    return out


def format_plan(config: Config, p: Plan, *, max_modules: int = 8) -> str:
    """The plan as the lines ``peftkit validate`` prints."""
    tc, mc, ac, qc = config.train, config.model, config.adapter, config.quantization
    shown = ", ".join(p.target_modules[:max_modules]) + (f", ... ({len(p.target_modules)} in all)" if len(p.target_modules) > max_modules else "")
    lines = [
        f"[peftkit] config OK: model {mc.name} ({p.model_type}) | task {mc.task} | labels {p.labels}",
        f"[peftkit] adapter {ac.method} on {len(p.target_modules)} modules: {shown or '(none: no adapter layers)'}",
        f"[peftkit] trained in full: {p.trained_in_full} | trainable {p.trainable:,} of {p.total:,} "
        f"({100 * p.trainable / max(p.total, 1):.3f}%)" + (f" | base in {qc.bits}-bit" if qc.bits else ""),
        f"[peftkit] data: {p.train_rows} train / {p.validation_rows} validation" + ("" if p.test_rows is None else f" / {p.test_rows} test"),
        f"[peftkit] effective batch {tc.batch_size} x {tc.grad_accum} accum x {p.processes} proc = {p.effective_batch} | "
        f"{p.total_steps} optimizer steps ({p.steps_per_epoch} per epoch) | precision {tc.precision} | lr {tc.lr} ({tc.schedule})",
        ("[peftkit] memory: " + p.memory.replace("\n", "\n[peftkit] ")) if p.memory else "[peftkit] memory estimate: not available",
        f"[peftkit] trust_remote_code: {mc.trust_remote_code} | output.dir: {config.output.dir}",
        "[peftkit] first training rows after preprocessing:",
        *[f"    {line}" for line in p.preview],
        "[peftkit] dry run only: no weights were loaded.",
    ]
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> int:
    """``peftkit validate --config X [dotted.key=value ...] [--processes N] [--debug]``."""
    ap = argparse.ArgumentParser(prog="peftkit validate", description="Dry run: check a config and print the plan without loading weights.")
    ap.add_argument("--config", required=True, help="YAML path, or the name of a shipped config under configs/")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides (they win over the YAML)")
    ap.add_argument("--processes", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                    help="processes the launch will start (for the effective batch and steps; default: WORLD_SIZE or 1)")
    ap.add_argument("--rows", type=int, default=3, help="data rows to preview")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = ap.parse_args(argv)

    def work() -> None:
        config = load_config(args.config, args.overrides)
        print(format_plan(config, plan(config, processes=max(args.processes, 1), preview_rows=args.rows)))

    return guarded(work, debug=args.debug)


# --------------------------------------------------------------------------------------------
# peftkit configs
# --------------------------------------------------------------------------------------------


def describe(path: Path) -> str:
    """One line for a config: its first comment that is not the command running it (else the first comment)."""
    comments = []
    for line in path.read_text(errors="replace").splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break  # only the opening comment block describes the file
        text = stripped.lstrip("#").strip()
        if text:
            comments.append(text)
    # The description may wrap over several comment lines; keep its first sentence.
    prose: list[str] = []
    for text in comments:
        if text.split()[0].lower().startswith(COMMAND_WORDS):
            if prose:
                break
            continue
        prose.append(text)
    if not prose:
        return comments[0] if comments else "(no description)"
    joined = " ".join(prose)
    end = joined.find(". ")
    sentence = joined if end < 0 else joined[: end + 1]
    return sentence if len(sentence) <= 120 else sentence[:117].rstrip() + "..."


def configs_main(argv: list[str] | None = None) -> int:
    """``peftkit configs [--dir DIR]``: the shipped configs, one line each."""
    ap = argparse.ArgumentParser(prog="peftkit configs", description="List the shipped configs.")
    ap.add_argument("--dir", default=str(CONFIG_DIR), help="folder to list (default: the shipped configs/)")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    found = sorted(root.rglob("*.yaml")) if root.is_dir() else []
    if not found:
        print(f"peftkit: no configs found under {root}.", file=sys.stderr)
        return 0
    names = [p.relative_to(root).as_posix() for p in found]
    width = max(len(n) for n in names)
    for name, path in zip(names, found, strict=True):
        print(f"{name:<{width}}  {describe(path)}")
    print(f"\n{len(found)} configs; run one with: peftkit validate --config NAME, then accelerate launch peftkit/train.py --config NAME")
    return 0
