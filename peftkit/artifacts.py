"""What a run writes and reads back: model folders (``best/``, ``last/``) and step checkpoints.

A model folder holds the adapter with the trained head and pooler (or the whole model for
``full``/``freeze``), the tokenizer or image processor, ``labels.json``, the resolved
``config.yaml`` and ``metrics.json``; everything else (merge, predict, eval) starts from one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from peftkit import checkpoint
from peftkit.config import Config, dump_config, read_yaml, validate_config
from peftkit.errors import UserError
from peftkit.loop import TrainState

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SCHEDULER_FILE = "scheduler.json"


def save_model_folder(accelerator: Accelerator, model: nn.Module, target: Path, *, processor: Any, config: Config,
                      labels: list[str], metrics: dict[str, Any]) -> None:
    """Write a complete model folder atomically; collective (every process must call it)."""
    # Gathers the full weights under ZeRO-3/FSDP, so the adapter and head are complete, not a shard.
    module, state_dict = gathered(accelerator, model)
    if accelerator.is_main_process:
        tmp = checkpoint.begin(target)
        write_model_contents(module, tmp, state_dict=state_dict, processor=processor,
                             config=config, labels=labels, metrics=metrics)
        checkpoint.commit(target)
    accelerator.wait_for_everyone()


def gathered(accelerator: Accelerator, model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The plain model (no DDP, DeepSpeed or torch.compile wrapper) and its full state dict.

    Collective: under ZeRO-3/FSDP the weights are gathered, so the adapter and head are complete,
    not a shard. A compiled model's keys lose the ``_orig_mod.`` prefix the wrapper adds.
    """
    state_dict = accelerator.get_state_dict(model)
    if state_dict is not None:
        state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    return accelerator.unwrap_model(model, keep_torch_compile=False), state_dict


def write_model_contents(model: nn.Module, folder: Path, *, state_dict: dict[str, torch.Tensor] | None, processor: Any,
                         config: Config, labels: list[str], metrics: dict[str, Any]) -> None:
    """The files of a model folder, written into ``folder`` (no atomicity: callers provide it)."""
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(folder)
    (folder / "config.yaml").write_text(dump_config(config))
    checkpoint.write_json(folder / "labels.json", labels)
    checkpoint.write_json(folder / "metrics.json", metrics)


class RunSaver:
    """The loop's :class:`~peftkit.loop.Checkpointer`: ``best/`` and atomic ``checkpoints/step-N``."""

    def __init__(self, accelerator: Accelerator, model: nn.Module, run_dir: Path, *, processor: Any, config: Config,
                 labels: list[str], keep: int, scheduler: Any = None) -> None:
        self.accelerator, self.model, self.run_dir = accelerator, model, run_dir
        self.processor, self.config, self.labels, self.keep = processor, config, labels, keep
        self.scheduler = scheduler
        # Step checkpoints keep only what changes: a LoRA run's frozen backbone is `model.name`
        # already, and writing it at every checkpoint costs hundreds of MB and a memory spike.
        accelerator.register_save_state_pre_hook(_keep_trainable_weights)

    def save_best(self, state: TrainState, metrics: dict[str, float]) -> None:
        save_model_folder(self.accelerator, self.model, self.run_dir / "best", processor=self.processor,
                          config=self.config, labels=self.labels, metrics={"step": state.step, "validation": metrics})

    def save_model(self, name: str, metrics: dict[str, Any]) -> None:
        save_model_folder(self.accelerator, self.model, self.run_dir / name, processor=self.processor,
                          config=self.config, labels=self.labels, metrics=metrics)

    def save_step(self, state: TrainState) -> None:
        """Model, optimizer, scheduler, RNG and loop state; sealed with a manifest, then renamed."""
        acc = self.accelerator
        root = self.run_dir / "checkpoints"
        target = root / f"step-{state.step:07d}"
        if acc.is_main_process:
            checkpoint.begin(target)
        acc.wait_for_everyone()
        tmp = checkpoint.temp_dir_for(target)
        acc.save_state(str(tmp / "state"))
        acc.wait_for_everyone()  # every rank's RNG file is written before the folder is sealed
        module, state_dict = gathered(acc, self.model)
        if acc.is_main_process:
            write_model_contents(module, tmp / "model", state_dict=state_dict, processor=self.processor,
                                 config=self.config, labels=self.labels, metrics={"step": state.step, "validation": state.last_eval})
            checkpoint.write_json(tmp / "trainer_state.json", state.to_dict())
            if self.scheduler is not None:
                # JSON, not accelerate's register_for_checkpointing: that pickles the state and
                # unpickles it with weights_only=False on resume.
                checkpoint.write_json(tmp / SCHEDULER_FILE, self.scheduler.state_dict())
            checkpoint.commit(target)
            checkpoint.prune(root, self.keep)
        acc.wait_for_everyone()


def _keep_trainable_weights(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """Accelerate save hook: drop frozen parameters from the saved model state (buffers are kept).

    ``weights`` holds the state dicts of plain and DDP models only; DeepSpeed and FSDP save their own.
    """
    for model, state in zip(models, weights, strict=False):
        keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
        for key in [k for k in state if k not in keep]:
            del state[key]


def load_training_state(accelerator: Accelerator, folder: Path) -> None:
    """Restore model, optimizer and RNG from ``folder``; frozen weights come from the base model itself."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        accelerator.load_state(str(folder))
    else:
        accelerator.load_state(str(folder), strict=False)


def read_trainer_state(ckpt: Path) -> TrainState:
    """The loop state saved in a step checkpoint."""
    from dataclasses import fields

    data = json.loads((ckpt / "trainer_state.json").read_text())
    known = {f.name for f in fields(TrainState)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{ckpt / 'trainer_state.json'} has keys {unknown} this peftkit does not know: the checkpoint was written "
                        "by another version. Resume with that version, or start a new run.")
    return TrainState(**data)


def load_scheduler_state(ckpt: Path, scheduler: Any) -> None:
    """Restore the LR schedule saved as JSON in a step checkpoint."""
    path = ckpt / SCHEDULER_FILE
    if not path.is_file():
        raise UserError(f"{ckpt} has no {SCHEDULER_FILE} (written by an older peftkit, which pickled the schedule); "
                        "resume from a newer checkpoint or start the run again with `--overwrite`.")
    scheduler.load_state_dict(json.loads(path.read_text()))


@dataclass
class Trained:
    """A model folder loaded back: the model (adapter applied, or a plain model), its processor and config."""

    model: nn.Module
    processor: Any
    config: Config
    labels: list[str]
    is_adapter: bool


def model_folder(path: Path) -> Path:
    """Accept a model folder, a run directory (uses ``best/``) or a step checkpoint (uses ``model/``)."""
    for candidate in (path, path / "best", path / "model", path / "last"):
        if (candidate / "config.yaml").is_file() and (candidate / "labels.json").is_file():
            return candidate
    raise UserError(f"{path} is not a peftkit run or model folder (no config.yaml and labels.json in it, its best/ or model/).")


@dataclass
class ModelFolder:
    """A model folder's settings, read and checked against its manifest; no weights loaded."""

    folder: Path
    config: Config
    labels: list[str]


def read_model_folder(path: Path) -> ModelFolder:
    """Find the model folder in ``path`` (see :func:`model_folder`), verify it, read its config and labels.

    A folder whose manifest disagrees with its files is refused; one without a manifest (edited by
    hand, or copied without it) is read as it is, and a damaged file shows up when it is loaded.
    """
    if not path.exists():
        raise UserError(f"`{path}` does not exist; give a run directory (its best/ is used) or a model folder.")
    folder = model_folder(path)
    reason = checkpoint.verify_manifest(folder)
    if reason is not None and (folder / checkpoint.MANIFEST).exists():
        raise UserError(f"Model folder {folder} fails verification: {reason}. Use another checkpoint (last/, checkpoints/) or retrain.")
    config = validate_config(read_yaml(folder / "config.yaml"), source=str(folder / "config.yaml"))
    labels = json.loads((folder / "labels.json").read_text())
    return ModelFolder(folder, config, labels)


_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, "
                            r"the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")


def _adapter_load_error(folder: Path, base: str, labels: list[str], exc: Exception) -> str:
    """Say which of the three usual causes it is: another label set, another base, or a damaged file."""
    match = _SIZE_MISMATCH.search(str(exc))
    if match:
        name, saved, current = match.groups()
        if any(part in ("classifier", "score") for part in name.split(".")):
            return (f"The adapter in {folder} carries a head for {saved.split(',')[0]} labels, but {folder / 'labels.json'} lists "
                    f"{len(labels)} ({labels}): the label set differs from the one it was trained with. Restore the run's labels.json.")
        return (f"The adapter in {folder} does not fit the base `{base}`: `{name}` was trained with shape [{saved}], the base gives "
                f"[{current}]. Use the base model it was trained on (`model.name` in {folder / 'config.yaml'}).")
    return (f"The adapter in {folder} cannot be loaded ({str(exc).splitlines()[0][:300]}); the file is corrupted "
            f"or does not match `model.name: {base}`.")


def load_trained(path: Path, *, quantized: bool = True, device: str | torch.device = "cpu", base_path: str | None = None) -> Trained:
    """Load a model folder as it was trained (``quantized=False`` puts the adapter on a full-precision base).

    ``base_path`` replaces the config's ``model.name`` (the base moved, or is on another machine).
    """
    from peftkit.models import TASKS, load_backbone, load_processor
    from peftkit.quant import bnb_config, disable_cpu_repacking

    read = read_model_folder(Path(path))
    folder, config, labels = read.folder, read.config, read.labels
    processor = load_processor(str(folder), config.model.task)
    is_adapter = (folder / "adapter_config.json").is_file()
    if not is_adapter:
        model = TASKS[config.model.task].auto_model.from_pretrained(folder, use_safetensors=True)
        return Trained(model.to(device).eval(), processor, config, labels, False)
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(f"Adapter folder {folder} is missing {missing}; the checkpoint is incomplete.")
    from peft import PeftModel

    from peftkit.models import architecture_for, load_model_config

    if base_path is not None:
        config.model.name = str(base_path)
    q = config.quantization
    quant = None
    if quantized and q.bits:
        arch = architecture_for(load_model_config(config.model.name).model_type)
        quant = bnb_config(q.bits, quant_type=q.quant_type, double_quant=q.double_quant, compute_dtype=q.compute_dtype,
                           skip_modules=list(arch.head))
    base = load_backbone(config.model.name, config.model.task, labels, dtype=config.model.dtype if quant else "float32",
                         revision=config.model.revision, trust_remote_code=config.model.trust_remote_code, quantization_config=quant)
    try:
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    except Exception as exc:  # safetensors/peft raise several types for a damaged file
        raise UserError(_adapter_load_error(folder, config.model.name, labels, exc)) from None
    if quant is not None:
        disable_cpu_repacking(model)
    else:
        model = model.to(device)
    return Trained(model.eval(), processor, config, labels, True)
