"""Recipe tests: the real `accelerate launch peftkit/train.py` on tiny DeBERTa-v2 and ViT models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import accelerate_launch, image_config, reload_and_evaluate, text_config, write_yaml

from peftkit.artifacts import load_trained
from peftkit.tracking import read_log

pytestmark = pytest.mark.slow

MODEL_FOLDER_FILES = {"adapter_config.json", "adapter_model.safetensors", "labels.json", "config.yaml", "metrics.json", "manifest.json"}


def _launch(cfg: dict, tmp_path: Path) -> dict:
    path = write_yaml(tmp_path / "cfg.yaml", cfg)
    proc = accelerate_launch("--config", str(path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"stdout": proc.stdout, "stderr": proc.stderr}


def _reload_and_evaluate(run_dir: Path) -> tuple[dict, dict]:
    """best/ loaded fresh and evaluated as the loop did, and the metrics the run logged for it."""
    logged = json.loads((run_dir / "best" / "metrics.json").read_text())["validation"]
    return reload_and_evaluate(run_dir / "best"), logged


def _check_run(run_dir: Path, processor_file: str) -> None:
    # The run directory is complete.
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
    for name in ("best", "last"):
        files = {p.name for p in (run_dir / name).iterdir()}
        assert MODEL_FOLDER_FILES | {processor_file} <= files, (name, files)
    # The loss falls: the mean of the last third of logged losses is below that of the first third.
    losses = [r["loss"] for r in read_log(run_dir / "metrics.jsonl") if "loss" in r]
    third = max(len(losses) // 3, 1)
    assert sum(losses[-third:]) / third < sum(losses[:third]) / third, losses
    # Reloading best/ reproduces the logged evaluation metrics.
    reproduced, logged = _reload_and_evaluate(run_dir)
    assert reproduced["accuracy"] == logged["accuracy"]
    assert reproduced["f1_macro"] == logged["f1_macro"]
    assert reproduced["loss"] == pytest.approx(logged["loss"], abs=1e-5)


def test_deberta_lora_recipe(assets: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = text_config(assets, run_dir, train={"epochs": 3, "eval_every": 6, "log_every": 2})
    out = _launch(cfg, tmp_path)
    assert "trainable" in out["stdout"] and "effective batch 16" in out["stdout"]
    _check_run(run_dir, "tokenizer_config.json")
    # The adapter carries the trained head and DeBERTa's pooler.
    from safetensors.torch import load_file

    keys = load_file(str(run_dir / "best" / "adapter_model.safetensors")).keys()
    assert any("classifier" in k for k in keys) and any("pooler" in k for k in keys)
    # The label map is wired into the reloaded model's config.
    trained = load_trained(run_dir / "best")
    assert trained.model.config.id2label == {0: "neg", 1: "pos"}


def test_vit_lora_recipe(assets: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = image_config(assets, run_dir, train={"epochs": 4, "log_every": 1, "lr": 1e-2})
    _launch(cfg, tmp_path)
    _check_run(run_dir, "preprocessor_config.json")


def test_text_pairs_and_overrides(assets: dict, tmp_path: Path) -> None:
    """Text pairs (NLI-style) train; a command-line override wins over the YAML."""
    import csv

    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["premise", "hypothesis", "label"])
        for i in range(48):
            w.writerow([f"the movie was {'good' if i % 2 else 'bad'}", f"it is {'great' if i % 3 else 'awful'}", ["entail", "contra", "neutral"][i % 3]])
    run_dir = tmp_path / "run"
    cfg = text_config(assets, run_dir, data={"train": str(pairs), "validation": None, "text_column": "premise",
                                             "text_pair_column": "hypothesis", "label_column": "label"},
                      train={"max_steps": 3})
    path = write_yaml(tmp_path / "cfg.yaml", cfg)
    proc = accelerate_launch("--config", str(path), "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_step"] == 2  # the override (2) won over the YAML (3)
    assert json.loads((run_dir / "best" / "labels.json").read_text()) == ["contra", "entail", "neutral"]
