"""The memory estimate (from a config alone), the plan for a budget, and the benchmark's quick mode."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO, text_config, write_yaml

from peftkit import memory
from peftkit.config import validate_config

GiB = 2**30


@pytest.fixture(scope="module")
def deberta_v3_base(tmp_path_factory) -> Path:
    """microsoft/deberta-v3-base's config.json only: no weights anywhere."""
    sys.path.insert(0, str(REPO / "benchmarks" / "memory"))
    from bench_memory import deberta_v3_base_config

    folder = tmp_path_factory.mktemp("deberta-v3-base")
    deberta_v3_base_config().save_pretrained(folder)
    return folder


def v3_config(folder: Path, tmp_path: Path, **sections: dict) -> dict:
    cfg = {"model": {"name": str(folder), "task": "text-classification", "labels": ["neg", "pos"]},
           "data": {"train": "unused.csv", "max_length": 256},
           "train": {"batch_size": 32},
           "output": {"dir": str(tmp_path / "run")}}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


def facts_and_setup(cfg: dict, processes: int = 1) -> tuple[memory.ModelFacts, memory.Setup]:
    config = validate_config(cfg)
    return memory.model_facts(config), memory.setup_from_config(config, processes)


def test_cli_estimates_deberta_v3_base_in_seconds_without_weights(deberta_v3_base, tmp_path, capsys):
    path = write_yaml(tmp_path / "cfg.yaml", v3_config(deberta_v3_base, tmp_path))
    t0 = time.perf_counter()
    assert memory.cli_main(["--config", str(path), "--gpu-memory", "8GiB"]) == 0
    assert time.perf_counter() - t0 < 60  # mostly importing peft and bitsandbytes; the arithmetic takes milliseconds
    out = capsys.readouterr().out
    for row in ("weights", "gradients", "optimizer states", "activations", "overhead (10%)", "total", "CUDA context"):
        assert row in out
    assert "does not fit in 8.00 GiB" in out and "train.gradient_checkpointing=true" in out
    assert sorted(p.name for p in deberta_v3_base.iterdir()) == ["config.json"], "nothing but the config may be read or written"


def test_counts_match_deberta_v3_base(deberta_v3_base, tmp_path):
    full, _ = facts_and_setup(v3_config(deberta_v3_base, tmp_path, adapter={"method": "full"}))
    # 184M: 98.4M embedding rows (128,100 x 768) + 85.6M in the 12 layers, + the pooler and a 2-label head.
    assert full.trainable == full.trainable + full.frozen_plain + full.quantizable
    assert 183_800_000 < full.trainable < 184_500_000
    lora, _ = facts_and_setup(v3_config(deberta_v3_base, tmp_path))
    # r=8 on 6 linear layers per layer (4 of 768x768, 768->3072, 3072->768) + pooler and classifier trained in full.
    lora_params = 12 * 8 * (4 * (768 + 768) + (768 + 3072) + (3072 + 768))
    head = 768 * 768 + 768 + 768 * 2 + 2
    assert lora.trainable == lora_params + head
    assert lora.quantizable == 12 * (4 * 768 * 768 + 2 * 768 * 3072)


def test_breakdown_follows_dtype_quantization_optimizer_and_checkpointing(deberta_v3_base, tmp_path):
    facts, base = facts_and_setup(v3_config(deberta_v3_base, tmp_path))
    fp32 = memory.estimate(facts, base).rows
    int8 = memory.estimate(facts, replace(base, bits=8)).rows
    nf4 = memory.estimate(facts, replace(base, bits=4)).rows
    q = facts.quantizable
    assert fp32["weights"] - int8["weights"] == pytest.approx(3 * q - 4 * facts.quantizable_rows)
    assert int8["weights"] - nf4["weights"] == pytest.approx(0.5 * q + 4 * facts.quantizable_rows - q / 64 * (1 + 4 / 256))
    assert fp32["gradients"] == 4 * facts.trainable
    assert fp32["optimizer states"] == 8 * facts.trainable
    opt8 = memory.estimate(facts, replace(base, optimizer="adamw_8bit")).rows["optimizer states"]
    assert 2 * facts.trainable < opt8 < 3 * facts.trainable
    ckpt = memory.estimate(facts, replace(base, checkpointing=True)).rows
    assert ckpt["activations"] < fp32["activations"] / 10
    half = memory.estimate(facts, replace(base, micro_batch=16)).rows
    assert half["activations"] == pytest.approx(fp32["activations"] / 2, rel=0.02)

    full, full_setup = facts_and_setup(v3_config(deberta_v3_base, tmp_path, adapter={"method": "full"}))
    rows = memory.estimate(full, full_setup).rows
    assert rows["weights"] == rows["gradients"] == 4 * full.trainable
    assert rows["optimizer states"] == 8 * full.trainable
    transient = rows["activations"] + rows["backward working set"]
    peak = rows["weights"] + rows["optimizer states"] + max(rows["gradients"], transient)
    assert memory.estimate(full, full_setup).total == pytest.approx(1.1 * peak)
    zero2 = memory.estimate(full, replace(full_setup, processes=4, zero=2)).rows
    assert zero2["gradients"] == rows["gradients"] / 4 and zero2["optimizer states"] == rows["optimizer states"] / 4


def test_plan_is_the_cheapest_setup_that_fits(deberta_v3_base, tmp_path):
    facts, base = facts_and_setup(v3_config(deberta_v3_base, tmp_path, adapter={"method": "full"}))
    budget = 8 * GiB
    assert memory.estimate(facts, base).device_total > budget
    setup, changes, est = memory.plan(facts, base, budget)
    assert est.device_total <= budget and changes
    assert setup.micro_batch * setup.grad_accum == base.micro_batch * base.grad_accum, "the effective batch must not change"
    assert setup.bits is None, "full fine-tuning cannot train a quantized base"
    cheaper = [c for c in memory.candidate_setups(base, allow_quantization=False)
               if memory.estimate(facts, c[1]).device_total <= budget]
    assert cheaper[0][1] == setup
    assert memory.plan(facts, base, 256 * 2**20) is None
    # ZeRO is offered only where there are processes to shard over.
    assert all(s.zero == 0 for _, s, _ in memory.candidate_setups(base, allow_quantization=True))
    assert any(s.zero == 3 for _, s, _ in memory.candidate_setups(replace(base, processes=2), allow_quantization=True))


def test_a_small_card_gets_a_quantized_lora_plan(deberta_v3_base, tmp_path, capsys):
    path = write_yaml(tmp_path / "cfg.yaml", v3_config(deberta_v3_base, tmp_path, train={"batch_size": 64}))
    assert memory.cli_main(["--config", str(path), "--gpu-memory", "1.5GiB"]) == 0
    out = capsys.readouterr().out
    assert "cheapest changes that fit" in out and "run with: accelerate launch peftkit/train.py" in out
    assert memory.cli_main(["--config", str(path), "--gpu-memory", "64GiB"]) == 0
    assert "fits in 64.00 GiB as configured" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "expected"), [("8GiB", 8 * GiB), ("8G", 8 * GiB), ("16GB", 16e9), ("7500MiB", 7500 * 2**20), ("1024", 1024)])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


def test_bad_budget_is_a_user_error(assets, tmp_path, capsys):
    path = write_yaml(tmp_path / "cfg.yaml", text_config(assets, tmp_path / "run"))
    assert memory.cli_main(["--config", str(path), "--gpu-memory", "eight gigs"]) == 2
    assert "--gpu-memory eight gigs" in capsys.readouterr().err


def test_vit_tokens_are_patches_plus_cls(assets, tmp_path):
    from conftest import image_config

    facts, _ = facts_and_setup(image_config(assets, tmp_path / "run"))
    assert facts.tokens == (32 // 8) ** 2 + 1


def test_startup_line_names_the_components(assets, tmp_path):
    line = memory.startup_line(validate_config(text_config(assets, tmp_path / "run")), processes=1, device="cpu")
    assert line.startswith("estimated peak memory per process") and "activations" in line and "optimizer states" in line


@pytest.mark.slow
def test_benchmark_quick_mode_measures_and_estimates(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory" / "bench_memory.py"), "--quick", "--models", "vit",
                           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["checkpointing"] for r in rows] == [False, True]
    assert all(r["measured"] > 0 and r["estimate"] > 0 for r in rows)
    assert "| vit lora |" in (tmp_path / "out" / "results.md").read_text()
