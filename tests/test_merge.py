"""`peftkit merge`: every mergeable method merged, saved, reloaded and verified; failures leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import image_config, text_config
from safetensors.torch import load_file

from peftkit import merge
from peftkit.config import validate_config
from peftkit.models import load_backbone

METHODS = ["lora", "dora", "rslora", "ia3", "loha", "lokr", "adalora"]
HEADS = {"text": ("classifier", "pooler.dense"), "image": ("classifier",)}


def train(cfg: dict) -> Path:
    """A real run of a few optimizer steps, in-process (seconds on the tiny models)."""
    from peftkit.train import run

    run(validate_config(cfg), overwrite=True)
    return Path(cfg["output"]["dir"])


def make_run(assets: dict, root: Path, kind: str, name: str, **sections: dict) -> Path:
    builder = text_config if kind == "text" else image_config
    sections["train"] = {"max_steps": 2, "eval_every": 2, **sections.get("train", {})}
    return train(builder(assets, root / name, **sections))


def saved_head(run: Path, kind: str) -> dict[str, torch.Tensor]:
    """The trained head (and pooler) weights as saved in the run's adapter file."""
    state = load_file(str(run / "best" / "adapter_model.safetensors"))
    prefixes = tuple(f"base_model.model.{h}." for h in HEADS[kind])
    return {k.removeprefix("base_model.model."): v for k, v in state.items() if k.startswith(prefixes)}


@pytest.fixture(scope="module")
def runs(assets: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge_runs")
    out = {f"text-{m}": make_run(assets, root, "text", f"text-{m}", adapter={"method": m}) for m in METHODS}
    out |= {f"image-{m}": make_run(assets, root, "image", f"image-{m}", adapter={"method": m}) for m in METHODS}
    return out


@pytest.mark.parametrize("kind", ["text", "image"])
@pytest.mark.parametrize("method", METHODS)
def test_merged_model_matches_adapter_model(runs: dict, assets: dict, tmp_path: Path, kind: str, method: str) -> None:
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    run = runs[f"{kind}-{method}"]
    out = tmp_path / "merged"
    assert merge.cli_main([str(run), "--out", str(out), "--samples", "8"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    v = report["verification"]
    assert report["passed"] is True and report["action"] == "merged"
    assert v["max_abs_diff"] <= 1e-4 and v["argmax_agreement"] == 1.0
    assert "validation data" in v["inputs"]
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".merged*")), "temporary folder left behind"

    auto = AutoModelForSequenceClassification if kind == "text" else AutoModelForImageClassification
    model = auto.from_pretrained(out)
    assert not any("lora" in n or "ia3" in n or "hada" in n or "lokr" in n for n, _ in model.named_parameters())
    labels = json.loads((run / "best" / "labels.json").read_text())
    assert model.config.id2label == dict(enumerate(labels))
    # The head and DeBERTa's pooler are the trained ones, not a fresh random initialisation.
    trained = saved_head(run, kind)
    assert len(trained) == 2 * len(HEADS[kind])
    fresh = load_backbone(str(assets["deberta" if kind == "text" else "vit"]), f"{kind}-classification", labels).state_dict()
    state = model.state_dict()
    for key, value in trained.items():
        assert torch.equal(state[key], value), key
        assert not torch.allclose(fresh[key], value), f"{key} equals a random initialisation"
    card = (out / "README.md").read_text()
    assert method in card and "max abs logit diff" in card and str(report["base"]) in card


def test_bf16_output_is_bf16_and_verified(runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    assert merge.cli_main([str(runs["text-lora"]), "--out", str(out), "--dtype", "bf16", "--samples", "8"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["tolerance"] == merge.DEFAULT_TOLERANCE["bf16"]
    assert 0 < report["verification"]["max_abs_diff"] <= report["tolerance"]
    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}


def test_corrupted_merge_fails_and_leaves_nothing(runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    real = merge.merge_weights

    def corrupt(model: torch.nn.Module, is_adapter: bool) -> torch.nn.Module:
        merged = real(model, is_adapter)
        with torch.no_grad():
            merged.classifier.weight.add_(0.5)  # what a lost or stale head looks like
        return merged

    monkeypatch.setattr(merge, "merge_weights", corrupt)
    out = tmp_path / "merged"
    assert merge.cli_main([str(runs["text-lora"]), "--out", str(out), "--samples", "8"]) == merge.EXIT_VERIFY_FAILED
    assert "verification FAILED" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_tolerance_is_enforced(runs: dict, tmp_path: Path) -> None:
    """bf16 rounding exceeds an fp32-sized tolerance: the same check that guards every merge."""
    out = tmp_path / "merged"
    assert merge.cli_main([str(runs["image-lora"]), "--out", str(out), "--dtype", "bf16", "--tolerance", "1e-7"]) == merge.EXIT_VERIFY_FAILED
    assert not out.exists()


def test_freeze_run_is_copied_and_verified(assets: dict, tmp_path: Path) -> None:
    run = make_run(assets, tmp_path, "text", "freeze", adapter={"method": "freeze"})
    out = tmp_path / "merged"
    assert merge.cli_main([str(run), "--out", str(out), "--samples", "8"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["action"].startswith("copied") and report["verification"]["max_abs_diff"] == 0.0


@pytest.fixture(scope="module")
def pair(assets: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair")
    return {
        "a": make_run(assets, root, "text", "a", train={"seed": 1}),
        "b": make_run(assets, root, "text", "b", train={"seed": 2, "lr": 1e-2}),
        "r8": make_run(assets, root, "text", "r8", adapter={"r": 8}),
        "relabelled": make_run(assets, root, "text", "relabelled", model={"labels": ["pos", "neg"]}),
        "bert": make_run(assets, root, "text", "bert", model={"name": str(assets["bert"])}),
    }


def test_two_adapters_with_trained_heads(pair: dict, tmp_path: Path) -> None:
    out = tmp_path / "combined"
    args = [str(pair["a"]), str(pair["b"]), "--weights", "0.7", "0.3", "--method", "cat", "--out", str(out), "--samples", "8"]
    assert merge.cli_main(args) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["passed"] and report["verification"]["argmax_agreement"] == 1.0
    assert report["combination"]["weights"] == {"a": 0.7, "b": 0.3}
    state = load_file(str(out / "model.safetensors"))
    head_a, head_b = saved_head(pair["a"], "text"), saved_head(pair["b"], "text")
    for key in head_a:
        assert torch.allclose(state[key], 0.7 * head_a[key] + 0.3 * head_b[key], atol=1e-6), key
        assert not torch.allclose(head_a[key], head_b[key])

    out_b = tmp_path / "head_b"
    assert merge.cli_main([*args[:-4], "--head-from", "b", "--out", str(out_b), "--samples", "8"]) == 0
    state_b = load_file(str(out_b / "model.safetensors"))
    assert all(torch.equal(state_b[k], v) for k, v in head_b.items())


def test_head_choice_is_head_from_or_the_weighted_default(capsys: pytest.CaptureFixture) -> None:
    """Only `--head-from` selects a head; no option merely restates the default (weighted average)."""
    default = merge.parse_args(["a", "b", "--out", "x"])
    assert default.head_from is None and not hasattr(default, "head")
    assert merge.parse_args(["a", "b", "--out", "x", "--head-from", "b"]).head_from == "b"
    with pytest.raises(SystemExit):
        merge.parse_args(["--help"])
    assert "weighted average of all heads (the default)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(("other", "extra", "message"), [
    ("r8", ["--method", "linear"], "equal rank"),
    ("relabelled", [], "same label set"),
    ("bert", ["--method", "cat"], "different base"),
    ("b", ["--method", "ties"], "--density"),
    ("b", ["--head-from", "nope"], "names no adapter"),
])
def test_incompatible_adapters_are_refused_before_work(pair: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       other: str, extra: list[str], message: str) -> None:
    out = tmp_path / "combined"
    assert merge.cli_main([str(pair["a"]), str(pair[other]), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not out.exists()


def test_unsupported_multi_method_is_named(assets: dict, pair: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    loha = make_run(assets, tmp_path, "text", "loha", adapter={"method": "loha"})
    assert merge.cli_main([str(pair["a"]), str(loha), "--out", str(tmp_path / "x")]) == 2
    assert "`loha` adapter" in capsys.readouterr().err.replace("\n", " ")


def test_8bit_trained_adapter_merges_into_full_precision(assets: dict, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    run = make_run(assets, tmp_path, "text", "int8", quantization={"bits": 8}, train={"max_steps": 3, "lr": 2e-2})
    out = tmp_path / "merged"
    assert merge.cli_main([str(run), "--out", str(out), "--samples", "16"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    v, q = report["verification"], report["quantized_reference"]
    assert v["max_abs_diff"] <= 1e-4 and v["argmax_agreement"] == 1.0  # merged == adapter on the full-precision base
    assert q["bits"] == 8 and q["samples"] == 16
    assert 0 < q["max_abs_diff"] < 1.0  # int8 rounding of the base: visible, small, reported
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    assert "8-bit" in (out / "README.md").read_text()


def test_existing_out_is_not_overwritten(runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert merge.cli_main([str(runs["text-lora"]), "--out", str(out)]) == 2
    assert (out / "keep.txt").exists()
