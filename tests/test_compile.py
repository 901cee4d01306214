"""`train.compile: true` trains through torch.compile and saves a plain, reloadable adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import reload_and_evaluate, text_config

from peftkit.config import validate_config
from peftkit.train import run

pytestmark = pytest.mark.slow


def test_compiled_run_saves_an_uncompiled_adapter(assets: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary = run(validate_config(text_config(assets, run_dir, train={"max_steps": 3, "compile": True})))
    assert summary["final_step"] == 3
    # The saved adapter has the plain module names (no `_orig_mod.` from the compiled wrapper) ...
    from safetensors.torch import load_file

    keys = list(load_file(str(run_dir / "best" / "adapter_model.safetensors")))
    assert keys and not any("_orig_mod" in k for k in keys)
    # ... and, reloaded without compiling, reproduces the metrics the compiled model logged.
    reproduced = reload_and_evaluate(run_dir / "best")
    logged = json.loads((run_dir / "best" / "metrics.json").read_text())["validation"]
    assert reproduced["accuracy"] == logged["accuracy"]
    assert reproduced["loss"] == pytest.approx(logged["loss"], abs=1e-4)
