"""`--resume`: the main process verifies and chooses the checkpoint; the other processes receive its choice."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from peftkit import checkpoint, train
from peftkit.errors import UserError


def _checkpoint(root: Path, step: int) -> Path:
    target = root / f"step-{step:07d}"
    tmp = checkpoint.begin(target)
    (tmp / "model.safetensors").write_bytes(os.urandom(256))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    checkpoint.commit(target)
    return target


def _rank(main: bool, processes: int = 2) -> Any:
    """The two attributes of an Accelerator the choice reads."""
    return SimpleNamespace(is_main_process=main, num_processes=processes)


@pytest.fixture
def damaged_newest(tmp_path: Path) -> tuple[Path, Path]:
    """A run with a good checkpoint at step 10 and a truncated one at step 20."""
    good = _checkpoint(tmp_path / "checkpoints", 10)
    bad = _checkpoint(tmp_path / "checkpoints", 20)
    (bad / "model.safetensors").write_bytes(b"x")
    return tmp_path, good


def test_single_process_choice_is_unchanged(damaged_newest: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    run_dir, good = damaged_newest
    assert train.choose_resume_checkpoint(_rank(True, 1), run_dir, "auto") == good
    assert capsys.readouterr().out.count("skipping a damaged checkpoint") == 1
    assert train.choose_resume_checkpoint(_rank(True, 1), run_dir / "fresh", "auto") is None


def test_main_process_verifies_and_sends_its_choice(damaged_newest: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    run_dir, good = damaged_newest
    sent: list[list[Any]] = []
    monkeypatch.setattr(train, "broadcast_object_list", lambda obj, from_process=0: sent.append(list(obj)) or obj)
    assert train.choose_resume_checkpoint(_rank(True), run_dir, "auto") == good
    assert sent == [[str(good), None]]  # plain strings: picklable for any backend
    assert "skipping a damaged checkpoint" in capsys.readouterr().out


def test_other_processes_verify_nothing_and_print_nothing(damaged_newest: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    run_dir, good = damaged_newest

    def no_hashing(folder: Path) -> None:
        raise AssertionError(f"a non-main process verified {folder}")

    monkeypatch.setattr(checkpoint, "verify_manifest", no_hashing)
    monkeypatch.setattr(train, "broadcast_object_list", lambda obj, from_process=0: [str(good), None])
    assert train.choose_resume_checkpoint(_rank(False), run_dir, "auto") == good
    monkeypatch.setattr(train, "broadcast_object_list", lambda obj, from_process=0: [None, None])
    assert train.choose_resume_checkpoint(_rank(False), run_dir, "auto") is None
    assert capsys.readouterr().out == ""


def test_a_refused_checkpoint_stops_every_process(damaged_newest: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _ = damaged_newest
    bad = run_dir / "checkpoints" / "step-0000020"
    sent: list[list[Any]] = []
    monkeypatch.setattr(train, "broadcast_object_list", lambda obj, from_process=0: sent.append(list(obj)) or obj)
    with pytest.raises(UserError, match="cannot be used"):
        train.choose_resume_checkpoint(_rank(True), run_dir, str(bad))
    assert sent[0][0] is None and "cannot be used" in sent[0][1]
    # Another rank raises the same refusal instead of waiting for a run that never starts.
    monkeypatch.setattr(train, "broadcast_object_list", lambda obj, from_process=0: sent[0])
    with pytest.raises(UserError, match="cannot be used"):
        train.choose_resume_checkpoint(_rank(False), run_dir, str(bad))
