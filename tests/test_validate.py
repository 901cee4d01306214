"""``peftkit validate`` (a dry run on the meta device) and ``peftkit configs``."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import image_config, run_cli, text_config, write_yaml

from peftkit.config import CONFIG_DIR, validate_config


def _no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to read pretrained weights fails the test."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    def refuse(*args, **kwargs):
        raise AssertionError("validate loaded weights")

    for cls in (AutoModelForSequenceClassification, AutoModelForImageClassification):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def test_text_plan_matches_the_real_model(assets, tmp_path, monkeypatch, capsys):
    from peftkit import dryrun
    from peftkit.adapters import AdapterSpec, count_parameters, inject
    from peftkit.models import architecture_for, load_backbone

    cfg = text_config(assets, tmp_path / "run", train={"epochs": 2, "batch_size": 16, "grad_accum": 2})
    path = write_yaml(tmp_path / "c.yaml", cfg)

    # The same model with real weights: the dry run's counts must match it exactly.
    real = load_backbone(str(assets["deberta"]), "text-classification", ["neg", "pos"])
    real, targets = inject(real, architecture_for("deberta-v2"), AdapterSpec(method="lora", r=4, alpha=8))
    trainable, total = count_parameters(real)

    _no_weights(monkeypatch)
    assert dryrun.cli_main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    p = dryrun.plan(validate_config(cfg))
    assert (p.trainable, p.total) == (trainable, total)
    assert p.target_modules == targets.modules and len(p.target_modules) == 12
    assert f"trainable {trainable:,} of {total:,}" in out
    assert "adapter lora on 12 modules: deberta.encoder.layer.0.attention.self.query_proj" in out
    assert "trained in full: ['classifier', 'pooler']" in out
    # 160 rows / 16 = 10 micro-batches, 2 per optimizer step: 5 steps an epoch, 10 in 2 epochs.
    assert "effective batch 16 x 2 accum x 1 proc = 32 | 10 optimizer steps (5 per epoch)" in out
    assert "data: 160 train / 40 validation" in out
    preview = [line for line in out.splitlines() if line.strip().startswith("row ")]
    assert len(preview) == 3 and all("label 'pos'" in r or "label 'neg'" in r for r in preview)
    assert all("[CLS]" in r and "tokens" in r for r in preview)
    assert "no weights were loaded" in out


def test_processes_change_effective_batch_and_steps(assets, tmp_path, capsys):
    from peftkit import dryrun

    path = write_yaml(tmp_path / "c.yaml", text_config(assets, tmp_path / "run", train={"epochs": 1, "batch_size": 16}))
    assert dryrun.cli_main(["--config", str(path), "--processes", "2", "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "effective batch 16 x 1 accum x 2 proc = 32 | 5 optimizer steps (5 per epoch)" in out
    assert sum(line.strip().startswith("row ") for line in out.splitlines()) == 1


def test_image_plan_and_override(assets, tmp_path, monkeypatch, capsys):
    from peftkit import dryrun

    path = write_yaml(tmp_path / "c.yaml", image_config(assets, tmp_path / "run"))
    _no_weights(monkeypatch)
    assert dryrun.cli_main(["--config", str(path), "adapter.method=ia3"]) == 0
    out = capsys.readouterr().out
    assert "labels ['blue', 'green', 'red']" in out
    assert "adapter ia3 on 6 modules" in out  # k_proj, v_proj, fc2 in 2 layers
    assert "pixel_values (3, 32, 32)" in out


def test_validate_cli_subprocess(assets, tmp_path):
    path = write_yaml(tmp_path / "c.yaml", text_config(assets, tmp_path / "run"))
    proc = run_cli("validate", "--config", str(path), "train.batch_size=8")
    assert proc.returncode == 0, proc.stderr
    assert "config OK" in proc.stdout and "effective batch 8 x 1 accum x 1 proc = 8" in proc.stdout
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_configs_lists_every_shipped_config():
    proc = run_cli("configs")
    assert proc.returncode == 0, proc.stderr
    shipped = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml"))
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.strip().endswith((".", "...", ")")) and line.split()[0].endswith(".yaml")]
    assert listed == shipped and len(shipped) > 0
    assert f"{len(shipped)} configs" in proc.stdout


def test_configs_descriptions(tmp_path, capsys):
    from peftkit import dryrun

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.yaml").write_text(
        "# LoRA on a text model, wrapped over\n# two comment lines. More detail here.\n"
        "#   accelerate launch peftkit/train.py --config text/a.yaml\nmodel: {}\n")
    (tmp_path / "b.yaml").write_text("#   accelerate launch peftkit/train.py --config b.yaml\nmodel: {}\n")
    (tmp_path / "c.yaml").write_text("model: {}\n# a comment after the keys is not a description\n")
    assert dryrun.configs_main(["--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(None, 1) == ["b.yaml", "accelerate launch peftkit/train.py --config b.yaml"]
    assert lines[1].split(None, 1) == ["c.yaml", "(no description)"]
    assert lines[2].split(None, 1) == ["text/a.yaml", "LoRA on a text model, wrapped over two comment lines."]
    assert "3 configs" in lines[-1]


def test_memory_estimate_is_shown_when_available(assets, tmp_path, monkeypatch, capsys):
    from peftkit import dryrun, memory

    path = write_yaml(tmp_path / "c.yaml", text_config(assets, tmp_path / "run"))
    assert dryrun.cli_main(["--config", str(path), "--rows", "0"]) == 0
    out = capsys.readouterr().out
    assert "[peftkit] memory: estimated peak training memory per process: micro-batch 16 x accum 1 x 1 proc" in out
    assert "[peftkit]   total" in out
    # An estimator that fails is reported, and the rest of the plan still prints.
    monkeypatch.setattr(memory, "report", lambda *a, **k: 1 / 0)
    assert dryrun.cli_main(["--config", str(path), "--rows", "0"]) == 0
    out = capsys.readouterr().out
    assert "memory: unavailable (ZeroDivisionError" in out and "no weights were loaded" in out


@pytest.mark.parametrize(("kind", "method"), [("text", "lora"), ("text", "adalora"), ("text", "full"), ("text", "freeze"), ("image", "ia3")])
def test_plan_builds_the_model_once_and_estimates_like_the_estimator(assets, tmp_path, monkeypatch, kind, method):
    import torch

    from peftkit import dryrun, memory, models

    cfg = validate_config((text_config if kind == "text" else image_config)(assets, tmp_path / "run", adapter={"method": method}))
    real = models.load_backbone
    built = []
    monkeypatch.setattr(models, "load_backbone", lambda *a, **k: built.append(k.get("meta")) or real(*a, **k))
    p = dryrun.plan(cfg, preview_rows=0)
    assert built == [True], "the meta model was built more than once"
    # The estimate counted from the plan's model is the one `peftkit estimate` gives for the config.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert p.memory == memory.report(cfg, device=device, num_labels=len(p.labels))
    assert len(built) == 2  # the estimator, on its own, builds its model


def test_trust_remote_code_is_off_and_strict(assets, tmp_path):
    cfg = validate_config(text_config(assets, tmp_path))
    assert cfg.model.trust_remote_code is False
    assert validate_config(text_config(assets, tmp_path, model={"trust_remote_code": True})).model.trust_remote_code is True
    from peftkit.errors import UserError

    for loose in ("yes", 1, "true"):
        with pytest.raises(UserError, match=r"model\.trust_remote_code"):
            validate_config(text_config(assets, tmp_path, model={"trust_remote_code": loose}))


def test_model_weights_load_only_from_safetensors(assets, tmp_path):
    from peftkit.errors import UserError
    from peftkit.models import _prefers_safetensors

    assert _prefers_safetensors(str(assets["deberta"])) is True
    pickled = tmp_path / "m"
    pickled.mkdir()
    (pickled / "config.json").write_text(Path(assets["deberta"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UserError, match="never unpickles"):
        _prefers_safetensors(str(pickled))
