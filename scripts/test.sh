#!/usr/bin/env bash
# The test suite, offline and single-threaded (the settings tests/conftest.py also enforces).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export HF_HOME="${HF_HOME:-$PWD/.cache/hf}" TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
