"""The baseline a user would write instead of peftkit: ``Trainer`` + ``TrainingArguments`` + ``get_peft_model``
+ ``DataCollatorWithPadding``, as the Transformers and peft docs show it.

It reads the same raw config mapping as the peftkit side, so model, data, precision, micro-batch,
accumulation, learning rate, schedule, warm-up, weight decay, clipping and optimizer steps agree.
Where the docs' defaults differ from peftkit's they are kept (no length grouping, the Trainer's default
optimizer), because that is what the baseline user gets. Two things are aligned on purpose so the
comparison is like for like: LoRA targets the same modules as peftkit's architecture preset, and
the head (plus DeBERTa's pooler) is trained and saved (``modules_to_save``).
"""

from __future__ import annotations

import resource
import tempfile
import time
from typing import Any

import numpy as np
import torch

# Module-name suffixes of peftkit's presets (peftkit.models.ARCHITECTURES), written out as a user would.
LORA_TARGETS = {
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
}
HEADS = {"deberta-v2": ["classifier", "pooler"], "bert": ["classifier"], "vit": ["classifier"]}


def _raw_splits(data: dict[str, Any], seed: int) -> tuple[Any, Any]:
    """Train and held-out test rows (test only for the demo data), selected as peftkit selects them."""
    from datasets import load_dataset

    if data["train"].startswith("demo:"):
        from peftkit.data import DEMOS  # the raw rows only, so both sides see the same reviews

        splits = DEMOS[data["train"].split(":", 1)[1]]()
        train, test = splits["train"], splits["test"]
    elif data["train"].endswith(".csv"):
        train = load_dataset("csv", data_files=data["train"], split="train")
        test = load_dataset("csv", data_files=data["test"], split="train") if data.get("test") else None
    else:
        train = load_dataset("imagefolder", data_dir=data["train"], split="train")
        train, test = train.train_test_split(test_size=data.get("validation_fraction", 0.1), seed=seed)["train"], None
    if data.get("max_train_samples"):
        train = train.select(range(min(data["max_train_samples"], len(train))))
    if test is not None and data.get("max_eval_samples"):
        test = test.select(range(min(data["max_eval_samples"], len(test))))
    return train, test


class _Span:
    """Times the training loop only: from ``on_train_begin`` (model, optimizer and loader already built,
    as at the start of peftkit's ``fit``) to ``on_train_end`` (after the last optimizer step)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        span = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                span.start = time.perf_counter()

            def on_train_end(self, args, state, control, **kw):
                span.end = time.perf_counter()

        self.start: float | None = None
        self.end: float | None = None
        self.callback = Callback()


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train ``cfg`` with the plain Trainer; returns the same figures as peftkit's summary."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from peftkit.models import resolve_name

    m, a, d, t = cfg["model"], cfg["adapter"], cfg["data"], cfg["train"]
    path = resolve_name(m["name"])
    seed = t.get("seed", 42)
    set_seed(seed)
    image = m["task"] == "image-classification"
    train, test = _raw_splits(d, seed)
    label_feature = train.features["label"]
    labels = list(label_feature.names) if hasattr(label_feature, "names") else sorted(set(train["label"]))
    to_id = {name: i for i, name in enumerate(labels)}

    if image:
        processor = AutoImageProcessor.from_pretrained(path)

        def transform(batch: dict[str, list]) -> dict[str, Any]:
            out = processor(images=[im.convert("RGB") for im in batch["image"]], return_tensors="pt")
            return {"pixel_values": out["pixel_values"], "labels": batch["label"]}

        train.set_transform(transform)

        def collator(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])}
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)

        def encode(batch: dict[str, list]) -> dict[str, Any]:
            out = tokenizer(batch["text"], truncation=True, max_length=d.get("max_length", 128))
            out["labels"] = [v if isinstance(v, int) else to_id[v] for v in batch["label"]]
            return out

        train = train.map(encode, batched=True, remove_columns=train.column_names)
        test = test.map(encode, batched=True, remove_columns=test.column_names) if test is not None else None
        collator = DataCollatorWithPadding(tokenizer)

    auto = AutoModelForImageClassification if image else AutoModelForSequenceClassification
    model_type = AutoConfig.from_pretrained(path).model_type
    model = auto.from_pretrained(path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=to_id,
                                 ignore_mismatched_sizes=True)
    method = a.get("method", "lora")
    if method == "lora":
        lora = LoraConfig(r=a.get("r", 8), lora_alpha=a.get("alpha", 16), lora_dropout=a.get("dropout", 0.05),
                          target_modules=LORA_TARGETS[model_type], modules_to_save=HEADS[model_type])
        model = get_peft_model(model, lora)
    elif method == "freeze":
        for name, param in model.named_parameters():
            param.requires_grad = any(name.startswith(h + ".") for h in HEADS[model_type])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    steps = t["max_steps"]
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="trainer-baseline-"),
        per_device_train_batch_size=t.get("batch_size", 16),
        gradient_accumulation_steps=t.get("grad_accum", 1),
        learning_rate=t.get("lr", 2e-4),
        weight_decay=t.get("weight_decay", 0.01),
        max_grad_norm=t.get("max_grad_norm", 1.0),
        max_steps=steps,
        lr_scheduler_type=t.get("schedule", "cosine"),
        warmup_steps=round(steps * t.get("warmup_ratio", 0.06)),  # peftkit rounds; the ratio form would ceil
        bf16=t.get("precision", "no") == "bf16",
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        seed=seed,
        remove_unused_columns=not image,
        dataloader_num_workers=0,
    )
    span = _Span()
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[span.callback])
    out = trainer.train()
    peak_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before any prediction or saving
    seconds = (span.end or 0.0) - (span.start or 0.0)
    samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    accuracy = None
    if test is not None:
        pred = trainer.predict(test)
        accuracy = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    return {
        "train_seconds": seconds, "samples_seen": samples, "trainable_parameters": trainable,
        "peak_train_bytes": peak_train, "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "test_accuracy": accuracy, "trainer_train_runtime": out.metrics.get("train_runtime"),
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__
        + (" (fused)" if args.optim.value.endswith("fused") else ""),
        "final_loss": out.training_loss,
    }
