"""Measured peak training memory against peftkit's estimate, one subprocess per configuration.

    python benchmarks/memory/bench_memory.py                 # DeBERTa-v3-base and ViT-base, 16 configurations (CPU)
    python benchmarks/memory/bench_memory.py --quick         # tiny models, seconds (used by the tests)

Each configuration runs in a fresh process that sets the model up with peftkit's own functions (as
the recipe does: quantized load, k-bit preparation or non-reentrant checkpointing, adapter,
parameter groups, optimizer) from a full-size architecture built from its config with random
weights, and trains a few steps on a fixed batch padded to the full length.

Measurement on CPU: the process's resident set. Its RSS is read after the imports (the baseline),
every weight page is touched once loaded (weights are mapped from disk), the peak counter (VmHWM)
is reset through ``/proc/self/clear_refs`` (so the transient copies made while loading and
quantizing are not counted: training does not hold them), and the result is VmHWM at the end of
training minus the baseline. By default glibc is told to return freed blocks of 64 KiB and more at
once (``--allocator live``), so the RSS follows live tensors, the CPU analogue of CUDA's
``max_memory_allocated``; ``--allocator default`` shows glibc's own high-water mark. On CUDA it is
``torch.cuda.max_memory_allocated`` after a reset, compared with the estimate without the CUDA context.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = [("full", None), ("lora", None), ("lora", 8), ("lora", 4)]


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_assets(root: Path, quick: bool) -> dict[str, Path]:
    """DeBERTa-v3-base and ViT-base (or tiny ones) with random weights, saved once, plus a tokenizer and image processor."""
    import torch
    from transformers import DebertaV2Config, DebertaV2Model, ViTConfig, ViTModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    from peftkit import tiny

    if quick:
        return {"deberta": tiny.tiny_deberta(root / "deberta"), "vit": tiny.tiny_vit(root / "vit")}
    deberta, vit = root / "deberta-v3-base", root / "vit-base"
    if not (deberta / "config.json").exists():
        deberta.mkdir(parents=True, exist_ok=True)
        tiny.train_tokenizer(deberta)  # any tokenizer will do: the batches are random ids of the model's vocabulary
        torch.manual_seed(0)
        DebertaV2Model(deberta_v3_base_config()).save_pretrained(deberta, safe_serialization=True)
    if not (vit / "config.json").exists():
        vit.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        ViTModel(ViTConfig(), add_pooling_layer=False).save_pretrained(vit, safe_serialization=True)  # ViTConfig() is ViT-base/16 at 224
        ViTImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(vit)
    del DebertaV2Config
    return {"deberta": deberta, "vit": vit}


def deberta_v3_base_config():
    """microsoft/deberta-v3-base's config.json, written out (no hub needed)."""
    from transformers import DebertaV2Config

    return DebertaV2Config(vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
                           type_vocab_size=0, layer_norm_eps=1e-7, relative_attention=True, max_relative_positions=-1,
                           position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
                           position_biased_input=False, pooler_hidden_size=768, pooler_dropout=0, pooler_hidden_act="gelu")


def make_config(kind: str, model: Path, method: str, bits: int | None, ckpt: bool, batch: int, seq: int) -> dict:
    """A peftkit config for one measured configuration (the data section is not read by the benchmark)."""
    task = "text-classification" if kind == "deberta" else "image-classification"
    cfg = {"model": {"name": str(model), "task": task, "labels": ["a", "b"]},
           "adapter": {"method": method, "r": 8, "alpha": 16},
           "data": {"train": "unused.csv", "max_length": seq},
           "train": {"batch_size": batch, "gradient_checkpointing": ckpt, "optimizer": "adamw"}}
    if bits:
        cfg["quantization"] = {"bits": bits}
    return cfg


def measure_one(spec: dict) -> dict:
    """Runs in the child: set up as the recipe does, train ``steps`` steps, report the peak."""
    import torch

    from peftkit import memory
    from peftkit.adapters import AdapterSpec, inject
    from peftkit.config import validate_config
    from peftkit.models import architecture_for, head_modules, load_backbone, load_model_config
    from peftkit.optim import make_optimizer, param_groups
    from peftkit.quant import bnb_config, prepare_for_kbit_training

    config = validate_config(spec["config"])
    mc, qc, tc, ac = config.model, config.quantization, config.train, config.adapter
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    gc.collect()
    baseline = status_kib("VmRSS") * 1024

    arch = architecture_for(load_model_config(mc.name).model_type)
    quant = bnb_config(qc.bits, quant_type=qc.quant_type, double_quant=qc.double_quant, compute_dtype=qc.compute_dtype, skip_modules=list(arch.head))
    # Read, not mapped: otherwise the fp32 checkpoint pages a quantized load reads stay resident
    # (file-backed, reclaimable) and the measurement counts memory training never uses.
    model = load_backbone(mc.name, mc.task, list(mc.labels), quantization_config=quant, mmap=False)
    if quant is not None:
        model = prepare_for_kbit_training(model, gradient_checkpointing=tc.gradient_checkpointing)
    elif tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    heads = head_modules(model, arch)
    model, _ = inject(model, arch, AdapterSpec(method=ac.method, r=ac.r, alpha=ac.alpha, dropout=ac.dropout))
    if quant is None:
        model.to(device)
    groups = param_groups(model, arch, lr=1e-4, weight_decay=0.01, heads=heads)
    optimizer = make_optimizer(groups, tc.optimizer, 1e-4)
    b, seq = tc.batch_size, config.data.max_length
    gen = torch.Generator().manual_seed(0)
    if mc.task == "text-classification":
        batch = {"input_ids": torch.randint(5, model.config.vocab_size, (b, seq), generator=gen),
                 "attention_mask": torch.ones(b, seq, dtype=torch.long)}
    else:
        size = model.config.image_size
        batch = {"pixel_values": torch.randn(b, 3, size, size, generator=gen)}
    batch["labels"] = torch.randint(0, 2, (b,), generator=gen)
    batch = {k: v.to(device) for k, v in batch.items()}

    # safetensors weights are mapped from disk: pages of rows a batch never reads (most of a 128k-row
    # embedding) would stay off the RSS, though a GPU holds them all. Touch one element per page.
    with torch.no_grad():
        for param in model.parameters():
            flat = param.data.reshape(-1)
            float(flat[:: max(4096 // flat.element_size(), 1)].float().sum())
    gc.collect()
    loaded = status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    t0 = time.perf_counter()
    losses = []
    for _ in range(spec["steps"]):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    peak_rss = status_kib("VmHWM") * 1024
    facts = memory.model_facts(config)
    setup = memory.setup_from_config(config)
    est = memory.estimate(facts, setup, device="cuda" if on_cuda else "cpu")
    measured = torch.cuda.max_memory_allocated() if on_cuda else peak_rss - baseline
    return {"measured": measured, "measure": "torch.cuda.max_memory_allocated" if on_cuda else "VmHWM - VmRSS before the model",
            "estimate": est.total, "rows": est.rows, "after_load": loaded - baseline, "seconds": round(seconds, 1),
            "losses": losses, "trainable": facts.trainable}


def run_all(args: argparse.Namespace) -> list[dict]:
    root = Path(args.work or tempfile.mkdtemp(prefix="peftkit-mem-"))
    assets = build_assets(root, args.quick)
    batch, seq, steps = (2, 32, 1) if args.quick else (args.batch, args.seq, args.steps)
    results = []
    for kind in args.models:
        grid = [(m, c) for m in METHODS for c in (False, True)]
        for (method, bits), ckpt in grid[2:4] if args.quick else grid:
            name = f"{kind} {method}{f' + {bits}-bit' if bits else ''}{' + ckpt' if ckpt else ''}"
            spec = {"config": make_config(kind, assets[kind], method, bits, ckpt, batch, seq), "steps": steps}
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            env.setdefault("OMP_NUM_THREADS", "2")
            if args.allocator == "live":
                # Every block of 64 KiB or more gets its own mapping, returned to the system when freed,
                # so the RSS follows the live tensors (as CUDA's max_memory_allocated does) rather than
                # glibc's heap high-water mark, which keeps freed blocks below 32 MiB resident.
                env |= {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            t0 = time.time()
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{name}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
                results.append({"name": name, "error": proc.stderr[-500:]})
                continue
            row = {"name": name, "model": kind, "method": method, "bits": bits, "checkpointing": ckpt, "batch": batch,
                   "tokens": seq, **json.loads(line[0][len("RESULT "):])}
            row["ratio"] = row["estimate"] / row["measured"]
            results.append(row)
            print(f"{name:<34} measured {row['measured'] / 2**20:8.0f} MiB  estimate {row['estimate'] / 2**20:8.0f} MiB  "
                  f"est/meas {row['ratio']:.2f}  ({time.time() - t0:.0f} s)", flush=True)
    return results


def rescore(results: list[dict], work: Path) -> list[dict]:
    """Recompute the estimates of measured rows (the measurements stay), e.g. after the estimator changed."""
    from peftkit import memory
    from peftkit.config import validate_config

    folders = {"deberta": work / "deberta-v3-base", "vit": work / "vit-base"}
    if not folders["deberta"].exists():
        folders = {"deberta": work / "deberta", "vit": work / "vit"}
    for row in results:
        if "error" in row:
            continue
        method = row["name"].split()[1]  # rows written before the measurement kept its own key were overwritten
        config = validate_config(make_config(row["model"], folders[row["model"]], method, row["bits"], row["checkpointing"],
                                             row["batch"], row["tokens"]))
        est = memory.estimate(memory.model_facts(config), memory.setup_from_config(config), device="cpu")
        row.update(estimate=est.total, rows=est.rows, ratio=est.total / row["measured"])
    return results


def write_report(results: list[dict], out: Path, command: str) -> None:
    """results.json, a markdown table (results.md) and a bar plot (memory.png)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    ok = [r for r in results if "error" not in r]
    lines = [f"Command: `{command}`", "",
             "| configuration | trainable params | measured peak (MiB) | estimate (MiB) | estimate / measured | measured after load | est. weights | est. grads + optim | est. activations + working set |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ok:
        rows = r["rows"]
        act = rows["activations"] + rows["backward working set"]
        lines.append(f"| {r['name']} | {r['trainable']:,} | {r['measured'] / 2**20:.0f} | {r['estimate'] / 2**20:.0f} | {r['ratio']:.2f} | "
                     f"{r['after_load'] / 2**20:.0f} | {rows['weights'] / 2**20:.0f} | {(rows['gradients'] + rows['optimizer states']) / 2**20:.0f} | {act / 2**20:.0f} |")
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed | | | | | | | |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(ok)), 4.5))
    xs = range(len(ok))
    ax.bar([x - 0.2 for x in xs], [r["measured"] / 2**30 for r in ok], width=0.4, label="measured peak")
    ax.bar([x + 0.2 for x in xs], [r["estimate"] / 2**30 for r in ok], width=0.4, label="peftkit estimate")
    ax.set_xticks(list(xs), [r["name"] for r in ok], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("GiB")
    ax.set_title("Peak training memory: measured vs estimated")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models, LoRA with and without checkpointing, one step")
    p.add_argument("--models", nargs="+", default=["deberta", "vit"], choices=["deberta", "vit"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128, help="text tokens per row (ViT-base uses 197: 196 patches + [CLS])")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps; the second one runs with optimizer states allocated")
    p.add_argument("--allocator", choices=["live", "default"], default="live",
                   help="live: glibc returns freed blocks at once (RSS ~ live tensors); default: glibc's own policy")
    p.add_argument("--work", default=None, help="folder for the random-weight models (reused between runs)")
    p.add_argument("--out", default=str(HERE / "results"), help="where results.json, results.md and memory.png go")
    p.add_argument("--rescore", default=None, help="a results.json: recompute its estimates only (needs --work of that run)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rescore:
        results = rescore(json.loads(Path(args.rescore).read_text()), Path(args.work))
        write_report(results, Path(args.out), "python benchmarks/memory/bench_memory.py (estimates recomputed with --rescore)")
        return 0
    if args.child:
        print("RESULT " + json.dumps(measure_one(json.loads(args.child))), flush=True)
        return 0
    results = run_all(args)
    write_report(results, Path(args.out), "python benchmarks/memory/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
