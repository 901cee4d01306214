"""``peftkit report RUN``: PNG plots that open as images and a markdown summary, from a real run's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, text_config


@pytest.fixture(scope="module")
def trained_run(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step run with an evaluation every 2 steps (in-process: a few seconds)."""
    from accelerate.state import AcceleratorState, GradientState

    from peftkit.config import validate_config
    from peftkit.train import run

    run_dir = tmp_path_factory.mktemp("report") / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    run(validate_config(text_config(assets, run_dir, train={"max_steps": 6, "eval_every": 2, "log_every": 1})))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return run_dir


def test_report_writes_pngs_that_open_and_a_summary(trained_run, tmp_path):
    from PIL import Image

    out = tmp_path / "report"
    proc = run_cli("report", str(trained_run), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("loss.png", "lr.png", "eval.png"):
        path = out / name
        assert f"plot: {path}" in proc.stdout
        with Image.open(path) as image:
            image.verify()  # a complete, uncorrupted PNG
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 200
            # Not a blank canvas: a plot has lines and text in several colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 10
    page = (out / "report.md").read_text()
    summary = json.loads((trained_run / "summary.json").read_text())
    assert f"| best_value | {summary['best_value']:.4g} |" in page
    assert f"| final_step | {summary['final_step']} |" in page
    assert "| train.lr | 0.005 |" in page
    # One evaluation row per eval (steps 2, 4, 6), and every plot linked.
    eval_rows = [line for line in page.splitlines() if line.startswith(("| 2 |", "| 4 |", "| 6 |"))]
    assert len(eval_rows) == 3
    assert all(f"]({name})" in page for name in ("loss.png", "lr.png", "eval.png"))


def test_report_on_an_unfinished_run(tmp_path):
    from peftkit.report import write_report

    rows = [{"step": s, "epoch": 0, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 6)] + [{"step": 3, "skipped_nonfinite": 1}]
    # Killed while writing its last line: that line is dropped, the rest reported.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    page, plots = write_report(tmp_path)
    assert [p.name for p in plots] == ["loss.png", "lr.png"]  # no evaluation yet: no eval plot
    text = page.read_text()
    assert "No summary.json" in text and "last logged step 5" in text
    assert "1 step(s) skipped for a non-finite loss" in text


@pytest.mark.parametrize(
    ("setup", "names"),
    [
        (lambda d: d / "missing", ("missing", "does not exist")),
        (lambda d: d, ("metrics.jsonl", "output.dir")),
        (lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n') and d, ("metrics.jsonl", "line 2")),
        (lambda d: (d / "metrics.jsonl").write_text("") == 0 and d, ("metrics.jsonl", "empty")),
    ],
    ids=["no_such_dir", "not_a_run", "cut_short_log", "empty_log"],
)
def test_report_mistakes_are_named(setup, names, tmp_path, capsys):
    from peftkit.report import cli_main

    target = setup(tmp_path)
    assert cli_main([str(target)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    for name in names:
        assert name in err
