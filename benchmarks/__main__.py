"""python -m benchmarks cpu|gpu [--quick] [--out FILE]: our figures and the two baselines', in one run
(``python -m benchmarks packing``: ``--packing``'s, benchmarks/packing.py; ``python -m benchmarks sharding``:
``--sharding fsdp``'s, benchmarks/sharding.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks import families
from benchmarks.arguments import writable_out
from benchmarks.dpo import measure_dpo
from benchmarks.harness import Setup, measure_generation, measure_training, profile_training, run_isolated
from benchmarks.recipe import measure_recipe, mfu

REPO = Path(__file__).resolve().parent.parent
# What each task's measurements run (each in a fresh process).
TASKS = {
    "train": measure_training,
    "generate": measure_generation,
    "profile": profile_training,
    "recipe": measure_recipe,
    "dpo": measure_dpo,
    "qwen3_train": families.measure_training,
    "qwen3_generate": families.measure_generation,
}
# The targets: (figure, at least / at most, bound). Ratios are ours / baseline in the same run.
TARGETS = {
    "cpu": [
        ("ratio:train_vs_hf", ">=", 1.3),
        ("ratio:generate_vs_hf", ">=", 2.0),
        ("ratio:generate_vs_book", ">=", 20.0),
    ],
    "gpu": [
        ("recipe/ours:loop_seconds", "<=", 15.0),
        ("train/ours/batch128:mfu", ">=", 0.40),
        ("generate/ours:wall_seconds", "<=", 5.0),
    ],
}


def default_data_dir() -> str:
    for candidate in (
        os.environ.get("SFT_JOB_TEST_DATA"),
        REPO.parent / "shared" / "data",
        Path.home() / ".cache" / "sft-job",
    ):
        if candidate and (Path(candidate) / "instruction-data.json").is_file():
            return str(candidate)
    sys.exit("no data: run `sft-job download --model gpt2-small` first, or set SFT_JOB_TEST_DATA")


def machine(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def setups(mode: str, quick: bool, data_dir: str, device: str | None) -> Setup:
    if mode == "cpu":
        base = dict(
            size="gpt2-small",
            device="cpu",
            data_dir=data_dir,
            max_new_tokens=32,
            book_prompts=8,
            train_steps=6,
            repeats=3,
        )
    else:
        base = dict(
            size="gpt2-medium",
            device="cuda",
            data_dir=data_dir,
            max_new_tokens=256,
            book_prompts=4,
            train_steps=20,
            repeats=3,
            precision="bf16",
            generate_batch_size=110,
        )
    if quick:  # a smoke test of the harness itself: a 2-layer GPT-2 small, few steps, the recipe on 60 entries
        base |= dict(
            size="gpt2-small", n_layers=2, train_steps=2, repeats=1, max_new_tokens=4, book_prompts=2, recipe_entries=60
        )
    if device:
        base["device"] = device
    return Setup(**base)


def plan(mode: str, setup: Setup, tasks: list[str]) -> list[tuple[str, str, Setup]]:
    """(result key, implementation, setup) in the order they run: the targets' figures first."""
    runs = []
    same = lambda **kw: dataclasses.replace(setup, **kw)  # noqa: E731
    for task in ("generate", "train"):
        if task in tasks:
            runs += [(f"{task}/{impl}", impl, setup) for impl in ("ours", "hf", "book")]
            if task == "train":  # LoRA (the book's exercise 7.4) against full finetuning
                runs += [("train/lora", "lora", setup)]
            if mode == "cpu":  # the book's code has no bf16 path; ours and HF's also in bf16 autocast
                runs += [(f"{task}/{impl}/bf16", impl, same(precision="bf16")) for impl in ("ours", "hf")]
    if mode == "gpu" and "train" in tasks:  # larger batches, for model FLOPs utilization
        runs += [(f"train/ours/batch{b}", "ours", same(batch_size=b, train_steps=10)) for b in (32, 128)]
    if "profile" in tasks:  # where ours spends a training step at the book's batch and at a large one
        runs += [("profile/ours", "ours", setup)] + (
            [("profile/ours/batch128", "ours", same(batch_size=128))] if mode == "gpu" else []
        )
    if "recipe" in tasks:
        runs += [("recipe/ours", "ours", setup), ("recipe/book", "book", setup)]
    if "dpo" in tasks:  # preference tuning's step, full and LoRA, beside the SFT step of the same shapes
        runs += [("dpo/ours", "ours", setup), ("dpo/lora", "lora", setup)]
    if "qwen3" in tasks:  # qwen3-0.6b's shape against transformers: fewer steps (and on a CPU fewer new tokens)
        fewer = same(train_steps=min(setup.train_steps, 2), warmup_steps=1, repeats=min(setup.repeats, 2))
        if mode == "cpu":
            fewer = dataclasses.replace(fewer, max_new_tokens=min(setup.max_new_tokens, 16))
        runs += [(f"qwen3_{task}/{impl}", impl, fewer) for task in ("train", "generate") for impl in ("ours", "hf")]
    return runs


def optional_runs(setup: Setup) -> list[tuple[str, str, Setup]]:
    """Measurements only --select runs: a 2-epoch recipe does not earn back torch.compile's start-up."""
    levers = dataclasses.replace(setup, levers=True)  # issue 18's, until they are measured faster on a GPU
    return [
        ("recipe/ours/compiled", "ours", dataclasses.replace(setup, compile=True)),
        ("recipe/ours/levers", "ours", levers),
        ("generate/ours/levers", "ours", levers),
    ]


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def summarize(report: dict, mode: str) -> None:
    r, ratios = report["results"], report["ratios"]
    for task in ("train", "generate", "qwen3_train", "qwen3_generate"):
        for suffix in ("", "/bf16"):
            ours = r.get(f"{task}/ours{suffix}", {}).get("tokens_per_second")
            for base in ("hf", "book"):
                theirs = r.get(f"{task}/{base}{suffix}", {}).get("tokens_per_second")
                if ours and theirs:
                    ratios[f"{task}{suffix.replace('/', '_')}_vs_{base}"] = ratio(ours, theirs)
    full, lora = (r.get(f"train/{k}", {}) for k in ("ours", "lora"))
    if full.get("tokens_per_second") and lora.get("tokens_per_second"):
        ratios["train_lora_vs_full"] = ratio(lora["tokens_per_second"], full["tokens_per_second"])
        ratios["train_lora_vs_full_peak_memory"] = ratio(lora["peak_memory_bytes"], full["peak_memory_bytes"])
    for kind in ("ours", "lora"):  # a DPO step against the SFT step of the same kind (tokens/s, peak memory)
        dpo, sft = r.get(f"dpo/{kind}", {}), r.get(f"train/{kind}", {})
        if dpo.get("tokens_per_second") and sft.get("tokens_per_second"):
            ratios[f"dpo_{kind}_vs_sft_{kind}"] = ratio(dpo["tokens_per_second"], sft["tokens_per_second"])
            ratios[f"dpo_{kind}_vs_sft_{kind}_peak_memory"] = ratio(dpo["peak_memory_bytes"], sft["peak_memory_bytes"])
    book = r.get("recipe/book", {}).get("loop_seconds")
    for key in ("recipe/ours", "recipe/ours/compiled", "recipe/ours/levers"):
        if book and r.get(key, {}).get("loop_seconds"):
            ratios[f"{key.replace('/', '_')}_speedup_vs_book"] = ratio(book, r[key]["loop_seconds"])
    report["targets"] = {}
    for figure, op, bound in TARGETS[mode]:
        where, name = figure.split(":")
        value = ratios.get(name) if where == "ratio" else r.get(where, {}).get(name)
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        report["targets"][figure] = {"target": f"{op} {bound}", "measured": value, "met": met}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["packing"]:  # --packing's own measurements (benchmarks/packing.py)
        from benchmarks.packing import main as packing_main

        return packing_main(argv[1:])
    if argv[:1] == ["sharding"]:  # --sharding fsdp's memory and speed (benchmarks/sharding.py)
        from benchmarks.sharding import main as sharding_main

        return sharding_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("mode", choices=["cpu", "gpu"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the harness, not the speed")
    parser.add_argument("--out", type=Path, help="JSON file for the figures (default benchmarks/results-MODE.json)")
    parser.add_argument("--data-dir", default=None, help="folder with instruction-data.json and gpt2/ tokenizer files")
    parser.add_argument("--only", choices=["train", "generate", "recipe", "profile", "dpo", "qwen3"], action="append")
    parser.add_argument(
        "--select",
        action="append",
        metavar="KEY",
        help="run only these measurements (e.g. recipe/ours), in the order given",
    )
    parser.add_argument("--device", help="run the mode's shapes on this device instead (e.g. cpu, to check gpu mode)")
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="start no new measurement after this many seconds (the rest are reported as skipped)",
    )
    args = parser.parse_args(argv)
    setup = setups(args.mode, args.quick, args.data_dir or default_data_dir(), args.device)
    if setup.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu mode needs a CUDA device (or --device cpu to check the harness)")
    tasks = args.only or (["train", "generate"] + (["profile", "recipe"] if args.mode == "gpu" else []))
    out = writable_out(
        parser, args.out or REPO / "benchmarks" / f"results-{args.mode}{'-quick' if args.quick else ''}.json"
    )
    report = {
        "mode": args.mode,
        "quick": args.quick,
        "machine": machine(setup.device),
        "setup": setup.__dict__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": {},
        "ratios": {},
    }
    began = time.perf_counter()
    runs = plan(args.mode, setup, tasks)
    if args.select:
        by_key = {
            r[0]: r
            for r in plan(args.mode, setup, ["train", "generate", "profile", "recipe", "dpo", "qwen3"])
            + optional_runs(setup)
        }
        unknown = [k for k in args.select if k not in by_key]
        if unknown:
            sys.exit(f"--select: unknown measurement {unknown[0]!r}; one of {', '.join(by_key)}")
        runs = [by_key[k] for k in args.select]
    for key, impl, s in runs:
        if args.budget_seconds and time.perf_counter() - began > args.budget_seconds:
            report["results"][key] = {"error": "skipped: --budget-seconds spent"}
            continue
        started = time.perf_counter()
        task = key.split("/")[0]
        result = run_isolated(TASKS[task], impl, s)
        result["measured_seconds"] = round(time.perf_counter() - started, 1)
        if task == "train" and args.mode == "gpu" and "error" not in result:
            result["mfu"] = mfu(result, s)
        report["results"][key] = result
        print(f"{key:24s} {_line(result)}", flush=True)
        summarize(report, args.mode)
        out.write_text(json.dumps(report, indent=2) + "\n")  # after every measurement: a cut-off run keeps its figures
    print(json.dumps({"ratios": report["ratios"], "targets": report["targets"]}, indent=2))
    print(f"wrote {out}")
    return 0


def _line(result: dict) -> str:
    if "error" in result:
        return "ERROR " + result["error"] + "\n" + result.get("traceback", "")
    if "table" in result:
        return (
            f"{result['step_ms']:.1f} ms/step, device busy {result['device_busy_ms_per_step'] or 0:.1f} ms/step, "
            f"{result['kernels_per_step'] or 0:.0f} kernels/step\n{result['table']}"
        )
    if "tokens_per_second" in result:
        line = f"{result['tokens_per_second']:10.1f} tokens/s  peak {result['peak_memory_bytes'] / 2**20:8.0f} MiB"
        if "wall_seconds" in result:
            line += f"  wall {result['wall_seconds']:.2f} s"
        return line + (f"  MFU {result['mfu']:.1%}" if result.get("mfu") else "")
    return json.dumps({k: v for k, v in result.items() if k != "traceback"})


if __name__ == "__main__":
    raise SystemExit(main())
