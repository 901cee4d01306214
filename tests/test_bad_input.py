"""The catalogue of user mistakes: each one exits with code 2 and one paragraph naming the key, file or
column and the fix, before heavy work and without a traceback (``--debug`` shows one).

Every entry runs in-process through the real entry points (``peftkit train`` and ``peftkit
validate``, both wrapped in :func:`peftkit.errors.guarded`); a representative subset also runs as
real subprocesses (``python peftkit/train.py`` and ``python -m peftkit.cli``), started together
so the catalogue stays fast.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import TRAIN_SCRIPT, image_config, text_config, write_yaml


def _csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _rows(n: int = 8, **extra: str) -> list[dict]:
    return [{"text": f"a good film number {i}" if i % 2 else f"a bad film number {i}", "label": "pos" if i % 2 else "neg", **extra}
            for i in range(n)]


@dataclass
class Env:
    """What a case builds on: the shared tiny assets and its own folder."""

    assets: dict[str, Path]
    tmp: Path

    @property
    def run_dir(self) -> Path:
        return self.tmp / "run"

    def text(self, **sections: dict) -> dict:
        return text_config(self.assets, self.run_dir, **sections)

    def image(self, **sections: dict) -> dict:
        return image_config(self.assets, self.run_dir, **sections)

    def config(self, cfg: dict, *extra: str) -> list[str]:
        return ["--config", str(write_yaml(self.tmp / "config.yaml", cfg)), *extra]

    def raw(self, text: str) -> list[str]:
        path = self.tmp / "config.yaml"
        path.write_text(text)
        return ["--config", str(path)]


def _drop(cfg: dict, section: str, key: str) -> dict:
    cfg[section].pop(key)
    return cfg


def _image_folder_with(env: Env, name: str, content: bytes) -> str:
    folder = env.tmp / "images"
    shutil.copytree(env.assets["images"], folder)
    (folder / "red" / name).write_bytes(content)
    return str(folder)


def _folder_without_images(env: Env) -> str:
    for label in ("cat", "dog"):
        (env.tmp / "pets" / label).mkdir(parents=True)
        (env.tmp / "pets" / label / "notes.txt").write_text("not an image")
    return str(env.tmp / "pets")


def _model_without_safetensors(env: Env) -> str:
    folder = env.tmp / "pickled_model"
    shutil.copytree(env.assets["deberta"], folder)
    for f in folder.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))
    return str(folder)


def _damaged_checkpoint(env: Env) -> list[str]:
    from peftkit import checkpoint

    target = env.run_dir / "checkpoints" / "step-0000010"
    tmp = checkpoint.begin(target)
    (tmp / "trainer_state.json").write_text("{}")
    (tmp / "optimizer.bin").write_bytes(b"0" * 64)
    checkpoint.commit(target)
    (target / "optimizer.bin").unlink()
    return env.config(env.text(), "--resume", str(target))


def _hide_module(name: str) -> Callable[[pytest.MonkeyPatch], None]:
    def patch(mp: pytest.MonkeyPatch) -> None:
        mp.setitem(sys.modules, name, None)  # importlib.util.find_spec(name) is then None: "not installed"
    return patch


@dataclass
class Case:
    """One mistake: how to make it, what the message must name, where it applies."""

    build: Callable[[Env], list[str]]
    names: tuple[str, ...]
    train_only: bool = False  # flags or state only `train` has (--resume, an existing run)
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


CASES: dict[str, Case] = {
    # ---- the config file and the command line ----------------------------------------------
    "malformed_yaml": Case(lambda e: e.raw("model:\n  name: x\n  task: [text\ndata: {train: a.csv}\n"), ("not valid YAML", "line")),
    "config_not_a_mapping": Case(lambda e: e.raw("- model\n- data\n"), ("must be a mapping", "config.yaml")),
    "config_file_missing": Case(lambda e: ["--config", str(e.tmp / "no_such_config.yaml")], ("no_such_config.yaml", "not found")),
    "empty_config": Case(lambda e: e.raw(""), ("`model` is required", "`data` is required")),
    "unknown_key": Case(lambda e: e.config(e.text(train={"lrr": 1e-3})), ("unknown key `train.lrr`", "Did you mean `lr`")),
    "unknown_section": Case(lambda e: e.config({**e.text(), "trainer": {"lr": 1e-3}}), ("unknown key `trainer`", "Did you mean `train`")),
    "wrong_type": Case(lambda e: e.config(e.text(train={"batch_size": "sixteen"})), ("`train.batch_size`", "'sixteen'")),
    "negative_lr": Case(lambda e: e.config(e.text(train={"lr": -1e-4})), ("`train.lr`", "greater than 0")),
    "rank_zero": Case(lambda e: e.config(e.text(adapter={"r": 0})), ("`adapter.r`", "greater than or equal to 1")),
    "dropout_out_of_range": Case(lambda e: e.config(e.text(adapter={"dropout": 1.5})), ("`adapter.dropout`", "1.5")),
    "unknown_adapter_method": Case(lambda e: e.config(e.text(adapter={"method": "lorra"})), ("`adapter.method`", "'lorra'")),
    "max_length_too_small": Case(lambda e: e.config(e.text(data={"max_length": 2})), ("`data.max_length`",)),
    "missing_model_name": Case(lambda e: e.config(_drop(e.text(), "model", "name")), ("`model.name` is required",)),
    "missing_data_train": Case(lambda e: e.config(_drop(e.text(), "data", "train")), ("`data.train` is required",)),
    "override_without_equals": Case(lambda e: e.config(e.text(), "train.lr"), ("`train.lr`", "section.key=value")),
    "override_into_a_value": Case(lambda e: e.config(e.text(), "train.lr.max=1"), ("`lr` is a value",)),
    "override_unknown_key": Case(lambda e: e.config(e.text(), "train.learning_rate=1e-3"), ("unknown key `train.learning_rate`",)),
    "trust_remote_code_as_string": Case(lambda e: e.config(e.text(model={"trust_remote_code": "yes"})), ("`model.trust_remote_code`",)),
    "adalora_target_above_init": Case(lambda e: e.config(e.text(adapter={"method": "adalora", "init_r": 4, "target_r": 8})),
                                      ("adapter.target_r", "adapter.init_r")),
    "text_column_on_image_task": Case(lambda e: e.config(e.image(data={"text_column": "caption"})), ("data.text_column: caption", "image task")),
    "image_column_on_text_task": Case(lambda e: e.config(e.text(data={"image_column": "img"})), ("data.image_column: img", "text task")),
    "text_pair_on_image_task": Case(lambda e: e.config(e.image(data={"text_pair_column": "hypothesis"})), ("data.text_pair_column",)),
    # ---- data -------------------------------------------------------------------------------------
    "data_file_missing": Case(lambda e: e.config(e.text(data={"train": str(e.tmp / "nope.csv")})), ("`data.train:", "nope.csv", "does not exist")),
    "data_unsupported_suffix": Case(lambda e: e.config(e.text(data={"train": str(_write(e.tmp / "train.txt", "hello"))})),
                                    ("`data.train:", "train.txt", "`.txt`")),
    "data_unreadable_file": Case(lambda e: e.config(e.text(data={"train": str(_write(e.tmp / "train.parquet", "not parquet"))})),
                                 ("`data.train:", "train.parquet", "cannot be read")),
    "unknown_demo": Case(lambda e: e.config(e.text(data={"train": "demo:imdb"})), ("`data.train: demo:imdb`", "demo:rotten_tomatoes")),
    "missing_text_column": Case(lambda e: e.config(e.text(data={"train": str(_csv(e.tmp / "t.csv", [{"sentence": r["text"], "label": r["label"]} for r in _rows()])),
                                                               "validation": None})),
                                ("`data.text_column: text`", "'sentence'")),
    "missing_label_column": Case(lambda e: e.config(e.text(data={"train": str(_csv(e.tmp / "t.csv", [{"text": r["text"], "target": r["label"]} for r in _rows()])),
                                                                "validation": None})),
                                 ("`data.label_column: label`", "'target'")),
    "missing_image_column": Case(lambda e: e.config(e.image(data={"train": str(e.assets["text_csv"])})), ("`data.image_column: image`", "'text'")),
    "labels_only_in_validation": Case(lambda e: e.config(e.text(data={"validation": str(_csv(e.tmp / "v.csv", [*_rows(4), {"text": "so so film", "label": "neutral"}]))})),
                                      ("validation data", "'neutral'", "model.labels")),
    "empty_dataset": Case(lambda e: e.config(e.text(data={"train": str(_csv(e.tmp / "t.csv", [], ["text", "label"])), "validation": None})),
                          ("data.train", "t.csv")),
    "empty_text": Case(lambda e: e.config(e.text(data={"train": str(_csv(e.tmp / "t.csv", [*_rows(6), {"text": "   ", "label": "pos"}])), "validation": None})),
                       ("column `text`", "empty or missing text")),
    "none_text": Case(lambda e: e.config(e.text(data={"validation": str(_csv(e.tmp / "v.csv", [*_rows(4), {"text": "", "label": "pos"}]))})),
                      ("validation data", "column `text`")),
    "missing_labels": Case(lambda e: e.config(e.text(data={"train": str(_csv(e.tmp / "t.csv", [*_rows(6), {"text": "a film", "label": ""}])), "validation": None})),
                           ("`label`", "empty label")),
    "corrupt_image_file": Case(lambda e: e.config(e.image(data={"train": _image_folder_with(e, "broken.png", b"\x89PNG but not really")})),
                               ("broken.png", "not a readable image")),
    "empty_image_file": Case(lambda e: e.config(e.image(data={"train": _image_folder_with(e, "empty.jpg", b"")})), ("empty.jpg",)),
    "image_folder_without_images": Case(lambda e: e.config(e.image(data={"train": _folder_without_images(e)})), ("`data.train:", "pets", "holds no images")),
    "hub_dataset_offline": Case(lambda e: e.config(e.text(data={"train": "acme-ml/no-such-dataset"})),
                                ("`data.train: acme-ml/no-such-dataset`", "local csv/json/parquet")),
    # ---- model and adapter --------------------------------------------------------------------
    "hub_model_offline": Case(lambda e: e.config(e.text(model={"name": "acme-ml/no-such-model"})),
                              ("`model.name: acme-ml/no-such-model`", "no hub is reachable")),
    "model_folder_without_config": Case(lambda e: e.config(e.text(model={"name": str(_mkdir(e.tmp / "empty_model"))})),
                                        ("`model.name:", "empty_model")),
    "model_weights_not_safetensors": Case(lambda e: e.config(e.text(model={"name": _model_without_safetensors(e)})),
                                          ("`model.name:", "pickled_model", "safetensors")),
    "text_model_on_image_task": Case(lambda e: e.config(e.image(model={"name": str(e.assets["deberta"])})), ("`model.name:", "image processor")),
    "target_modules_match_nothing": Case(lambda e: e.config(e.text(adapter={"target_modules": ["q_lin", "v_lin"]})),
                                         ("`adapter.target_modules`", "q_lin", "query_proj")),
    "modules_to_save_missing": Case(lambda e: e.config(e.text(adapter={"modules_to_save": ["score_head"]})), ("`adapter.modules_to_save`", "score_head")),
    "four_bit_without_bitsandbytes": Case(lambda e: e.config(e.text(quantization={"bits": 4})), ("`quantization.bits: 4`", "pip install"),
                                          patch=_hide_module("bitsandbytes")),
    "eight_bit_optimizer_without_bitsandbytes": Case(lambda e: e.config(e.text(train={"optimizer": "adamw_8bit"})),
                                                     ("`train.optimizer: adamw_8bit`", "bitsandbytes"), train_only=True,
                                                     patch=_hide_module("bitsandbytes")),
    # ---- launch and run directory ------------------------------------------------------------
    "deepspeed_without_deepspeed": Case(lambda e: e.config(e.text()), ("DeepSpeed", "pip install"), train_only=True,
                                        patch=_hide_module("deepspeed"), env={"ACCELERATE_USE_DEEPSPEED": "true"}),
    "output_dir_holds_a_run": Case(lambda e: _write(e.run_dir / "config.yaml", "model: {}") and e.config(e.text()),
                                   ("`output.dir:", "--resume auto", "--overwrite"), train_only=True),
    "resume_checkpoint_missing_files": Case(_damaged_checkpoint, ("`--resume", "optimizer.bin is missing"), train_only=True),
}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30


@pytest.fixture
def fresh_accelerate_state(monkeypatch, capsys):
    """A fresh process's state: no Accelerator yet, and no library error logs (they are shown in a real process).

    datasets' log handler keeps the stderr stream of the test that imported it, which pytest closes
    later; its failure report would read as a traceback here. The subprocess cases keep the logs.
    """
    import logging

    from accelerate.state import AcceleratorState, GradientState

    datasets_logger = logging.getLogger("datasets")
    monkeypatch.setattr(datasets_logger, "level", logging.CRITICAL)
    datasets_logger.manager._clear_cache()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _check(rc: int, err: str, names: tuple[str, ...]) -> None:
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err
    assert "peftkit: error:" in err
    message = " ".join(err.split())  # the paragraph is wrapped; compare with single spaces
    for name in names:
        assert name in message, f"{name!r} not in: {message[-1500:]}"


# Every mistake through `peftkit train`; those `validate` can meet (all but run-directory, --resume,
# launcher and optimizer ones) through `peftkit validate` as well.
VERB_CASES = [(name, verb) for name, case in CASES.items() for verb in ("train", "validate") if verb == "train" or not case.train_only]


@pytest.mark.parametrize(("name", "verb"), VERB_CASES)
def test_mistake_is_named_without_traceback(name, verb, assets, tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    case = CASES[name]
    from peftkit import dryrun, train

    argv = case.build(Env(assets, tmp_path))
    if case.patch:
        case.patch(monkeypatch)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    rc = train.main(argv) if verb == "train" else dryrun.cli_main(argv)
    _check(rc, capsys.readouterr().err, case.names)


# ------------------------------------------------------------------------------------------------
# The same mistakes through real processes, as a user meets them
# ------------------------------------------------------------------------------------------------

# (case, how it is started): "script" is `python peftkit/train.py`, the others are `peftkit VERB`.
# Config mistakes through `peftkit validate` cost a second each (nothing heavy is imported before the
# config is valid); those through the training script pay for importing torch and transformers.
SUBPROCESS_CASES = [
    ("malformed_yaml", "validate"),
    ("unknown_key", "validate"),
    ("config_file_missing", "validate"),
    ("labels_only_in_validation", "validate"),
    ("missing_text_column", "script"),
    ("target_modules_match_nothing", "script"),
    ("output_dir_holds_a_run", "script"),
]


@pytest.fixture(scope="module")
def subprocess_results(assets, tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Start every subprocess case at once (they spend most of their time importing), then collect."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, how in [*SUBPROCESS_CASES, ("unknown_key", "debug")]:
        tmp = tmp_path_factory.mktemp(name)
        argv = CASES[name].build(Env(assets, tmp))
        if how == "script":
            cmd = [sys.executable, str(TRAIN_SCRIPT), *argv]
        elif how == "debug":
            cmd = [sys.executable, "-m", "peftkit.cli", "validate", *argv, "--debug"]
        else:
            cmd = [sys.executable, "-m", "peftkit.cli", how, *argv]
        procs[f"{name}-{how}"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out = {}
    for key, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        out[key] = (proc.returncode, err)
    return out


@pytest.mark.parametrize(("name", "how"), SUBPROCESS_CASES)
def test_mistake_in_real_process(name, how, subprocess_results):
    rc, err = subprocess_results[f"{name}-{how}"]
    _check(rc, err, CASES[name].names)


def test_debug_flag_shows_traceback(subprocess_results):
    rc, err = subprocess_results["unknown_key-debug"]
    assert rc != 0
    assert "Traceback" in err and "UserError" in err and "unknown key `train.lrr`" in err


def test_valid_config_passes_validate(assets, tmp_path, capsys):
    """The control: the same builder with no mistake validates (so the cases above fail for their reason)."""
    from peftkit import dryrun

    env = Env(assets, tmp_path)
    assert dryrun.cli_main(env.config(env.text())) == 0
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["name"] == str(assets["deberta"])


# ------------------------------------------------------------------------------------------------
# After training: merge and predict
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory) -> dict[str, Path]:
    """A 2-step text run and image run (in-process), and a base model of another width."""
    from accelerate.state import AcceleratorState, GradientState

    from peftkit import tiny
    from peftkit.config import validate_config
    from peftkit.train import run

    root = tmp_path_factory.mktemp("trained")
    out = {"text": root / "text_run", "image": root / "image_run"}
    for kind, make in (("text", text_config), ("image", image_config)):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        run(validate_config(make(assets, out[kind], train={"max_steps": 2, "batch_size": 16})))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out["wide_base"] = tiny.tiny_deberta(root / "wide_deberta", hidden=128)
    out["vit"] = assets["vit"]
    return out


def _copy_run(runs: dict[str, Path], tmp: Path, kind: str = "text") -> Path:
    return Path(shutil.copytree(runs[kind], tmp / f"{kind}_copy"))


def _damage(runs: dict[str, Path], tmp: Path, *, keep_manifest: bool, rel: str = "adapter_model.safetensors",
            content: bytes | None = None) -> str:
    run = _copy_run(runs, tmp)
    target = run / "best" / rel
    if content is None:
        target.unlink()
    else:
        target.write_bytes(content)
    if not keep_manifest:
        (run / "best" / "manifest.json").unlink()
    return str(run)


def _relabel(runs: dict[str, Path], tmp: Path) -> str:
    run = _copy_run(runs, tmp)
    (run / "best" / "labels.json").write_text('["neg", "pos", "neutral"]')
    (run / "best" / "manifest.json").unlink()  # an edited folder; the head shape gives it away
    return str(run)


def _no_images(tmp: Path) -> str:
    (tmp / "photos" / "empty").mkdir(parents=True)
    (tmp / "photos" / "notes.txt").write_text("no images here")
    return str(tmp / "photos")


AFTER_TRAINING: dict[str, tuple[str, Callable[[dict[str, Path], Path], list[str]], tuple[str, ...]]] = {
    "merge_onto_a_different_base": ("merge", lambda r, t: [str(r["text"]), "--base", str(r["wide_base"]), "--out", str(t / "m")],
                                    ("does not fit the base", "query_proj", "[4, 64]", "[4, 128]")),
    "merge_onto_another_architecture": ("merge", lambda r, t: [str(r["text"]), "--base", str(r["vit"]), "--out", str(t / "m")],
                                        ("`model.name:", "text-classification", "ViTConfig")),
    "merge_with_a_different_label_set": ("merge", lambda r, t: [_relabel(r, t), "--out", str(t / "m")],
                                         ("head for 2 labels", "labels.json", "'neutral'")),
    "merge_adapters_of_different_tasks": ("merge", lambda r, t: [str(r["text"]), str(r["image"]), "--out", str(t / "m")],
                                          ("image-classification", "text-classification")),
    "merge_truncated_adapter": ("merge", lambda r, t: [_damage(r, t, keep_manifest=True, content=b"\x00" * 100), "--out", str(t / "m")],
                                ("adapter_model.safetensors", "has 100 bytes", "truncated")),
    "merge_corrupted_adapter_without_manifest": ("merge", lambda r, t: [_damage(r, t, keep_manifest=False, content=b"garbage" * 50),
                                                                       "--out", str(t / "m")],
                                                 ("cannot be loaded", "corrupted")),
    "merge_folder_missing_adapter_config": ("merge", lambda r, t: [_damage(r, t, keep_manifest=True, rel="adapter_config.json"),
                                                                  "--out", str(t / "m")],
                                            ("adapter_config.json is missing",)),
    "merge_not_a_run": ("merge", lambda r, t: [str(_mkdir(t / "not_a_run")), "--out", str(t / "m")], ("not_a_run", "not a peftkit run")),
    "predict_folder_without_images": ("predict", lambda r, t: ["--model", str(r["image"]), _no_images(t)], ("No images", "photos")),
}


@pytest.mark.parametrize("name", list(AFTER_TRAINING))
def test_after_training_mistake_is_named(name, trained, tmp_path, capsys, fresh_accelerate_state):
    from peftkit import inference, merge

    verb, build, names = AFTER_TRAINING[name]
    argv = build(trained, tmp_path)
    rc = merge.cli_main(argv) if verb == "merge" else inference.predict_main([*argv, "--quiet"])
    _check(rc, capsys.readouterr().err, names)
    assert not (tmp_path / "m").exists()  # nothing half-written


def test_catalogue_counts_at_least_thirty_entries_with_merge_and_predict():
    assert len(CASES) + len(AFTER_TRAINING) >= 40
