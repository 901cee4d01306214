"""Automatic micro-batch: find the largest micro-batch that fits, keep the effective batch.

Accelerate's ``find_executable_batch_size`` halves the batch after each out-of-memory error; peftkit
runs it on a *probe* (one forward and backward on the longest rows, gradients discarded) before
training starts, so no optimizer step is ever taken on a half-finished batch, and then doubles
gradient accumulation for each halving.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, find_executable_batch_size
from torch import nn

from peftkit.errors import UserError


def probe_rows(dataset: Any, collate: Callable, size: int) -> dict[str, torch.Tensor]:
    """The ``size`` longest rows (text) or the first ``size`` rows (images), collated: the worst case."""
    n = min(size, len(dataset))
    if "length" in getattr(dataset, "column_names", []):
        lengths = dataset["length"]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:n]
    else:
        order = list(range(n))
    return collate([dataset[i] for i in order])


def fit_micro_batch(accelerator: Accelerator, model: nn.Module, make_batch: Callable[[int], dict[str, torch.Tensor]],
                    batch_size: int, grad_accum: int) -> tuple[int, int]:
    """(micro-batch, accumulation) with ``micro x accumulation == batch_size x grad_accum``.

    Every process probes without gradient synchronisation, then all take the smallest size found.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UserError("`train.auto_batch: true` does not work under DeepSpeed (its engine steps inside backward); "
                        "set `train.batch_size` and `train.grad_accum` yourself or use DDP.")

    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("`train.auto_batch: true` does not work under FSDP (its ranks communicate inside every forward, so one "
                        "rank's out-of-memory would stall the others); set `train.batch_size` and `train.grad_accum` yourself.")
    current = batch_size

    def halve() -> int:
        # The largest divisor of the configured batch at most half the current size, so
        # micro-batch x accumulation is exactly the configured effective batch.
        nonlocal current
        current = max((d for d in range(1, current // 2 + 1) if batch_size % d == 0), default=0)
        return current

    @find_executable_batch_size(starting_batch_size=batch_size, reduce_batch_size_fn=halve)
    def probe(size: int) -> int:
        batch = {k: v.to(accelerator.device) for k, v in make_batch(size).items()}
        with accelerator.no_sync(model), accelerator.autocast():
            loss = model(**batch).loss
        with accelerator.no_sync(model):
            accelerator.backward(loss)
        model.zero_grad(set_to_none=True)
        return size

    try:
        found = probe()
    except RuntimeError as exc:
        if "reached zero" not in str(exc):
            raise
        raise UserError("`train.auto_batch`: not even a micro-batch of 1 fits in memory. Reduce `data.max_length`, turn on "
                        "`train.gradient_checkpointing`, quantize the base (`quantization.bits`) or use a larger device; "
                        "`peftkit estimate --config ...` shows what takes the memory.") from None
    if accelerator.num_processes > 1:
        t = torch.tensor([found], device=accelerator.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        found = int(t.item())
    return found, grad_accum * (batch_size // found)
