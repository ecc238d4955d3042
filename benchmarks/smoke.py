"""python -m benchmarks.smoke [--runs N] [--out FILE]: where `sft-job run --smoke --skip-judge` spends its
time and its disk, from an empty cache each run, beside the floor every command pays (`sft-job run --help`,
the interpreter and the CLI's imports) measured in the same call."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from benchmarks.arguments import positive_int, writable_out


def _stamp(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _sizes(run: Path) -> dict[str, int]:
    """Bytes under each top-level entry of the run folder."""
    sizes = {}
    for entry in run.iterdir():
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes[entry.name] = sum(p.stat().st_size for p in files)
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))


def smoke_once(folder: Path) -> dict:
    """One smoke in ``folder`` (its own cache and output): wall time, its parts from the events, the run's bytes."""
    cmd = [sys.executable, "-m", "job.cli", "run", "--smoke", "--skip-judge", "--log-format", "json"]
    cmd += ["--metrics-port", "0", "--cache", str(folder / "cache"), "--output", str(folder / "runs"), "--run-id", "s"]
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"the smoke failed (exit {done.returncode}): {done.stderr[-2000:]}")
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    first = {e["event"] + ":" + str(e.get("stage")): e for e in reversed(events)}  # the first of each kind
    stages = {e["stage"]: e["seconds"] for e in events if e["event"] == "stage_done"}
    sizes = _sizes(folder / "runs" / "s")
    return {
        "wall_seconds": round(ended - started, 2),
        "startup_seconds": round(_stamp(events[0]) - started, 2),  # interpreter, imports, config
        "preflight_seconds": round(_stamp(first["preflight_ok:run"]) - _stamp(events[0]), 2),
        "stage_seconds": stages,
        "checkpoint_seconds": round(sum(e["seconds"] for e in events if e["event"] == "checkpoint"), 2),
        "report_seconds": round(_stamp(first["report_written:run"]) - _stamp(first["stage_done:generate"]), 2),
        "exit_seconds": round(ended - _stamp(events[-1]), 2),
        "run_bytes": sum(sizes.values()),
        "run_bytes_by_entry": sizes,
    }


def help_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "job.cli", "run", "--help"], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=positive_int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.out:
        writable_out(parser, args.out)
    runs, floors = [], []
    for _ in range(args.runs):
        floors.append(help_seconds())
        with tempfile.TemporaryDirectory() as folder:
            runs.append(smoke_once(Path(folder)))
    median = statistics.median(r["wall_seconds"] for r in runs)
    floor = round(statistics.median(floors), 2)
    report = {
        "cores": os.cpu_count(),
        "smoke_wall_seconds_median": median,
        "help_seconds_median": floor,
        "ratio_smoke_vs_help": round(median / floor, 1),
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
