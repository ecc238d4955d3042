"""python -m benchmarks cpu|gpu [--quick] [--out FILE]: our figures and the two baselines', in one run."""

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

from benchmarks.harness import Setup, run_isolated

REPO = Path(__file__).resolve().parent.parent
TARGETS = {  # ours / baseline, on the same machine in the same run
    "cpu": {"train_vs_hf": 1.3, "generate_vs_hf": 2.0, "generate_vs_book": 20.0},
    "gpu": {"generate_vs_hf": 2.0, "generate_vs_book": 20.0},
}


def default_data_dir() -> str:
    for candidate in (os.environ.get("SFT_JOB_TEST_DATA"), REPO.parent / "shared" / "data",
                      Path.home() / ".cache" / "sft-job"):  # fmt: skip
        if candidate and (Path(candidate) / "instruction-data.json").is_file():
            return str(candidate)
    sys.exit("no data: run `sft-job download --model gpt2-small` first, or set SFT_JOB_TEST_DATA")


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads()}  # fmt: skip
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def setups(mode: str, quick: bool, data_dir: str) -> list[Setup]:
    if mode == "cpu":
        base = dict(size="gpt2-small", device="cpu", data_dir=data_dir, max_new_tokens=32, book_prompts=8,
                    train_steps=6, repeats=3)  # fmt: skip
    else:
        base = dict(size="gpt2-medium", device="cuda", data_dir=data_dir, max_new_tokens=256, book_prompts=10,
                    train_steps=20, repeats=3, precision="bf16", generate_batch_size=110)  # fmt: skip
    if quick:  # a smoke test of the harness itself: a 2-layer model, few steps
        base |= dict(n_layers=2, train_steps=2, repeats=1, max_new_tokens=4, book_prompts=2)
    return [Setup(**base)]


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("mode", choices=["cpu", "gpu"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the harness, not the speed")
    parser.add_argument("--out", type=Path, help="JSON file for the figures (default benchmarks/results-MODE.json)")
    parser.add_argument("--data-dir", default=None, help="folder with instruction-data.json and gpt2/ tokenizer files")
    parser.add_argument("--only", choices=["train", "generate", "recipe"], action="append")
    args = parser.parse_args(argv)
    if args.mode == "gpu" and not torch.cuda.is_available():
        sys.exit("gpu mode needs a CUDA device")
    data_dir = args.data_dir or default_data_dir()
    [setup] = setups(args.mode, args.quick, data_dir)
    tasks = args.only or (["train", "generate"] + (["recipe"] if args.mode == "gpu" else []))
    report = {"mode": args.mode, "quick": args.quick, "machine": machine(setup.device), "setup": setup.__dict__,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": {}, "ratios": {}}  # fmt: skip
    # The main comparison is at one precision for all three; on the CPU, ours and Hugging Face's
    # are also measured in bf16 autocast (AVX-512 BF16), the book's code has no such path.
    runs = [(impl, setup.precision) for impl in ("ours", "hf", "book")]
    if args.mode == "cpu":
        runs += [("ours", "bf16"), ("hf", "bf16")]
    for task in ("train", "generate"):
        if task not in tasks:
            continue
        for impl, precision in runs:
            started = time.perf_counter()
            result = run_isolated(task, impl, dataclasses.replace(setup, precision=precision))
            result["measured_seconds"] = round(time.perf_counter() - started, 1)
            key = f"{task}/{impl}" + ("" if precision == setup.precision else f"/{precision}")
            report["results"][key] = result
            print(f"{task:9s} {impl:5s} {precision:5s} {result['tokens_per_second']:10.1f} tokens/s  "
                  f"peak {result['peak_memory_bytes'] / 2**20:8.0f} MiB", flush=True)  # fmt: skip
    if args.mode == "gpu" and "train" in tasks:
        from benchmarks.recipe import mfu

        big = dataclasses.replace(setup, batch_size=32)  # the larger batch the MFU target is about
        report["results"]["train/ours/batch32"] = run_isolated("train", "ours", big)
        for key, s_ in (("train/ours", setup), ("train/ours/batch32", big)):
            res = report["results"][key]
            res["mfu"] = mfu(res["tokens_per_second"], s_, round(res["mean_seq_len"]))
            print(f"{key:20s} MFU {res['mfu']}", flush=True)
    if "recipe" in tasks:
        from benchmarks.recipe import full_recipe

        report["results"]["recipe/ours"] = full_recipe(setup)
        print(f"recipe    ours  {report['results']['recipe/ours']}", flush=True)
    r = report["results"]
    for task in ("train", "generate"):
        if f"{task}/ours" in r:
            for base in ("hf", "book"):
                report["ratios"][f"{task}_vs_{base}"] = ratio(r[f"{task}/ours"]["tokens_per_second"],
                                                              r[f"{task}/{base}"]["tokens_per_second"])  # fmt: skip
        if f"{task}/ours/bf16" in r:
            report["ratios"][f"{task}_bf16_vs_hf_bf16"] = ratio(r[f"{task}/ours/bf16"]["tokens_per_second"],
                                                                r[f"{task}/hf/bf16"]["tokens_per_second"])  # fmt: skip
    report["targets"] = {k: {"target": v, "measured": report["ratios"].get(k),
                             "met": bool(report["ratios"].get(k, 0) >= v)} for k, v in TARGETS[args.mode].items()}  # fmt: skip
    out = args.out or REPO / "benchmarks" / f"results-{args.mode}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"ratios": report["ratios"], "targets": report["targets"]}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
