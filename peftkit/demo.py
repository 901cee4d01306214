"""``peftkit demo``: LoRA vs. a linear probe on real MiniLM weights and Rotten Tomatoes, offline.

Both runs use the same data, steps, batch and seed; only the adapter differs. Each is the shipped
recipe run as a user would run it, and the demo ends with both held-out scores side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from peftkit.config import resolve_config_path

RUNS = (("LoRA (r=8)", "demo/minilm_lora.yaml"), ("linear probe", "demo/minilm_probe.yaml"))


def cli_main(argv: list[str]) -> int:
    """Run both demo configs, then print their held-out accuracy and macro-F1."""
    p = argparse.ArgumentParser(prog="peftkit demo", description=__doc__)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps for both runs (default: the configs' 150)")
    p.add_argument("--out", default="runs", help="parent folder of the two run directories")
    args = p.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    results = []
    script = Path(__file__).with_name("train.py")
    for title, name in RUNS:
        run_dir = Path(args.out) / Path(name).stem.replace("minilm", "demo_minilm")
        overrides = [f"output.dir={run_dir}"] + ([f"train.max_steps={args.steps}"] if args.steps else [])
        print(f"\n### {title}: {resolve_config_path(name)}", flush=True)
        code = subprocess.call([sys.executable, str(script), "--config", name, *overrides, "--overwrite"], env=env)
        if code != 0:
            return code
        results.append((title, json.loads((run_dir / "summary.json").read_text())))
    print("\nRotten Tomatoes, held-out test split (1,000 reviews), same steps, data and seed:")
    print(f"{'method':<14} {'trainable params':>17} {'test accuracy':>14} {'test macro-F1':>14} {'train s':>8}")
    for title, s in results:
        t = s["test_of_final_model"]
        print(f"{title:<14} {s['trainable_parameters']:>17,} {t['accuracy']:>14.4f} {t['f1_macro']:>14.4f} {s['train_seconds']:>8.0f}")
    lora, probe = (r[1]["test_of_final_model"]["accuracy"] for r in results)
    verdict = "beats" if lora > probe else "does NOT beat"
    print(f"\nLoRA {verdict} the linear probe by {100 * (lora - probe):+.1f} accuracy points.")
    return 0
