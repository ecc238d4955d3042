"""The judge against a real inference server: llama.cpp's OpenAI-compatible server (``llama_cpp.server``) on a
GGUF the job itself exported (tests/judge_model.py: a tiny model whose weights answer ``85``), scored through
``--judge-backend openai``: the 110 test responses, summary.json, in the default structured format (the server
refuses OpenAI's ``json_schema`` with HTTP 500 and takes ``json_object`` with a schema) and plain, and the server
stopped mid-way (exit 75; the rerun asks for exactly the rest)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from job.stages.export import GGUF_FILE, run_export
from job.stages.export_config import ExportConfig
from tests.helpers import cli, free_port, start_cli, wait_until
from tests.judge_model import SCORE, write_judge_model

CHAT = '"POST /v1/chat/completions HTTP/1.1" 200'
REFUSED = '"POST /v1/chat/completions HTTP/1.1" 500'


@pytest.fixture(scope="module")
def judge_gguf(tmp_path_factory):
    model = write_judge_model(tmp_path_factory.mktemp("judge-model"))
    out = tmp_path_factory.mktemp("judge-gguf")
    run_export(ExportConfig(model_dir=str(model), output=str(out), dtype="f32", cache=str(out / "unused")))
    return out / GGUF_FILE


@pytest.fixture
def responses(tmp_path, book_data):
    """The book's 110 test entries with a response each (generate's file)."""
    path = tmp_path / "instruction-data-with-response.json"
    path.write_text(json.dumps([{**e, "model_response": e["output"]} for e in book_data[935:1045]]))
    return path


class Server:
    """``python -m llama_cpp.server`` on a port, its access log in a file (each chat request is one line)."""

    def __init__(self, gguf, port: int, log):
        self.port, self.log = port, log
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "judge"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1"]
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
        wait_until(self.serving, deadline_s=180, what="llama_cpp.server answering /v1/models")

    def serving(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            if self.process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {self.log.read_text()[-2000:]}")
            return False

    def chat_requests(self, answer: str = CHAT) -> int:
        return self.log.read_text().count(answer)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def judge_args(port: int, responses, output, *extra) -> list:
    url = f"http://127.0.0.1:{port}/v1"
    common = ["--judge-backend", "openai", "--judge-url", url, "--judge-model", "judge"]
    return ["judge", *common, "--responses", responses, "--output", output, "--log-format", "json", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("judge_format", ["structured", "plain"])
def test_110_responses_scored_by_llama_cpp(judge_gguf, responses, tmp_path, judge_format):
    port = free_port()
    server = Server(judge_gguf, port, tmp_path / "server.log")
    try:
        done = cli(*judge_args(port, responses, tmp_path / "judge", "--judge-format", judge_format))
        assert done.returncode == 0, done.stderr
        assert server.chat_requests() == 110
        # structured: the first requests in flight (--judge-concurrency 4) asked with json_schema, refused
        refused = server.chat_requests(REFUSED)
        assert 1 <= refused <= 4 if judge_format == "structured" else refused == 0
    finally:
        server.stop()
    summary = json.loads((tmp_path / "judge" / "summary.json").read_text())
    assert (summary["scored"], summary["unparsed"], summary["failed"]) == (110, 0, 0)
    assert summary["mean"] == summary["min"] == summary["max"] == int(SCORE)
    assert summary["prompt_mode"] == judge_format
    scores = json.loads((tmp_path / "judge" / "scores.json").read_text())
    assert [s["score"] for s in scores] == [int(SCORE)] * 110
    # structured: each reply is the JSON object llama.cpp's grammar held the model to, not the plain "85"
    replies = [json.loads(s["judge_reply"]) if judge_format == "structured" else s["judge_reply"] for s in scores]
    assert replies == [{"score": int(SCORE)} if judge_format == "structured" else SCORE] * 110


@pytest.mark.slow
def test_server_stopped_mid_way_is_75_and_the_rerun_asks_for_the_rest(judge_gguf, responses, tmp_path):
    port, out = free_port(), tmp_path / "judge"
    server = Server(judge_gguf, port, tmp_path / "first.log")
    args = judge_args(port, responses, out, "--judge-retries", "1", "--judge-concurrency", "1")
    job = start_cli(*args)
    progress = out / "scores.progress.jsonl"
    try:
        wait_until(lambda: progress.is_file() and len(progress.read_text().splitlines()) >= 20, 300, what="20 scores")
    finally:
        server.stop()
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 75, stderr
    assert stderr.startswith("Error: judge:") and stderr.count("\n") == 1 and "rerun" in stderr
    kept = len(progress.read_text().splitlines())
    assert 20 <= kept < 110
    again = Server(judge_gguf, port, tmp_path / "second.log")
    try:
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        assert again.chat_requests() == 110 - kept
    finally:
        again.stop()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["scored"], summary["failed"]) == (110, 0)
