"""The Accelerate training loop: accumulate, clip, evaluate, checkpoint, resume, stop early, log.

The loop knows nothing about models or adapters; it calls back into a :class:`Checkpointer`
to save, so the same loop serves every adapter method and every launch topology.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from peftkit.errors import UserError
from peftkit.tracking import FileLog


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite."""


@dataclass
class LoopSettings:
    """The flat settings the loop needs (from the ``train:`` section and the data)."""

    total_steps: int
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # optimizer steps; None = each epoch
    metric_for_best: str = "accuracy"
    early_stopping_patience: int | None = None
    log_every: int = 10
    on_nan: str = "stop"


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler/RNG that a resume must restore."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    interrupted: bool = False
    samples_seen: int = 0
    train_seconds: float = 0.0
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_step: int = -1
    micro_batch: int = 0  # the micro-batch and accumulation the run trains with (auto_batch may change them)
    grad_accum: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Checkpointer(Protocol):
    def save_step(self, state: TrainState) -> None: ...
    def save_best(self, state: TrainState, metrics: dict[str, float]) -> None: ...


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 over every class (also one absent from this data, as `peftkit eval` counts it).

    Computed with numpy rather than scikit-learn (whose metrics equal these, tested): importing
    ``sklearn.metrics`` adds 37 MiB to every training process, which showed as a higher peak than
    the Trainer baseline's on small models (benchmarks/README.md). Per class, F1 = 2TP / (2TP + FP +
    FN), and 0 where that is 0/0 (scikit-learn's ``zero_division=0``).
    """
    preds, labels = logits.argmax(-1), np.asarray(labels, dtype=np.int64)
    n = logits.shape[-1]
    known = (labels >= 0) & (labels < n)  # a label outside the head's classes counts as a miss, not a class
    tp = np.bincount(labels[known & (preds == labels)], minlength=n)
    denominator = np.bincount(preds, minlength=n)[:n] + np.bincount(labels[known], minlength=n)  # 2TP + FP + FN
    f1 = np.divide(2 * tp, denominator, out=np.zeros(n), where=denominator > 0)
    return {"accuracy": float((preds == labels).mean()) if len(labels) else 0.0, "f1_macro": float(f1.mean())}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, accelerator: Accelerator) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over the whole loader, gathered across processes."""
    was_training = model.training
    model.eval()
    losses, all_logits, all_labels = [], [], []
    for batch in loader:
        out = model(**batch)
        logits, labels = accelerator.gather_for_metrics((out.logits.float(), batch["labels"]))
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        losses.append(loss.item())
        all_logits.append(logits.cpu().numpy())
        all_labels.append(labels.cpu().numpy())
    if was_training:
        model.train()
    logits_np, labels_np = np.concatenate(all_logits), np.concatenate(all_labels)
    metrics = classification_metrics(logits_np, labels_np)
    metrics["loss"] = float(sum(losses) / max(len(labels_np), 1))
    metrics["samples"] = len(labels_np)
    return metrics


def _better(new: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return new < best if metric == "loss" else new > best


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step and exits cleanly."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _batches(loader: Any) -> Any:
    """The loader's batches, fetched without touching the global torch RNG.

    Starting a DataLoader iterator draws a seed from the global RNG, and a resumed run starts one
    more (the skip-ahead loader) than the uninterrupted run did; on CPU, where dropout draws from the
    same RNG, the resumed run's dropout masks would then differ from the uninterrupted run's.
    """
    with torch.random.fork_rng(devices=[]):
        it = iter(loader)
    while True:
        with torch.random.fork_rng(devices=[]):
            try:
                batch = next(it)
            except StopIteration:
                return
        yield batch


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when it is true on any (so all take the same branch)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _mean_over_processes(accelerator: Accelerator, total: float, count: int) -> float:
    """The mean of per-micro-batch losses over every process (collective), not the main process's shard alone."""
    if accelerator.num_processes == 1:
        return total / max(count, 1)
    t = accelerator.reduce(torch.tensor([total, float(count)], device=accelerator.device), reduction="sum")
    return float(t[0] / max(t[1].item(), 1.0))


def fit(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    train_loader: Any,
    eval_loader: Any,
    settings: LoopSettings,
    checkpointer: Checkpointer,
    log: FileLog,
    state: TrainState | None = None,
    after_step: Callable[[nn.Module, int], None] | None = None,
) -> TrainState:
    """Train until ``settings.total_steps`` optimizer steps, early stop or a stop signal."""
    state = state or TrainState()
    s = settings
    main = accelerator.is_main_process
    bar = tqdm(total=s.total_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    running_loss, running_n, window_start, window_samples = 0.0, 0, time.perf_counter(), 0
    model.train()

    paused = 0.0  # seconds spent evaluating and checkpointing: not training time

    def run_eval_and_save() -> None:
        nonlocal paused, window_start
        started = time.perf_counter()
        metrics = evaluate(model, eval_loader, accelerator)
        state.last_eval, state.last_eval_step = metrics, state.step
        value = metrics[s.metric_for_best]
        if _better(value, state.best_metric, s.metric_for_best):
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
            checkpointer.save_best(state, metrics)
        else:
            state.evals_without_improvement += 1
        row = {"step": state.step, "epoch": state.epoch, **{f"eval_{k}": v for k, v in metrics.items()}}
        if main:
            log.log(row)
            tqdm.write(f"[eval] step {state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "samples")
                       + f" (best {s.metric_for_best}={state.best_metric:.4f} at step {state.best_step})")
        accelerator.log(row, step=state.step)
        if s.early_stopping_patience and state.evals_without_improvement >= s.early_stopping_patience:
            state.stopped_early = True
        checkpointer.save_step(state)
        spent = time.perf_counter() - started
        paused += spent
        window_start += spent  # the logged samples/s measures training only

    with StopSignal() as stop:
        t0 = time.perf_counter()
        while state.step < s.total_steps and not state.stopped_early:
            loader = train_loader
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(state.epoch)
            if state.batches_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            for batch in _batches(loader):
                with accelerator.accumulate(model):
                    out = model(**batch)
                    loss = out.loss
                    bad = _any_process(accelerator, not torch.isfinite(loss.detach()).all().item())
                    if bad and s.on_nan == "stop":
                        raise NonFiniteLoss(
                            f"The training loss became {loss.item()} at step {state.step + 1} (epoch {state.epoch}). "
                            "Likely causes: a learning rate too high (lower `train.lr`), or fp16 overflow "
                            "(DeBERTa-v3 overflows in fp16: use `train.precision: bf16`). The last good checkpoint is kept; "
                            "set `train.on_nan: skip` to skip such steps instead."
                        )
                    if not bad:
                        accelerator.backward(loss)
                    if accelerator.sync_gradients and s.max_grad_norm and not bad:
                        accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                    if not bad:
                        optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    if accelerator.sync_gradients and after_step is not None and not bad:
                        after_step(accelerator.unwrap_model(model), state.step)
                    optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += 1
                batch_size = int(batch["labels"].shape[0]) * accelerator.num_processes
                state.samples_seen += batch_size
                window_samples += batch_size
                if not bad:
                    running_loss += loss.detach().float().item()
                    running_n += 1
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                bar.update(1)
                if bad and main:
                    tqdm.write(f"[peftkit] non-finite loss at step {state.step}: step skipped (train.on_nan: skip)")
                    log.log({"step": state.step, "skipped_nonfinite": 1})
                # A window of only skipped (non-finite) steps has no loss to report; it carries over.
                if (state.step % s.log_every == 0 or state.step == s.total_steps) and running_n:
                    elapsed = time.perf_counter() - window_start
                    row = {"step": state.step, "epoch": state.epoch, "loss": _mean_over_processes(accelerator, running_loss, running_n),
                           "lr": scheduler.get_last_lr()[0], "samples_per_s": window_samples / max(elapsed, 1e-9)}
                    if main:
                        log.log(row)
                    accelerator.log(row, step=state.step)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    running_loss, running_n, window_start, window_samples = 0.0, 0, time.perf_counter(), 0
                if s.eval_every and state.step % s.eval_every == 0:
                    run_eval_and_save()
                if _any_process(accelerator, stop.received is not None):
                    state.interrupted = True
                    checkpointer.save_step(state)
                    break
                if state.step >= s.total_steps or state.stopped_early:
                    break
            else:
                # The epoch ran to its end.
                state.epoch += 1
                state.batches_in_epoch = 0
                if not s.eval_every:
                    run_eval_and_save()
                continue
            break
        state.train_seconds += time.perf_counter() - t0 - paused
        if not state.interrupted and state.last_eval_step != state.step:
            run_eval_and_save()  # max_steps ended mid-epoch: the final weights get evaluated too
    bar.close()
    return state


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over ``num_batches`` micro-batches (the last partial group steps too)."""
    return max(math.ceil(num_batches / grad_accum), 1)


def plan_steps(rows: int, *, batch_size: int, grad_accum: int, processes: int, epochs: float,
               max_steps: int | None) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch): micro-batches per process, grouped by accumulation."""
    per_process_batches = math.ceil(math.ceil(rows / batch_size) / processes)
    per_epoch = steps_per_epoch(per_process_batches, grad_accum)
    return max_steps or max(math.ceil(per_epoch * epochs), 1), per_epoch
