"""One measurement, in its own process: ``python -m benchmarks.worker SPEC.json OUT.json``.

A fresh process per run makes peak RSS (or CUDA peak) a per-run figure and keeps one run's caches,
threads and allocator state out of the next.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def measure(side: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train ``cfg`` with peftkit or with the Trainer baseline; the figures both sides report."""
    if side == "trainer":
        from benchmarks import baseline

        return baseline.run(cfg)
    from peftkit.artifacts import RunSaver
    from peftkit.config import validate_config
    from peftkit.train import run

    # The peak up to the first checkpoint (training and the final validation pass done, nothing saved
    # yet) is comparable with the baseline's, which saves nothing; the whole-process peak, which adds
    # the checkpoint writes, is reported beside it.
    marks: dict[str, int] = {}
    save_step = RunSaver.save_step

    def marked_save_step(self: RunSaver, state: Any) -> None:
        marks.setdefault("train_peak", _peak_rss())
        save_step(self, state)

    RunSaver.save_step = marked_save_step  # type: ignore[method-assign]
    try:
        s = run(validate_config(cfg), overwrite=True)
    finally:
        RunSaver.save_step = save_step  # type: ignore[method-assign]
    test = s.get("test_of_final_model") or {}
    return {"train_seconds": s["train_seconds"], "samples_seen": s["samples_seen"], "trainable_parameters": s["trainable_parameters"],
            "peak_train_bytes": marks.get("train_peak", s["peak_memory"]["bytes"]), "peak_bytes": s["peak_memory"]["bytes"],
            "test_accuracy": test.get("accuracy")}


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    result = measure(spec["side"], spec["config"])
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
