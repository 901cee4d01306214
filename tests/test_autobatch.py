"""Automatic micro-batch: an out-of-memory probe halves the micro-batch and doubles accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import text_config
from transformers import DebertaV2ForSequenceClassification

from peftkit.config import validate_config
from peftkit.train import run

FITS = 4  # the simulated device holds at most this many rows per forward


@pytest.fixture
def small_device(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Forward passes on more than FITS rows raise the allocator's out-of-memory error; sizes are recorded."""
    seen: list[int] = []
    original = DebertaV2ForSequenceClassification.forward

    def forward(self, *args, **kwargs):
        rows = kwargs["input_ids"].shape[0]
        seen.append(rows)
        if rows > FITS:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB. out of memory.")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DebertaV2ForSequenceClassification, "forward", forward)
    return seen


def test_oom_halves_micro_batch_and_keeps_effective_batch(assets: dict, tmp_path: Path, small_device: list[int], capsys) -> None:
    cfg = text_config(assets, tmp_path / "run", train={"batch_size": 16, "grad_accum": 1, "auto_batch": True, "max_steps": 3, "eval_batch_size": FITS})
    summary = run(validate_config(cfg))
    out = capsys.readouterr().out
    assert "training with 4 x 4 accum" in out
    assert summary["final_step"] == 3
    # Every training forward used the micro-batch that fits; 3 steps x 4 micro-batches x 4 rows were seen.
    train_forwards = small_device[small_device.index(4):]
    assert max(train_forwards) <= FITS
    assert summary["samples_seen"] == 3 * 16
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert (state["micro_batch"], state["grad_accum"]) == (4, 4)


def test_without_auto_batch_oom_is_not_hidden(assets: dict, tmp_path: Path, small_device: list[int]) -> None:
    cfg = text_config(assets, tmp_path / "run", train={"batch_size": 16, "max_steps": 2})
    with pytest.raises(RuntimeError, match="out of memory"):
        run(validate_config(cfg))


def test_probe_uses_longest_rows() -> None:
    from peftkit.autobatch import probe_rows

    class Rows(list):
        column_names = ("length",)

        def __getitem__(self, key):
            if key == "length":
                return [r["length"] for r in self]
            return list.__getitem__(self, key)

    data = Rows([{"length": n} for n in (3, 9, 1, 7)])
    batch = probe_rows(data, lambda rows: {"x": torch.tensor([r["length"] for r in rows])}, 2)
    assert batch["x"].tolist() == [9, 7]
