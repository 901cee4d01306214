"""Multi-process runs through the real `accelerate launch` on CPU (gloo): DDP, DeepSpeed ZeRO-2/3, resume, refusals.

Tolerances: the same global batch split over two processes, or a run resumed from a checkpoint,
must give the trained adapter and the logged losses within 1e-5 (float32; the differences come
only from summation order and per-batch padding).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, TRAIN_SCRIPT, accelerate_launch, reload_and_evaluate, text_config, write_yaml
from safetensors.torch import load_file

from peftkit.tracking import read_log

pytestmark = pytest.mark.slow

TOL = 1e-5
ACC = REPO / "launch" / "accelerate"
TWO_CPU = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0"]


@pytest.fixture(scope="module")
def deterministic_deberta(assets: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DeBERTa with dropout off, so one process and two see the same forward pass."""
    folder = tmp_path_factory.mktemp("deberta_nodrop")
    shutil.copytree(assets["deberta"], folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pooler_dropout=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _cfg(assets: dict, run_dir: Path, **train) -> dict:
    return text_config(assets, run_dir, train={"group_by_length": False, "log_every": 1, **train})


def _launch(cfg: dict, tmp_path: Path, *extra_args: str, topo: list[str] | None = None, name: str = "cfg.yaml",
            env: dict | None = None) -> subprocess.CompletedProcess:
    path = write_yaml(tmp_path / name, cfg)
    proc = accelerate_launch("--config", str(path), *extra_args, extra=topo, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = [r for r in read_log(run_dir / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _final_eval(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "summary.json").read_text())["final_validation"]


def _reload_and_evaluate(folder: Path) -> dict[str, float]:
    return reload_and_evaluate(folder)


def test_two_process_ddp_matches_one_process_with_same_global_batch(assets: dict, deterministic_deberta: Path, tmp_path: Path) -> None:
    """16 samples per step either way: 1 process x 16 (cpu.yaml) vs 2 processes x 8 (cpu_ddp.yaml)."""
    model = {"model": {"name": str(deterministic_deberta), "task": "text-classification"}, "adapter": {"dropout": 0.0}}
    one = _cfg(assets, tmp_path / "one", batch_size=16, max_steps=3, eval_every=3) | model
    two = _cfg(assets, tmp_path / "two", batch_size=8, max_steps=3, eval_every=3) | model
    _launch(one, tmp_path, topo=["--config_file", str(ACC / "cpu.yaml")], name="one.yaml")
    proc = _launch(two, tmp_path, topo=["--config_file", str(ACC / "cpu_ddp.yaml")], name="two.yaml")

    assert "processes 2" in proc.stdout and "effective batch 8 x 1 accum x 2 proc = 16" in proc.stdout, proc.stdout[-2000:]
    a, b = _adapter(tmp_path / "one" / "last"), _adapter(tmp_path / "two" / "last")
    assert any("lora_B" in k and a[k].abs().max() > 0 for k in a), "the adapter did not train (lora_B still zero)"
    assert _max_diff(a, b) < TOL
    la, lb = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
    assert la.keys() == lb.keys() == {1, 2, 3}
    assert all(abs(la[s] - lb[s]) < TOL for s in la), (la, lb)
    assert _final_eval(tmp_path / "one")["loss"] == pytest.approx(_final_eval(tmp_path / "two")["loss"], abs=TOL)


def test_ddp_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(assets: dict, tmp_path: Path) -> None:
    """SIGKILL a 2-process run once step 2 is checkpointed; `--resume auto` must end where an uninterrupted run ends.

    Dropout stays on, so the RNG states restored from the checkpoint matter too.
    """
    topo = ["--config_file", str(ACC / "ddp.yaml"), "--num_processes", "2"]  # the GPU config, on CPU processes
    settings = {"batch_size": 8, "max_steps": 8, "eval_every": 2}
    _launch(_cfg(assets, tmp_path / "full", **settings), tmp_path, topo=topo, name="full.yaml")

    killed_dir = tmp_path / "killed"
    cfg_path = write_yaml(tmp_path / "killed.yaml", _cfg(assets, killed_dir, **settings) | {"output": {
        "dir": str(killed_dir), "trackers": ["jsonl"], "keep_checkpoints": 2}})
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *topo, str(TRAIN_SCRIPT), "--config", str(cfg_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed_dir / "checkpoints" / "step-0000002"
    deadline = time.time() + 600
    while not first.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    # SIGKILL the workers and the launcher: no chance to clean up. The workers are found by ancestry
    # because torchrun starts them in sessions of their own (a process-group kill would miss them).
    family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for member in family:
        member.kill()
    psutil.wait_procs(family, timeout=60)
    proc.wait()
    assert first.is_dir(), "the run never wrote its first checkpoint"
    assert not (killed_dir / "summary.json").exists(), "the run finished before it could be killed; the test proved nothing"

    resumed = _launch(_cfg(assets, killed_dir, **settings), tmp_path, "--resume", "auto", topo=topo, name="killed.yaml")
    match = re.search(r"resumed from \S+ at step (\d+)", resumed.stdout)
    assert match and 2 <= int(match.group(1)) < 8, resumed.stdout[-2000:]  # some training is left to redo
    full, res = _train_losses(tmp_path / "full"), _train_losses(killed_dir)
    assert full.keys() == res.keys() == set(range(1, 9))
    assert all(abs(full[s] - res[s]) < TOL for s in full), (full, res)
    fe, re_ = _final_eval(tmp_path / "full"), _final_eval(killed_dir)
    assert fe["accuracy"] == re_["accuracy"] and fe["loss"] == pytest.approx(re_["loss"], abs=TOL)
    assert _max_diff(_adapter(tmp_path / "full" / "last"), _adapter(killed_dir / "last")) < TOL


ONE_CPU = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.parametrize(
    ("topo", "env", "expected"),
    [
        # The silent trap: `--cpu` makes accelerate start ONE process whatever --num_processes says.
        (["--cpu", "--num_processes", "2"], None, "was asked for 2 processes but started 1"),
        # A WORLD_SIZE left in the environment, with no launcher to start the other ranks.
        (ONE_CPU, {"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set in the environment"),
    ],
    ids=["cpu-flag-starts-one-process", "faked-world-size"],
)
def test_mismatched_world_size_is_refused(assets: dict, tmp_path: Path, topo: list[str], env: dict | None, expected: str) -> None:
    cfg = write_yaml(tmp_path / "cfg.yaml", _cfg(assets, tmp_path / "run", max_steps=2))
    proc = accelerate_launch("--config", str(cfg), extra=topo, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "peftkit: error:" in proc.stderr and expected in " ".join(out.split()), out[-3000:]
    assert not (tmp_path / "run" / "config.yaml").exists(), "the run started before it was refused"


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_trains_saves_complete_adapter_and_resumes(assets: dict, tmp_path: Path, stage: str) -> None:
    """Two CPU processes under ZeRO-2/3: train, save the gathered adapter + head, reload, and (ZeRO-3) resume."""
    pytest.importorskip("deepspeed")
    topo = ["--config_file", str(ACC / f"deepspeed_{stage}.yaml"), "--num_processes", "2"]
    settings = {"batch_size": 8, "max_steps": 4, "eval_every": 2}
    run = tmp_path / "run"
    cfg = _cfg(assets, run, **settings) | {"output": {"dir": str(run), "trackers": ["jsonl"], "keep_checkpoints": 3}}
    proc = _launch(cfg, tmp_path, topo=topo)
    assert f"ZeRO-{stage[-1]}" in proc.stdout and "processes 2" in proc.stdout, proc.stdout[-2000:]

    # Complete: every LoRA pair of the 12 targeted projections, and the full-size head and pooler.
    weights = _adapter(run / "last")
    assert sum("lora_A" in k for k in weights) == sum("lora_B" in k for k in weights) == 12, sorted(weights)
    head = {k: tuple(v.shape) for k, v in weights.items() if "classifier" in k or "pooler" in k}
    assert (2, 64) in head.values() and (64, 64) in head.values(), head
    assert all(v.numel() > 0 for v in weights.values())
    # Reloaded alone, best/ reproduces the evaluation logged when it was saved.
    logged = json.loads((run / "best" / "metrics.json").read_text())["validation"]
    reproduced = _reload_and_evaluate(run / "best")
    assert reproduced["accuracy"] == logged["accuracy"] and reproduced["loss"] == pytest.approx(logged["loss"], abs=TOL)

    if stage != "zero3":
        return
    # Resume: a copy of the run cut back to its step-2 checkpoint (as if killed there) ends where the run ended.
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step-0000002", cut / "checkpoints" / "step-0000002")
    shutil.copy(run / "config.yaml", cut / "config.yaml")
    shutil.copy(run / "metrics.jsonl", cut / "metrics.jsonl")
    cut_cfg = _cfg(assets, cut, **settings) | {"output": {"dir": str(cut), "trackers": ["jsonl"], "keep_checkpoints": 3}}
    resumed = _launch(cut_cfg, tmp_path, "--resume", "auto", topo=topo, name="cut.yaml")
    assert "resumed from" in resumed.stdout
    full, res = _train_losses(run), _train_losses(cut)
    assert full.keys() == res.keys() and all(abs(full[s] - res[s]) < TOL for s in full), (full, res)
    assert _final_eval(run)["loss"] == pytest.approx(_final_eval(cut)["loss"], abs=TOL)
    assert _max_diff(_adapter(run / "last"), _adapter(cut / "last")) < TOL
