"""The architecture registry on tiny DeBERTa-v2, ViT and BERT; the fallback; label maps; meta builds; load errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from peftkit import models
from peftkit.errors import UserError

TEXT, IMAGE = "text-classification", "image-classification"


def per_layer(prefix: str, suffixes: list[str], layers: int = 2) -> list[str]:
    return [f"{prefix}.{i}.{s}" for i in range(layers) for s in suffixes]


@pytest.fixture(scope="module")
def loaded(assets: dict[str, Path]) -> dict[str, torch.nn.Module]:
    """The three tiny backbones with a 3-label head, loaded once for the module."""
    return {
        "deberta": models.load_backbone(str(assets["deberta"]), TEXT, ["neg", "neu", "pos"]),
        "vit": models.load_backbone(str(assets["vit"]), IMAGE, ["red", "green", "blue"]),
        "bert": models.load_backbone(str(assets["bert"]), TEXT, ["neg", "neu", "pos"]),
    }


EXPECTED_TARGETS = {
    "deberta": per_layer("deberta.encoder.layer", ["attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                                                   "attention.output.dense", "intermediate.dense", "output.dense"]),
    "vit": per_layer("vit.layers", ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"]),
    "bert": per_layer("bert.encoder.layer", ["attention.self.query", "attention.self.key", "attention.self.value",
                                             "attention.output.dense", "intermediate.dense", "output.dense"]),
}
EXPECTED_IA3 = {
    "deberta": per_layer("deberta.encoder.layer", ["attention.self.key_proj", "attention.self.value_proj", "output.dense"]),
    "vit": per_layer("vit.layers", ["attention.k_proj", "attention.v_proj", "mlp.fc2"]),
    "bert": per_layer("bert.encoder.layer", ["attention.self.key", "attention.self.value", "output.dense"]),
}
EXPECTED_HEADS = {"deberta": ["classifier", "pooler"], "vit": ["classifier"], "bert": ["classifier"]}
MODEL_TYPES = {"deberta": "deberta-v2", "vit": "vit", "bert": "bert"}


@pytest.mark.parametrize("family", ["deberta", "vit", "bert"])
def test_registry_entry_and_default_targets(loaded: dict, family: str) -> None:
    model = loaded[family]
    assert model.config.model_type == MODEL_TYPES[family]
    arch = models.architecture_for(model.config.model_type)
    assert arch.preset and arch is models.ARCHITECTURES[MODEL_TYPES[family]]
    targets = models.default_targets(model, arch, arch.lora_targets)
    assert targets == EXPECTED_TARGETS[family]
    # The head and the pooler hold linear layers too; they are trained in full, never wrapped.
    assert not any(t.startswith(("classifier", "pooler")) or ".pooler." in t for t in targets)


@pytest.mark.parametrize("family", ["deberta", "vit", "bert"])
def test_ia3_targets_and_feedforward(loaded: dict, family: str) -> None:
    model = loaded[family]
    arch = models.architecture_for(model.config.model_type)
    targets = models.default_targets(model, arch, arch.ia3_targets)
    assert targets == EXPECTED_IA3[family]
    feedforward = [t for t in targets if models.matches_suffix(t, arch.ia3_feedforward)]
    assert feedforward == [t for t in targets if t.endswith(("layer.0.output.dense", "layer.1.output.dense", "mlp.fc2"))]
    assert len(feedforward) == 2


@pytest.mark.parametrize("family", ["deberta", "vit", "bert"])
def test_head_modules_include_deberta_pooler(loaded: dict, family: str) -> None:
    model = loaded[family]
    heads = models.head_modules(model, models.architecture_for(model.config.model_type))
    assert heads == EXPECTED_HEADS[family]
    for head in heads:
        assert isinstance(model.get_submodule(head), torch.nn.Module)


def test_fallback_for_an_unknown_model_type(tmp_path: Path) -> None:
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=50, dim=64, n_layers=2, n_heads=2, hidden_dim=128, max_position_embeddings=64)
    torch.manual_seed(0)
    DistilBertModel(config).save_pretrained(tmp_path, safe_serialization=True)
    model = models.load_backbone(str(tmp_path), TEXT, ["a", "b"])
    arch = models.architecture_for(model.config.model_type)
    assert arch is models.FALLBACK and arch.preset is False
    assert models.architecture_for("no-such-family") is models.FALLBACK
    targets = models.default_targets(model, arch, arch.lora_targets)
    assert targets == per_layer("distilbert.transformer.layer", ["attention.q_lin", "attention.k_lin", "attention.v_lin",
                                                                 "attention.out_lin", "ffn.lin1", "ffn.lin2"])
    # DistilBERT's new `pre_classifier` is random too: it must be trained and saved like the classifier.
    heads = models.head_modules(model, arch)
    assert "classifier" in heads and "pre_classifier" in heads
    assert not set(heads) & set(targets)


def test_matches_suffix_respects_dot_boundaries() -> None:
    name = "deberta.encoder.layer.0.attention.self.query_proj"
    assert models.matches_suffix(name, ["query_proj"])
    assert models.matches_suffix(name, ["self.query_proj"])
    assert not models.matches_suffix(name, ["query"])  # BERT's name must not catch DeBERTa's query_proj
    assert not models.matches_suffix(name, ["proj"])
    assert models.matches_suffix("x.layer.1.attention.output.dense", ["output.dense"])
    assert not models.matches_suffix("x.layer.1.attention.output.dense", [r"layer\.\d+\.output\.dense"])
    assert models.matches_suffix("x.layer.1.output.dense", [r"layer\.\d+\.output\.dense"])
    assert models.matches_suffix("classifier", ["classifier"])


@pytest.mark.parametrize(
    ("family", "name", "index"),
    [
        ("deberta-v2", "deberta.embeddings.word_embeddings.weight", 0),
        ("deberta-v2", "deberta.encoder.layer.0.attention.self.query_proj.weight", 1),
        ("deberta-v2", "deberta.encoder.layer.1.output.LayerNorm.bias", 2),
        ("deberta-v2", "base_model.model.deberta.encoder.layer.1.attention.self.query_proj.lora_A.default.weight", 2),
        ("deberta-v2", "classifier.weight", 3),
        ("deberta-v2", "pooler.dense.weight", 3),
        ("vit", "vit.embeddings.cls_token", 0),
        ("vit", "vit.embeddings.patch_embeddings.projection.weight", 0),
        ("vit", "vit.layers.0.mlp.fc1.weight", 1),
        ("vit", "vit.layers.1.attention.q_proj.bias", 2),
        ("vit", "vit.layernorm.weight", 3),
        ("bert", "bert.encoder.layer.1.attention.self.value.weight", 2),
        ("bert", "bert.pooler.dense.weight", 3),
    ],
)
def test_layer_index(family: str, name: str, index: int) -> None:
    assert models.layer_index(name, models.architecture_for(family), num_layers=2) == index


def test_every_parameter_gets_a_layer_index_in_range(loaded: dict) -> None:
    for model in loaded.values():
        arch = models.architecture_for(model.config.model_type)
        n = models.num_layers(model)
        assert n == 2
        seen = {models.layer_index(name, arch, n) for name, _ in model.named_parameters()}
        assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("family", ["deberta", "vit", "bert"])
def test_label_maps_are_wired_into_the_model_config(loaded: dict, family: str, tmp_path: Path) -> None:
    model = loaded[family]
    labels = ["neg", "neu", "pos"] if family != "vit" else ["red", "green", "blue"]
    assert model.config.num_labels == 3
    assert model.config.id2label == dict(enumerate(labels))
    assert model.config.label2id == {name: i for i, name in enumerate(labels)}
    assert model.get_submodule("classifier").out_features == 3
    model.config.save_pretrained(tmp_path)
    saved = AutoConfig.from_pretrained(tmp_path)
    assert saved.id2label == dict(enumerate(labels)) and saved.label2id == {name: i for i, name in enumerate(labels)}


def test_label_maps() -> None:
    id2label, label2id = models.label_maps(["rotten", "fresh"])
    assert id2label == {0: "rotten", 1: "fresh"} and label2id == {"rotten": 0, "fresh": 1}


@pytest.mark.parametrize(("family", "task"), [("deberta", TEXT), ("vit", IMAGE)])
def test_meta_build_has_the_real_module_tree_on_meta(assets: dict[str, Path], loaded: dict, family: str, task: str) -> None:
    meta = models.load_backbone(str(assets[family]), task, ["a", "b", "c"], meta=True)
    tensors = [*meta.parameters(), *meta.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    real = dict(loaded[family].named_parameters())
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in real.items()}
    assert meta.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_meta_build_of_a_large_model_allocates_nothing(assets: dict[str, Path], tmp_path: Path) -> None:
    import json

    psutil = pytest.importorskip("psutil", reason="psutil (in the dev extra) measures resident memory")
    # A DeBERTa-v3-large-sized config without weights: 1.7 GB if it were materialised in float32.
    config = json.loads((assets["deberta"] / "config.json").read_text())
    config |= {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
               "vocab_size": 128_000, "pooler_hidden_size": 1024}
    (tmp_path / "config.json").write_text(json.dumps(config))
    before = psutil.Process().memory_info().rss
    meta = models.load_backbone(str(tmp_path), TEXT, ["a", "b"], meta=True)
    grown = psutil.Process().memory_info().rss - before
    n_params = sum(p.numel() for p in meta.parameters())
    assert n_params > 400_000_000
    assert grown < 200 * 2**20, f"meta build grew resident memory by {grown / 2**20:.0f} MiB"


def test_meta_build_honours_dtype(assets: dict[str, Path]) -> None:
    meta = models.load_backbone(str(assets["deberta"]), TEXT, ["a", "b"], dtype="bfloat16", meta=True)
    assert {p.dtype for p in meta.parameters()} == {torch.bfloat16}


def test_missing_local_folder_is_a_user_error() -> None:
    with pytest.raises(UserError) as info:
        models.load_backbone("/definitely/not/here", TEXT, ["a", "b"])
    assert "`model.name: /definitely/not/here`" in str(info.value) and "config.json" in str(info.value)


def test_offline_hub_id_says_how_to_point_at_a_folder() -> None:
    with pytest.raises(UserError, match=r"point `model\.name` at a folder"):
        models.load_model_config("nobody-owner/no-such-model")


def test_folder_without_safetensors_is_refused(assets: dict[str, Path], tmp_path: Path) -> None:
    shutil.copy(assets["deberta"] / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match=r"no \*\.safetensors weights"):
        models.load_backbone(str(tmp_path), TEXT, ["a", "b"])


def test_processors(assets: dict[str, Path]) -> None:
    tokenizer = models.load_processor(str(assets["deberta"]), TEXT)
    assert tokenizer("a good film")["input_ids"]
    processor = models.load_processor(str(assets["vit"]), IMAGE)
    assert processor.size == {"height": 32, "width": 32}
    with pytest.raises(UserError, match="has no usable image processor"):
        models.load_processor(str(assets["deberta"]), IMAGE)
