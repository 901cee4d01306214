"""Interrupted runs lose nothing: SIGTERM/SIGINT checkpoint and exit cleanly, SIGKILL resumes from the
last complete checkpoint, damaged checkpoints are never picked, NaN losses are caught at their step,
and nothing from a run directory is unpickled.

The signal tests drive the real training script in a subprocess; the NaN tests run the recipe
in-process so the loss can be replaced at a chosen step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TRAIN_SCRIPT, text_config, write_yaml

from peftkit import checkpoint

# 160 rows, micro-batch 8: 20 steps per epoch, 60 in all, a checkpoint every 10. Long enough that a
# signal sent when the first checkpoints appear lands mid-run, short enough for CI.
RUN = {"train": {"max_steps": 60, "batch_size": 8, "eval_every": 10, "log_every": 5, "lr": 5e-3, "seed": 0},
       "output": {"keep_checkpoints": 3}}

# Runs the training script with torch.load refusing full unpickling, so a resume proves that
# nothing in the run directory needs it (accelerate loads optimizer/RNG state with weights_only=True).
GUARD = """
import runpy, sys, torch
_load = torch.load
def _weights_only_load(*args, **kwargs):
    if kwargs.get("weights_only") is False:
        raise RuntimeError(f"unsafe unpickling (weights_only=False) of {args[0] if args else kwargs.get('f')}")
    return _load(*args, **kwargs)
torch.load = _weights_only_load
sys.argv = [SCRIPT, *sys.argv[1:]]
runpy.run_path(SCRIPT, run_name="__main__")
"""


def _config(assets: dict[str, Path], run_dir: Path) -> Path:
    cfg = text_config(assets, run_dir, **RUN)
    return write_yaml(run_dir.parent / f"{run_dir.name}.yaml", cfg)


def _train_cmd(tmp: Path, config: Path, *extra: str) -> list[str]:
    guard = tmp / "guarded_train.py"
    guard.write_text(GUARD.replace("SCRIPT", repr(str(TRAIN_SCRIPT))))
    return [sys.executable, str(guard), "--config", str(config), *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())


def _start_and_signal(cmd: list[str], run_dir: Path, sig: int, wait_for: int) -> tuple[int, str]:
    """Start training, send ``sig`` once ``wait_for`` step checkpoints are complete; return (rc, output)."""
    log = run_dir.parent / f"{run_dir.name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.time() + 300
        while len(checkpoint.step_checkpoints(run_dir / "checkpoints")) < wait_for:
            assert proc.poll() is None, f"training ended before the signal:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "no checkpoint appeared within 300 s"
            time.sleep(0.05)
        proc.send_signal(sig)
        rc = proc.wait(timeout=300)
    return rc, log.read_text()


def _final(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"step": summary["final_step"], **summary["final_validation"]}


def _assert_same_outcome(resumed: dict, reference: dict) -> None:
    assert resumed["step"] == reference["step"] == 60
    assert resumed["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-6)
    assert resumed["loss"] == pytest.approx(reference["loss"], rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module")
def reference(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same config trained without interruption."""
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = tmp / "run"
    proc = _run(_train_cmd(tmp, _config(assets, run_dir)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _final(run_dir)


@pytest.mark.slow
def test_sigkill_then_resume_auto_skips_truncated_checkpoint(assets, tmp_path, reference):
    run_dir = tmp_path / "run"
    config = _config(assets, run_dir)
    rc, _ = _start_and_signal(_train_cmd(tmp_path, config), run_dir, signal.SIGKILL, wait_for=2)
    assert rc == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()

    # Damage the newest complete checkpoint the way a full disk would: cut its adapter file short.
    ckpts = checkpoint.step_checkpoints(run_dir / "checkpoints")
    (newest_step, newest), (previous_step, _) = ckpts[-1], ckpts[-2]
    weights = newest / "model" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    proc = _run(_train_cmd(tmp_path, config, "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping a damaged checkpoint: {weights}" in proc.stdout
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{previous_step:07d}'} at step {previous_step}" in proc.stdout
    assert newest_step > previous_step
    _assert_same_outcome(_final(run_dir), reference)
    # Logged steps are not duplicated by the replay after the resume point.
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps))


@pytest.mark.slow
def test_sigterm_saves_resumable_checkpoint(assets, tmp_path, reference):
    run_dir = tmp_path / "run"
    config = _config(assets, run_dir)
    rc, out = _start_and_signal(_train_cmd(tmp_path, config), run_dir, signal.SIGTERM, wait_for=1)
    assert rc == 0, out[-3000:]
    assert "Traceback" not in out
    assert "stopped by a signal at step" in out and "--resume auto" in out
    stopped_at = int(out.split("stopped by a signal at step ")[1].split(";")[0])
    assert 10 <= stopped_at < 60
    newest_step, newest = checkpoint.step_checkpoints(run_dir / "checkpoints")[-1]
    assert newest_step == stopped_at and checkpoint.verify_manifest(newest) is None
    assert json.loads((run_dir / "last" / "metrics.json").read_text())["interrupted"] is True
    # Scheduler state travels as JSON; nothing accelerate would unpickle with weights_only=False.
    assert (newest / "scheduler.json").is_file() and not list(newest.rglob("custom_checkpoint_*"))

    proc = _run(_train_cmd(tmp_path, config, "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {stopped_at}" in proc.stdout
    _assert_same_outcome(_final(run_dir), reference)


def test_sigint_handler_sets_flag_then_second_interrupt_stops():
    from peftkit.loop import StopSignal

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run as a background job
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------------------------------
# Checkpoint folders: atomic, verified
# ------------------------------------------------------------------------------------------


def _fake_checkpoint(root: Path, step: int) -> Path:
    target = root / f"step-{step:07d}"
    tmp = checkpoint.begin(target)
    (tmp / "state").mkdir()
    (tmp / "state" / "model.safetensors").write_bytes(os.urandom(256))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    checkpoint.commit(target)
    return target


def test_latest_valid_skips_truncated_missing_and_partial(tmp_path):
    root = tmp_path / "checkpoints"
    good = _fake_checkpoint(root, 10)
    truncated = _fake_checkpoint(root, 20)
    missing = _fake_checkpoint(root, 30)
    partial = checkpoint.begin(root / "step-0000040")  # a crash while writing: never renamed into place
    (partial / "trainer_state.json").write_text("{}")
    weights = truncated / "state" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (missing / "trainer_state.json").unlink()

    found, skipped = checkpoint.latest_valid(root)
    assert found == good
    assert len(skipped) == 2
    assert "trainer_state.json is missing" in skipped[0] and "truncated" in skipped[1]
    assert [s for s, _ in checkpoint.step_checkpoints(root)] == [10, 20, 30]


def test_resume_from_damaged_checkpoint_is_a_user_error(tmp_path):
    from peftkit.errors import UserError
    from peftkit.train import find_resume_checkpoint

    ckpt = _fake_checkpoint(tmp_path / "checkpoints", 10)
    (ckpt / "state" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match=r"cannot be used.*model\.safetensors"):
        find_resume_checkpoint(tmp_path, str(ckpt))


# ------------------------------------------------------------------------------------------
# Non-finite losses
# ------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _nan_at_training_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the training loss NaN at optimizer step ``step`` (evaluation losses stay untouched)."""
    import torch
    import torch.nn.functional as F

    real = F.cross_entropy
    calls = {"n": 0}

    def cross_entropy(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == step:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)


def test_nan_loss_stops_at_that_step(assets, tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    from peftkit.config import validate_config
    from peftkit.errors import guarded
    from peftkit.train import run

    cfg = validate_config(text_config(assets, tmp_path / "run", train={"max_steps": 6, "eval_every": 2, "batch_size": 16}))
    _nan_at_training_step(monkeypatch, 3)
    assert guarded(lambda: run(cfg)) == 2
    err = capsys.readouterr().err
    assert "loss became nan at step 3" in err
    assert "train.lr" in err and "bf16" in err and "train.on_nan: skip" in err
    assert "Traceback" not in err
    # The last good checkpoint (step 2) is kept and verifies; nothing was saved after the fault.
    steps = [s for s, _ in checkpoint.step_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == [2]
    assert checkpoint.verify_manifest(tmp_path / "run" / "checkpoints" / "step-0000002") is None


def test_nan_loss_skip_skips_only_that_step(assets, tmp_path, monkeypatch, fresh_accelerate_state):
    import math

    from peftkit.config import validate_config
    from peftkit.train import run

    cfg = validate_config(text_config(assets, tmp_path / "run", train={"max_steps": 5, "batch_size": 16, "on_nan": "skip"}))
    _nan_at_training_step(monkeypatch, 3)
    summary = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped_nonfinite")] == [3]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == [1, 2, 4, 5]  # no made-up loss for the skipped step
    assert all(math.isfinite(v) for v in losses.values())
    assert summary["final_step"] == 5 and math.isfinite(summary["final_validation"]["loss"])
