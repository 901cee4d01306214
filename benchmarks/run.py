"""Benchmark runner: peftkit against a plain ``Trainer`` + ``peft`` baseline, and peftkit's speed switches.

    python -m benchmarks.run                       # full mode (about 20 minutes on 2 CPU cores)
    python -m benchmarks.run --quick               # every case, 2 steps, tiny models (a CI smoke test)
    python -m benchmarks.run --cases minilm-lora-rt vitbase-lora --repeats 5

For each case side A (peftkit) and side B (the baseline, or peftkit with one switch flipped) train the
same thing, alternating A B, B A, ... in one session, each run in its own process. Per repeat the runner
forms the ratios A/B (throughput, peak memory); a case reports the median of those ratios, which
cancels most of the drift of a shared machine. Results: ``results.json``, ``results.md``, ``results.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import cases as C
from benchmarks.flops import cpu_peak, train_flops_per_sample

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def child_env(threads: int) -> dict[str, str]:
    """The environment of every measured process: offline, a fixed thread count, no trackers.

    glibc is told to give every block of 64 KiB or more its own mapping and to return freed memory
    at once, so peak RSS follows the live tensors; with its defaults, freed memory it keeps for reuse
    made the same run's peak differ by up to 1.5x with the order of allocations (see
    benchmarks/memory/README.md), which is noise, not a property of either side.
    """
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
            "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def measure_subprocess(side: str, cfg: dict[str, Any], spec_dir: Path, threads: int, timeout: int) -> dict[str, Any]:
    """One run in a fresh process (``benchmarks.worker``): per-run peak memory, nothing shared between runs."""
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec, out = spec_dir / "spec.json", spec_dir / "result.json"
    spec.write_text(json.dumps({"side": side, "config": cfg}))
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(spec), str(out)], cwd=REPO, env=child_env(threads),
                          capture_output=True, text=True, timeout=timeout)
    (spec_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out.exists():
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:400] if (proc.stderr or proc.stdout).strip() else f"exit {proc.returncode}"}
    return {**json.loads(out.read_text()), "process_seconds": round(time.perf_counter() - t0, 1)}


def measure_inprocess(side: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Quick mode only: run in this process (imports once); peak memory is then not a per-run figure."""
    from accelerate.state import AcceleratorState, GradientState

    from benchmarks.worker import measure

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        return measure(side, cfg)
    except Exception as exc:  # one broken case must not hide the others' results
        return {"error": f"{type(exc).__name__}: {exc}"[:400]}


# ------------------------------------------------------------------------------------------------
# Model FLOPs per sample (measured once per case in this process, on the meta device)
# ------------------------------------------------------------------------------------------------


def flop_inputs(case: C.Case, cfg: dict[str, Any]) -> dict[str, float]:
    """Linear-layer weights, layers, width and (real, unpadded) token statistics of the training rows."""
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification, AutoTokenizer

    from peftkit.models import resolve_name

    path = resolve_name(cfg["model"]["name"])
    mc = AutoConfig.from_pretrained(path)
    mc.num_labels = 3 if case.data == "images" else 2
    auto = AutoModelForImageClassification if case.data == "images" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(mc)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if case.data == "images":
        t = (mc.image_size // mc.patch_size) ** 2 + 1
        lengths = [t]
    else:
        tok = AutoTokenizer.from_pretrained(path)
        d, n = cfg["data"], cfg["data"].get("max_train_samples") or 10**9
        if d["train"].startswith("demo:"):
            from peftkit.data import DEMOS

            texts = DEMOS[d["train"].split(":", 1)[1]]()["train"]["text"][:n]
        else:
            import csv

            with open(d["train"]) as f:
                texts = [r["text"] for r in csv.DictReader(f)][:n]
        lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=d["max_length"])["input_ids"]]
    return {"linear_params": linear, "layers": mc.num_hidden_layers, "hidden": mc.hidden_size,
            "mean_t": statistics.fmean(lengths), "mean_t2": statistics.fmean(x * x for x in lengths)}


# ------------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------------


def _sps(r: dict[str, Any]) -> float:
    return r["samples_seen"] / max(r["train_seconds"], 5e-3)  # peftkit rounds to 10 ms


def summarise(case: C.Case, runs: list[dict[str, Any]], fi: dict[str, float], peak_flops: float) -> dict[str, Any]:
    """Median of per-repeat ratios A/B, and the medians of each side's own figures."""
    by_repeat: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_repeat.setdefault(r["repeat"], {})[r["side"]] = r
    pairs = [(p["a"], p["b"]) for _, p in sorted(by_repeat.items())
             if "a" in p and "b" in p and "error" not in p["a"] and "error" not in p["b"]]
    if not pairs:
        return {"error": next((r["error"] for r in runs if "error" in r), "no complete pair")}
    out: dict[str, Any] = {
        "throughput_ratio": statistics.median(_sps(a) / _sps(b) for a, b in pairs),
        "memory_ratio": statistics.median(a["peak_train_bytes"] / b["peak_train_bytes"] for a, b in pairs),
        "process_memory_ratio": statistics.median(a["peak_bytes"] / b["peak_bytes"] for a, b in pairs),
        "pairs": len(pairs),
    }
    for label, idx in (("a", 0), ("b", 1)):
        side = [p[idx] for p in pairs]
        sps = statistics.median(_sps(r) for r in side)
        trainable = side[0]["trainable_parameters"]
        method = case.b_overrides.get("adapter.method", case.method) if label == "b" else case.method
        linear = fi["linear_params"] + (trainable if method == "lora" else 0)
        flops = train_flops_per_sample(method, linear_params=linear, trainable=trainable, layers=fi["layers"], hidden=fi["hidden"],
                                       mean_t=fi["mean_t"], mean_t2=fi["mean_t2"])
        # Accuracy cases train each pair with its own seed: the mean over seeds, not one seed's luck.
        accs = [r["test_accuracy"] for r in side if r.get("test_accuracy") is not None]
        out[label] = {"samples_per_s": sps, "peak_mib": statistics.median(r["peak_train_bytes"] for r in side) / 2**20,
                      "process_peak_mib": statistics.median(r["peak_bytes"] for r in side) / 2**20,
                      "trainable_parameters": trainable, "gflop_per_sample": flops / 1e9, "mfu": flops * sps / peak_flops,
                      "test_accuracy": statistics.mean(accs) if accs else None, "test_accuracies": accs}
    return out


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    head = ("| case | kind | method | A samples/s | B samples/s | **throughput A/B** | A peak MiB | B peak MiB | **memory A/B** "
            "| process memory A/B | A MFU | B MFU | A test acc | B test acc |")
    lines = [f"Command: `{report['command']}`  ", f"Machine: {report['machine']['cpu']} ({report['machine']['cores']} cores), "
             f"{report['machine']['threads']} thread(s) per run, torch {report['machine']['torch']}, transformers {report['machine']['transformers']}, "
             f"peft {report['machine']['peft']}  ", f"Peak: {report['machine']['peak_derivation']}  "]
    lines += [f"Re-run later into this report: `{u['command']}` ({u['started']}; {', '.join(u['cases'])}; {u['machine']['cpu']}, "
              f"{u['machine']['threads']} thread(s))  " for u in report.get("updates", [])]
    lines += ["", head, "|" + "---|" * 14]
    for c in report["cases"]:
        s = c["summary"]
        if "error" in s:
            lines.append(f"| {c['name']} | {c['kind']} | {c['method']} | failed: {s['error'][:120]} |" + " |" * 10)
            continue
        a, b = s["a"], s["b"]

        def acc(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.1f}%"

        lines.append(f"| {c['name']} | {c['kind']} | {c['method']} | {a['samples_per_s']:.2f} | {b['samples_per_s']:.2f} | "
                     f"**{s['throughput_ratio']:.2f}x** | {a['peak_mib']:.0f} | {b['peak_mib']:.0f} | **{s['memory_ratio']:.2f}x** | "
                     f"{s['process_memory_ratio']:.2f}x | "
                     f"{100 * a['mfu']:.1f}% | {100 * b['mfu']:.1f}% | {acc(a['test_accuracy'])} | {acc(b['test_accuracy'])} |")
    lines += ["", "A = peftkit (defaults); B = Trainer + peft baseline, or for ablations peftkit with the switch in the note flipped.",
              "Ratios are medians over repeats of per-repeat A/B; absolute figures are medians of each side.",
              "Peak MiB: peak RSS through training (loading included, checkpoint writing excluded); process memory: the whole run's peak."]
    for c in report["cases"]:
        if c.get("note"):
            lines.append(f"- {c['name']}: {c['note']}")
        s = c["summary"]
        if c.get("accuracy") and "error" not in s and len(s["a"].get("test_accuracies") or []) > 1:
            per_seed = {side: ", ".join(f"{100 * x:.1f}" for x in s[side]["test_accuracies"]) for side in "ab"}
            lines.append(f"- {c['name']}: test accuracy (%) per seed (42, 43, ...): A {per_seed['a']}; B {per_seed['b']}; the table shows the means")
    micro = report.get("micro") or {}
    if micro and "error" not in micro:
        lines += ["", "Per-step micro-benchmarks (ms per call, median; `python -m benchmarks.micro`):", "",
                  "| what | model | variant | ms |", "|---|---|---|---|"]
        for what, per_model in micro.items():
            for model, variants in per_model.items():
                lines += [f"| {what} | {model} | {v} | {ms:.2f} |" for v, ms in variants.items()]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in report["cases"] if "error" not in c["summary"]]
    if not done:
        return
    names = [c["name"] for c in done]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.8), sharey=True)
    for ax, key, title in ((axes[0], "throughput_ratio", "training throughput A/B (higher: peftkit faster)"),
                           (axes[1], "memory_ratio", "peak memory A/B (lower: peftkit leaner)")):
        values = [c["summary"][key] for c in done]
        ax.barh(names, values, color=["tab:green" if (v >= 1) == (key == "throughput_ratio") else "tab:red" for v in values])
        ax.axvline(1.0, color="black", lw=1)
        ax.set_title(title, fontsize=10)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"peftkit vs Trainer+peft (median of ratios) - {report['machine']['cpu']}, {report['machine']['threads']} thread(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def run_micro(quick: bool, threads: int) -> dict[str, Any]:
    """AdamW implementations and gradient clipping, timed in their own process (in-process with ``quick``)."""
    if quick:
        from benchmarks import micro

        return micro.run(quick=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.micro"], cwd=REPO, env=child_env(threads), capture_output=True, text=True, timeout=900)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr.strip()[-400:]}


def write_all(out: Path, report: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(report, indent=1))
    write_markdown(out / "results.md", report)
    write_plot(out / "results.png", report)


def select(names: list[str] | None) -> list[C.Case]:
    if not names:
        return list(C.CASES)
    chosen = [c for c in C.CASES if any(fnmatch.fnmatch(c.name, n) for n in names)]
    if not chosen:
        raise SystemExit(f"no case matches {names}; cases: {[c.name for c in C.CASES]}")
    return chosen


def machine(threads: int) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    peak = cpu_peak()
    return {"cpu": peak.model, "cores": peak.cores, "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "peak_flops": peak.per_core() * threads,
            "peak_derivation": peak.derivation(threads), "cuda": torch.cuda.is_available()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every case for 2 steps on tiny models, in this process (a smoke test)")
    p.add_argument("--cases", nargs="*", help="case names or globs (default: all)")
    p.add_argument("--repeats", type=int, default=None, help="A/B pairs per case (default 3; 1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps for every selected case (default: each case's own)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per run (default 1: steady on a shared 2-core machine)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results, or benchmarks/results/quick)")
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "benchmarks", help="models, data and run folders")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--update", action="store_true", help="re-run the selected cases into the existing report in --out (others kept)")
    args = p.parse_args(argv)
    os.environ.update({k: v for k, v in child_env(args.threads).items() if k != "PYTHONPATH"})
    repeats = args.repeats or (1 if args.quick else 3)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    work = args.work / ("quick" if args.quick else "full")
    assets = C.build_assets(work, quick=args.quick)
    info = machine(args.threads)
    command = "python -m benchmarks.run" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report: dict[str, Any] = {"command": command, "mode": "quick" if args.quick else "full", "repeats": repeats, "machine": info,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": []}
    if args.update:  # the earlier report, its cases kept in order; the re-run ones are replaced below
        if not (out / "results.json").exists():
            p.error(f"--update needs an earlier report: {out / 'results.json'} does not exist (run without --update first).")
        earlier = json.loads((out / "results.json").read_text())
        if (earlier["mode"], earlier["machine"]["threads"]) != (report["mode"], info["threads"]):
            p.error(f"--update would mix runs: the report in {out} is {earlier['mode']} mode with {earlier['machine']['threads']} "
                    f"thread(s), this run {report['mode']} with {info['threads']}; use the same --quick/--threads or another --out.")
        earlier.setdefault("updates", []).append({"command": command, "started": report["started"], "machine": info,
                                                  "cases": [c.name for c in select(args.cases)]})
        report = earlier
    for case in select(args.cases):
        if args.steps:
            case = dataclasses.replace(case, steps=args.steps)
        base = C.peftkit_config(case, assets, work / "runs" / case.name, quick=args.quick)
        cfg = {"a": C.with_overrides(base, case.a_overrides), "b": C.with_overrides(base, case.b_overrides)}
        sides = {"a": "peftkit", "b": case.b_side}
        fi = flop_inputs(case, base)
        runs = []
        for r in range(min(repeats, case.repeats or repeats)):
            # A B, B A, A B, ...: drift hits both sides alike, and neither side is always the first run
            # after a case starts (ViT-base's first run, always side A's before, was slow in four invocations).
            for label in ("a", "b") if r % 2 == 0 else ("b", "a"):
                per_run = {"output.dir": str(work / "runs" / case.name / f"{label}{r}")}
                if case.accuracy:
                    per_run["train.seed"] = cfg[label]["train"]["seed"] + r  # both sides of pair r share seed 42 + r
                run_cfg = C.with_overrides(cfg[label], per_run)
                if args.quick:
                    result = measure_inprocess(sides[label], run_cfg)
                else:
                    result = measure_subprocess(sides[label], run_cfg, work / "runs" / case.name / f"{label}{r}-spec", args.threads, args.timeout)
                runs.append({"side": label, "repeat": r, **result})
                shown = ("error: " + result["error"] if "error" in result else
                         f"{_sps(result):.2f} samples/s, {result['peak_train_bytes'] / 2**20:.0f} MiB ({result['peak_bytes'] / 2**20:.0f} with saving)")
                print(f"[bench] {case.name} {label}={sides[label]} #{r}: {shown}", flush=True)
        summary = summarise(case, runs, fi, info["peak_flops"])
        report["cases"] = [c for c in report["cases"] if c["name"] != case.name]
        report["cases"].append({"name": case.name, "kind": case.kind, "method": case.method, "model": case.model, "data": case.data,
                                "max_length": case.max_length, "batch_size": case.batch_size, "steps": base["train"]["max_steps"],
                                "lr": case.lr, "precision": case.precision, "note": case.note, "b_side": case.b_side,
                                "b_overrides": case.b_overrides, "accuracy": case.accuracy, "flop_inputs": fi, "runs": runs,
                                "summary": summary})
        write_all(out, report)  # after each case: a run cut short keeps what it has
        if "error" not in summary:
            print(f"[bench] {case.name}: throughput A/B {summary['throughput_ratio']:.2f}x, memory A/B {summary['memory_ratio']:.2f}x", flush=True)
    order = {case.name: i for i, case in enumerate(C.CASES)}
    report["cases"].sort(key=lambda c: order.get(c["name"], len(order)))
    if not args.update:
        report["micro"] = run_micro(args.quick, args.threads)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_all(out, report)
    print((out / "results.md").read_text())
    return 0 if all("error" not in c["summary"] for c in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
