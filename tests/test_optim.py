"""Parameter groups (no decay on biases and norms, head LR, layer-wise LR decay), optimizers and schedules."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from peftkit import models
from peftkit.adapters import AdapterSpec, inject
from peftkit.errors import UserError
from peftkit.optim import make_optimizer, make_scheduler, param_groups, warmup_steps

LR, HEAD_LR, DECAY, WD = 1e-3, 5e-3, 0.5, 0.01


def load(assets: dict[str, Path], family: str, method: str = "full") -> tuple[torch.nn.Module, models.Architecture, list[str]]:
    task = "image-classification" if family == "vit" else "text-classification"
    model = models.load_backbone(str(assets[family]), task, ["a", "b"])
    arch = models.architecture_for(model.config.model_type)
    heads = models.head_modules(model, arch)
    model, _ = inject(model, arch, AdapterSpec(method=method, r=4, alpha=8))
    return model, arch, heads


def by_name(groups: list[dict]) -> dict[str, dict]:
    return {name: group for group in groups for name in group["names"]}


@pytest.mark.parametrize("family", ["deberta", "vit", "bert"])
def test_no_weight_decay_on_biases_and_norms(assets: dict[str, Path], family: str) -> None:
    model, arch, heads = load(assets, family)
    groups = by_name(param_groups(model, arch, lr=LR, weight_decay=WD, heads=heads))
    params = dict(model.named_parameters())
    assert set(groups) == set(params)  # every trainable parameter is in exactly one group
    for name, group in groups.items():
        is_norm = "layernorm" in name.lower() or name.endswith(".bias")
        assert group["weight_decay"] == (0.0 if is_norm or params[name].ndim < 2 else WD), name
    decayed = [n for n, g in groups.items() if g["weight_decay"] == WD]
    assert any(n.endswith("classifier.weight") for n in decayed)
    assert any("layers.0" in n or "layer.0" in n for n in decayed)


def test_head_lr_applies_to_the_head_and_pooler_only(assets: dict[str, Path]) -> None:
    model, arch, heads = load(assets, "deberta")
    assert heads == ["classifier", "pooler"]
    groups = by_name(param_groups(model, arch, lr=LR, weight_decay=WD, heads=heads, head_lr=HEAD_LR))
    for name, group in groups.items():
        expected = HEAD_LR if name.startswith(("classifier.", "pooler.")) else LR
        assert group["lr"] == expected, name
    assert sum(name.startswith(("classifier.", "pooler.")) for name in groups) == 4


def test_head_lr_defaults_to_lr(assets: dict[str, Path]) -> None:
    model, arch, heads = load(assets, "vit")
    groups = param_groups(model, arch, lr=LR, weight_decay=WD, heads=heads)
    assert {g["lr"] for g in groups} == {LR}
    assert len(groups) == 2  # one with decay, one without


@pytest.mark.parametrize("family", ["deberta", "vit", "bert"])
def test_layer_decay_is_lr_times_decay_to_the_depth(assets: dict[str, Path], family: str) -> None:
    model, arch, heads = load(assets, family)
    n = models.num_layers(model)
    groups = by_name(param_groups(model, arch, lr=LR, weight_decay=WD, heads=heads, head_lr=HEAD_LR, layer_decay=DECAY, num_layers=n))
    seen = set()
    for name, group in groups.items():
        if any(name.startswith(h + ".") for h in heads):
            assert group["lr"] == HEAD_LR, name
            continue
        depth = n + 1 - models.layer_index(name, arch, n)
        assert group["lr"] == pytest.approx(LR * DECAY**depth, rel=1e-12), name
        seen.add(depth)
    assert seen == {0, 1, 2, 3}  # above the encoder, top layer, bottom layer, embeddings


def test_layer_decay_pinned_on_deberta(assets: dict[str, Path]) -> None:
    model, arch, heads = load(assets, "deberta")
    groups = by_name(param_groups(model, arch, lr=LR, weight_decay=WD, heads=heads, head_lr=HEAD_LR, layer_decay=DECAY, num_layers=2))
    assert groups["deberta.embeddings.word_embeddings.weight"]["lr"] == pytest.approx(LR / 8)
    assert groups["deberta.encoder.layer.0.attention.self.query_proj.weight"]["lr"] == pytest.approx(LR / 4)
    assert groups["deberta.encoder.layer.1.intermediate.dense.bias"]["lr"] == pytest.approx(LR / 2)
    assert groups["classifier.weight"]["lr"] == HEAD_LR
    assert groups["pooler.dense.weight"]["lr"] == HEAD_LR


def test_layer_decay_through_a_lora_model(assets: dict[str, Path]) -> None:
    model, arch, heads = load(assets, "vit", method="lora")
    groups = param_groups(model, arch, lr=LR, weight_decay=WD, heads=heads, head_lr=HEAD_LR, layer_decay=DECAY, num_layers=2)
    named = by_name(groups)
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    lora = {n: g["lr"] for n, g in named.items() if "lora_" in n}
    assert lora and all(lr == pytest.approx(LR * DECAY ** (1 if ".layers.1." in n else 2)) for n, lr in lora.items())
    head = {n: g["lr"] for n, g in named.items() if "classifier" in n}
    assert len(head) == 2 and set(head.values()) == {HEAD_LR}


def test_no_decay_means_one_lr(assets: dict[str, Path]) -> None:
    model, arch, heads = load(assets, "bert")
    groups = param_groups(model, arch, lr=LR, weight_decay=WD, heads=heads, layer_decay=1.0, num_layers=2)
    assert {g["lr"] for g in groups} == {LR}


def test_nothing_trainable_is_a_user_error(assets: dict[str, Path]) -> None:
    model, arch, heads = load(assets, "vit")
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(UserError, match="No parameter is trainable"):
        param_groups(model, arch, lr=LR, weight_decay=WD, heads=heads)


def test_adamw_keeps_group_settings(assets: dict[str, Path]) -> None:
    model, arch, heads = load(assets, "deberta", method="lora")
    groups = param_groups(model, arch, lr=LR, weight_decay=WD, heads=heads, head_lr=HEAD_LR, layer_decay=DECAY, num_layers=2)
    opt = make_optimizer(groups, "adamw", LR)
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == \
        [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups]
    assert all("names" not in g for g in opt.param_groups)


def test_8bit_adamw(assets: dict[str, Path]) -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="the bnb extra is not installed")
    model, arch, heads = load(assets, "vit", method="lora")
    groups = param_groups(model, arch, lr=LR, weight_decay=WD, heads=heads)
    assert isinstance(make_optimizer(groups, "adamw_8bit", LR), bnb.optim.AdamW8bit)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def lr_curve(schedule: str, total: int, warmup: int, base: float = 1.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = make_scheduler(opt, schedule, total_steps=total, warmup=warmup)
    curve = [sched.get_last_lr()[0]]
    for _ in range(total):
        opt.step()
        sched.step()
        curve.append(sched.get_last_lr()[0])
    return curve


@pytest.mark.parametrize(
    ("schedule", "pinned"),
    [
        ("cosine", {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5, 8: 0.5 * (1 + math.cos(3 * math.pi / 4)), 10: 0.0}),
        ("linear", {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.75, 6: 0.5, 8: 0.25, 10: 0.0}),
        ("constant", {0: 0.0, 1: 0.5, 2: 1.0, 6: 1.0, 10: 1.0}),
    ],
)
def test_warmup_then_schedule(schedule: str, pinned: dict[int, float]) -> None:
    curve = lr_curve(schedule, total=10, warmup=2)
    for step, lr in pinned.items():
        assert curve[step] == pytest.approx(lr, abs=1e-12), (schedule, step)
    after = curve[2:]
    if schedule == "constant":
        assert set(after) == {1.0}
    else:
        assert all(a > b for a, b in itertools.pairwise(after)), "must decay monotonically after warm-up"


def test_no_warmup_starts_at_full_lr() -> None:
    assert lr_curve("cosine", total=4, warmup=0)[:3] == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5])


def test_schedule_scales_every_group_alike() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 2.5e-4}], lr=1e-3)
    sched = make_scheduler(opt, "linear", total_steps=10, warmup=2)
    for _ in range(6):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([0.5e-3, 0.125e-3])


@pytest.mark.parametrize(("total", "ratio", "steps", "expected"), [(100, 0.06, None, 6), (10, 0.06, None, 1), (10, 0.0, None, 0),
                                                                   (100, 0.06, 0, 0), (100, 0.5, 7, 7)])
def test_warmup_steps(total: int, ratio: float, steps: int | None, expected: int) -> None:
    assert warmup_steps(total, ratio, steps) == expected
