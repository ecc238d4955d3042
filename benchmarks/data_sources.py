"""python -m benchmarks.data_sources [--sizes 1000,52000,500000] [--out FILE]: how a dataset's cost grows with
its size and its file type: reading and checking every entry (job/data/sources.py) and tokenizing the training
split (GPT-2's tokenizer, the book's Alpaca layout), each in a fresh process for its own time and peak memory,
JSON Lines and Parquet as ratios against JSON (today's file) in the same call; and the start-up of
``sft-job finetune`` to its first training step at each size (a tiny model, so the data is what grows).

The entries are the book's 1,100 repeated to the size (Alpaca's 52k entries have the same shape)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from benchmarks.__main__ import default_data_dir, machine
from benchmarks.arguments import writable_out

FILE_TYPES = ("json", "jsonl", "parquet")


def write_files(book: list[dict], size: int, folder: Path) -> dict[str, Path]:
    """The book's entries repeated to ``size``, as a JSON array, JSON Lines and Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    entries = [book[i % len(book)] for i in range(size)]
    paths = {kind: folder / f"data-{size}.{kind}" for kind in FILE_TYPES}
    paths["json"].write_text(json.dumps(entries))
    paths["jsonl"].write_text("".join(json.dumps(e) + "\n" for e in entries))
    pq.write_table(pa.Table.from_pylist(entries), paths["parquet"])
    return paths


def measure_load(path: str, tokenizer_dir: str, chat_template: str | None = None) -> dict:
    """In this (fresh) process: read and check every entry (its format told from its keys), then tokenize the
    training split as ``finetune`` lays that format out (job/data/formats.py's ``layout``; ``chat_template``
    is ``--chat-template FILE``); seconds and the process's peak RSS after each."""
    from types import SimpleNamespace

    from job.data.formats import layout
    from job.data.instructions import PROMPT_STYLES
    from job.data.sources import load_splits, local_source
    from job.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    imports_rss = peak_rss_bytes()  # torch and the job's modules
    start = time.perf_counter()
    splits = load_splits(local_source(Path(path)))
    loaded = time.perf_counter()
    load_peak = peak_rss_bytes()
    settings = SimpleNamespace(chat_template=chat_template, train_on="assistant")
    how = layout(settings, splits.data_format, splits.train, tokenizer, PROMPT_STYLES["alpaca"])
    examples = how.examples(splits.train, tokenizer, 1024)
    tokenized = time.perf_counter()
    return {
        "data_format": splits.data_format,
        "entries": len(splits.train) + len(splits.val) + len(splits.test),
        "file_bytes": Path(path).stat().st_size,
        "load_check_seconds": round(loaded - start, 3),
        "tokenize_seconds": round(tokenized - loaded, 3),
        "tokens": sum(len(e.token_ids) for e in examples),
        "imports_rss_bytes": imports_rss,
        "load_peak_rss_bytes": load_peak,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's ``VmHWM``, which starts afresh at ``exec``; the
    ``ru_maxrss`` of a process started by ``subprocess`` keeps its parent's peak at the fork (the driver's own
    hundreds of MB of entries), so it is the fallback only where ``/proc`` is not."""
    import resource

    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) << 10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


def isolated_load(path: Path, tokenizer_dir: str, chat_template: Path | None = None) -> dict:
    template = str(chat_template) if chat_template else None
    code = f"import json; from benchmarks.data_sources import measure_load; print(json.dumps(measure_load({str(path)!r}, {tokenizer_dir!r}, {template!r})))"  # noqa: E501
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measuring {path} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def tiny_model(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=1024))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def finetune_startup(path: Path, model: Path, cache: Path, out: Path, *extra: str) -> dict:
    """``sft-job finetune --max-steps 1`` on ``path`` (``extra``: more flags): seconds from the process's start
    to ``finetune_start`` (every entry read, checked and tokenized, the model loaded) and to the process's end
    (one step, one evaluation, the outputs)."""
    cmd = [sys.executable, "-m", "job.cli", "finetune", "--model-dir", str(model), "--data", str(path), *extra]
    cmd += ["--cache", str(cache), "--output", str(out), "--max-steps", "1", "--eval-freq", "1", "--eval-iter", "1"]
    started = time.time()
    done = subprocess.run(cmd + ["--log-format", "json"], capture_output=True, text=True, check=False)
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"finetune on {path} failed: {done.stderr[-2000:]}")
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    start = next(e for e in events if e["event"] == "finetune_start")
    stamp = datetime.fromisoformat(start["timestamp"].replace("Z", "+00:00")).timestamp()
    return {"to_first_step_seconds": round(stamp - started, 2), "wall_seconds": round(ended - started, 2)}


def job_cache(folder: Path, tokenizer_dir: str) -> Path:
    """A ``--cache`` for the start-ups: GPT-2's tokenizer files, copied."""
    cache = folder / "cache"
    (cache / "gpt2").mkdir(parents=True)
    for name in ("encoder.json", "vocab.bpe"):
        (cache / "gpt2" / name).write_bytes((Path(tokenizer_dir) / name).read_bytes())
    return cache


def run(sizes: list[int], data_dir: str, startup: bool) -> dict:
    book = json.loads((Path(data_dir) / "instruction-data.json").read_text())
    tokenizer_dir = str(Path(data_dir) / "gpt2")
    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        cache = job_cache(folder, tokenizer_dir)
        model = tiny_model(folder / "model") if startup else None
        for size in sizes:
            paths = write_files(book, size, folder)
            for kind, path in paths.items():
                results[f"{size}/{kind}"] = isolated_load(path, tokenizer_dir)
                print(f"{size} {kind}: {results[f'{size}/{kind}']}", file=sys.stderr)
            if model is not None:
                for kind in ("json", "parquet"):
                    out = folder / f"ft-{size}-{kind}"
                    results[f"{size}/{kind}/finetune"] = finetune_startup(paths[kind], model, cache, out)
                    print(f"{size} {kind} finetune: {results[f'{size}/{kind}/finetune']}", file=sys.stderr)
            for path in paths.values():
                path.unlink()
    return results


def ratios(results: dict, sizes: list[int]) -> dict:
    out = {}
    for size in sizes:
        base = results[f"{size}/json"]
        for kind in ("jsonl", "parquet"):
            other = results[f"{size}/{kind}"]
            for figure in ("load_check_seconds", "tokenize_seconds", "peak_rss_bytes"):
                if base[figure]:
                    out[f"{size}/{kind}_vs_json:{figure}"] = round(other[figure] / base[figure], 2)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_sources", description=__doc__)
    parser.add_argument("--sizes", default="1000,52000,500000")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--no-startup", action="store_true", help="leave out the finetune start-up")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results-cpu-data-sources.json")
    args = parser.parse_args(argv)
    writable_out(parser, args.out)
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.time()
    results = run(sizes, args.data_dir or default_data_dir(), not args.no_startup)
    report = {"machine": machine("cpu"), "sizes": sizes, "results": results, "ratios": ratios(results, sizes)}
    report["seconds"] = round(time.time() - started, 1)
    report["load_average_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
