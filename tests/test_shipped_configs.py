"""Every shipped config is found, validates, and trains for two steps on a tiny model of its family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.config import CONFIG_DIR, load_config, validate_config
from peftkit.models import architecture_for, load_model_config

SHIPPED = sorted(CONFIG_DIR.rglob("*.yaml"))
EXPECTED_COUNT = 6  # update when a config is added: a config that silently disappears fails here


def test_all_configs_are_found() -> None:
    assert len(SHIPPED) == EXPECTED_COUNT, [p.relative_to(CONFIG_DIR).as_posix() for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_config_opens_with_its_command(path: Path) -> None:
    """Each config starts with a comment block naming the command that runs it and one override."""
    head = path.read_text().split("\nmodel:")[0]
    assert "peftkit" in head and "--config" in head, head
    assert "=" in head, "the header shows an override example"


def _family(name: str) -> str:
    if name.startswith("pkg:"):
        return "bert"
    lowered = name.lower()
    for family in ("deberta", "vit", "bert"):
        if family in lowered:
            return family
    raise AssertionError(f"no tiny model stands in for {name}")


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_config_runs_two_steps_on_a_tiny_model(path: Path, assets: dict, tmp_path: Path) -> None:
    from peftkit.train import run

    config = load_config(path)
    tiny = assets[_family(config.model.name)]
    raw = config.model_dump(mode="json")
    raw["model"]["name"] = str(tiny)
    raw["data"]["max_train_samples"] = 48
    raw["data"]["max_eval_samples"] = 16
    raw["train"].update(max_steps=2, batch_size=8, eval_every=None, early_stopping_patience=None)
    raw["output"].update(dir=str(tmp_path / "run"), trackers=["jsonl"])
    # The tiny family member keeps the shipped architecture preset.
    assert architecture_for(load_model_config(str(tiny)).model_type).preset
    summary = run(validate_config(raw))
    assert summary["final_step"] == 2
    assert (tmp_path / "run" / "best" / "labels.json").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_validation"]["samples"] == 16
