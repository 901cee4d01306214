"""Every adapter method injects on tiny DeBERTa and ViT and trains only what it should; target errors; the parameter report."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from peftkit import adapters, models
from peftkit.adapters import METHODS, AdapterSpec, count_parameters, inject, resolve_targets
from peftkit.errors import UserError

TASKS = {"deberta": "text-classification", "vit": "image-classification"}
HEADS = {"deberta": ["classifier", "pooler"], "vit": ["classifier"]}
# The parameter names each peft method adds; anything else trainable must be a head copy.
MARKERS = {
    "lora": ("lora_A", "lora_B"),
    "rslora": ("lora_A", "lora_B"),
    "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "ia3": ("ia3_l",),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "adalora": ("lora_A", "lora_B", "lora_E"),
}


def load(assets: dict[str, Path], family: str) -> tuple[torch.nn.Module, models.Architecture]:
    model = models.load_backbone(str(assets[family]), TASKS[family], ["a", "b"])
    return model, models.architecture_for(model.config.model_type)


def batch_for(family: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 1, 0])
    if family == "vit":
        return {"pixel_values": torch.randn(4, 3, 32, 32, generator=g), "labels": labels}
    ids = torch.randint(5, model.config.vocab_size, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_registry_covers_every_schema_method() -> None:
    from typing import get_args

    from peftkit.config import AdapterName

    assert set(METHODS) == set(get_args(AdapterName))
    assert set(MARKERS) | {"full", "freeze"} == set(METHODS)
    assert not METHODS["full"].mergeable and not METHODS["freeze"].mergeable
    assert all(METHODS[m].mergeable for m in MARKERS)


@pytest.mark.parametrize("family", ["deberta", "vit"])
@pytest.mark.parametrize("method", sorted(MARKERS))
def test_peft_method_trains_only_adapters_and_heads(assets: dict[str, Path], family: str, method: str) -> None:
    torch.manual_seed(0)
    model, arch = load(assets, family)
    expected = models.default_targets(model, arch, arch.ia3_targets if METHODS[method].uses_ia3_targets else arch.lora_targets)
    # dropout 0: LoHa/LoKr map it to module dropout, which skips whole adapters (no grad) for a step.
    peft_model, targets = inject(model, arch, AdapterSpec(method=method, r=4, alpha=8, dropout=0.0, total_steps=20))
    assert targets.to_save == HEADS[family]
    assert targets.modules == expected

    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    adapter_names = [n for n in trainable if any(f".{m}." in n for m in MARKERS[method])]
    head_names = [n for n in trainable if ".modules_to_save." in n]
    assert sorted(adapter_names + head_names) == sorted(trainable), "something else trains"
    # Every target got adapter weights, and nothing outside the targets did.
    adapted = {re.split(r"\.(?:" + "|".join(MARKERS[method]) + r")\.", n)[0].removeprefix("base_model.model.") for n in adapter_names}
    assert adapted == set(targets.modules)
    # The whole head (and DeBERTa's pooler) trains as a saved copy; the original stays frozen.
    for head in HEADS[family]:
        module = model.get_submodule(head)
        n_head = sum(p.numel() for p in module.modules_to_save.parameters())
        assert n_head == sum(p.numel() for p in module.original_module.parameters()) > 0
        assert all(p.requires_grad for p in module.modules_to_save.parameters())
        assert not any(p.requires_grad for p in module.original_module.parameters())

    # One backward pass reaches every trainable parameter and no frozen one.
    peft_model.train()
    peft_model(**batch_for(family, model)).loss.backward()
    for name, param in peft_model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    if METHODS[method].after_backward is not None:
        METHODS[method].after_backward(peft_model, 1)


@pytest.mark.parametrize("family", ["deberta", "vit"])
def test_freeze_trains_only_the_head_and_pooler(assets: dict[str, Path], family: str) -> None:
    model, arch = load(assets, family)
    model, targets = inject(model, arch, AdapterSpec(method="freeze"))
    assert targets.modules == [] and targets.to_save == HEADS[family]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{h}.{n}" for h in HEADS[family] for n, _ in model.get_submodule(h).named_parameters()}
    assert trainable == expected
    n_expected = sum(model.get_submodule(h).weight.numel() + model.get_submodule(h).bias.numel()
                     for h in ["classifier", "pooler.dense"][: len(HEADS[family])])
    assert count_parameters(model) == (n_expected, sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("family", ["deberta", "vit"])
def test_full_trains_everything(assets: dict[str, Path], family: str) -> None:
    model, arch = load(assets, family)
    for p in model.parameters():
        p.requires_grad = False  # inject must turn them all back on
    model, _ = inject(model, arch, AdapterSpec(method="full"))
    assert all(p.requires_grad for p in model.parameters())
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())


def test_lora_parameter_count_is_exact(assets: dict[str, Path]) -> None:
    model, arch = load(assets, "deberta")
    base_total = sum(p.numel() for p in model.parameters())
    heads = sum(p.numel() for h in HEADS["deberta"] for p in model.get_submodule(h).parameters())
    peft_model, _ = inject(model, arch, AdapterSpec(method="lora", r=4, alpha=8))
    # r * (in + out) per wrapped layer: 4 attention projections 64->64, intermediate 64->128, output 128->64.
    per_layer = 4 * (4 * (64 + 64)) + 4 * (64 + 128) + 4 * (128 + 64)
    lora = 2 * per_layer
    trainable, total = count_parameters(peft_model)
    assert trainable == lora + heads
    assert total == base_total + lora + heads  # peft keeps the original head beside its trained copy
    assert (trainable, total) == peft_model.get_nb_trainable_parameters()


def test_count_parameters_counts_4bit_weights_as_parameters() -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="the bnb extra is not installed")
    layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4").to("cpu")  # quantized on the move
    assert type(layer.weight).__name__ == "Params4bit" and layer.weight.numel() == 64 * 64 // 2
    assert count_parameters(layer) == (64, 64 * 64 + 64)


def test_explicit_targets_resolve_to_full_names(assets: dict[str, Path]) -> None:
    model, arch = load(assets, "deberta")
    t = resolve_targets(model, arch, AdapterSpec(method="lora", target_modules=["query_proj", "value_proj"]))
    assert t.modules == [f"deberta.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query_proj", "value_proj")]


def test_explicit_targets_never_wrap_the_saved_head(assets: dict[str, Path]) -> None:
    model, arch = load(assets, "deberta")
    t = resolve_targets(model, arch, AdapterSpec(method="lora", target_modules=["dense"]))
    assert "pooler.dense" not in t.modules and t.to_save == ["classifier", "pooler"]
    assert len(t.modules) == 6 and all(".layer." in m for m in t.modules)


@pytest.mark.parametrize(
    ("family", "wrong", "listed"),
    [("vit", ["query", "value"], ["q_proj", "v_proj", "fc1"]),  # transformers 4 names of ViT
     ("deberta", ["query", "value"], ["query_proj", "value_proj", "intermediate.dense"]),
     ("deberta", ["query_proj", "nonsense"], ["query_proj"])],
)
def test_targets_that_match_nothing_list_the_module_names(assets: dict[str, Path], family: str, wrong: list[str], listed: list[str]) -> None:
    model, arch = load(assets, family)
    with pytest.raises(UserError) as info:
        inject(model, arch, AdapterSpec(method="lora", target_modules=wrong))
    msg = str(info.value)
    assert "`adapter.target_modules`" in msg
    missing = [w for w in wrong if w != "query_proj"]
    assert f"entries {missing}" in msg
    for name in listed:
        assert name in msg
    assert "all-linear" in msg


def test_all_linear_takes_every_encoder_linear_layer(assets: dict[str, Path]) -> None:
    model, arch = load(assets, "vit")
    t = resolve_targets(model, arch, AdapterSpec(method="lora", target_modules="all-linear"))
    assert t.modules == [n for n in models.linear_module_names(model) if n != "classifier"]
    assert len(t.modules) == 12


def test_no_encoder_layer_found_is_a_user_error(assets: dict[str, Path]) -> None:
    model, _ = load(assets, "deberta")
    odd = dataclasses.replace(models.FALLBACK, layer_pattern=r"\.blocks\.(\d+)\.")
    with pytest.raises(UserError, match="selects no linear layer inside the encoder"):
        resolve_targets(model, odd, AdapterSpec(method="lora"))


def test_explicit_modules_to_save(assets: dict[str, Path]) -> None:
    model, arch = load(assets, "deberta")
    t = resolve_targets(model, arch, AdapterSpec(method="freeze", modules_to_save=["classifier"]))
    assert t.to_save == ["classifier"]
    with pytest.raises(UserError) as info:
        resolve_targets(model, arch, AdapterSpec(method="lora", modules_to_save=["head"]))
    assert "`adapter.modules_to_save` entries ['head']" in str(info.value) and "'classifier'" in str(info.value)


def test_a_model_without_a_head_asks_for_modules_to_save(assets: dict[str, Path]) -> None:
    from transformers import AutoModel

    bare = AutoModel.from_pretrained(assets["deberta"])
    with pytest.raises(UserError, match=r"`adapter\.modules_to_save`"):
        resolve_targets(bare, models.architecture_for("deberta-v2"), AdapterSpec(method="lora"))


def test_adalora_schedule_fits_the_run() -> None:
    targets = adapters.Targets(["x.layer.0.q"], [], ["classifier"])
    config = METHODS["adalora"].build(AdapterSpec(method="adalora", init_r=8, target_r=2, total_steps=200), targets)
    assert (config.init_r, config.target_r, config.total_step, config.tinit, config.tfinal) == (8, 2, 200, 20, 20)
    assert config.tinit + config.tfinal < config.total_step
    tiny = METHODS["adalora"].build(AdapterSpec(method="adalora", total_steps=1), targets)
    assert tiny.total_step >= 3
