"""``peftkit report RUN``: PNG plots of loss, learning rate and evaluation metrics, and a markdown summary.

Everything comes from the plain files a run writes (``metrics.jsonl``, ``summary.json``,
``config.yaml``); nothing is unpickled, and a run that is still going or was interrupted can be
reported on too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from peftkit.errors import UserError, guarded

# One figure per entry: file name, title, and the logged keys it draws (those present are drawn).
PLOTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "loss.png": ("Loss", ("loss", "eval_loss")),
    "lr.png": ("Learning rate", ("lr",)),
    "eval.png": ("Validation metrics", ("eval_accuracy", "eval_f1_macro")),
}


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r["step"]), float(r[key])) for r in rows if key in r and "step" in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per :data:`PLOTS` entry that has data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    written = []
    for filename, (title, keys) in PLOTS.items():
        series = {k: _series(rows, k) for k in keys}
        series = {k: v for k, v in series.items() if v[0]}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for key, (x, y) in series.items():
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename)
        plt.close(fig)
        written.append(out / filename)
    return written


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def markdown(run_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any] | None, plots: list[Path], out: Path) -> str:
    """The summary page: outcome, settings, the evaluation table and the plots."""
    lines = [f"# Run report: {run_dir}", ""]
    if summary:
        lines += ["## Outcome", "", "| | |", "|---|---|"]
        keys = ("best_metric", "best_value", "best_step", "final_step", "stopped_early", "train_seconds", "wall_seconds",
                "samples_seen", "trainable_parameters", "total_parameters", "best_dir")
        lines += [f"| {k} | {_fmt(summary.get(k))} |" for k in keys if k in summary]
        for name in ("final_validation", "test_of_final_model"):
            if summary.get(name):
                lines.append(f"| {name} | " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary[name].items()) + " |")
        lines.append("")
    else:
        last = max((r.get("step", 0) for r in rows), default=0)
        lines += [f"No summary.json: the run is still going, was interrupted or failed; last logged step {last}.", ""]
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        cfg = yaml.safe_load(config.read_text()) or {}
        picks = [("model.name", cfg.get("model", {}).get("name")), ("adapter.method", cfg.get("adapter", {}).get("method")),
                 ("adapter.r", cfg.get("adapter", {}).get("r")), ("train.lr", cfg.get("train", {}).get("lr")),
                 ("train.batch_size", cfg.get("train", {}).get("batch_size")), ("train.grad_accum", cfg.get("train", {}).get("grad_accum")),
                 ("train.precision", cfg.get("train", {}).get("precision")), ("quantization.bits", cfg.get("quantization", {}).get("bits"))]
        lines += ["## Settings", "", "| key | value |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in picks], ""]
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    if evals:
        cols = [k for k in ("eval_loss", "eval_accuracy", "eval_f1_macro") if any(k in r for r in evals)]
        lines += ["## Evaluations", "", "| step | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {r.get('step')} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in evals]
        lines.append("")
    skipped = sum(1 for r in rows if r.get("skipped_nonfinite"))
    if skipped:
        lines += [f"**{skipped} step(s) skipped for a non-finite loss** (`train.on_nan: skip`).", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots] + [""]
    return "\n".join(lines)


def read_rows(log: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a cut-short last line (a run killed mid-write) is dropped."""
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{log} line {number} is not valid JSON; was the file edited? Fix or delete that line.") from None
    return rows


def write_report(run_dir: Path, out: Path | None = None) -> tuple[Path, list[Path]]:
    """Write the plots and ``report.md`` for ``run_dir`` into ``out`` (default ``RUN/report``)."""
    run_dir = Path(run_dir)
    log = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"Run directory {run_dir} does not exist; give the `output.dir` of a run.")
    if not log.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl, so there is nothing to plot. Is it a run's `output.dir`? "
                        "Runs log there when `output.trackers` includes `jsonl` (the default) or `csv`.")
    rows = read_rows(log)
    if not rows:
        raise UserError(f"{log} is empty: the run logged no step yet.")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(rows, out)
    page = out / "report.md"
    page.write_text(markdown(run_dir, rows, summary, plots, out))
    return page, plots


def cli_main(argv: list[str] | None = None) -> int:
    """``peftkit report RUN [--out DIR] [--debug]``."""
    ap = argparse.ArgumentParser(prog="peftkit report", description="Plots and a markdown summary of a run.")
    ap.add_argument("run", help="the run directory (a config's output.dir)")
    ap.add_argument("--out", default=None, help="where to write (default: RUN/report)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = ap.parse_args(argv)

    def work() -> None:
        page, plots = write_report(Path(args.run), None if args.out is None else Path(args.out))
        print(f"[peftkit] report: {page}" + "".join(f"\n[peftkit] plot: {p}" for p in plots))

    return guarded(work, debug=args.debug)
