"""The benchmark runner end to end in quick mode (every case, 2 steps, tiny models), and its FLOP count.

No timing is asserted (CI machines are noisy); the files, fields and ratios must be there and sane.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/ lives beside the package, not inside it

from benchmarks.cases import CASES  # noqa: E402
from benchmarks.flops import cpu_peak, train_flops_per_sample  # noqa: E402


def test_quick_mode_writes_every_case_with_positive_ratios(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["mode"] == "quick"
    assert [c["name"] for c in report["cases"]] == [c.name for c in CASES]
    for case in report["cases"]:
        s = case["summary"]
        assert "error" not in s, (case["name"], s)
        assert case["steps"] == 2
        for key in ("throughput_ratio", "memory_ratio"):
            assert isinstance(s[key], float) and math.isfinite(s[key]) and s[key] > 0, (case["name"], key, s[key])
        for side in ("a", "b"):
            figures = s[side]
            assert figures["samples_per_s"] > 0 and figures["peak_mib"] > 0 and 0 < figures["mfu"] < 1, (case["name"], side, figures)
        # Both sides train exactly the same parameters (same targets, same head), or the comparison is void;
        # only a case that switches the method on purpose (LoRA vs. full) differs, and then as expected.
        if "adapter.method" in case["b_overrides"]:
            assert s["a"]["trainable_parameters"] < s["b"]["trainable_parameters"], case["name"]
        else:
            assert s["a"]["trainable_parameters"] == s["b"]["trainable_parameters"], case["name"]
        sides = [r["side"] for r in case["runs"]]
        assert sides == ["a", "b"], sides  # alternating, one pair in quick mode
    accuracy_cases = [c for c in report["cases"] if c["data"] == "rotten_tomatoes"]
    assert accuracy_cases and all(0 <= c["summary"][side]["test_accuracy"] <= 1 for c in accuracy_cases for side in "ab")
    table = (out / "results.md").read_text()
    assert "throughput A/B" in table and all(c.name in table for c in CASES)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flop_count_orders_methods_and_peak_is_derived() -> None:
    kw = {"linear_params": 1000, "trainable": 10, "layers": 2, "hidden": 8, "mean_t": 4.0, "mean_t2": 16.0}
    forward = 2 * 1000 * 4 + 4 * 2 * 8 * 16
    assert train_flops_per_sample("full", **kw) == 3 * forward
    assert train_flops_per_sample("lora", **kw) == 2 * forward + 2 * 10 * 4
    assert train_flops_per_sample("freeze", **kw) == forward + 40
    peak = cpu_peak()
    assert peak.per_core() > 1e9 and peak.cores >= 1 and "GFLOP/s" in peak.derivation(1)


def test_peftkit_builds_fused_adamw_on_cpu() -> None:
    """The fused AdamW the benchmarks credit (4-5x faster steps than torch's CPU default) is what training gets."""
    import torch

    from peftkit.optim import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(4, 4))]
    opt = make_optimizer([{"params": params, "names": ["w"], "lr": 1e-3, "weight_decay": 0.0}], "adamw", 1e-3)
    assert opt.defaults["fused"] is True
    params[0].grad = torch.ones(4, 4)
    opt.step()  # the fused CPU kernel runs
    assert torch.all(params[0] < 0)
    with torch.device("meta"):
        meta = [torch.nn.Parameter(torch.zeros(4, 4))]
    assert make_optimizer([{"params": meta, "lr": 1e-3, "weight_decay": 0.0}], "adamw", 1e-3).defaults["fused"] is None
