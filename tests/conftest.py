"""Shared fixtures: tiny models and data built once per session, offline, single-threaded."""

from __future__ import annotations

import os

# Before torch/transformers are imported anywhere: no hub look-ups (each would retry for 20-40 s),
# one OpenMP thread (2 threads on this 2-core machine were seen 10-100x slower).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftkit import tiny

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "peftkit" / "train.py"


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny DeBERTa-v2, ViT and BERT folders and small text/image data sets (built once)."""
    root = tmp_path_factory.mktemp("assets")
    return {
        "deberta": tiny.tiny_deberta(root / "deberta"),
        "vit": tiny.tiny_vit(root / "vit"),
        "bert": tiny.tiny_bert(root / "bert"),
        "text_csv": tiny.write_text_csv(root / "text" / "train.csv", 160),
        "text_val_csv": tiny.write_text_csv(root / "text" / "val.csv", 40, seed=1),
        "images": tiny.write_image_folder(root / "images", per_class=12),
    }


def text_config(assets: dict[str, Path], run_dir: Path, **sections: dict) -> dict:
    """A small text-classification config on the tiny DeBERTa; ``sections`` update its sections."""
    cfg = {
        "model": {"name": str(assets["deberta"]), "task": "text-classification"},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"train": str(assets["text_csv"]), "validation": str(assets["text_val_csv"]), "max_length": 32},
        "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "log_every": 1, "seed": 0},
        "output": {"dir": str(run_dir), "trackers": ["jsonl"]},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


def image_config(assets: dict[str, Path], run_dir: Path, **sections: dict) -> dict:
    """A small image-classification config on the tiny ViT and the colour image folder."""
    cfg = {
        "model": {"name": str(assets["vit"]), "task": "image-classification"},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"train": str(assets["images"]), "validation_fraction": 0.25},
        "train": {"epochs": 1, "batch_size": 8, "lr": 5e-3, "log_every": 1, "seed": 0},
        "output": {"dir": str(run_dir), "trackers": ["jsonl"]},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


def write_yaml(path: Path, data: dict) -> Path:
    """Write ``data`` as YAML to ``path`` and return it."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m peftkit.cli ARGS`` in a subprocess (as a user would), capturing output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "peftkit.cli", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd)


def accelerate_launch(*args: str, num_processes: int = 1, extra: list[str] | None = None, env: dict | None = None,
                      timeout: int = 900) -> subprocess.CompletedProcess:
    """``accelerate launch [extra] peftkit/train.py ARGS`` on CPU in a subprocess."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if extra is not None:
        topo = extra
    elif num_processes > 1:
        topo = ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", "0"]
    else:
        topo = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # DeepSpeed JIT-compiles its ops on first use; a folder inside the repo (gitignored .cache/) keeps them between runs.
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "1", "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
                **(env or {})}
    # Run from the repo root: launch configs name their DeepSpeed JSONs relative to it.
    return subprocess.run([*launcher, *topo, str(TRAIN_SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)


def reload_and_evaluate(folder: Path) -> dict[str, float]:
    """A saved model folder loaded fresh and evaluated on its run's validation data, as the loop did."""
    from accelerate import Accelerator

    from peftkit.artifacts import load_trained
    from peftkit.data import validation_loader
    from peftkit.loop import evaluate

    trained = load_trained(folder)
    loader = validation_loader(trained.config, processor=trained.processor, labels=trained.labels)
    return evaluate(trained.model, loader, Accelerator(cpu=True))
