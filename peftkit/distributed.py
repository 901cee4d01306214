"""The Accelerator for this launch, and the topology checks that refuse a broken launch.

Topology (processes, DDP, FSDP, DeepSpeed) is the accelerate config's alone; the peftkit YAML owns
training. Two silent traps are refused here: a launcher that started N processes while Accelerate
sees one (``accelerate launch --cpu --num_processes 2``), and N unsynchronised copies that each
see all the data (``--multi_gpu`` without a process group).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from peftkit.errors import UserError


def make_accelerator(*, precision: str, grad_accum: int, run_dir: str, trackers: list[str]) -> Accelerator:
    """An Accelerator; on CPU the process group uses gloo, so DDP and DeepSpeed work there."""
    kwargs_handlers: list[Any] = []
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.cuda.is_available():
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30)))
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=run_dir, logging_dir=run_dir),
        kwargs_handlers=kwargs_handlers,
    )
    check_world_size(accelerator)
    return accelerator


def check_world_size(accelerator: Accelerator) -> None:
    """Refuse to train when the launcher's world size differs from what Accelerate sees."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UserError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate sees "
            f"{accelerator.num_processes} ({accelerator.distributed_type}). Each process would train alone on all the data. "
            "On CPU launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` "
            "or `--config_file launch/accelerate/cpu_ddp.yaml`; on GPUs check the accelerate config's `num_processes`."
        )


def topology_summary(accelerator: Accelerator, batch_size: int, grad_accum: int) -> str:
    """One line: distributed type, processes, device, and the effective batch."""
    n = accelerator.num_processes
    return (
        f"topology: {accelerator.distributed_type.value.lower()} | processes {n} | device {accelerator.device} | "
        f"precision {accelerator.mixed_precision} | effective batch {batch_size} x {grad_accum} accum x {n} proc = {batch_size * grad_accum * n}"
    )
