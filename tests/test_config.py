"""The config schema: every kind of mistake is a UserError naming the key and the fix; overrides, lookup, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import write_yaml

from peftkit import config as cfg
from peftkit.config import (
    Config,
    apply_overrides,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
    resolve_config_path,
    validate_config,
)
from peftkit.errors import UserError


def minimal(**sections: dict) -> dict:
    """The smallest valid config; ``sections`` are merged into it."""
    raw: dict = {"model": {"name": "some/model"}, "data": {"train": "train.csv"}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


def error_of(raw: dict) -> str:
    with pytest.raises(UserError) as info:
        validate_config(raw, source="my.yaml")
    return str(info.value)


def test_minimal_config_takes_the_defaults() -> None:
    c = validate_config(minimal())
    assert c.model.task == "text-classification"
    assert c.adapter.method == "lora" and c.adapter.r == 8 and c.adapter.target_modules == "auto"
    assert c.train.lr == pytest.approx(2e-4) and c.train.batch_size == 16 and c.train.schedule == "cosine"
    assert c.quantization.bits is None
    assert c.data.validation is None and c.data.validation_fraction == pytest.approx(0.1)


def test_unknown_key_names_it_and_suggests_the_closest() -> None:
    msg = error_of(minimal(train={"lrr": 1e-3}))
    assert "unknown key `train.lrr`" in msg and "Did you mean `lr`?" in msg
    assert "my.yaml" in msg


def test_unknown_top_level_section_suggests_the_section() -> None:
    raw = minimal()
    raw["adaptor"] = raw.pop("adapter", {"r": 4})
    msg = error_of(raw)
    assert "unknown key `adaptor`" in msg and "Did you mean `adapter`?" in msg


def test_unknown_key_without_a_close_match_has_no_suggestion() -> None:
    msg = error_of(minimal(data={"zzzzqqq": 1}))
    assert "unknown key `data.zzzzqqq`" in msg and "Did you mean" not in msg


@pytest.mark.parametrize(
    ("section", "values", "key", "got"),
    [
        ("train", {"batch_size": "big"}, "train.batch_size", "'big'"),
        ("train", {"epochs": "three"}, "train.epochs", "'three'"),
        ("adapter", {"r": 2.5}, "adapter.r", "2.5"),
        ("adapter", {"method": "loraa"}, "adapter.method", "'loraa'"),
        ("model", {"task": "text"}, "model.task", "'text'"),
        ("output", {"trackers": ["csv", "nope"]}, "output.trackers.1", "'nope'"),
    ],
)
def test_wrong_type_or_choice_names_the_key_and_the_value(section: str, values: dict, key: str, got: str) -> None:
    msg = error_of(minimal(**{section: values}))
    assert f"`{key}`" in msg and f"(got {got})" in msg


def test_a_choice_error_lists_the_allowed_values() -> None:
    msg = error_of(minimal(adapter={"method": "loraa"}))
    for method in ("lora", "dora", "ia3", "adalora", "freeze"):
        assert f"'{method}'" in msg


def test_union_error_hides_pydantic_internals() -> None:
    msg = error_of(minimal(adapter={"target_modules": "q_proj"}))
    assert "`adapter.target_modules`" in msg and "'q_proj'" in msg
    assert "literal[" not in msg and "list[str]" not in msg


@pytest.mark.parametrize(
    ("section", "values", "key", "bound"),
    [
        ("train", {"lr": -1e-3}, "train.lr", "greater than 0"),
        ("adapter", {"r": 0}, "adapter.r", "greater than or equal to 1"),
        ("adapter", {"dropout": 1.5}, "adapter.dropout", "less than 1"),
        ("train", {"layer_decay": 1.2}, "train.layer_decay", "less than or equal to 1"),
        ("data", {"validation_fraction": 0.0}, "data.validation_fraction", "greater than 0"),
        ("data", {"max_length": 4}, "data.max_length", "greater than or equal to 8"),
        ("train", {"grad_accum": 0}, "train.grad_accum", "greater than or equal to 1"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_bound(section: str, values: dict, key: str, bound: str) -> None:
    msg = error_of(minimal(**{section: values}))
    assert f"`{key}`" in msg and bound in msg
    assert f"(got {next(iter(values.values()))!r})" in msg


def test_missing_required_section_and_key() -> None:
    msg = error_of({"model": {"name": "m"}})
    assert "`data` is required" in msg
    msg = error_of({"model": {"task": "text-classification"}, "data": {"train": "x.csv"}})
    assert "`model.name` is required" in msg and "model.name=..." in msg


def test_a_section_given_as_a_scalar_is_an_error() -> None:
    msg = error_of({"model": "microsoft/deberta-v3-base", "data": {"train": "x.csv"}})
    assert "`model`" in msg and "valid dictionary" in msg


def test_all_errors_are_reported_at_once() -> None:
    msg = error_of(minimal(train={"lr": 0, "batch_size": 0}, adapter={"rr": 4}))
    assert "`train.lr`" in msg and "`train.batch_size`" in msg and "unknown key `adapter.rr`" in msg


@pytest.mark.parametrize(
    ("sections", "words"),
    [
        ({"model": {"task": "image-classification"}, "data": {"text_pair_column": "hypothesis"}}, ["data.text_pair_column", "image task"]),
        ({"adapter": {"method": "adalora", "init_r": 4, "target_r": 8}}, ["adapter.target_r", "adapter.init_r"]),
        ({"adapter": {"method": "full"}, "quantization": {"bits": 8}}, ["quantization.bits", "adapter.method: full"]),
        ({"train": {"precision": "fp16"}, "quantization": {"bits": 4, "compute_dtype": "bfloat16"}},
         ["train.precision: fp16", "quantization.compute_dtype: bfloat16"]),
    ],
)
def test_cross_field_checks(sections: dict, words: list[str]) -> None:
    msg = error_of(minimal(**sections))
    for word in words:
        assert word in msg


def test_cross_field_checks_accept_the_valid_neighbours() -> None:
    validate_config(minimal(model={"task": "image-classification"}, data={"text_pair_column": None}))
    validate_config(minimal(adapter={"method": "adalora", "init_r": 8, "target_r": 8}))
    validate_config(minimal(adapter={"method": "lora"}, quantization={"bits": 8}))
    validate_config(minimal(train={"precision": "bf16"}, quantization={"bits": 4, "compute_dtype": "bfloat16"}))


def test_assignment_is_validated_too() -> None:
    c = validate_config(minimal())
    with pytest.raises(ValueError):
        c.train.lr = -1.0


# --------------------------------------------------------------------------------------------
# YAML files
# --------------------------------------------------------------------------------------------


def test_malformed_yaml_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: m\ndata:\n  train: [a.csv\n  validation: b.csv\ntrain:\n  lr: 1\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "not valid YAML" in msg
    assert "at line 5, column" in msg


def test_bad_indentation_points_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "indent.yaml"
    path.write_text("model:\n  name: m\n    task: text-classification\n")
    with pytest.raises(UserError, match=r"line 3, column \d+"):
        read_yaml(path)


@pytest.mark.parametrize(("text", "kind"), [("- model\n- data\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_non_mapping_yaml_is_an_error(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"must be a mapping of sections .* not a {kind}"):
        load_config(path)


def test_empty_yaml_reports_the_required_sections(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert "`model` is required" in str(info.value) and "`data` is required" in str(info.value)


def test_yaml_scientific_notation_becomes_a_float(tmp_path: Path) -> None:
    # PyYAML reads `3e-4` (no dot) as a string; the schema must still give a float.
    path = tmp_path / "sci.yaml"
    path.write_text("model: {name: m}\ndata: {train: t.csv}\ntrain: {lr: 3e-4, head_lr: 1e-3}\n")
    c = load_config(path)
    assert isinstance(c.train.lr, float) and c.train.lr == pytest.approx(3e-4)
    assert c.train.head_lr == pytest.approx(1e-3)


# --------------------------------------------------------------------------------------------
# Overrides and precedence
# --------------------------------------------------------------------------------------------


def test_parse_override_reads_yaml_scalars_and_lists() -> None:
    assert parse_override("train.lr=3e-4") == (["train", "lr"], "3e-4")  # a string; the schema makes it a float
    assert parse_override("train.batch_size=8") == (["train", "batch_size"], 8)
    assert parse_override("train.gradient_checkpointing=true") == (["train", "gradient_checkpointing"], True)
    assert parse_override("model.labels=[neg, pos]") == (["model", "labels"], ["neg", "pos"])
    assert parse_override("data.train=a=b.csv") == (["data", "train"], "a=b.csv")
    assert parse_override("train.head_lr=") == (["train", "head_lr"], None)


@pytest.mark.parametrize("text", ["train.lr", "=3", "lr 3"])
def test_malformed_override_is_an_error(text: str) -> None:
    with pytest.raises(UserError, match=r"`section\.key=value`"):
        parse_override(text)


def test_override_into_a_value_is_an_error() -> None:
    with pytest.raises(UserError, match="`lr` is a value, not a section"):
        apply_overrides(minimal(train={"lr": 1e-3}), ["train.lr.x=1"])


def test_precedence_overrides_beat_yaml_beat_defaults(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "run.yaml", minimal(train={"lr": 1e-3, "batch_size": 4}, adapter={"r": 4}))
    c = load_config(path, ["train.lr=5e-4", "adapter.alpha=32", "quantization.bits=8"])
    assert c.train.lr == pytest.approx(5e-4)  # override beats YAML
    assert c.train.batch_size == 4  # YAML beats default
    assert c.adapter.r == 4
    assert c.adapter.alpha == pytest.approx(32.0)  # override beats default
    assert c.quantization.bits == 8  # override creates a section the YAML lacks
    assert c.train.epochs == pytest.approx(3.0)  # default where nobody says otherwise
    assert c.train.schedule == "cosine"


def test_the_last_override_of_a_key_wins(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "run.yaml", minimal())
    assert load_config(path, ["train.lr=1e-3", "train.lr=2e-3"]).train.lr == pytest.approx(2e-3)


@pytest.mark.parametrize(
    ("override", "words"),
    [("train.lr=-1", ["`train.lr`", "greater than 0"]), ("train.lrr=1", ["unknown key `train.lrr`", "Did you mean `lr`?"]),
     ("adapter.r=0", ["`adapter.r`"]), ("nonsense.key=1", ["unknown key `nonsense`"])],
)
def test_overrides_are_validated(tmp_path: Path, override: str, words: list[str]) -> None:
    path = write_yaml(tmp_path / "run.yaml", minimal())
    with pytest.raises(UserError) as info:
        load_config(path, [override])
    for word in words:
        assert word in str(info.value)


def test_an_override_can_supply_a_required_key(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "run.yaml", {"model": {"name": "m"}})
    assert load_config(path, ["data.train=x.csv"]).data.train == "x.csv"


# --------------------------------------------------------------------------------------------
# Lookup and round trip
# --------------------------------------------------------------------------------------------


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for the shipped ``configs/`` folder with two recipes."""
    folder = tmp_path / "configs"
    (folder / "extra").mkdir(parents=True)
    write_yaml(folder / "lora_demo.yaml", minimal(train={"lr": 1e-3}))
    write_yaml(folder / "extra" / "probe.yaml", minimal(adapter={"method": "freeze"}))
    monkeypatch.setattr(cfg, "CONFIG_DIR", folder)
    return folder


def test_lookup_by_path(tmp_path: Path, shipped: Path) -> None:
    path = write_yaml(tmp_path / "mine.yaml", minimal(train={"lr": 7e-4}))
    assert resolve_config_path(path) == path
    assert load_config(str(path)).train.lr == pytest.approx(7e-4)


def test_lookup_by_shipped_name_with_or_without_suffix(shipped: Path) -> None:
    assert resolve_config_path("lora_demo.yaml") == shipped / "lora_demo.yaml"
    assert resolve_config_path("lora_demo") == shipped / "lora_demo.yaml"
    assert resolve_config_path("extra/probe.yaml") == shipped / "extra" / "probe.yaml"
    assert load_config("lora_demo").train.lr == pytest.approx(1e-3)
    assert load_config("extra/probe").adapter.method == "freeze"


def test_a_path_wins_over_a_shipped_name(tmp_path: Path, shipped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path / "lora_demo.yaml", minimal(train={"lr": 9e-4}))
    assert load_config("lora_demo.yaml").train.lr == pytest.approx(9e-4)


def test_missing_config_lists_the_shipped_ones(shipped: Path) -> None:
    with pytest.raises(UserError) as info:
        resolve_config_path("lora_dmeo")
    msg = str(info.value)
    assert "`lora_dmeo` not found" in msg and str(shipped) in msg
    assert "lora_demo.yaml" in msg and "extra/probe.yaml" in msg


def test_dump_config_round_trips(tmp_path: Path) -> None:
    c = validate_config(minimal(model={"labels": ["neg", "pos"]}, adapter={"target_modules": ["query_proj", "value_proj"], "r": 4},
                                train={"lr": 3e-4, "head_lr": 1e-3, "max_steps": 10}, quantization={"bits": 4}))
    text = dump_config(c)
    data = yaml.safe_load(text)
    assert data["train"]["batch_size"] == 16  # defaults are written out, so the saved file is complete
    assert list(data) == list(Config.model_fields)
    again = validate_config(data)
    assert again == c
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path) == c
