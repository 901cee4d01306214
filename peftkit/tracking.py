"""Run logs: stdout lines, a JSONL/CSV file of every logged step, and Accelerate's trackers.

TensorBoard, wandb and mlflow go through ``Accelerator(log_with=...)``; the JSONL and CSV files
are peftkit's own because Accelerate has no plain-file tracker, and they are what ``peftkit
report`` and the tests read.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

from peftkit.checkpoint import write_text

ACCELERATE_TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def accelerate_trackers(requested: list[str]) -> list[str]:
    """The requested trackers Accelerate runs whose package is installed (the rest are named on stdout)."""
    out = []
    for name in requested:
        module = ACCELERATE_TRACKERS.get(name)
        if module is None:
            continue
        if importlib.util.find_spec(module) is None and not (name == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            print(f"[peftkit] tracker `{name}` asked for in output.trackers but `{module}` is not installed; skipping it.")
            continue
        out.append(name)
    return out


class FileLog:
    """Append-only JSONL and/or CSV log of metrics, one row per logged step (main process only)."""

    def __init__(self, run_dir: Path, formats: list[str], enabled: bool = True) -> None:
        self.enabled = enabled
        self.jsonl = run_dir / "metrics.jsonl" if "jsonl" in formats or "csv" in formats else None
        self.csv = run_dir / "metrics.csv" if "csv" in formats else None

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled or self.jsonl is None:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.csv is not None:
            self._write_csv()

    def _write_csv(self) -> None:
        # Rewritten whole because columns appear as the run goes (eval metrics after train ones).
        rows = read_log(self.jsonl)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.csv, buffer.getvalue())


def read_log(path: Path) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl`` file."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
