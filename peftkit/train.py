"""The training recipe: config -> model -> data -> optimizer -> loop -> save. Reads top to bottom.

    accelerate launch peftkit/train.py --config lora_deberta.yaml [train.lr=3e-4 ...] [--resume auto]
    python peftkit/train.py --config configs/demo/minilm_lora.yaml
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from peftkit import checkpoint
from peftkit.adapters import METHODS, AdapterSpec, count_parameters, inject
from peftkit.artifacts import RunSaver, load_scheduler_state, load_training_state, read_trainer_state
from peftkit.autobatch import fit_micro_batch, probe_rows
from peftkit.config import Config, dump_config, load_config
from peftkit.data import infer_labels, make_loader, prepared_for, splits_for
from peftkit.distributed import make_accelerator, topology_summary
from peftkit.errors import UserError, guarded
from peftkit.loop import LoopSettings, TrainState, evaluate, fit, plan_steps
from peftkit.memory import peak_memory, print_estimate
from peftkit.models import architecture_for, head_modules, load_backbone, load_model_config, load_processor
from peftkit.optim import make_optimizer, make_scheduler, param_groups, warmup_steps
from peftkit.quant import bnb_config, check_quantization, prepare_for_kbit_training
from peftkit.tracking import FileLog, accelerate_trackers, read_log


def check_run_dir(run_dir: Path, *, resume: str | None, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless asked to resume or overwrite."""
    holds_run = (run_dir / "config.yaml").exists() or (run_dir / "checkpoints").exists()
    if holds_run and not resume and not overwrite:
        raise UserError(f"`output.dir: {run_dir}` already holds a run. Pass `--resume auto` to continue it, "
                        "`--overwrite` to replace it, or choose another `output.dir`.")


def find_resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """``auto``: the newest checkpoint that verifies (None on a fresh run); else the given folder."""
    if resume != "auto":
        path = Path(resume)
        reason = checkpoint.verify_manifest(path)
        if reason:
            raise UserError(f"`--resume {resume}` cannot be used: {reason}.")
        return path
    found, skipped = checkpoint.latest_valid(run_dir / "checkpoints")
    for reason in skipped:
        print(f"[peftkit] skipping a damaged checkpoint: {reason}")
    return found


def choose_resume_checkpoint(accelerator: Accelerator, run_dir: Path, resume: str) -> Path | None:
    """:func:`find_resume_checkpoint` on the main process only; the other processes receive its answer.

    Verifying hashes every file of every candidate checkpoint: done on each of N ranks, the same
    folder is read N times for one answer. Its messages (skipped checkpoints) print once, and a
    refusal is raised on every rank, so none is left waiting for the others.
    """
    choice: list[str | None] = [None, None]  # [chosen folder, refusal message]
    failure: BaseException | None = None
    if accelerator.is_main_process:
        try:
            found = find_resume_checkpoint(run_dir, resume)
            choice[0] = None if found is None else str(found)
        except BaseException as exc:  # the others wait for an answer: a failure (Ctrl-C too) must reach them
            failure = exc
            choice[1] = str(exc) if isinstance(exc, UserError) else f"the main process could not choose a checkpoint ({exc!r})"
    if accelerator.num_processes > 1:
        choice = broadcast_object_list(choice, from_process=0)
    if failure is not None:
        raise failure
    if choice[1] is not None:
        raise UserError(choice[1])
    return None if choice[0] is None else Path(choice[0])


def run(config: Config, *, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train one config; returns the final summary (also written to ``summary.json``)."""
    t_start = time.time()
    tc, mc, ac, dc, qc = config.train, config.model, config.adapter, config.data, config.quantization
    run_dir = Path(config.output.dir)

    # ---- launch and run directory ------------------------------------------------------
    accelerator = make_accelerator(precision=tc.precision, grad_accum=tc.grad_accum, batch_size=tc.batch_size,
                                   max_grad_norm=tc.max_grad_norm, optimizer=tc.optimizer, run_dir=str(run_dir),
                                   trackers=accelerate_trackers(config.output.trackers))
    main = accelerator.is_main_process
    if tc.on_nan == "skip" and tc.grad_accum > 1 and accelerator.distributed_type.value == "DEEPSPEED":
        raise UserError("`train.on_nan: skip` with `train.grad_accum` > 1 does not work under DeepSpeed (a skipped backward "
                        "also skips its micro-step count); use `train.on_nan: stop` or `train.grad_accum: 1` there.")
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    resume_from = choose_resume_checkpoint(accelerator, run_dir, resume) if resume else None
    accelerator.wait_for_everyone()  # every rank has looked at the folder before the main one writes into it
    if main:
        if overwrite and resume_from is None and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text(run_dir / "config.yaml", dump_config(config))
    accelerator.wait_for_everyone()
    set_seed(tc.seed)

    # ---- checks that need only config.json (cheap), then the data; no weights read yet -----------
    model_config = load_model_config(mc.name, revision=mc.revision, trust_remote_code=mc.trust_remote_code)
    arch = architecture_for(model_config.model_type)
    check_quantization(model_config, qc.bits, tc.precision)
    quant = bnb_config(qc.bits, quant_type=qc.quant_type, double_quant=qc.double_quant, compute_dtype=qc.compute_dtype,
                       skip_modules=list(arch.head))
    splits = splits_for(dc, seed=tc.seed)
    labels = infer_labels(splits.train, dc.label_column, mc.labels)
    processor = load_processor(mc.name, mc.task, revision=mc.revision, trust_remote_code=mc.trust_remote_code)
    with accelerator.main_process_first():
        prepared = prepared_for(config, processor=processor, labels=labels, splits=splits)

    # ---- model: backbone (optionally quantized) + new head + adapter ---------------------
    model = load_backbone(mc.name, mc.task, labels, dtype=mc.dtype, revision=mc.revision,
                          trust_remote_code=mc.trust_remote_code, quantization_config=quant)
    if quant is not None:
        model = prepare_for_kbit_training(model, gradient_checkpointing=tc.gradient_checkpointing)
    elif tc.gradient_checkpointing:
        # Non-reentrant: reentrant checkpointing drops gradients to adapters whose inputs do not
        # require grad, and breaks DDP's reducer; inputs are made to require grad as well.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()

    # ---- loaders and step counts ----------------------------------------------------------
    micro, accum = tc.batch_size, tc.grad_accum
    eval_bs = tc.eval_batch_size or tc.batch_size

    def train_loader_for(batch_size: int) -> Any:
        return make_loader(prepared.train, batch_size=batch_size, collate=prepared.collate, shuffle=True,
                           seed=tc.seed, group_by_length=tc.group_by_length)

    def optimizer_steps(batch_size: int, grad_accum: int) -> tuple[int, int]:
        return plan_steps(len(prepared.train), batch_size=batch_size, grad_accum=grad_accum,
                          processes=accelerator.num_processes, epochs=tc.epochs, max_steps=tc.max_steps)

    total_steps, per_epoch = optimizer_steps(micro, accum)
    spec = AdapterSpec.from_section(ac, total_steps)
    heads = head_modules(model, arch)
    model, targets = inject(model, arch, spec)
    trainable, total = count_parameters(model)

    # ---- optimizer, prepare, micro-batch, schedule ------------------------------------------------
    groups = param_groups(model, arch, lr=tc.lr, weight_decay=tc.weight_decay, heads=heads, head_lr=tc.head_lr,
                          layer_decay=tc.layer_decay, num_layers=int(getattr(model_config, "num_hidden_layers", 0) or 0))
    raw_optimizer = make_optimizer(groups, tc.optimizer, tc.lr)
    if tc.compile:
        # After the adapter is in place (compiling first would trace the un-adapted graph); saving
        # unwraps the compiled module through accelerator.unwrap_model.
        model = torch.compile(model)
    eval_loader = make_loader(prepared.validation, batch_size=eval_bs, collate=prepared.collate, shuffle=False)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, raw_optimizer, train_loader_for(micro), eval_loader)
    recorded = read_trainer_state(resume_from) if resume_from is not None else None
    if recorded is not None and recorded.micro_batch:
        micro, accum = recorded.micro_batch, recorded.grad_accum  # a resumed run keeps the batches it had
    elif tc.auto_batch:
        micro, accum = fit_micro_batch(accelerator, model, lambda n: probe_rows(prepared.train, prepared.collate, n), micro, accum)
    if (micro, accum) != (tc.batch_size, tc.grad_accum):
        if main and recorded is None:
            print(f"[peftkit] micro-batch {tc.batch_size} x {tc.grad_accum} accum does not fit; training with "
                  f"{micro} x {accum} accum (same effective batch)")
        accelerator.gradient_accumulation_steps = accum
        train_loader = accelerator.prepare(train_loader_for(micro))
        total_steps, per_epoch = optimizer_steps(micro, accum)
    scheduler = make_scheduler(raw_optimizer, tc.schedule, total_steps=total_steps,
                               warmup=warmup_steps(total_steps, tc.warmup_ratio, tc.warmup_steps))
    # The scheduler is stepped once per optimizer step by the loop (not prepared, which would step it
    # once per process). Checkpoints carry it as JSON (RunSaver), not through
    # accelerator.register_for_checkpointing, whose pickle is loaded with weights_only=False.
    if main and accelerate_trackers(config.output.trackers):
        accelerator.init_trackers("peftkit", config={"lr": tc.lr, "method": ac.method, "batch": tc.batch_size})

    # ---- resume --------------------------------------------------------------------------------
    state = TrainState(micro_batch=micro, grad_accum=accum)
    if resume_from is not None and recorded is not None:
        load_training_state(accelerator, resume_from / "state")
        load_scheduler_state(resume_from, scheduler)
        state = recorded
        state.interrupted = False
        if main:
            _truncate_log(run_dir / "metrics.jsonl", state.step)
            print(f"[peftkit] resumed from {resume_from} at step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})")

    # ---- start-up summary ---------------------------------------------------------------------------
    if main:
        print(f"[peftkit] model {mc.name} ({model_config.model_type}{'' if arch.preset else ', no preset: all encoder linear layers'}) "
              f"| task {mc.task} | labels {labels}")
        print(f"[peftkit] adapter {ac.method} on {len(targets.modules)} modules; trained in full: {targets.to_save} | "
              f"trainable {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"
              + (f" | base in {qc.bits}-bit" if qc.bits else ""))
        print(f"[peftkit] {topology_summary(accelerator, micro, accum)}")
        print(f"[peftkit] data: {len(prepared.train)} train / {len(prepared.validation)} validation"
              f"{'' if prepared.test is None else f' / {len(prepared.test)} test'} | {total_steps} optimizer steps "
              f"({per_epoch} per epoch) | lr {tc.lr} ({tc.schedule}, head {tc.head_lr or tc.lr}, layer decay {tc.layer_decay})")
        print_estimate(config, processes=accelerator.num_processes, device=accelerator.device.type, num_labels=len(labels))

    # ---- train ----------------------------------------------------------------------------------------
    saver = RunSaver(accelerator, model, run_dir, processor=processor, config=config, labels=labels, keep=config.output.keep_checkpoints,
                     scheduler=scheduler)
    settings = LoopSettings(total_steps=total_steps, max_grad_norm=tc.max_grad_norm, eval_every=tc.eval_every,
                            metric_for_best=tc.metric_for_best, early_stopping_patience=tc.early_stopping_patience,
                            log_every=tc.log_every, on_nan=tc.on_nan)
    state = fit(accelerator, model, optimizer, scheduler, train_loader, eval_loader, settings, saver,
                FileLog(run_dir, config.output.trackers, enabled=main), state, after_step=METHODS[ac.method].after_backward)

    # ---- save and report -----------------------------------------------------------------------------
    if state.interrupted:
        saver.save_model("last", {"step": state.step, "validation": state.last_eval, "interrupted": True})
        if main:
            print(f"[peftkit] stopped by a signal at step {state.step}; a checkpoint was saved. Resume with: "
                  f"accelerate launch peftkit/train.py --config {run_dir / 'config.yaml'} --resume auto")
        accelerator.end_training()
        return {"interrupted": True, "step": state.step}
    test_metrics = None
    if prepared.test is not None:
        test_loader = accelerator.prepare(make_loader(prepared.test, batch_size=eval_bs, collate=prepared.collate, shuffle=False))
        test_metrics = evaluate(model, test_loader, accelerator)
    summary = {
        "best_metric": tc.metric_for_best, "best_value": state.best_metric, "best_step": state.best_step,
        "final_step": state.step, "stopped_early": state.stopped_early, "final_validation": state.last_eval,
        "test_of_final_model": test_metrics, "train_seconds": round(state.train_seconds, 2),
        "wall_seconds": round(time.time() - t_start, 2), "samples_seen": state.samples_seen,
        "trainable_parameters": trainable, "total_parameters": total, "peak_memory": peak_memory(accelerator.device),
        "best_dir": str(run_dir / "best"), "last_dir": str(run_dir / "last"),
    }
    saver.save_model("last", {"step": state.step, "validation": state.last_eval, "test": test_metrics})
    if main:
        checkpoint.write_json(run_dir / "summary.json", summary)
        print(format_summary(summary))
    accelerator.end_training()
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The final table a user reads at the end of a run."""
    rows = [
        (f"best validation {s['best_metric']}", f"{s['best_value']:.4f} at step {s['best_step']}"),
        ("final validation accuracy", f"{s['final_validation'].get('accuracy', float('nan')):.4f}"),
    ]
    if s["test_of_final_model"]:
        rows.append(("test accuracy / macro-F1", f"{s['test_of_final_model']['accuracy']:.4f} / {s['test_of_final_model']['f1_macro']:.4f}"))
    rows += [
        ("steps", f"{s['final_step']}{' (early stop)' if s['stopped_early'] else ''}"),
        ("train time", f"{s['train_seconds']:.1f} s ({s['samples_seen'] / max(s['train_seconds'], 1e-9):.1f} samples/s)"),
        ("peak memory", f"{s['peak_memory']['bytes'] / 2**20:.0f} MiB ({s['peak_memory']['method']})"),
        ("best adapter", s["best_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "=" * (width + 40)] + [f"{k:<{width}}  {v}" for k, v in rows] + ["=" * (width + 40)])


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows newer than the resumed step, so the resumed run does not log them twice."""
    rows = [r for r in read_log(path) if r.get("step", 0) <= step]
    checkpoint.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``--config NAME [dotted.key=value ...] [--resume auto|PATH] [--overwrite] [--debug]``."""
    p = argparse.ArgumentParser(prog="peftkit train", description="Fine-tune from one YAML config.")
    p.add_argument("--config", required=True, help="YAML path, or the name of a shipped config under configs/")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides (they win over the YAML)")
    p.add_argument("--resume", default=None, help="`auto` (newest valid checkpoint in output.dir) or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in output.dir")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``peftkit train`` and ``python peftkit/train.py``."""
    args = parse_args(argv)
    return guarded(lambda: run(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
