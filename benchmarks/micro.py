"""Micro-benchmarks of per-step work that has no config switch yet: AdamW's implementation on CPU, and
gradient clipping over all parameters vs. the trainable ones only.

``python -m benchmarks.micro [--quick]`` prints JSON; :mod:`benchmarks.run` runs it in its own
process and puts the figures in the results. Each variant is timed in alternation (A B C A B C ...)
and the median per step is reported.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import torch


def _params(sizes: list[tuple[int, ...]], trainable: bool = True) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    out = []
    for shape in sizes:
        p = torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.02, requires_grad=trainable)
        if trainable:
            p.grad = torch.randn(*shape, generator=g) * 1e-3
        out.append(p)
    return out


def _encoder_shapes(hidden: int, layers: int, ffn: int) -> list[tuple[int, ...]]:
    per_layer = [(hidden, hidden)] * 4 + [(ffn, hidden), (hidden, ffn)] + [(hidden,)] * 6 + [(ffn,)]
    return per_layer * layers


def _lora_shapes(hidden: int, layers: int, ffn: int, r: int = 8) -> list[tuple[int, ...]]:
    pairs = [(hidden, hidden)] * 4 + [(ffn, hidden), (hidden, ffn)]
    return [s for out_f, in_f in pairs for s in ((r, in_f), (out_f, r))] * layers


def time_adamw(shapes: list[tuple[int, ...]], iters: int) -> dict[str, float]:
    """Milliseconds per ``optimizer.step()`` for the single-tensor, foreach and fused AdamW on CPU."""
    variants = {"single-tensor (torch default on CPU)": {"foreach": False}, "foreach": {"foreach": True},
                "fused (peftkit and Trainer default)": {"fused": True}}
    opts = {name: torch.optim.AdamW(_params(shapes), lr=1e-4, weight_decay=0.01, **kw) for name, kw in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(iters + 1):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if i:  # the first step allocates the moment buffers
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def time_clip(trainable: list[torch.nn.Parameter], frozen: list[torch.nn.Parameter], iters: int) -> dict[str, float]:
    """Milliseconds per ``clip_grad_norm_`` over every parameter (frozen ones included) vs. the trainable list."""
    everything = frozen + trainable
    times: dict[str, list[float]] = {"all parameters (per step)": [], "trainable only (listed once)": []}
    for _ in range(iters):
        for name, params in (("all parameters (per step)", everything), ("trainable only (listed once)", trainable)):
            t0 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_([p for p in params] if name.startswith("all") else params, 1.0)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def run(quick: bool = False) -> dict[str, Any]:
    """The figures for a MiniLM-sized and a DeBERTa-v3-base-sized encoder (tiny ones with ``quick``)."""
    torch.set_num_threads(1)
    models = {"tiny (64 wide, 2 layers)": (64, 2, 128)} if quick else {"MiniLM-L6 (384 wide, 6 layers)": (384, 6, 1536),
                                                                        "DeBERTa-v3-base encoder (768 wide, 12 layers)": (768, 12, 3072)}
    iters = 3 if quick else 15
    out: dict[str, Any] = {"adamw_full_ms": {}, "adamw_lora_ms": {}, "clip_lora_ms": {}}
    for name, (h, n, f) in models.items():
        out["adamw_full_ms"][name] = time_adamw(_encoder_shapes(h, n, f), iters)
        out["adamw_lora_ms"][name] = time_adamw(_lora_shapes(h, n, f), iters)
        out["clip_lora_ms"][name] = time_clip(_params(_lora_shapes(h, n, f)), _params(_encoder_shapes(h, n, f), trainable=False), iters)
    return out


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:])))
