"""`peftkit predict` and `peftkit eval` on merged models and runs; the merged folder needs neither peft nor peftkit."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import image_config, text_config

from peftkit import inference, merge
from peftkit.config import validate_config

TEXTS = ["a great and moving film", "awful boring plot", "the cast was superb", "dull messy story"]


@pytest.fixture(scope="module")
def models(assets: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A text and an image run (a few steps of LoRA) and their merged folders."""
    from peftkit.train import run

    root = tmp_path_factory.mktemp("inference")
    out = {}
    for kind, builder in (("text", text_config), ("image", image_config)):
        cfg = builder(assets, root / f"run-{kind}", train={"max_steps": 4, "eval_every": 4, "lr": 2e-2})
        run(validate_config(cfg), overwrite=True)
        out[f"{kind}-run"] = root / f"run-{kind}"
        out[f"{kind}-merged"] = root / f"merged-{kind}"
        assert merge.cli_main([str(out[f"{kind}-run"]), "--out", str(out[f"{kind}-merged"]), "--samples", "8"]) == 0
    return out


def predict(*args: str) -> list[dict]:
    """`peftkit predict` in-process, JSONL read back from --output."""
    path = Path(args[args.index("--output") + 1])
    assert inference.predict_main([*args, "--quiet"]) == 0
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_merged_and_run_predict_the_same(models: dict, tmp_path: Path) -> None:
    merged = predict("--model", str(models["text-merged"]), *TEXTS, "--output", str(tmp_path / "m.jsonl"))
    adapter = predict("--model", str(models["text-run"]), *TEXTS, "--output", str(tmp_path / "a.jsonl"))
    assert [r["input"] for r in merged] == TEXTS
    for m, a in zip(merged, adapter, strict=True):
        assert m["label"] == a["label"] and m["label"] in ("neg", "pos")
        assert abs(sum(m["probabilities"].values()) - 1) < 1e-5
        assert all(abs(m["probabilities"][k] - a["probabilities"][k]) < 1e-5 for k in m["probabilities"])


def test_predict_reads_txt_csv_jsonl_and_writes_csv(models: dict, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n\n")
    with (tmp_path / "in.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["review", "id"], *[[t, i] for i, t in enumerate(TEXTS)]])
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"review": t}) + "\n" for t in TEXTS))
    model = str(models["text-merged"])
    reference = predict("--model", model, *TEXTS, "--output", str(tmp_path / "ref.jsonl"))
    for name in ("in.txt", "in.csv", "in.jsonl"):
        rows = predict("--model", model, "--input", str(tmp_path / name), "--text-column", "review", "--output", str(tmp_path / f"{name}.jsonl"))
        assert [r["label"] for r in rows] == [r["label"] for r in reference], name
    assert inference.predict_main(["--model", model, "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "o.csv"), "--quiet"]) == 2
    assert inference.predict_main(["--model", model, "--input", str(tmp_path / "in.csv"), "--text-column", "review",
                                   "--output", str(tmp_path / "o.csv"), "--quiet"]) == 0
    with (tmp_path / "o.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["input", "label", "score", "p_neg", "p_pos"]
    assert [r["label"] for r in rows] == [r["label"] for r in reference]


def test_predict_images_from_a_folder(models: dict, assets: dict, tmp_path: Path) -> None:
    rows = predict("--model", str(models["image-merged"]), str(assets["images"] / "red"), "--output", str(tmp_path / "p.jsonl"))
    assert len(rows) == 12 and all(r["input"].endswith(".png") for r in rows)
    assert set(rows[0]["probabilities"]) == {"blue", "green", "red"}


def test_plain_transformers_reproduces_predict(models: dict, tmp_path: Path) -> None:
    """A process that never imports peft or peftkit loads the merged folder and gets predict's numbers."""
    expected = predict("--model", str(models["text-merged"]), *TEXTS, "--output", str(tmp_path / "p.jsonl"))
    script = textwrap.dedent(f"""
        import json, sys
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        path = {str(models["text-merged"])!r}
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        with torch.no_grad():
            logits = model(**tok({TEXTS!r}, truncation=True, padding=True, return_tensors="pt")).logits
        probs = torch.softmax(logits.float(), -1).tolist()
        assert not any(m == "peft" or m.startswith(("peft.", "peftkit")) for m in sys.modules), "peft was imported"
        print(json.dumps([[model.config.id2label[int(max(range(len(p)), key=p.__getitem__))], p] for p in probs]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for (label, probs), row in zip(got, expected, strict=True):
        assert label == row["label"]
        assert max(abs(p - q) for p, q in zip(probs, row["probabilities"].values(), strict=True)) < 1e-6


def test_eval_text_writes_metrics_report_and_confusion_png(models: dict, assets: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval"
    assert inference.eval_main(["--model", str(models["text-merged"]), "--data", str(assets["text_val_csv"]), "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 40 and set(metrics["per_class"]) == {"neg", "pos"}
    matrix = metrics["confusion_matrix"]
    assert sum(map(sum, matrix)) == 40
    assert metrics["accuracy"] == pytest.approx((matrix[0][0] + matrix[1][1]) / 40)
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "macro-F1" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sum(r["label"] == r["true"] for r in rows) / 40 == pytest.approx(metrics["accuracy"])


def test_eval_run_and_merged_agree_on_images(models: dict, assets: dict, tmp_path: Path) -> None:
    results = []
    for key in ("image-run", "image-merged"):
        assert inference.eval_main(["--model", str(models[key]), "--data", str(assets["images"]), "--out", str(tmp_path / key), "--quiet"]) == 0
        results.append(json.loads((tmp_path / key / "metrics.json").read_text()))
    assert results[0]["confusion_matrix"] == results[1]["confusion_matrix"]
    assert results[0]["samples"] == 36


def test_eval_names_a_missing_column(models: dict, assets: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = inference.eval_main(["--model", str(models["text-merged"]), "--data", str(assets["text_val_csv"]),
                                "--label-column", "sentiment", "--out", str(tmp_path / "e"), "--quiet"])
    assert code == 2
    assert "--label-column" in capsys.readouterr().err.replace("\n", " ")
