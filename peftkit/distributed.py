"""The Accelerator for this launch, the DeepSpeed config it runs with, and the checks that refuse a broken launch.

Precedence: the accelerate config (``launch/accelerate/*.yaml``, or ``accelerate launch`` flags) owns
the topology: processes, machines, DDP/FSDP/DeepSpeed, ZeRO stage, offload. The peftkit YAML owns
training: batch size, accumulation, clipping, precision, optimizer. A DeepSpeed JSON writes
``"auto"`` for the training values and peftkit fills them in, so the two can never disagree; an
explicit value that differs is an error naming both.

Silent traps refused here: a launcher that started N processes while Accelerate sees one
(``accelerate launch --cpu --num_processes 2``); N unsynchronised copies that each see all the
data (``--multi_gpu`` without a process group); an FSDP or DeepSpeed launch that Accelerate
quietly turned into plain data parallelism.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

from peftkit.errors import UserError

DS_CONFIG_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"

# Engines an accelerate config asks for (through the launcher's environment) and the type
# Accelerate must end up with; anything else means the request was silently dropped.
REQUESTED_ENGINES = {
    "ACCELERATE_USE_DEEPSPEED": DistributedType.DEEPSPEED,
    "ACCELERATE_USE_FSDP": DistributedType.FSDP,
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(*, precision: str, grad_accum: int, batch_size: int, max_grad_norm: float | None, optimizer: str,
                     run_dir: str, trackers: list[str]) -> Accelerator:
    """The Accelerator for this launch; refuses launches whose processes would not train together.

    On a machine without CUDA the process group uses gloo and Accelerate runs in CPU mode, so
    ``accelerate launch --multi_gpu`` and DeepSpeed both work there.
    """
    check_launch_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = not torch.cuda.is_available()
    deepspeed = _flag("ACCELERATE_USE_DEEPSPEED")
    if deepspeed:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(
                "The accelerate config asks for DeepSpeed (`distributed_type: DEEPSPEED`), but deepspeed is not installed. "
                "Install it with `pip install 'peftkit[deepspeed]'`, or launch with an accelerate config without DeepSpeed."
            )
    if on_cpu and _flag("ACCELERATE_USE_FSDP"):
        raise UserError(
            "The accelerate config asks for FSDP (`distributed_type: FSDP`), but there is no CUDA device and Accelerate "
            "runs FSDP on GPUs only (on CPU it would silently fall back to plain data parallelism). On CPU launch with "
            "`launch/accelerate/cpu_ddp.yaml`, or shard with DeepSpeed ZeRO-3 (`launch/accelerate/deepspeed_zero3.yaml`)."
        )
    if on_cpu and deepspeed:
        # Accelerate's CPU mode switches DeepSpeed off; DeepSpeed picks its own CPU accelerator.
        os.environ.pop("ACCELERATE_USE_CPU", None)
    kwargs_handlers: list[Any] = []
    if world > 1:
        # 30 minutes for every collective (NCCL's default is 10): the other ranks wait in a broadcast
        # while the main process verifies checkpoints on resume, and at barriers while it saves.
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo" if on_cpu else None, timeout=timedelta(minutes=30)))
    plugin = None
    if deepspeed and os.environ.get(DS_CONFIG_ENV, "none") != "none":
        from accelerate.utils import DeepSpeedPlugin

        path = os.environ[DS_CONFIG_ENV]
        filled = fill_deepspeed_config(read_deepspeed_json(path), source=path, batch_size=batch_size, grad_accum=grad_accum,
                                       world_size=world, max_grad_norm=max_grad_norm, precision=precision, optimizer=optimizer)
        plugin = DeepSpeedPlugin(hf_ds_config=filled)
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher_precision not in ("no", precision) and int(os.environ.get("RANK", "0")) == 0:
        print(f"[peftkit] the launch config asks for mixed_precision {launcher_precision}; the training config's "
              f"`train.precision: {precision}` wins (the launch config owns topology only).")
    if world == 1:
        # Several runs in one process (tests, notebooks) may differ in precision; Accelerate's state
        # is a process-wide singleton, so a single-process run starts it afresh.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        cpu=on_cpu and not deepspeed,
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum,
        deepspeed_plugin=plugin,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=run_dir, logging_dir=run_dir),
        kwargs_handlers=kwargs_handlers,
    )
    check_world_size(accelerator, requested=launcher_requested_processes())
    check_engine(accelerator)
    return accelerator


def check_launch_env() -> None:
    """Refuse a ``WORLD_SIZE`` above 1 that no launcher set up (no rank for this process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ranked = any(k in os.environ for k in ("RANK", "LOCAL_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"))
    if world > 1 and not ranked:
        raise UserError(
            f"WORLD_SIZE={world} is set in the environment, but no launcher started the other ranks (RANK and LOCAL_RANK "
            "are unset), so this process would wait for peers that never come. Unset WORLD_SIZE, or start the processes "
            "with `accelerate launch --config_file launch/accelerate/<topology>.yaml` (or torchrun)."
        )


def check_world_size(accelerator: Accelerator, requested: int | None = None) -> None:
    """Refuse to train when the launcher's process count differs from what Accelerate sees.

    ``requested`` is what the user asked the launcher for (see :func:`launcher_requested_processes`);
    ``WORLD_SIZE`` is what the launcher actually started.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    seen = accelerator.num_processes
    if launched != seen:
        raise UserError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate sees {seen} "
            f"({accelerator.distributed_type.value}): each process would train alone on all the data. "
            "On CPU launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` "
            "or `--config_file launch/accelerate/cpu_ddp.yaml`; on GPUs check the accelerate config's `num_processes`."
        )
    if requested is not None and requested != seen:
        raise UserError(
            f"`accelerate launch` was asked for {requested} processes but started {seen} "
            f"({accelerator.distributed_type.value}). `--cpu --num_processes N` starts ONE process silently. "
            "On CPU launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` "
            "or `--config_file launch/accelerate/cpu_ddp.yaml`."
        )


def check_engine(accelerator: Accelerator) -> None:
    """Refuse a run where the engine the accelerate config asked for (FSDP, DeepSpeed) was dropped."""
    for env, wanted in REQUESTED_ENGINES.items():
        if _flag(env) and accelerator.distributed_type != wanted:
            raise UserError(
                f"The accelerate config asks for {wanted.value} ({env}=true), but Accelerate runs "
                f"{accelerator.distributed_type.value}; training would proceed without it. "
                "Check the accelerate config's `distributed_type` and that the engine is installed and supported on this device."
            )


def launcher_requested_processes() -> int | None:
    """How many processes the parent ``accelerate launch`` was asked for, or None when unknown.

    Read from the parent's command line (Linux ``/proc``), because ``accelerate launch --cpu
    --num_processes 2`` starts one process without telling it that two were asked for.
    """
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return requested_processes_from_argv([a.decode(errors="replace") for a in raw.split(b"\0") if a])


def requested_processes_from_argv(argv: list[str]) -> int | None:
    """The process count in an ``accelerate launch`` command line (flags, else its ``--config_file``)."""
    rest = None
    for i, arg in enumerate(argv):
        name = Path(arg).name
        if name == "accelerate" and i + 1 < len(argv) and argv[i + 1] == "launch":
            rest = argv[i + 2:]
        elif name == "accelerate-launch" or arg == "accelerate.commands.launch":
            rest = argv[i + 1:]
        if rest is not None:
            break
    if rest is None:
        return None
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        args = launch_command_parser().parse_args(rest)
        if args.num_processes is not None:
            return int(args.num_processes)
        if args.config_file:
            n = load_config_from_file(args.config_file).num_processes
            return n if n and n > 0 else None
    except (SystemExit, Exception):  # an unparsable parent command line is not ours to judge
        return None
    return None


# ---- DeepSpeed: the JSON's "auto" values come from the training config ----------------------------


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON as a dict, with a clear error for a missing or malformed file."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"DeepSpeed config `{path}` (the accelerate config's `deepspeed_config_file`) cannot be read: "
                        f"{exc.strerror}. Paths are relative to the folder you launch from.") from None
    except ValueError as exc:
        raise UserError(f"DeepSpeed config `{path}` is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise UserError(f"DeepSpeed config `{path}` must be a JSON object.")
    return data


def _owned_values(*, batch_size: int, grad_accum: int, world_size: int, max_grad_norm: float | None,
                  precision: str) -> dict[str, tuple[Any, str]]:
    """DeepSpeed key -> (value from the training config, the training key(s) it comes from)."""
    return {
        "train_micro_batch_size_per_gpu": (batch_size, f"train.batch_size: {batch_size}"),
        "gradient_accumulation_steps": (grad_accum, f"train.grad_accum: {grad_accum}"),
        "train_batch_size": (batch_size * grad_accum * world_size,
                             f"train.batch_size x train.grad_accum x processes = {batch_size} x {grad_accum} x {world_size}"),
        # DeepSpeed clips inside its step (Accelerate's clip_grad_norm_ is a no-op under it); 0 = off.
        "gradient_clipping": (float(max_grad_norm or 0.0), f"train.max_grad_norm: {max_grad_norm}"),
        "bf16.enabled": (precision == "bf16", f"train.precision: {precision}"),
        "fp16.enabled": (precision == "fp16", f"train.precision: {precision}"),
    }


def _node(config: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    """The dict holding ``dotted``'s last part (created on the way) and that part."""
    *parents, leaf = dotted.split(".")
    node: Any = config
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    return node, leaf


def fill_deepspeed_config(raw: dict[str, Any], *, source: str, batch_size: int, grad_accum: int, world_size: int,
                          max_grad_norm: float | None, precision: str, optimizer: str = "adamw",
                          hidden_size: int | None = None) -> dict[str, Any]:
    """A copy of a DeepSpeed config with every training-owned ``"auto"`` filled from the training config.

    An explicit value that disagrees with the training config raises :class:`UserError` naming both.
    ``hidden_size`` also fills the bucket-size autos (Accelerate fills them from the model otherwise).
    """
    config = json.loads(json.dumps(raw))
    for section, owner in (("optimizer", f"train.optimizer: {optimizer}"), ("scheduler", "train.schedule")):
        if section in config:
            raise UserError(
                f"DeepSpeed config `{source}` has an `{section}` section, but the training config owns it (`{owner}`, with "
                "per-group learning rates for the head and layer decay that a DeepSpeed section cannot express). "
                f"Remove `{section}` from {source}; under ZeRO offload Accelerate swaps AdamW for DeepSpeed's CPU Adam itself."
            )
    for key, (value, owner) in _owned_values(batch_size=batch_size, grad_accum=grad_accum, world_size=world_size,
                                             max_grad_norm=max_grad_norm, precision=precision).items():
        # A missing key counts as "auto": DeepSpeed's own default (e.g. no clipping) would silently differ.
        node, leaf = _node(config, key)
        current = node.get(leaf, "auto")
        if current == "auto":
            node[leaf] = value
        elif (float(current) != float(value)) if isinstance(value, float) else (current != value):
            raise UserError(
                f"DeepSpeed config `{source}` sets `{key}: {json.dumps(current)}` but the training config has {owner}. "
                f"Set `{key}` to \"auto\" in {source} (peftkit then fills it from the training config), or change the training config."
            )
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # Saving gathers the sharded adapter and head through the engine; without this flag ZeRO-3
        # can only write the local shard (the "empty adapter" trap).
        gather = "stage3_gather_16bit_weights_on_model_save"
        if zero.get(gather, "auto") == "auto":
            zero[gather] = True
        elif zero[gather] is not True:
            raise UserError(f"DeepSpeed config `{source}` sets `zero_optimization.{gather}: false`; under ZeRO-3 peftkit needs it "
                            "true to save the complete adapter and head. Set it to true or \"auto\".")
    if hidden_size is not None:
        buckets = {"reduce_bucket_size": hidden_size * hidden_size, "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                   "stage3_param_persistence_threshold": 10 * hidden_size}
        for key, value in buckets.items():
            if zero.get(key) == "auto":
                zero[key] = value
    return config


def deepspeed_summary(accelerator: Accelerator) -> str:
    """ZeRO stage and offload targets of a DeepSpeed run ("" otherwise)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return ""
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    offload = [f"{k.split('_')[1]}->{v.get('device')}" for k in ("offload_optimizer", "offload_param")
               if isinstance(v := zero.get(k), dict) and v.get("device", "none") != "none"]
    source = os.environ.get(DS_CONFIG_ENV, "accelerate config")
    return f" | ZeRO-{zero.get('stage', 0)}{' offload ' + ', '.join(offload) if offload else ''} ({source})"


def topology_summary(accelerator: Accelerator, batch_size: int, grad_accum: int) -> str:
    """One line: distributed type, processes, device, precision, and the effective batch."""
    n = accelerator.num_processes
    backend = f" ({accelerator.state.backend})" if n > 1 and accelerator.state.backend else ""
    return (
        f"topology: {accelerator.distributed_type.value.lower()}{backend}{deepspeed_summary(accelerator)} | processes {n} | "
        f"device {accelerator.device} | precision {accelerator.mixed_precision} | "
        f"effective batch {batch_size} x {grad_accum} accum x {n} proc = {batch_size * grad_accum * n}"
    )
