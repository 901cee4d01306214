"""Memory: the measured peak of a run (and, with the planner, the estimate before it)."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory(device: torch.device) -> dict[str, object]:
    """The measured peak, with the method named: CUDA's peak allocation, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "method": "torch.cuda.max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return {"bytes": int(rss if sys.platform == "darwin" else rss * 1024), "method": "peak RSS of the training process (getrusage)"}
