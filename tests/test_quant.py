"""8-bit and 4-bit (bitsandbytes) LoRA training on CPU, the head kept in fp32, and the 8-bit optimizers."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import image_config, reload_and_evaluate, text_config
from safetensors.torch import load_file
from torch import nn

pytest.importorskip("bitsandbytes", reason="bitsandbytes is an optional extra: pip install 'peftkit[bnb]'")

import bitsandbytes as bnb

from peftkit import quant, train
from peftkit.artifacts import load_trained
from peftkit.config import validate_config
from peftkit.errors import UserError
from peftkit.models import load_backbone
from peftkit.optim import make_optimizer
from peftkit.tracking import read_log

QUANTIZED = {8: bnb.nn.Linear8bitLt, 4: bnb.nn.Linear4bit}
STEPS, EVAL_EVERY = 20, 5
# Random tiny backbones: the DeBERTa pooler sees nearly the same [CLS] vector for every text, so
# the run memorises 16 fixed rows (one full batch per step) at a rate found stable for both widths.
SETTINGS = {
    "deberta": (text_config, {"lr": 5e-3, "head_lr": 5e-3}),
    "vit": (image_config, {"lr": 5e-3, "head_lr": 5e-3}),
}


def evaluate_reloaded(path: Path) -> dict[str, float]:
    """Validation metrics of a model folder loaded back through ``load_trained``."""
    return reload_and_evaluate(path)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["deberta", "vit"])
def test_kbit_lora_trains_through_eval_and_reloads(assets, tmp_path, kind, bits):
    make, lrs = SETTINGS[kind]
    run_dir = tmp_path / "run"
    cfg = make(assets, run_dir, quantization={"bits": bits}, data={"max_train_samples": 16},
               train={"max_steps": STEPS, "eval_every": EVAL_EVERY, "batch_size": 16, "warmup_ratio": 0.0,
                      "schedule": "constant", **lrs}, output={"keep_checkpoints": 5})
    summary = train.run(validate_config(cfg))
    assert summary["final_step"] == STEPS

    rows = read_log(run_dir / "metrics.jsonl")
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    eval_steps = [r["step"] for r in rows if "eval_loss" in r]
    assert eval_steps[0] == EVAL_EVERY < STEPS, "an evaluation pass must happen mid-run"
    assert all(math.isfinite(v) for v in loss.values()), loss
    assert loss[STEPS] < 0.6 * loss[1], f"the training loss did not fall: {loss}"

    # Training went on after the mid-run evaluation: the adapter changed between checkpoints.
    first = load_file(run_dir / "checkpoints" / f"step-{EVAL_EVERY:07d}" / "model" / "adapter_model.safetensors")
    last = load_file(run_dir / "last" / "adapter_model.safetensors")
    lora_keys = [k for k in last if "lora_B" in k]
    assert lora_keys and any(not torch.equal(first[k], last[k]) for k in lora_keys)
    # The head (and DeBERTa's pooler) is saved in full precision with the adapter.
    head_keys = [k for k in last if "classifier" in k or "pooler" in k]
    assert any("classifier" in k for k in head_keys) and (kind != "deberta" or any("pooler" in k for k in head_keys))
    assert all(last[k].dtype == torch.float32 for k in head_keys)

    # Reloaded quantized, it gives the metrics the run logged for its final weights.
    logged = json.loads((run_dir / "last" / "metrics.json").read_text())["validation"]
    again = evaluate_reloaded(run_dir / "last")
    assert again["accuracy"] == pytest.approx(logged["accuracy"])
    assert again["loss"] == pytest.approx(logged["loss"], abs=1e-4)

    model = load_trained(run_dir / "last").model
    quantized = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED[bits])]
    assert quantized and all("classifier" not in n and "pooler" not in n for n in quantized)
    heads = [(n, p) for n, p in model.named_parameters() if "classifier" in n or "pooler" in n]
    assert heads and all(p.dtype == torch.float32 and type(p) is nn.Parameter for _, p in heads)


def _tiny_4bit(assets) -> nn.Module:
    cfg = quant.bnb_config(4, quant_type="nf4", double_quant=True, compute_dtype="float32", skip_modules=["classifier", "pooler"])
    return load_backbone(str(assets["deberta"]), "text-classification", ["neg", "pos"], quantization_config=cfg)


def _packed(model: nn.Module) -> list[bool]:
    return [bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_4bit_layout_survives_an_eval_forward(assets):
    model = _tiny_4bit(assets)
    assert quant.disable_cpu_repacking(model) == len(_packed(model)) > 0
    ids = torch.randint(5, model.config.vocab_size, (2, 8))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert _packed(model) and not any(_packed(model))


@pytest.mark.skipif(not bnb.nn.modules.has_avx512bf16(), reason="the repacking only happens on CPUs with AVX512-BF16")
def test_4bit_eval_forward_repacks_without_the_fix(assets):
    # The control for the test above: bitsandbytes really changes the layout when left alone.
    model = _tiny_4bit(assets).eval()
    with torch.no_grad():
        model(input_ids=torch.randint(5, model.config.vocab_size, (2, 8)))
    assert all(_packed(model))


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match=r"quantization.bits: 4.*pip install"):
        quant.bnb_config(4, quant_type="nf4", double_quant=True, compute_dtype="float32", skip_modules=[])
    with pytest.raises(UserError, match=r"train.optimizer: adamw_8bit.*pip install"):
        make_optimizer([{"params": [nn.Parameter(torch.zeros(2))], "names": ["w"]}], "adamw_8bit", 1e-3)


def test_4bit_on_cpu_needs_widths_multiple_of_64():
    from transformers import BertConfig

    with pytest.raises(UserError, match=r"multiples of 64.*hidden_size"):
        quant.check_4bit_widths(BertConfig(hidden_size=96, intermediate_size=384, num_attention_heads=2), 4)
    quant.check_4bit_widths(BertConfig(hidden_size=96, num_attention_heads=2), 8)  # 8-bit has no such limit
    quant.check_4bit_widths(BertConfig(hidden_size=128, intermediate_size=256, num_attention_heads=2), 4)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_train_on_cpu(name):
    torch.manual_seed(0)
    # 64x64 = 4096 elements: bitsandbytes keeps 8-bit state only for tensors at least that large.
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    x = torch.randn(256, 64)
    y = torch.sin(x[:, :4].sum(1, keepdim=True))
    groups = [{"params": list(model.parameters()), "names": [n for n, _ in model.named_parameters()], "lr": 3e-3, "weight_decay": 0.0}]
    opt = make_optimizer(groups, name, 3e-3)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    state = opt.state[model[0].weight]
    assert state["state1"].dtype == torch.uint8, "the large weight must keep 8-bit optimizer state"
