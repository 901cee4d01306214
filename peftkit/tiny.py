"""Tiny models, tokenizers and data sets built from configs, offline, in well under a second.

Used by the tests, the benchmarks and ``peftkit validate`` examples: a 2-layer DeBERTa-v2 with a
DeBERTa-v3-style (Unigram + Metaspace) tokenizer trained on the spot, a 2-layer ViT with its image
processor, and a 2-layer BERT. Widths are multiples of 64 so bitsandbytes' 4-bit CPU kernels run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

POSITIVE = ["good", "great", "fine", "superb", "lovely", "brilliant", "fun", "moving"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "messy", "tedious"]
FILLER = ["the", "movie", "film", "was", "plot", "cast", "a", "really", "quite", "story", "it", "and", "acting", "very"]


def sentiment_rows(n: int, seed: int = 0, labels: tuple[str, str] = ("neg", "pos")) -> list[dict[str, Any]]:
    """Short synthetic reviews whose label is given by the polar words they contain (learnable in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if y else NEGATIVE))
        rows.append({"text": " ".join(words), "label": labels[y]})
    return rows


def train_tokenizer(folder: Path, vocab_size: int = 200) -> Any:
    """A DeBERTa-v3-style tokenizer (Unigram + Metaspace) trained on the synthetic corpus, saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import DebertaV2Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="[UNK]")
    corpus = [r["text"] for r in sentiment_rows(500, seed=123)] + [" ".join(POSITIVE + NEGATIVE + FILLER)] * 5
    tok.train_from_iterator(corpus, trainer)
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    tokenizer = DebertaV2Tokenizer(vocab=vocab, unk_id=specials.index("[UNK]"))
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_deberta(folder: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer DeBERTa-v2 (v3 layout: relative attention, c2p/p2c) with random weights and a tokenizer."""
    from transformers import DebertaV2Config, DebertaV2Model

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder)
    config = DebertaV2Config(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                             intermediate_size=2 * hidden, max_position_embeddings=128, relative_attention=True,
                             position_buckets=32, max_relative_positions=-1, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                             share_att_key=True, position_biased_input=False, pooler_hidden_size=hidden, type_vocab_size=0)
    torch.manual_seed(seed)
    DebertaV2Model(config).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_bert(folder: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer BERT with a WordPiece tokenizer over the synthetic vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(POSITIVE + NEGATIVE + FILLER))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_vit(folder: Path, *, hidden: int = 64, layers: int = 2, image_size: int = 32, seed: int = 0) -> Path:
    """A 2-layer ViT (transformers 5 layout) with a PIL image processor."""
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=2 * hidden,
                       image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)
    ViTImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def write_text_csv(path: Path, n: int, seed: int = 0) -> Path:
    """A csv of synthetic reviews with ``text`` and ``label`` (pos/neg) columns."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(sentiment_rows(n, seed))
    return path


COLOURS = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}


def write_image_folder(folder: Path, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """``folder/<colour>/<i>.png``: noisy images whose dominant colour is the label."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-60, 60, size=(size, size, 3))
            pixels = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype("uint8")
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    return folder
