"""The config schema: one strict, typed YAML file, validated before anything heavy happens.

Precedence (tested): command-line ``dotted.key=value`` overrides > the YAML file > the defaults
below. Launch topology (processes, DeepSpeed, FSDP) comes from the accelerate config alone.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from peftkit.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

Task = Literal["text-classification", "image-classification"]
AdapterName = Literal["lora", "dora", "rslora", "ia3", "loha", "lokr", "adalora", "full", "freeze"]
DType = Literal["float32", "bfloat16", "float16"]


class Section(BaseModel):
    """Base for every section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name: str = Field(description="Hub id or local folder of the pretrained backbone.")
    task: Task = "text-classification"
    labels: list[str] | None = Field(None, description="Label names; inferred from the training data when omitted.")
    dtype: DType = Field("float32", description="dtype the backbone weights are loaded in.")
    revision: str | None = None
    # Strict: only a YAML boolean `true` turns it on, never a string such as "no" or "0".
    trust_remote_code: StrictBool = Field(False, description="Run code shipped with the model; off unless you trust it.")


class AdapterSection(Section):
    method: AdapterName = "lora"
    r: int = Field(8, ge=1, description="Rank of LoRA-style adapters.")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Literal["auto", "all-linear"] | list[str] = "auto"
    modules_to_save: Literal["auto"] | list[str] = "auto"
    # AdaLoRA starts every module at `init_r` and prunes towards `target_r` on average.
    init_r: int = Field(12, ge=1)
    target_r: int = Field(4, ge=1)


class QuantizationSection(Section):
    bits: Literal[4, 8] | None = Field(None, description="Load the backbone in 8-bit (LLM.int8) or 4-bit; the head stays full precision.")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: DType = "float32"


class DataSection(Section):
    train: str = Field(description="A csv/json/jsonl/parquet file, an image folder, `demo:NAME`, or a hub dataset id.")
    validation: str | None = Field(None, description="Same forms as `train`; carved from train when omitted.")
    test: str | None = Field(None, description="Held-out data evaluated once at the end of the run.")
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    text_column: str | None = Field(None, description="Text column (text tasks; `text` when omitted).")
    text_pair_column: str | None = None
    image_column: str | None = Field(None, description="Image column (image tasks; `image` when omitted).")
    label_column: str = "label"
    max_length: int = Field(128, ge=8)
    augment: bool = Field(False, description="Light image augmentation (flip, crop) on the training split only.")
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)


class TrainSection(Section):
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides `epochs` when set.")
    batch_size: int = Field(16, ge=1, description="Per-device micro-batch.")
    eval_batch_size: int | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    head_lr: float | None = Field(None, gt=0, description="Learning rate of the task head; `lr` when omitted.")
    layer_decay: float = Field(1.0, gt=0, le=1.0, description="Layer-wise LR decay: layer k of L trains at lr * decay**(L-k).")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1.0)
    warmup_steps: int | None = Field(None, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile the model (first steps pay the compile time, 10-60 s).")
    seed: int = 42
    eval_every: int | None = Field(None, ge=1, description="Evaluate (and checkpoint) every N optimizer steps; each epoch when omitted.")
    metric_for_best: Literal["accuracy", "f1_macro", "loss"] = "accuracy"
    early_stopping_patience: int | None = Field(None, ge=1)
    # Text only: batches of rows of similar length pad little (1.8x faster on Rotten Tomatoes), and
    # the batches come in random order, so accuracy holds (benchmarks/README.md).
    group_by_length: bool = Field(True, description="Batch text rows of similar length together (less padding); batch order stays random.")
    on_nan: Literal["stop", "skip"] = "stop"
    auto_batch: bool = Field(False, description="On out-of-memory, halve the micro-batch and double accumulation.")
    log_every: int = Field(10, ge=1)


class OutputSection(Section):
    dir: str = "runs/default"
    keep_checkpoints: int = Field(2, ge=1)
    trackers: list[Literal["csv", "jsonl", "tensorboard", "wandb", "mlflow"]] = ["jsonl", "tensorboard"]


class Config(Section):
    """The whole run, one section per concern."""

    model: ModelSection
    adapter: AdapterSection = AdapterSection()
    quantization: QuantizationSection = QuantizationSection()
    data: DataSection
    train: TrainSection = TrainSection()
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _cross_field_checks(self) -> Config:
        task, data = self.model.task, self.data
        if task == "image-classification" and data.text_pair_column:
            raise ValueError("data.text_pair_column is set on an image task; remove it or set model.task: text-classification")
        # A column of the other modality is a sign of a wrong task or a copied config. The defaults
        # are filled here, per task, so a saved config.yaml validates again unchanged.
        if task == "image-classification" and data.text_column:
            raise ValueError(f"data.text_column: {data.text_column} is set on an image task (model.task: {task}); "
                             "remove it and set data.image_column, or set model.task: text-classification")
        if task == "text-classification" and data.image_column:
            raise ValueError(f"data.image_column: {data.image_column} is set on a text task (model.task: {task}); "
                             "remove it and set data.text_column, or set model.task: image-classification")
        if task == "text-classification" and data.text_column is None:
            data.text_column = "text"
        if task == "image-classification" and data.image_column is None:
            data.image_column = "image"
        if self.adapter.method == "adalora" and self.adapter.target_r > self.adapter.init_r:
            raise ValueError("adapter.target_r must not exceed adapter.init_r for AdaLoRA")
        if self.quantization.bits and self.adapter.method == "full":
            raise ValueError("quantization.bits with adapter.method: full cannot train quantized weights; use lora or drop quantization")
        if self.train.precision == "fp16" and self.quantization.bits == 4 and self.quantization.compute_dtype == "bfloat16":
            raise ValueError("train.precision: fp16 with quantization.compute_dtype: bfloat16 mixes half types; use bf16 for both")
        return self


def _closest(key: str, section: type[BaseModel] | None) -> str:
    if section is None:
        return ""
    match = difflib.get_close_matches(key, list(section.model_fields), n=1)
    return f" Did you mean `{match[0]}`?" if match else ""


def _section_of(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        model = field.annotation if field and isinstance(field.annotation, type) else None
    return model


def _explain(err: ValidationError, source: str) -> UserError:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key `{key}`.{_closest(str(loc[-1]), _section_of(loc))} Remove or rename it.")
        elif e["type"] == "value_error" and not loc:  # a cross-field check: its message names the keys
            lines.append(e["msg"].removeprefix("Value error, ") + ".")
        elif e["type"] == "missing":
            fix = f"add a `{key}:` section" if len(loc) == 1 else f"add it to the config or pass `{key}=...`"
            lines.append(f"`{key}` is required; {fix}.")
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"`{key}`: {e['msg']}{got_s}.")
    return UserError(f"Invalid config {source}: " + " ".join(lines))


def resolve_config_path(name: str | Path) -> Path:
    """Find ``name`` as a path, then under the shipped ``configs/`` (with or without ``.yaml``)."""
    candidates = [Path(name), CONFIG_DIR / str(name), CONFIG_DIR / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    shipped = ", ".join(sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml"))) if CONFIG_DIR.is_dir() else "none"
    raise UserError(f"Config file `{name}` not found, neither as a path nor under {CONFIG_DIR}. Shipped configs: {shipped}.")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (['train', 'lr'], 3e-4); values are parsed as YAML scalars/lists."""
    if "=" not in text or text.startswith("="):
        raise UserError(f"Override `{text}` is not of the form `section.key=value` (e.g. `train.lr=3e-4`).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides onto the raw YAML mapping (before validation, so they are validated too)."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:  # absent, or a section with every key commented out
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"Override `{text}`: `{part}` is a value, not a section.")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a malformed or non-mapping file."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"Config file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}. Check indentation and quoting there.") from None
    except OSError as exc:
        raise UserError(f"Config file {path} cannot be read: {exc.strerror}.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"Config file {path} must be a mapping of sections (model:, data:, ...), not a {type(raw).__name__}.")
    return raw


def load_config(name: str | Path, overrides: list[str] | None = None) -> Config:
    """Load, override and validate a config; raises :class:`UserError` naming the culprit."""
    path = resolve_config_path(name)
    raw = apply_overrides(read_yaml(path), list(overrides or []))
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "(in memory)") -> Config:
    """Validate a raw mapping into a :class:`Config`."""
    # A section whose keys are all commented out reads as None: it means "all defaults".
    raw = {k: ({} if v is None and k in Config.model_fields else v) for k, v in raw.items()}
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise _explain(err, source) from None


def dump_config(config: Config) -> str:
    """The resolved config as YAML (defaults filled in), as saved beside every checkpoint."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
