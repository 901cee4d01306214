"""Run the training recipe with its loop replaced by one probed step; used by test_gradient_checkpointing.

    accelerate launch ... tests/gc_probe.py peftkit/train.py --config X   (GC_PROBE_OUT=folder)

The recipe sets the model up exactly as in a real run (quantization, k-bit preparation,
checkpointing, adapter, accelerate.prepare); instead of ``fit`` the probe runs one forward and
backward on a training batch and writes, per process, how checkpointing was configured, how often
it ran, and the gradient norm of every adapter parameter.
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

import torch

import peftkit.loop


def probed_fit(accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any, train_loader: Any, *args: Any, **kwargs: Any) -> Any:
    """One forward/backward through the prepared model; records checkpointing and adapter gradients."""
    state = args[4] if len(args) > 4 else kwargs.get("state")
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    calls = {"n": 0}
    kwargs_seen = []
    for layer in layers:
        func = layer._gradient_checkpointing_func
        kwargs_seen.append(dict(getattr(func, "keywords", {})))

        def counted(*a: Any, _func: Any = func, **k: Any) -> Any:
            calls["n"] += 1
            return _func(*a, **k)

        layer._gradient_checkpointing_func = functools.wraps(func)(counted) if hasattr(func, "__name__") else counted
    # LoRA starts with B = 0, which alone zeroes every gradient of A; a small, seeded (so equal on
    # every process) B makes a missing gradient mean a broken path, not the initialisation.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    model.train()
    batch = next(iter(train_loader))
    loss = model(**batch).loss
    accelerator.backward(loss)
    grads = {n: (None if p.grad is None else float(p.grad.float().norm())) for n, p in model.named_parameters() if "lora_" in n}
    out = Path(os.environ["GC_PROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    report = {"checkpointed_layers": len(layers), "checkpoint_kwargs": kwargs_seen, "checkpoint_calls": calls["n"],
              "loss": float(loss), "grads": grads, "world": accelerator.num_processes}
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    optimizer.zero_grad(set_to_none=True)
    # Marked as interrupted, the recipe saves `last/` and returns without a final evaluation.
    state.interrupted = True
    return state


def install() -> None:
    """Replace the loop's ``fit`` (the recipe imports it from ``peftkit.loop`` and holds its own name)."""
    peftkit.loop.fit = probed_fit
    if "peftkit.train" in sys.modules:
        sys.modules["peftkit.train"].fit = probed_fit


if __name__ == "__main__":
    install()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
