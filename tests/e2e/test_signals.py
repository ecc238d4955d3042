"""Stop signals at every stage: SIGTERM, SIGUSR1 or SIGINT during the preflight, the download, training,
decoding, judging and between stages ends the job with 75 in one line, keeps what was complete, and
the manifest says where it stopped; the rerun of the same command ends with exactly the results of
an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.file_server import FileServer
from tests.helpers import cli, filled_cache, free_port, smoke_run, start_cli, wait_for_event, wait_until
from tests.ollama_server import FakeOllama

# Enough decoding (6 batches) and judging (24 requests, one at a time) for a signal to land inside each.
OPTIONS = ("--limit", "24", "--max-new-tokens", "48", "--generate-batch-size", "4", "--judge-concurrency", "1")
RESULTS = ("model/model.safetensors", "instruction-data-with-response.json", "scores.json")


def _digests(run: Path) -> dict[str, str]:
    return {name: hashlib.sha256((run / name).read_bytes()).hexdigest() for name in RESULTS}


def _args(cache: Path, runs: Path, run_id: str, judge_url: str) -> list:
    return smoke_run(cache, runs, run_id, "--judge-url", judge_url, "--judge-wait", "60s", *OPTIONS)


@pytest.fixture(scope="module")
def uninterrupted(shared_data, tmp_path_factory) -> dict[str, str]:
    server = FakeOllama().start()
    try:
        runs = tmp_path_factory.mktemp("straight")
        cache = filled_cache(tmp_path_factory.mktemp("cache"), shared_data)
        done = cli(*_args(cache, runs, "straight", server.url))
        assert done.returncode == 0, done.stderr
        return _digests(runs / "straight")
    finally:
        server.stop()


def _stopped(proc: subprocess.Popen, signum: int, then=None) -> str:
    proc.send_signal(signum)
    if then is not None:
        then()
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    [line] = err.splitlines()
    return line


def _wait_then_stop(proc, server: FakeOllama, where: str, signum: int) -> str:
    """Let the run reach ``where``, then send ``signum``."""
    if where == "finetune":
        wait_for_event(proc, lambda e: e.get("event") == "checkpoint", deadline_s=300)
    elif where == "generate":
        wait_for_event(proc, lambda e: e.get("event") == "progress" and e.get("stage") == "generate", 300)
    elif where == "between":
        wait_for_event(proc, lambda e: e.get("event") == "stage_done" and e.get("stage") == "finetune", 300)
    elif where == "judge":
        server.mode, server.healthy_for = "hang", 3  # three answers, then the fourth request hangs
        assert server.wait_for_chats(4, timeout=300)

    def answer_again():  # the request in flight ends at once instead of waiting out its timeout
        server.mode = "ok"
        server.release.set()

    return _stopped(proc, signum, then=answer_again)


@pytest.mark.slow
@pytest.mark.parametrize(
    "where, signum, said, manifest_where",
    [
        ("finetune", signal.SIGINT, "stopped by SIGINT at step", {"stage": "finetune"}),
        ("generate", signal.SIGTERM, "stopped by SIGTERM in stage generate", {"stage": "generate"}),
        ("judge", signal.SIGTERM, "stopped by SIGTERM in stage judge", {"stage": "judge"}),
        ("between", signal.SIGUSR1, "stopped by SIGUSR1", None),
    ],
)
def test_a_signal_inside_a_stage_is_75_and_the_rerun_ends_as_an_uninterrupted_run(
    where, signum, said, manifest_where, uninterrupted, cache, tmp_path
):
    server = FakeOllama().start()
    try:
        args = _args(cache, tmp_path / "runs", "cut", server.url)
        line = _wait_then_stop(start_cli(*args), server, where, signum)
        assert said in line and line.endswith(("rerun to resume", "rerun the same command to continue"))
        manifest = json.loads((tmp_path / "runs" / "cut" / "manifest.json").read_text())
        assert manifest["status"] == "interrupted"
        stopped = {k: v for k, v in manifest["stopped"].items() if k in ("stage", "after")}
        if manifest_where is not None:
            assert stopped == manifest_where
            assert manifest["stages"][where]["status"] == "interrupted"
        else:  # between finetune and generate: after the one, or at the start of the other
            assert stopped in ({"after": "finetune"}, {"stage": "generate"})
        assert manifest["stages"]["finetune"]["status"] == ("interrupted" if where == "finetune" else "complete")

        rerun = cli(*args)
        assert rerun.returncode == 0, rerun.stderr
    finally:
        server.stop()
    manifest = json.loads((tmp_path / "runs" / "cut" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "stopped" not in manifest
    assert _digests(tmp_path / "runs" / "cut") == uninterrupted


def test_a_signal_during_the_preflight_leaves_nothing_behind(cache, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # no judge there yet: the preflight waits for one
    proc = start_cli(*_args(cache, tmp_path / "runs", "early", url))
    wait_for_event(proc, lambda e: e.get("event") == "judge_not_answering", deadline_s=120)
    line = _stopped(proc, signal.SIGTERM)
    assert line == "Error: stopped by SIGTERM: what was complete is kept; rerun the same command to continue"
    assert not (tmp_path / "runs" / "early").exists()


def test_a_signal_during_a_download_keeps_the_part_and_the_rerun_resumes_it(shared_data, tmp_path):
    weights = bytes(range(256)) * 12288  # 3 MB; the server sends half, then stalls
    files = {f"/gpt2/{n}": (shared_data / "gpt2" / n).read_bytes() for n in ("encoder.json", "vocab.bpe")}
    files |= {"/gpt2-hf/gpt2-small/config.json": b"{}", "/gpt2-hf/gpt2-small/model.safetensors": weights}
    with FileServer(files) as server:
        server.faults["/gpt2-hf/gpt2-small/model.safetensors"].append("stall")
        args = ["download", "--model", "gpt2-small", "--source", "hf", "--no-dataset", "--base-url", server.url]
        args += ["--cache", tmp_path / "cache", "--log-format", "json"]
        proc = start_cli(*args)
        part = tmp_path / "cache" / "gpt2-hf" / "gpt2-small" / "model.safetensors.part"
        wait_until(lambda: part.is_file() and part.stat().st_size >= 1 << 20, 120, what="a first chunk on disk")
        line = _stopped(proc, signal.SIGTERM)
        assert line.startswith("Error: stopped by SIGTERM")
        kept = part.stat().st_size
        assert 0 < kept < len(weights)  # kept for the rerun
        server.release.set()
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        assert server.gets("/gpt2-hf/gpt2-small/model.safetensors")[-1] == f"bytes={kept}-"  # resumed
    assert (tmp_path / "cache" / "gpt2-hf" / "gpt2-small" / "model.safetensors").read_bytes() == weights
