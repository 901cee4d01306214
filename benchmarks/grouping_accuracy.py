"""Does length-grouped batching cost accuracy? The demo task, three batch orders, several seeds.

    python -m benchmarks.grouping_accuracy                      # 3 orders x 3 seeds, 2 runs at a time
    python -m benchmarks.grouping_accuracy --seeds 42 --orders plain grouped

Each run is ``configs/demo/minilm_lora.yaml`` (real MiniLM weights, Rotten Tomatoes, LoRA, 150 steps
of 32) in its own process, scored on the whole fixed 1,000-review test split. The orders:

- ``plain``: a seeded shuffle (``train.group_by_length: false``);
- ``grouped``: peftkit's length grouping (the default): batches of similar length, in random order;
- ``transformers``: transformers' ``get_length_grouped_indices`` (what ``Trainer(group_by_length=True)``
  uses): the same batches, but within each pool of 50 batches ordered from long to short.

Results: ``benchmarks/results/grouping/results.json`` and ``results.md``. The training times are
for comparing orders within one session only (two runs share the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
ORDERS = ("plain", "grouped", "transformers")


def one_run(order: str, seed: int, run_dir: str) -> dict[str, Any]:
    """Train the demo config with one batch order and seed (in this process); the test figures."""
    from peftkit import data
    from peftkit.config import validate_config
    from peftkit.train import run

    if order == "transformers":
        from transformers.trainer_pt_utils import get_length_grouped_indices

        data.length_grouped_order = lambda lengths, batch_size, generator: get_length_grouped_indices(lengths, batch_size, generator=generator)
    cfg = yaml.safe_load((REPO / "configs" / "demo" / "minilm_lora.yaml").read_text())
    cfg["train"] |= {"seed": seed, "group_by_length": order != "plain"}
    cfg["output"] = {"dir": run_dir, "trackers": ["jsonl"], "keep_checkpoints": 1}
    s = run(validate_config(cfg), overwrite=True)
    test = s["test_of_final_model"]
    return {"order": order, "seed": seed, "train_seconds": s["train_seconds"], "test_accuracy": test["accuracy"],
            "test_f1_macro": test["f1_macro"], "test_samples": test["samples"]}


def in_subprocess(order: str, seed: int, work: Path) -> dict[str, Any]:
    """:func:`one_run` in a fresh process (one OpenMP thread, offline)."""
    out = work / f"{order}_{seed}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    code = ("import json, sys; from benchmarks.grouping_accuracy import one_run; "
            f"json.dump(one_run({order!r}, {seed}, {str(work / f'{order}_{seed}')!r}), open({str(out)!r}, 'w'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"order": order, "seed": seed, "error": proc.stderr[-2000:]}
    return json.loads(out.read_text())


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    """Per-run rows and a mean per order."""
    lines = [f"Command: `{report['command']}`  ", f"Started {report['started']}, finished {report['finished']}.", "",
             "| order | seed | test accuracy | test macro-F1 | train seconds |", "|---|---|---|---|---|"]
    ok = [r for r in report["runs"] if "error" not in r]
    for r in sorted(ok, key=lambda r: (ORDERS.index(r["order"]), r["seed"])):
        lines.append(f"| {r['order']} | {r['seed']} | {r['test_accuracy']:.3f} | {r['test_f1_macro']:.3f} | {r['train_seconds']:.0f} |")
    lines += ["", "| order | mean test accuracy | mean train seconds |", "|---|---|---|"]
    for order in ORDERS:
        rows = [r for r in ok if r["order"] == order]
        if rows:
            lines.append(f"| {order} | {statistics.mean(r['test_accuracy'] for r in rows):.4f} "
                         f"| {statistics.mean(r['train_seconds'] for r in rows):.0f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grouping_accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orders", nargs="*", choices=ORDERS, default=list(ORDERS))
    p.add_argument("--seeds", nargs="*", type=int, default=[42, 43, 44])
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2: one per core here)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "grouping")
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "grouping")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.grouping_accuracy" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report: dict[str, Any] = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    # Seeds outer, orders inner: the runs sharing the machine at one time are of different orders.
    jobs = [(order, seed) for seed in args.seeds for order in args.orders]
    with ThreadPoolExecutor(args.parallel) as pool:
        report["runs"] = list(pool.map(lambda job: in_subprocess(*job, args.work), jobs))
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    write_markdown(args.out / "results.md", report)
    print((args.out / "results.md").read_text())
    failed = [r for r in report["runs"] if "error" in r]
    for r in failed:
        print(f"{r['order']} seed {r['seed']} failed:\n{r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
