"""Every file in launch/ parses with its own engine's loader, and every CPU-runnable one is run.

Accelerate configs are read by Accelerate's config loader and turned into the environment its
launcher would give the workers; DeepSpeed JSONs are filled from a training config by peftkit and
then parsed by DeepSpeed's own ``DeepSpeedConfig``. The DeepSpeed auto-filling and the launch
checks of :mod:`peftkit.distributed` are unit-tested here too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, accelerate_launch, text_config, write_yaml

from peftkit.distributed import check_launch_env, fill_deepspeed_config, requested_processes_from_argv
from peftkit.errors import UserError

LAUNCH = REPO / "launch"
ACCELERATE_CONFIGS = sorted((LAUNCH / "accelerate").glob("*.yaml"))
DEEPSPEED_JSONS = sorted((LAUNCH / "deepspeed").glob("*.json"))

# Where each accelerate config is run for a few steps on this CPU machine, or why it cannot be.
RUN_IN = {
    "cpu.yaml": "test_multiprocess.py::test_two_process_ddp_matches_one_process_with_same_global_batch (1-process reference)",
    "cpu_ddp.yaml": "test_multiprocess.py::test_two_process_ddp_matches_one_process_with_same_global_batch",
    "ddp.yaml": "test_multiprocess.py::test_ddp_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result",
    "deepspeed_zero2.yaml": "test_multiprocess.py::test_deepspeed_trains_saves_complete_adapter_and_resumes[zero2]",
    "deepspeed_zero3.yaml": "test_multiprocess.py::test_deepspeed_trains_saves_complete_adapter_and_resumes[zero3]",
    "deepspeed_zero3_offload.yaml": "test_launch_configs.py::test_zero3_offload_runs_on_cpu",
    "gpu.yaml": "test_launch_configs.py::test_gpu_config_runs",
}
NOT_RUN_ON_CPU = {
    "fsdp.yaml": "Accelerate runs FSDP on CUDA devices only; test_fsdp_refused_on_cpu / test_fsdp_runs_on_gpu",
    "multi_node.yaml": "needs several machines; parsed, and its placeholders checked",
}
TRAINING = {"batch_size": 16, "grad_accum": 2, "world_size": 1, "max_grad_norm": 0.5, "precision": "bf16"}


def _launcher_env(path: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file PATH` gives its workers (no process started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "--main_process_port", "0", "train.py"])
    args, defaults, precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    if args.multi_gpu or args.use_fsdp:
        return prepare_multi_gpu_env(args)
    return prepare_simple_launcher_cmd_env(args)[1]


def _no_auto_left(node: Any, where: str = "") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _no_auto_left(value, f"{where}.{key}")
    else:
        assert node != "auto", f"{where} is still auto"


def test_every_launch_file_is_accounted_for() -> None:
    assert len(ACCELERATE_CONFIGS) == 9 and len(DEEPSPEED_JSONS) == 3
    assert {p.name for p in ACCELERATE_CONFIGS} == set(RUN_IN) | set(NOT_RUN_ON_CPU)
    for path in ACCELERATE_CONFIGS:
        assert path.read_text().startswith("#"), f"{path.name} should open with a comment saying what it is for"
        assert "accelerate launch" in path.read_text(), f"{path.name} should show the command that uses it"
    slurm = LAUNCH / "slurm"
    for script in ("multi_node.sbatch", "torchrun.sh"):  # torchrun.sh also runs: test_torchrun_script_runs_two_cpu_processes
        assert subprocess.run(["bash", "-n", str(slurm / script)]).returncode == 0, script
    assert "## Scaling out" in (LAUNCH / "README.md").read_text()


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_parses_and_builds_the_launcher_env(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin, patch_environment

    config = load_config_from_file(str(path))  # strict: an unknown key raises
    assert config.num_processes >= 1 and config.num_processes % config.num_machines == 0
    if config.num_machines > 1:
        text = path.read_text()
        assert "PLACEHOLDER" in text and config.main_process_ip and config.main_process_port, "multi-node needs address and port"
        return  # the launcher would check the port on this machine; nothing more to build here
    env = _launcher_env(path)
    if config.distributed_type == DistributedType.DEEPSPEED:
        ds_file = REPO / config.deepspeed_config["deepspeed_config_file"]
        assert ds_file.parent == LAUNCH / "deepspeed" and ds_file.is_file()
        filled = fill_deepspeed_config(json.loads(ds_file.read_text()), source=str(ds_file), **TRAINING)
        with patch_environment(**{k: v for k, v in env.items() if k.startswith("ACCELERATE_")}):
            plugin = DeepSpeedPlugin(hf_ds_config=filled)  # raises on accelerate-config fields that clash with the JSON
        assert plugin.zero_stage == filled["zero_optimization"]["stage"]
        assert plugin.zero3_init_flag == (plugin.zero_stage == 3)
    elif config.distributed_type == DistributedType.FSDP:
        with patch_environment(**{k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.use_orig_params, "LoRA under FSDP1 needs the original (not flattened) parameters"
        assert plugin.auto_wrap_policy is not None
    else:
        assert env.get("ACCELERATE_USE_DEEPSPEED", "false") != "true"


@pytest.mark.deepspeed
@pytest.mark.parametrize("path", DEEPSPEED_JSONS, ids=lambda p: p.name)
def test_deepspeed_json_is_accepted_by_deepspeed_once_filled(path: Path) -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    owned = ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"]
    assert all(raw[k] == "auto" for k in owned) and raw["bf16"]["enabled"] == raw["fp16"]["enabled"] == "auto"
    assert "optimizer" not in raw and "scheduler" not in raw
    filled = fill_deepspeed_config(raw, source=str(path), hidden_size=64, **TRAINING)
    _no_auto_left(filled)
    ds = DeepSpeedConfig(filled)
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.train_batch_size) == (16, 2, 32)
    assert ds.gradient_clipping == 0.5 and ds.bfloat16_config.enabled and not ds.float16_config.enabled
    assert ds.zero_optimization_stage == raw["zero_optimization"]["stage"]
    if ds.zero_optimization_stage == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save


# ---- filling the autos: agreement, conflicts, what peftkit owns -----------------------------------------


def test_fill_takes_training_values_and_accepts_agreeing_explicit_ones() -> None:
    raw = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}}
    filled = fill_deepspeed_config(raw, source="ds.json", **TRAINING | {"world_size": 4, "precision": "no", "max_grad_norm": None})
    assert filled["train_batch_size"] == 16 * 2 * 4 and filled["gradient_accumulation_steps"] == 2
    # Absent keys count as auto: DeepSpeed's own defaults (here: no clipping) would silently differ otherwise.
    assert filled["gradient_clipping"] == 0.0 and filled["bf16"] == {"enabled": False} and filled["fp16"] == {"enabled": False}
    assert raw == {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}}


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ({"train_micro_batch_size_per_gpu": 8}, ["train_micro_batch_size_per_gpu: 8", "train.batch_size: 16"]),
        ({"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps: 4", "train.grad_accum: 2"]),
        ({"train_batch_size": 64}, ["train_batch_size: 64", "train.batch_size x train.grad_accum x processes"]),
        ({"gradient_clipping": 1.0}, ["gradient_clipping: 1.0", "train.max_grad_norm: 0.5"]),
        ({"fp16": {"enabled": True}}, ["fp16.enabled: true", "train.precision: bf16"]),
        ({"optimizer": {"type": "AdamW"}}, ["`optimizer` section", "train.optimizer: adamw"]),
        ({"scheduler": {"type": "WarmupLR"}}, ["`scheduler` section", "train.schedule"]),
        ({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}},
         ["stage3_gather_16bit_weights_on_model_save: false", "complete adapter"]),
    ],
)
def test_fill_refuses_a_conflicting_value_naming_both(raw: dict, names: list[str]) -> None:
    with pytest.raises(UserError) as err:
        fill_deepspeed_config({"zero_optimization": {"stage": 2}} | raw, source="my_ds.json", **TRAINING)
    message = str(err.value)
    assert "my_ds.json" in message and all(n in message for n in names), message


def test_zero3_gathers_weights_for_saving_unless_told_otherwise() -> None:
    filled = fill_deepspeed_config({"zero_optimization": {"stage": 3}}, source="z3.json", **TRAINING)
    assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


# ---- the launch checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/venv/bin/python", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "train.py", "--config", "x"], 2),
        (["python", "-m", "accelerate.commands.launch", "--num_processes=4", "train.py"], 4),
        (["/venv/bin/accelerate-launch", "--multi_gpu", "--num_processes", "8", "train.py", "--num_processes", "3"], 8),
        (["python", "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "accelerate" / "cpu_ddp.yaml"), "train.py"], 2),
        (["python", "-m", "accelerate.commands.launch", "train.py"], None),  # nothing asked: nothing to compare
        (["/usr/bin/python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py"], None),
        (["bash"], None),
    ],
)
def test_requested_processes_are_read_from_the_launcher_command_line(argv: list[str], expected: int | None) -> None:
    assert requested_processes_from_argv(argv) == expected


def test_world_size_without_ranks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "LOCAL_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UserError, match="WORLD_SIZE=4 is set"):
        check_launch_env()
    monkeypatch.setenv("RANK", "0")
    check_launch_env()


# ---- running the configs no other test runs -----------------------------------------------------------


def _run(assets: dict, tmp_path: Path, config: str, *flags: str) -> str:
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "cfg.yaml", text_config(assets, run, train={"batch_size": 8, "max_steps": 2, "eval_every": 2}))
    proc = accelerate_launch("--config", str(cfg), extra=["--config_file", str(LAUNCH / "accelerate" / config), *flags])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (run / "last" / "adapter_model.safetensors").is_file() and (run / "summary.json").is_file()
    return proc.stdout


@pytest.mark.slow
def test_gpu_config_runs(assets: dict, tmp_path: Path) -> None:
    """One process; on a machine without CUDA it runs on the CPU."""
    out = _run(assets, tmp_path, "gpu.yaml")
    assert "processes 1" in out and f"device {'cuda' if torch.cuda.is_available() else 'cpu'}" in out


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero3_offload_runs_on_cpu(assets: dict, tmp_path: Path) -> None:
    """ZeRO-3 with weights and optimizer offloaded; Accelerate swaps AdamW for DeepSpeed's CPU Adam (compiled once)."""
    pytest.importorskip("deepspeed")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("DeepSpeed's CPU Adam is JIT-compiled and needs a C++ compiler")
    out = _run(assets, tmp_path, "deepspeed_zero3_offload.yaml", "--num_processes", "2")
    assert "ZeRO-3 offload optimizer->cpu, param->cpu" in out and "processes 2" in out, out[-2000:]


@pytest.mark.slow
def test_fsdp_refused_on_cpu(assets: dict, tmp_path: Path) -> None:
    """Accelerate would quietly train plain DDP instead of FSDP on CPU; peftkit says so and stops."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; test_fsdp_runs_on_gpu covers FSDP")
    cfg = write_yaml(tmp_path / "cfg.yaml", text_config(assets, tmp_path / "run", train={"max_steps": 2}))
    proc = accelerate_launch("--config", str(cfg), extra=["--config_file", str(LAUNCH / "accelerate" / "fsdp.yaml"), "--num_processes", "2"],
                             timeout=300)
    assert proc.returncode != 0
    assert "asks for FSDP" in " ".join(proc.stderr.split()), proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.slow
def test_fsdp_runs_on_gpu(assets: dict, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: Accelerate runs FSDP on CUDA devices only (the config is still validated above)")
    n = str(torch.cuda.device_count())
    out = _run(assets, tmp_path, "fsdp.yaml", "--num_processes", n)
    assert "topology: fsdp" in out


@pytest.mark.slow
def test_torchrun_script_runs_two_cpu_processes(assets: dict, tmp_path: Path) -> None:
    """torchrun instead of accelerate launch, and no ACCELERATE_USE_CPU: peftkit picks CPU mode and gloo itself."""
    import os
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "cfg.yaml", text_config(assets, run, train={"batch_size": 8, "max_steps": 2}))
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env |= {"NPROC_PER_NODE": "2", "MAIN_PORT": str(port), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(LAUNCH / "slurm" / "torchrun.sh"), str(cfg)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "processes 2" in proc.stdout and "(gloo)" in proc.stdout
    assert (run / "last" / "adapter_model.safetensors").is_file()
