import json
import signal
import statistics
import subprocess
import sys
import threading

import pytest

from job.config import JudgeConfig
from job.stages.judge import JudgeError, judge_prompt, parse_score, run_judge
from tests.helpers import REPO, cli, events, free_port, start_cli
from tests.ollama_server import FakeOllama, overlap_grade


@pytest.fixture
def ollama():
    server = FakeOllama().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def book_responses(shared_data):
    return shared_data / "seed-eval" / "instruction-data-with-response.json"


def _cfg(responses, output, url, **kw):
    return JudgeConfig(responses=str(responses), output=str(output), judge_url=url, judge_wait="10s", **kw)


def test_scores_the_books_110_responses_end_to_end(ollama, book_responses, tmp_path):
    entries = json.loads(book_responses.read_text())
    summary = run_judge(_cfg(book_responses, tmp_path, ollama.url))
    expected = [overlap_grade(e["output"], e["model_response"]) for e in entries]
    assert len(expected) == 110
    assert summary["scored"] == 110 and summary["unparsed"] == 0 and summary["failed"] == 0
    assert summary["mean"] == pytest.approx(statistics.fmean(expected))
    assert summary["median"] == statistics.median(expected)
    assert (summary["min"], summary["max"]) == (min(expected), max(expected))
    assert sum(summary["histogram"].values()) == 110
    assert summary["histogram"]["90-100"] == sum(1 for s in expected if s >= 90)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert [s["score"] for s in scores] == expected
    assert scores[0]["model_response"] == entries[0]["model_response"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json", "summary.json"]


def test_structured_mode_sends_the_schema_and_options(ollama, book_responses, tmp_path):
    run_judge(_cfg(book_responses, tmp_path, ollama.url))
    body = ollama.chats[0]
    assert body["format"] == {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["score"],
    }
    assert body["options"] == {"seed": 123, "temperature": 0.0, "num_ctx": 2048}
    assert body["model"] == "llama3"


def test_plain_mode_sends_the_books_prompt_byte_for_byte(ollama, book_responses, tmp_path):
    entries = json.loads(book_responses.read_text())
    run_judge(_cfg(book_responses, tmp_path, ollama.url, judge_format="plain"))
    sent = {b["messages"][0]["content"] for b in ollama.chats}
    entry = entries[0]
    book = (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        f"completes the request.\n\n### Instruction:\n{entry['instruction']}\n\n### Input:\n{entry['input']}` "
        f"and correct output `{entry['output']}`, score the model response `{entry['model_response']}` on a scale "
        "from 0 to 100, where 100 is the best score. Respond with the integer number only."
    )
    assert entry["input"] and book in sent
    assert judge_prompt(entry) == book
    assert all("format" not in b for b in ollama.chats)
    assert all(b["messages"] == [{"role": "user", "content": b["messages"][0]["content"]}] for b in ollama.chats)


@pytest.mark.parametrize(
    "reply, structured, score",
    [
        ("85", False, 85),
        (" 85.\n", False, 85),  # the integer alone: surrounding whitespace and a final period allowed
        ("100", False, 100),
        ("0", False, 0),
        ("I'd rate it 85/100", False, None),  # the book asks for the integer only: prose is no score
        ("On a scale of 1 to 10 ... 9, so 90 out of 100", False, None),
        ("eighty", False, None),
        ("", False, None),
        ("150", False, None),
        ("-5", False, None),
        ("85.5", False, None),
        ("\u0668\u0665", False, None),  # Arabic-Indic digits: not the ASCII integer asked for
        ('{"score": 72}', True, 72),
        ('{"score": 101}', True, None),
        ('{"score": 72.9}', True, None),  # a JSON number with a fraction is no integer score
        ('{"score": 72.0}', True, None),
        ('{"score": 1e9}', True, None),
        ('{"score": "72"}', True, None),
        ('{"score": true}', True, None),
        ('{"grade": 72}', True, None),
        ('{"score": ' + "9" * 5000 + "}", True, None),
        ("[" * 10000, True, None),
        ("88", True, 88),  # a server that ignored the schema and answered plainly
        ("not json 40", True, None),
    ],
)
def test_parse_score(reply, structured, score):
    assert parse_score(reply, structured) == score


def test_odd_replies_are_recorded_unparsed_without_crashing(ollama, book_responses, tmp_path):
    for text in ("I'd rate it 85/100", "eighty", "", "150"):
        ollama.faults.append(("reply", text))
    summary = run_judge(_cfg(book_responses, tmp_path, ollama.url, judge_format="plain", judge_concurrency=1))
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert [(s["score"], s["judge_reply"]) for s in scores[:4]] == [
        (None, "I'd rate it 85/100"),
        (None, "eighty"),
        (None, ""),
        (None, "150"),
    ]
    assert summary["unparsed"] == 4 and summary["scored"] == 106


def test_500_twice_then_an_answer_is_retried(ollama, book_responses, tmp_path):
    ollama.faults.extend(["500", "500"])
    summary = run_judge(_cfg(book_responses, tmp_path, ollama.url, judge_concurrency=1))
    assert summary["scored"] == 110 and summary["failed"] == 0
    assert len(ollama.chats) == 112


def test_4xx_is_not_retried_and_is_never_written_as_a_result(ollama, book_responses, tmp_path):
    ollama.faults.append("404")
    with pytest.raises(JudgeError, match=r"^judge: 1 of 110 entries failed \(judge answered HTTP 404") as raised:
        run_judge(_cfg(book_responses, tmp_path, ollama.url, judge_concurrency=1))
    assert raised.value.exit_code == 1 and len(ollama.chats) == 110
    assert not (tmp_path / "scores.json").exists() and not (tmp_path / "summary.json").exists()
    # The 109 replies are kept; a rerun asks for the one refused entry only.
    summary = run_judge(_cfg(book_responses, tmp_path, ollama.url, judge_concurrency=1))
    assert summary["scored"] == 110 and len(ollama.chats) == 111


def test_a_server_that_starts_after_the_stage_began_waiting_for_it(book_responses, tmp_path):
    from structlog.testing import capture_logs

    from tests.helpers import wait_until

    server = FakeOllama(port=free_port())

    def start_once_waited_for():
        wait_until(lambda: any(e["event"] == "judge_not_answering" for e in logs), 60, 0.05, what="the judge wait")
        server.start()

    with capture_logs() as logs:
        starter = threading.Thread(target=start_once_waited_for)
        starter.start()
        try:
            summary = run_judge(_cfg(book_responses, tmp_path, server.url))
        finally:
            starter.join()
            server.stop()
    assert summary["scored"] == 110
    said = [e["event"] for e in logs if e["event"].startswith("judge_")]
    assert said[0] == "judge_not_answering" and "judge_ready" in said


def test_missing_model_is_pulled(book_responses, tmp_path):
    server = FakeOllama(models=()).start()
    try:
        summary = run_judge(_cfg(book_responses, tmp_path, server.url, judge_model="llama3.1:8b"))
    finally:
        server.stop()
    assert server.pulls and server.pulls[0]["model"] == "llama3.1:8b"
    assert summary["scored"] == 110


def test_missing_model_without_pull_is_a_one_line_error(book_responses, tmp_path):
    server = FakeOllama(models=()).start()
    try:
        result = cli(
            "judge",
            "--responses",
            book_responses,
            "--output",
            tmp_path / "out",
            "--judge-url",
            server.url,
            "--no-judge-pull",
            "--log-format",
            "json",
        )
    finally:
        server.stop()
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: judge model 'llama3' is not on {server.url} and --no-judge-pull was given"
    assert not (tmp_path / "out").exists()


def test_server_that_never_comes_up_fails_before_any_work(book_responses, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = cli(
        "judge",
        "--responses",
        book_responses,
        "--output",
        tmp_path / "out",
        "--judge-url",
        url,
        "--judge-wait",
        "2s",
        "--log-format",
        "json",
    )
    assert result.returncode == 75  # an outage past the wait: worth a rerun
    assert result.stderr.startswith(f"Error: judge at {url} did not answer within 2s (")
    assert result.stderr.rstrip().endswith("point --judge-url (or OLLAMA_HOST) at it, or pass --skip-judge")
    waited = [e["event"] for e in events(result.stdout) if e["event"].startswith("judge_")]
    assert waited == ["judge_not_answering"]  # said at the first failed attempt; then every 30 s at most
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_restart_asks_only_for_entries_not_yet_scored(book_responses, tmp_path):
    server = FakeOllama().start()
    try:
        args = [
            "judge",
            "--responses",
            book_responses,
            "--output",
            tmp_path,
            "--judge-url",
            server.url,
            "--judge-concurrency",
            "1",
            "--log-format",
            "json",
        ]
        proc = start_cli(*args)
        assert server.wait_for_chats(30), "the stage never got going"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        first = len(server.chats)
        assert 0 < first < 110
        saved = sum(1 for _ in (tmp_path / "scores.progress.jsonl").open())
        rerun = cli(*args)
        assert rerun.returncode == 0, rerun.stderr
        start = [e for e in events(rerun.stdout) if e["event"] == "judge_start"][0]
        assert start["already_scored"] == saved and start["to_score"] == 110 - saved
        assert len(server.chats) - first == 110 - saved
        assert json.loads((tmp_path / "summary.json").read_text())["scored"] == 110
    finally:
        server.stop()


def test_openai_backend_gives_the_same_scores(ollama, book_responses, tmp_path):
    a = run_judge(_cfg(book_responses, tmp_path / "ollama", ollama.url))
    b = run_judge(
        _cfg(
            book_responses,
            tmp_path / "openai",
            ollama.url + "/v1",
            judge_backend="openai",
            judge_model="llama3:latest",
            judge_api_key="sk-test",
        )
    )
    assert b["scored"] == 110 and b["mean"] == a["mean"]
    body = ollama.chats[-1]
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["score"]
    assert body["seed"] == 123 and body["temperature"] == 0.0


def test_openai_backend_unknown_model_is_a_clear_error(ollama, book_responses, tmp_path):
    with pytest.raises(JudgeError, match="judge model 'gpt-x' is not served by"):
        run_judge(_cfg(book_responses, tmp_path, ollama.url + "/v1", judge_backend="openai", judge_model="gpt-x"))


@pytest.fixture
def eight_responses(book_responses, tmp_path):
    path = tmp_path / "eight.json"
    path.write_text(json.dumps(json.loads(book_responses.read_text())[:8]))
    return path


def _openai_args(server, responses, out) -> list:
    args = ["judge", "--responses", responses, "--output", out, "--judge-url", server.url + "/v1"]
    return args + ["--judge-backend", "openai", "--judge-retries", "1", "--judge-concurrency", "1", "--judge-wait", "5"]


def test_a_server_refusing_json_schema_is_asked_with_a_schema_object(eight_responses, tmp_path):
    """llama-cpp-python's server answers OpenAI's json_schema with HTTP 500 and takes json_object with a schema."""
    server = FakeOllama().start()
    try:
        server.refused_formats = {"json_schema"}
        done = cli(*_openai_args(server, eight_responses, tmp_path / "out"), timeout=120)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    asked = [chat["response_format"]["type"] for chat in server.chats]
    assert asked == ["json_schema"] + ["json_object"] * 8
    assert server.chats[-1]["response_format"]["schema"]["required"] == ["score"]
    entries = json.loads(eight_responses.read_text())
    scores = [s["score"] for s in json.loads((tmp_path / "out" / "scores.json").read_text())]
    assert scores == [overlap_grade(e["output"], e["model_response"]) for e in entries]


def test_a_server_refusing_every_structured_shape_is_exit_1_naming_plain(eight_responses, tmp_path):
    server = FakeOllama().start()
    try:
        server.refused_formats = {"json_schema", "json_object"}
        refused = cli(*_openai_args(server, eight_responses, tmp_path / "out"), timeout=120)
    finally:
        server.stop()
    assert refused.returncode == 1, refused.stderr
    [line] = refused.stderr.splitlines()
    assert line.startswith(f"Error: judge at {server.url}/v1 answers plain requests but refuses structured output")
    assert line.endswith("use --judge-format plain") and "HTTP 500" in line
    # json_schema, json_object with a schema, a plain request, json_schema again: then no more requests
    assert [chat.get("response_format", {}).get("type") for chat in server.chats] == [
        "json_schema",
        "json_object",
        None,
        "json_schema",
    ]
    assert not (tmp_path / "out" / "scores.json").exists()


def test_a_server_failing_every_request_stays_an_outage_exit_75(eight_responses, tmp_path):
    """A 500 to plain requests too is the server failing, not the request's shape: retried, then 75."""
    server = FakeOllama().start()
    try:
        server.mode = "500"
        failed = cli(*_openai_args(server, eight_responses, tmp_path / "out"), timeout=120)
    finally:
        server.stop()
    assert failed.returncode == 75, failed.stderr
    [line] = failed.stderr.splitlines()
    assert line.startswith("Error: judge: 8 of 8 entries failed (HTTP 500") and "rerun to retry them" in line


# A judge answering 500: the same, through the whole run, in test_reliability.py (the run's side: its manifest)
@pytest.mark.parametrize("mode", ["hang", "drop", "garbage"])
def test_a_failing_judge_is_never_a_result_exit_75_and_a_rerun_asks_only_for_the_failed(
    mode, eight_responses, tmp_path
):
    server = FakeOllama().start()
    out = tmp_path / "out"
    args = ["judge", "--responses", eight_responses, "--output", out, "--judge-url", server.url, "--judge-wait", "5s"]
    args += ["--judge-retries", "1", "--judge-timeout", "1", "--judge-concurrency", "1", "--log-format", "json"]
    try:
        server.mode, server.healthy_for = mode, 3  # three entries answered, then every request misbehaves
        failed = cli(*args, timeout=120)
        assert failed.returncode == 75, failed.stderr
        [line] = failed.stderr.splitlines()
        assert line.startswith("Error: judge: 5 of 8 entries failed (") and f"from {server.url}): rerun" in line
        assert not (out / "scores.json").exists() and not (out / "summary.json").exists()
        assert len(server.chats) == 3 + 5 * 2  # each failing entry tried twice (--judge-retries 1)
        server.mode = "ok"
        done = cli(*args, timeout=120)
        assert done.returncode == 0, done.stderr
        assert len(server.chats) == 13 + 5  # exactly the failed entries, once each
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["scored"], summary["failed"]) == (8, 0)
        assert [s["score"] for s in json.loads((out / "scores.json").read_text())] == [
            overlap_grade(e["output"], e["model_response"]) for e in json.loads(eight_responses.read_text())
        ]
    finally:
        server.stop()


def test_the_ollama_stand_in_runs_on_its_own_for_a_judge_without_ollama(book_responses, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.ollama_server", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == (
            f"Ollama stand-in listening on http://127.0.0.1:{port} with llama3:latest"
        )
        judged = cli(
            "judge", "--responses", book_responses, "--output", tmp_path, "--judge-url", f"http://127.0.0.1:{port}"
        )
        assert judged.returncode == 0, judged.stderr[-2000:]
        assert json.loads((tmp_path / "summary.json").read_text())["scored"] == 110
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
