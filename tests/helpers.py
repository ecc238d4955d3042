"""Running the CLI as a real process, and waiting on its output with a deadline."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What a job finds in a filled cache: copied into each test's own, so nothing a job writes reaches ../shared.
CACHE_FILES = ("instruction-data.json", "instruction-data-with-preference.json", "gpt2/encoder.json", "gpt2/vocab.bpe")


# What asks a run for a metrics endpoint of the test's own (a port, a scrape target, or a file that may name one).
METRICS_FLAGS = ("--metrics-port", "--metrics-sd-dir", "--config")
METRICS_VARIABLES = ("SFT_JOB_METRICS_PORT", "SFT_JOB_METRICS_SD_DIR")


def without_endpoint(args, env: dict | None) -> list[str]:
    """``sft-job run`` arguments with ``--metrics-port 0`` (no endpoint) added, unless the test asks for a port,
    a scrape target or a config file: no test depends on a port being free, nor serves one it does not read."""
    args = [str(a) for a in args]
    asked = any(a.split("=")[0] in METRICS_FLAGS for a in args) or any(v in (env or {}) for v in METRICS_VARIABLES)
    return ["run", "--metrics-port", "0", *args[1:]] if args[:1] == ["run"] and not asked else args


def cli(*args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "job.cli", *without_endpoint(args, env)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def start_cli(*args, env: dict | None = None, umask: int | None = None) -> subprocess.Popen:
    """The CLI as a process; ``umask``: the one it starts with (a cluster's users may have 077)."""
    return subprocess.Popen(
        [sys.executable, "-m", "job.cli", *without_endpoint(args, env)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        preexec_fn=None if umask is None else lambda: os.umask(umask),
    )


def wait_for_event(proc: subprocess.Popen, predicate, deadline_s: float = 300) -> dict:
    """Read the process's JSON log lines until one satisfies ``predicate``; fail at the deadline, also
    while the process prints nothing (each line is read by a helper thread the wait can give up on)."""
    deadline = time.monotonic() + deadline_s
    while (line := _line_before(proc, deadline)) is not None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if predicate(event):
            return event
    raise AssertionError(f"no matching event before the deadline or the end of output (exit code {proc.poll()})")


def _line_before(proc: subprocess.Popen, deadline: float) -> str | None:
    """The next line of ``proc``'s stdout, or None at its end or once ``deadline`` passes."""
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    return read[0] or None if read else None


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, deadline_s: float = 60, interval_s: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail past the deadline."""
    deadline = time.monotonic() + deadline_s
    pause = threading.Event()
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        pause.wait(interval_s)


def filled_cache(folder: Path, reference: Path) -> Path:
    """``folder`` holding copies of the reference data's ``CACHE_FILES``, as a filled cache holds them."""
    for name in CACHE_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(reference / name, folder / name)
    return folder


def smoke_run(cache: Path, output, run_id: str, *extra) -> list:
    """``sft-job run --smoke`` arguments on the book's data in a test's own ``cache``, logging JSON, no metrics port."""
    data = cache / "instruction-data.json"
    common = ["--data", data, "--cache", cache, "--output", output, "--run-id", run_id]
    return ["run", "--smoke", *common, "--metrics-port", "0", "--log-format", "json", *extra]


def finetune_run(model_dir: Path, cache: Path, output, *extra) -> list:
    """``sft-job finetune`` arguments on the book's data in a test's own ``cache``, logging JSON."""
    common = ["--data", cache / "instruction-data.json", "--cache", cache, "--output", output]
    return ["finetune", "--model-dir", model_dir, *common, "--log-format", "json", *extra]


def conversations_file(path, book_data, long: range = range(0)):
    """60 of the book's entries as conversations (51 training, 6 test, 3 validation in the 85/10/5 cut), those
    in ``long`` behind a system prompt that leaves their answer past --allowed-max-length 200."""
    rows = []
    for i, entry in enumerate(book_data[:60]):
        system = "Be brief. " * (80 if i in long else 1)
        turns = [("system", system), ("user", entry["instruction"]), ("assistant", entry["output"])]
        rows.append({"messages": [{"role": role, "content": text} for role, text in turns]})
    path.write_text(json.dumps(rows))
    return path
