"""Model FLOPs per training sample and this machine's peak FLOP rate (for the achieved share, "MFU").

What is counted (dense matmul FLOPs only; embeddings lookups, norms, softmax and the optimizer are not):

* forward ``F = 2 * P_lin * T + 4 * L * d * T**2`` per sample, where ``P_lin`` is the number of weights
  in linear layers of the backbone and head (LoRA's A/B matrices included when present), ``T`` the
  sample's real (unpadded) token count, ``L`` layers and ``d`` the hidden width (the second term is
  ``QK^T`` and ``AV``). DeBERTa's extra content-to-position and position-to-content products are
  not counted, so its share is a slight underestimate.
* full fine-tuning: ``3 F`` (backward = gradients w.r.t. activations ``F`` + w.r.t. weights ``F``).
* LoRA and other adapters: ``2 F + 2 * P_train * T``: the backward pass still propagates activation
  gradients through every frozen layer above the lowest adapter, but computes weight gradients only
  for the trainable parameters.
* frozen backbone (``freeze``, the linear probe): ``F + 4 * P_train`` (no backward through the
  backbone; the head sees one pooled vector per sample).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

FLOPS_PER_CYCLE = {  # fp32, per core: vector lanes x 2 (fused multiply-add) x FMA units
    "avx512": 16 * 2 * 2,
    "avx2": 8 * 2 * 2,
    "sse": 4 * 2 * 2,
}


@dataclass(frozen=True)
class CpuPeak:
    model: str
    cores: int
    ghz: float
    isa: str
    flops_per_cycle: int
    clock_source: str

    def per_core(self) -> float:
        return self.ghz * 1e9 * self.flops_per_cycle

    def derivation(self, threads: int) -> str:
        return (f"{self.model}: {self.isa.upper()} fp32 = {self.flops_per_cycle} FLOPs/cycle/core "
                f"(lanes x 2 for FMA x 2 FMA units) x {self.ghz:.2f} GHz ({self.clock_source}) = "
                f"{self.per_core() / 1e9:.0f} GFLOP/s per core; x {threads} thread(s) used = "
                f"{self.per_core() * threads / 1e9:.0f} GFLOP/s; the whole machine ({self.cores} cores) = "
                f"{self.per_core() * self.cores / 1e9:.0f} GFLOP/s")


def cpu_peak() -> CpuPeak:
    """Peak fp32 FLOP rate from ``lscpu``: cores x clock x FLOPs/cycle of the widest SIMD unit."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict((k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line))
    flags = fields.get("Flags", "").split()
    isa = "avx512" if "avx512f" in flags else "avx2" if "fma" in flags else "sse"
    cores = int(fields.get("CPU(s)", "1"))
    if "CPU max MHz" in fields:
        ghz, source = float(fields["CPU max MHz"]) / 1000, "lscpu CPU max MHz"
    elif "CPU MHz" in fields:
        ghz, source = float(fields["CPU MHz"]) / 1000, "lscpu CPU MHz"
    else:
        # Virtual machines often hide the clock; BogoMIPS is twice the TSC (nominal) frequency.
        ghz, source = float(fields.get("BogoMIPS", "2000")) / 2000, "BogoMIPS / 2 = nominal TSC clock; turbo not counted"
    model = re.sub(r"\s+", " ", fields.get("Model name", "unknown CPU"))
    return CpuPeak(model, cores, ghz, isa, FLOPS_PER_CYCLE[isa], source)


def train_flops_per_sample(method: str, *, linear_params: int, trainable: int, layers: int, hidden: int,
                           mean_t: float, mean_t2: float) -> float:
    """Model FLOPs of one training sample (see the module docstring for what is counted)."""
    forward = 2 * linear_params * mean_t + 4 * layers * hidden * mean_t2
    if method == "full":
        return 3 * forward
    if method == "freeze":
        return forward + 4 * trainable
    return 2 * forward + 2 * trainable * mean_t
