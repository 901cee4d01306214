"""``peftkit predict`` and ``peftkit eval``: a merged model or a run, texts or images in, labels out.

Both accept either a plain Transformers folder (what ``peftkit merge`` writes) or a peftkit run /
model folder (the adapter is applied as trained, on its quantized base if it had one). The input
encoding and batched forward pass here are shared with the merge verification, so the numbers a
merge reports are the numbers ``predict`` gives.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.checkpoint import write_json, write_text
from peftkit.data import IMAGE_SUFFIXES
from peftkit.errors import UserError, guarded

MAX_TEXT_LENGTH = 512  # cap for tokenizers whose model_max_length is "unlimited" (1e30)

# A saved model's architecture name ends with the task's model class.
TASK_BY_ARCHITECTURE = {
    "ForSequenceClassification": "text-classification",
    "ForImageClassification": "image-classification",
}


@dataclass
class Loaded:
    """A model ready for inference, with what is needed to feed it and read its outputs."""

    model: nn.Module
    processor: Any
    labels: list[str]
    task: str
    max_length: int
    source: str  # "merged" (plain Transformers folder) or "run" (peftkit model folder)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def plain_task(folder: Path) -> str:
    """The task of a plain Transformers folder, from the model class named in its config.json."""
    config = json.loads((folder / "config.json").read_text())
    for arch in config.get("architectures") or []:
        for suffix, task in TASK_BY_ARCHITECTURE.items():
            if arch.endswith(suffix):
                return task
    raise UserError(f"{folder}/config.json names architectures {config.get('architectures')}; peftkit predicts with "
                    f"classification models only (an architecture ending in {sorted(TASK_BY_ARCHITECTURE)}).")


def text_max_length(tokenizer: Any, model: nn.Module, configured: int | None = None) -> int:
    """The truncation length: the run's ``data.max_length``, else the tokenizer's, capped by the model's positions."""
    length = configured or getattr(tokenizer, "model_max_length", None) or MAX_TEXT_LENGTH
    length = min(int(length), MAX_TEXT_LENGTH) if configured is None else int(length)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(length, positions) if isinstance(positions, int) and positions > 0 else length


def load_for_inference(path: str | Path, *, quantized: bool = True) -> Loaded:
    """A merged (plain Transformers) folder, or a peftkit run / model folder, ready to predict."""
    from peftkit import artifacts
    from peftkit.models import TASKS, load_processor

    folder = Path(path)
    if not folder.exists():
        raise UserError(f"`--model {path}` does not exist; give a folder written by `peftkit merge` or a run directory.")
    try:
        run_folder = artifacts.model_folder(folder)
    except UserError:
        run_folder = None
    if run_folder is not None:
        trained = artifacts.load_trained(run_folder, quantized=quantized)
        configured = trained.config.data.max_length if trained.config.model.task == "text-classification" else None
        model = trained.model
        max_length = text_max_length(trained.processor, _inner(model), configured) if configured else 0
        return Loaded(model, trained.processor, trained.labels, trained.config.model.task, max_length, "run")
    if not (folder / "config.json").is_file():
        raise UserError(f"`--model {path}` holds neither a peftkit run (config.yaml + labels.json, or best/) nor a "
                        "Transformers model (config.json); point it at a run directory or a `peftkit merge` output.")
    task = plain_task(folder)
    model = TASKS[task].auto_model.from_pretrained(folder, use_safetensors=True).eval()
    processor = load_processor(str(folder), task)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    labels = [id2label[i] for i in range(len(id2label))]
    max_length = text_max_length(processor, model) if task == "text-classification" else 0
    return Loaded(model, processor, labels, task, max_length, "merged")


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (for its config)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# --------------------------------------------------------------------------------------------
# Encoding and the forward pass (shared with the merge verification)
# --------------------------------------------------------------------------------------------


def encode_texts(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, *, max_length: int,
                 batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches, each padded to its own longest row (as in training)."""
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        pair = list(pairs[start:start + batch_size]) if pairs is not None else None
        enc = tokenizer(chunk, pair, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batches.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


def open_image(item: Any) -> Any:
    """A PIL image in RGB from a path or an image object; unreadable files are a UserError naming them."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(item) if isinstance(item, (str, Path)) else item
        return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"Image {item} cannot be read ({exc}); remove it or convert it to PNG/JPEG.") from None


def encode_images(processor: Any, images: Sequence[Any], *, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Batches of ``pixel_values`` from paths or PIL images, through the model's image processor."""
    batches = []
    for start in range(0, len(images), batch_size):
        chunk = [open_image(x) for x in images[start:start + batch_size]]
        batches.append({"pixel_values": processor(images=chunk, return_tensors="pt")["pixel_values"]})
    return batches


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype inputs must have: that of the first floating-point parameter (8-bit weights are skipped)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


@torch.inference_mode()
def forward_logits(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, progress: bool = False,
                   total: int | None = None) -> torch.Tensor:
    """Logits of every batch, concatenated, as float32 on the CPU."""
    from tqdm.auto import tqdm

    model.eval()
    dtype = float_dtype(model)
    device = next(model.parameters()).device
    out = []
    for batch in tqdm(batches, total=total, desc="predict", unit="batch", file=sys.stderr, disable=not progress):
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
        out.append(model(**inputs).logits.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------


def collect_images(items: Sequence[str]) -> list[str]:
    """Image files given directly or found (recursively, sorted) in the given folders."""
    found: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += [str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_file():
            found.append(str(path))
        else:
            raise UserError(f"Image input `{item}` does not exist; give image files or folders of them.")
    if not found:
        raise UserError(f"No images ({sorted(IMAGE_SUFFIXES)}) found in {list(items)}.")
    return found


def read_text_file(path: Path, column: str, pair_column: str | None) -> tuple[list[str], list[str] | None]:
    """Texts (and optional pair texts) from a .txt (one per line), .csv or .jsonl/.json file."""
    if not path.is_file():
        raise UserError(f"`--input {path}` does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line for line in path.read_text().splitlines() if line.strip()], None
    if suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    elif suffix in (".jsonl", ".json"):
        text = path.read_text()
        rows = json.loads(text) if suffix == ".json" and text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    else:
        raise UserError(f"`--input {path}`: unsupported suffix `{suffix}`; use .txt (one text per line), .csv or .jsonl.")
    for col, flag in ((column, "--text-column"), (pair_column, "--text-pair-column")):
        if col is not None and rows and col not in rows[0]:
            raise UserError(f"`--input {path}` has no column `{col}` (it has {sorted(rows[0])}); set `{flag}`.")
    texts = [str(r[column]) for r in rows]
    return texts, ([str(r[pair_column]) for r in rows] if pair_column else None)


def predict_rows(loaded: Loaded, inputs: list[Any], pairs: list[str] | None = None, *, batch_size: int = 32,
                 progress: bool = False) -> list[dict[str, Any]]:
    """Label and per-label probabilities of each input (texts, image paths or PIL images)."""
    if loaded.task == "text-classification":
        batches = encode_texts(loaded.processor, inputs, pairs, max_length=loaded.max_length, batch_size=batch_size)
        logits = forward_logits(loaded.model, batches, progress=progress)
    else:
        # Images are opened batch by batch, so a large folder never sits in memory at once.
        chunks = [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
        batches_iter = (encode_images(loaded.processor, c, batch_size=batch_size)[0] for c in chunks)
        logits = forward_logits(loaded.model, batches_iter, progress=progress, total=len(chunks))
    probs = torch.softmax(logits, dim=-1)
    rows = []
    for item, p in zip(inputs, probs.tolist(), strict=True):
        best = max(range(len(p)), key=p.__getitem__)
        rows.append({"input": item if isinstance(item, str) else str(item), "label": loaded.labels[best], "score": p[best],
                     "probabilities": dict(zip(loaded.labels, p, strict=True))})
    return rows


def write_rows(rows: list[dict[str, Any]], labels: list[str], fmt: str, stream: Any) -> None:
    """JSONL (one object per input) or CSV (input, label, score, one ``p_<label>`` column per label)."""
    if fmt == "jsonl":
        for row in rows:
            stream.write(json.dumps(row) + "\n")
        return
    writer = csv.writer(stream)
    writer.writerow(["input", "label", "score", *[f"p_{name}" for name in labels]])
    for row in rows:
        writer.writerow([row["input"], row["label"], row["score"], *[row["probabilities"][n] for n in labels]])


def _predict(args: argparse.Namespace) -> None:
    loaded = load_for_inference(args.model)
    pairs = None
    if loaded.task == "text-classification":
        if args.input:
            inputs, pairs = read_text_file(Path(args.input), args.text_column, args.text_pair_column)
            inputs = inputs + list(args.items)
        else:
            inputs = list(args.items)
    else:
        inputs = collect_images([*args.items, *([args.input] if args.input else [])])
    if not inputs:
        raise UserError("Nothing to predict: pass texts (or image paths) as arguments, or `--input FILE`.")
    if pairs is not None and len(pairs) != len(inputs):
        raise UserError("`--text-pair-column` works with `--input` alone; do not mix it with texts given as arguments.")
    rows = predict_rows(loaded, inputs, pairs, batch_size=args.batch_size, progress=not args.quiet)
    fmt = args.format or ("csv" if args.output and args.output.endswith(".csv") else "jsonl")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", newline="") as f:
            write_rows(rows, loaded.labels, fmt, f)
        print(f"[peftkit] {len(rows)} predictions written to {args.output}", file=sys.stderr)
    else:
        write_rows(rows, loaded.labels, fmt, sys.stdout)


def predict_main(argv: list[str]) -> int:
    """``peftkit predict --model DIR [TEXT ... | IMAGE_OR_FOLDER ...] [--input FILE] [--output FILE] [--format jsonl|csv]``."""
    p = argparse.ArgumentParser(prog="peftkit predict", description="Label texts or images with a merged model or a run.")
    p.add_argument("--model", required=True, help="a `peftkit merge` output, or a run / model folder")
    p.add_argument("items", nargs="*", help="texts (text models) or image files / folders (image models)")
    p.add_argument("--input", help="a .txt (one text per line), .csv or .jsonl file; for image models a folder")
    p.add_argument("--text-column", default="text", help="text column of a csv/jsonl --input")
    p.add_argument("--text-pair-column", default=None, help="second text column, for sentence-pair models")
    p.add_argument("--output", help="write here instead of stdout")
    p.add_argument("--format", choices=["jsonl", "csv"], help="default: csv for a .csv --output, else jsonl")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    return guarded(lambda: _predict(args), debug=args.debug)


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


def _pick_split(splits: dict[str, Any], wanted: str | None, data: str) -> Any:
    if wanted:
        if wanted not in splits:
            raise UserError(f"`--split {wanted}` is not a split of `{data}`; it has {sorted(splits)}.")
        return splits[wanted]
    for name in ("test", "validation", "train"):
        if name in splits:
            return splits[name]
    return next(iter(splits.values()))


def classification_report(labels: list[str], y_true: list[int], y_pred: list[int]) -> dict[str, Any]:
    """Accuracy, macro-F1, scikit-learn's per-class report and the confusion matrix (rows: true labels)."""
    from sklearn import metrics

    ids = list(range(len(labels)))
    report = metrics.classification_report(y_true, y_pred, labels=ids, target_names=labels, output_dict=True, zero_division=0)
    return {
        "samples": len(y_true),
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "f1_macro": float(metrics.f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "per_class": {name: report[name] for name in labels},
        "confusion_matrix": metrics.confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "labels": labels,
        "text_report": metrics.classification_report(y_true, y_pred, labels=ids, target_names=labels, zero_division=0, digits=4),
    }


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    """The confusion matrix as a PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(confusion_matrix=np.array(matrix), display_labels=labels).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45 if max(map(len, labels)) > 3 else "horizontal")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _eval(args: argparse.Namespace) -> dict[str, Any]:
    from peftkit.data import check_columns, check_texts, encode_labels, load_source

    loaded = load_for_inference(args.model)
    ds = _pick_split(load_source(args.data, "eval"), args.split, args.data)
    if args.max_samples:
        ds = ds.select(range(min(args.max_samples, len(ds))))
    is_text = loaded.task == "text-classification"
    columns = {"label_column": args.label_column}
    columns |= {"text_column": args.text_column, "text_pair_column": args.text_pair_column} if is_text else {"image_column": args.image_column}
    try:
        check_columns(ds, "eval", columns)
    except UserError as err:
        raise UserError(str(err).replace("`data.", "`--").replace("_column:", "-column:").replace("Set `--", "Pass `--")) from None
    ds = encode_labels(ds, "eval", args.label_column, loaded.labels)
    if is_text:
        check_texts(ds, "eval", [c for c in (args.text_column, args.text_pair_column) if c])
    inputs = list(ds[args.text_column if is_text else args.image_column])
    pairs = list(ds[args.text_pair_column]) if is_text and args.text_pair_column else None
    rows = predict_rows(loaded, inputs, pairs, batch_size=args.batch_size, progress=not args.quiet)
    index = {name: i for i, name in enumerate(loaded.labels)}
    y_true, y_pred = list(ds["labels"]), [index[r["label"]] for r in rows]
    result = classification_report(loaded.labels, y_true, y_pred)
    result |= {"model": str(args.model), "data": str(args.data)}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", {k: v for k, v in result.items() if k != "text_report"})
    write_text(out / "report.txt", result["text_report"])
    plot_confusion(result["confusion_matrix"], loaded.labels, out / "confusion_matrix.png",
                   f"{Path(args.model).name}: accuracy {result['accuracy']:.3f}, macro-F1 {result['f1_macro']:.3f}")
    with (out / "predictions.jsonl").open("w") as f:
        for i, (row, truth) in enumerate(zip(rows, y_true, strict=True)):
            if not is_text:  # decoded images have no useful text form; name the row instead
                row = {**row, "input": f"row {i}"}
            f.write(json.dumps({**row, "true": loaded.labels[truth]}) + "\n")
    print(f"accuracy {result['accuracy']:.4f} | macro-F1 {result['f1_macro']:.4f} | {result['samples']} samples\n")
    print(result["text_report"])
    print(f"[peftkit] metrics.json, report.txt, confusion_matrix.png and predictions.jsonl written to {out}")
    return result


def eval_main(argv: list[str]) -> int:
    """``peftkit eval --model DIR --data PATH [--out DIR] [--text-column ...] [--label-column ...]``."""
    p = argparse.ArgumentParser(prog="peftkit eval", description="Accuracy, macro-F1, per-class report and confusion matrix.")
    p.add_argument("--model", required=True, help="a `peftkit merge` output, or a run / model folder")
    p.add_argument("--data", required=True, help="a csv/json/jsonl/parquet file, an image folder or `demo:NAME`")
    p.add_argument("--split", default=None, help="split of a multi-split source (default: test, else validation, else train)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--text-pair-column", default=None)
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    p.add_argument("--out", default="eval", help="folder for metrics.json, report.txt, confusion_matrix.png, predictions.jsonl")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.max_samples is not None and args.max_samples < 1):
        p.error("--batch-size and --max-samples must be at least 1")
    return guarded(lambda: _eval(args), debug=args.debug)

