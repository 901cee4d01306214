"""With `train.gradient_checkpointing`, every adapter parameter gets a gradient (plain and k-bit, 1 and 2 processes)."""

from __future__ import annotations

import json
from pathlib import Path

import gc_probe
import pytest
from conftest import REPO, accelerate_launch, image_config, text_config, write_yaml

from peftkit import train
from peftkit.config import validate_config

PROBE = REPO / "tests" / "gc_probe.py"
CONFIGS = {"deberta": text_config, "vit": image_config}


def config(assets, run_dir: Path, kind: str, bits: int | None) -> dict:
    cfg = CONFIGS[kind](assets, run_dir, train={"gradient_checkpointing": True, "max_steps": 1})
    if bits:
        cfg["quantization"] = {"bits": bits}
    return cfg


def check_report(report: dict, layers: int = 2) -> None:
    assert report["checkpointed_layers"] == layers
    assert all(k.get("use_reentrant") is False for k in report["checkpoint_kwargs"]), report["checkpoint_kwargs"]
    assert report["checkpoint_calls"] == layers, "the forward pass did not go through the checkpointed layers"
    grads = report["grads"]
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    missing = [n for n, g in grads.items() if not g]
    assert not missing, f"adapter parameters without a gradient: {missing}"


@pytest.mark.parametrize(("kind", "bits"), [("deberta", None), ("vit", None), ("deberta", 4), ("vit", 8)])
def test_every_adapter_parameter_gets_a_gradient(assets, tmp_path, monkeypatch, kind, bits):
    if bits:
        pytest.importorskip("bitsandbytes", reason="k-bit paths need bitsandbytes")
    monkeypatch.setenv("GC_PROBE_OUT", str(tmp_path / "probe"))
    monkeypatch.setattr(train, "fit", gc_probe.probed_fit)
    train.run(validate_config(config(assets, tmp_path / "run", kind, bits)))
    check_report(json.loads((tmp_path / "probe" / "rank0.json").read_text()))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "bits"), [("deberta", None), ("vit", 8)])
def test_every_adapter_parameter_gets_a_gradient_under_ddp(assets, tmp_path, kind, bits):
    if bits:
        pytest.importorskip("bitsandbytes", reason="k-bit paths need bitsandbytes")
    cfg = write_yaml(tmp_path / "cfg.yaml", config(assets, tmp_path / "run", kind, bits))
    topo = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0", str(PROBE)]
    # The launcher runs the probe, which runs the recipe (the helper's script path is its first argument).
    proc = accelerate_launch("--config", str(cfg), extra=topo, env={"GC_PROBE_OUT": str(tmp_path / "probe")}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["world"] == 2
        check_report(report)
    # DDP averaged the gradients: both processes hold the same ones.
    assert reports[0]["grads"] == pytest.approx(reports[1]["grads"], rel=1e-5)
    assert reports[0]["loss"] != reports[1]["loss"], "each process should have seen its own batch"

