"""Every field of every reply a judge sends is read where a bad shape is a failed request (retried,
then exit 75 with the replies received kept) or a refusal (exit 1), never a crash: through the real
CLI against the wire-protocol stand-in, and a Hypothesis property over any JSON each endpoint may
send, through the ``ollama`` and ``openai`` clients as the job uses them."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from job.config import JudgeConfig
from job.core.observability import Metrics
from job.stages.judge import JudgeError, RetryableError, make_judge, score_one
from tests.helpers import cli
from tests.ollama_server import FakeOllama, overlap_grade

ENTRY = {"instruction": "Say hi.", "input": "", "output": "Hi.", "model_response": "Hi."}


@pytest.fixture
def server():
    fake = FakeOllama().start()
    yield fake
    fake.stop()


@pytest.fixture
def eight_responses(shared_data, tmp_path):
    path = tmp_path / "eight.json"
    path.write_text(
        json.dumps(json.loads((shared_data / "seed-eval" / "instruction-data-with-response.json").read_text())[:8])
    )
    return path


def _judge_args(responses, out, url: str, backend: str) -> list:
    url = url if backend == "ollama" else f"{url}/v1"
    args = ["judge", "--responses", responses, "--output", out, "--judge-url", url, "--judge-backend", backend]
    return args + ["--judge-wait", "2s", "--judge-retries", "1", "--judge-concurrency", "1", "--log-format", "json"]


def _progress(out) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.progress.jsonl").read_text().splitlines()]


# --- chat replies of a bad shape: failed requests, exit 75, the replies received kept ------------------

BAD_CHATS = [
    ("openai", '{"choices": []}', "choices: List should have at least 1 item"),
    ("openai", '{"choices": null}', "choices: Input should be a valid list"),
    ("openai", '{"choices": [{"index": 0, "message": "72"}]}', "choices.0.message: Input should be a valid dictionary"),
    (
        "openai",
        '{"choices": [{"message": {"content": 72}}]}',
        "choices.0.message.content: Input should be a valid string",
    ),
    ("openai", '{"choices": ["72"]}', "choices.0: Input should be a valid dictionary"),
    ("openai", "[]", "the document: Input should be a valid dictionary"),
    ("ollama", "[]", "unreadable reply (TypeError)"),
    ("ollama", "null", "unreadable reply (TypeError)"),
    ("ollama", '{"message": "72", "done": true}', "message: Input should be a valid dictionary"),
    ("ollama", '{"message": {"role": "assistant", "content": 72}}', "message.content: Input should be a valid string"),
    ("ollama", '{"done": true}', "message: Field required"),
    ("ollama", "[" * 20_000 + "]" * 20_000, "unreadable reply (RecursionError)"),  # under 64 KB, too deep to parse
    ("openai", '{"a": ' * 5_000 + "1" + "}" * 5_000, "unreadable reply (RecursionError)"),
]


@pytest.mark.parametrize("backend, body, why", BAD_CHATS, ids=[f"{b}-{s[:30]}" for b, s, _ in BAD_CHATS])
def test_a_chat_reply_of_a_bad_shape_fails_the_request_exit_75_keeping_the_replies_received(
    server, eight_responses, tmp_path, backend, body, why
):
    out = tmp_path / "out"
    server.mode, server.shape, server.healthy_for = "shape", (200, body), 3  # three answered, then the bad shape
    failed = cli(*_judge_args(eight_responses, out, server.url, backend), timeout=120)
    assert failed.returncode == 75, failed.stderr
    [line] = failed.stderr.splitlines()
    assert line.startswith(f"Error: judge: 5 of 8 entries failed (unreadable reply{'' if '(' in why else ': '}")
    assert why in line and line.endswith("rerun to retry them (the 3 scored are kept)")
    assert len(server.chats) == 3 + 5 * 2  # each bad reply retried once (--judge-retries 1)
    entries = json.loads(eight_responses.read_text())
    kept = sorted((r["index"], r["score"], r["outcome"]) for r in _progress(out))
    assert kept == [(i, overlap_grade(entries[i]["output"], entries[i]["model_response"]), "ok") for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == ["scores.progress.jsonl"]


def test_after_bad_shapes_a_rerun_asks_only_for_the_failed_entries_and_scores_all(server, eight_responses, tmp_path):
    out = tmp_path / "out"
    args = _judge_args(eight_responses, out, server.url, "openai")
    server.mode, server.shape, server.healthy_for = "shape", (200, '{"choices": null}'), 3
    assert cli(*args, timeout=120).returncode == 75
    server.mode = "ok"
    done = cli(*args, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(server.chats) == 13 + 5
    entries = json.loads(eight_responses.read_text())
    scores = [s["score"] for s in json.loads((out / "scores.json").read_text())]
    assert scores == [overlap_grade(e["output"], e["model_response"]) for e in entries]


def test_a_valid_reply_without_a_score_is_kept_with_a_null_score(server, eight_responses, tmp_path):
    """The other side of the line: a reply of the right shape whose content is null is an answer."""
    out = tmp_path / "out"
    server.mode, server.healthy_for = "shape", 7
    server.shape = (200, '{"choices": [{"index": 0, "message": {"role": "assistant", "content": null}}]}')
    done = cli(*_judge_args(eight_responses, out, server.url, "openai"), timeout=120)
    assert done.returncode == 0, done.stderr
    last = json.loads((out / "scores.json").read_text())[7]
    assert (last["score"], last["judge_reply"]) == (None, "")
    assert json.loads((out / "summary.json").read_text())["unparsed"] == 1


@pytest.mark.parametrize("backend", ["ollama", "openai"])
@pytest.mark.parametrize("body", ["[]", '"model gone"', '{"error": ["not", "text"]}', "<html>\n404\n</html>"])
def test_a_4xx_whose_body_is_no_error_object_is_a_refusal_exit_1_in_one_line(
    server, eight_responses, tmp_path, backend, body
):
    out = tmp_path / "out"
    server.mode, server.shape, server.healthy_for = "shape", (404, body), 3
    refused = cli(*_judge_args(eight_responses, out, server.url, backend), timeout=120)
    assert refused.returncode == 1, refused.stderr
    [line] = refused.stderr.splitlines()
    assert line.startswith("Error: judge: 5 of 8 entries failed (judge answered HTTP 404: ")
    assert line.endswith("the judge refuses the requests; check --judge-model and --judge-url")
    assert len(server.chats) == 3 + 5 and len(_progress(out)) == 3  # a refusal is not retried


# --- the model list and the pull -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, why",
    [
        ("/api/tags", "[]", "unreadable reply (TypeError)"),
        ("/api/tags", '{"models": null}', "unreadable reply: models: Input should be"),
        ("/api/tags", '{"models": [{"model": 3}]}', "unreadable reply: models.0.model: Input should be a valid string"),
        ("/v1/models", '{"data": [null]}', "unreadable reply: data.0: Input should be a valid dictionary"),
        ("/v1/models", '{"data": [{"id": 3}]}', "unreadable reply: data.0.id: Input should be a valid string"),
        ("/v1/models", '{"object": "list"}', "unreadable reply: data: Input should be a valid list"),
    ],
)
def test_a_model_list_of_a_bad_shape_is_waited_out_then_75_before_any_work(server, tmp_path, path, body, why):
    server.bodies[path] = (200, body)
    backend = "ollama" if path.startswith("/api") else "openai"
    (tmp_path / "r.json").write_text(json.dumps([ENTRY]))
    failed = cli(*_judge_args(tmp_path / "r.json", tmp_path / "out", server.url, backend), timeout=120)
    assert failed.returncode == 75, failed.stderr
    [line] = failed.stderr.splitlines()
    assert line.startswith("Error: judge at http://127.0.0.1:") and f"did not answer within 2s ({why}" in line
    assert not (tmp_path / "out").exists() and not server.chats


PULL_REFUSED = '{"status": "pulling manifest"}\n{"error": "pull model manifest: file does not exist"}\n'


@pytest.mark.parametrize(
    "stream, code, why",
    [
        (PULL_REFUSED, 1, "judge refused: pull model manifest: file does not exist"),
        ('{"error": "pull model manifest: file does not exist"}\n', 1, "judge refused: pull model manifest"),
        ("[1]\n", 75, "(unreadable reply (AttributeError))"),
        ("not json\n", 75, "(unreadable reply (JSONDecodeError))"),
        ('{"status": "pulling", "total": "big"}\n', 75, "(unreadable reply: total: Input should be a valid integer"),
        ('{"status": "pulling manifest"}\n', 75, "(the pull of llama3 ended without success (last status 'pulling"),
        ("", 75, "(the pull of llama3 ended without success (last status None))"),
    ],
)
def test_a_pull_stream_that_refuses_is_exit_1_and_one_of_a_bad_shape_is_retried_then_75(tmp_path, stream, code, why):
    server = FakeOllama(models=()).start()
    server.bodies["/api/pull"] = (200, stream)
    (tmp_path / "r.json").write_text(json.dumps([ENTRY]))
    try:
        failed = cli(*_judge_args(tmp_path / "r.json", tmp_path / "out", server.url, "ollama"), timeout=120)
    finally:
        server.stop()
    assert failed.returncode == code, failed.stderr
    [line] = failed.stderr.splitlines()
    if code == 1:
        assert line.startswith(f"Error: pulling judge model 'llama3' on {server.url}: {why}")
        assert len(server.pulls) == 1  # a refusal is not retried
    else:
        assert line.startswith(f"Error: judge at {server.url} failed while checking model llama3 {why}")
        assert len(server.pulls) == 2  # retried once (--judge-retries 1)
    assert not (tmp_path / "out").exists() and not server.chats


# --- any JSON each endpoint may send: a property through both clients ----------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=12,
)
CONTENTS = st.sampled_from(["72", " 85.\n", '{"score": 72}', '{"score": 101}', "eighty", ""]) | st.text(max_size=20)


def _ollama_chat(content) -> dict:
    message = {"role": "assistant", "content": content}
    return {"model": "llama3", "created_at": "2026-12-05T00:00:00Z", "message": message, "done": True}


def _openai_chat(content) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "llama3", "choices": [choice]}


PULL_LINES = [
    {"status": "pulling manifest"},
    {"status": "pulling 365c0bd3c000", "digest": "sha256:" + "ab" * 32, "total": 1000, "completed": 500},
    {"status": "success"},
]
TEMPLATES = {
    "/api/chat": CONTENTS.map(_ollama_chat),
    "/v1/chat/completions": CONTENTS.map(_openai_chat),
    "/api/tags": st.just({"models": [FakeOllama._tag("llama3:latest")]}),
    "/v1/models": st.just({"object": "list", "data": [{"id": "llama3:latest", "object": "model", "owned_by": "x"}]}),
    "/api/pull": st.just(PULL_LINES),
}


@st.composite
def near_valid(draw, template: dict | list):
    """A valid reply with one field, at any depth, removed, nulled, replaced by any JSON or wrapped in a list."""
    reply = copy.deepcopy(template)
    parent, key, node = None, None, reply
    while isinstance(node, dict | list) and node and draw(st.booleans()):
        parent, key = node, draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        node = node[key]
    change = draw(st.sampled_from(["remove", "null", "replace", "wrap"]))
    new = {"null": None, "wrap": [node]}.get(change) if change != "replace" else draw(JSON_VALUES)
    if parent is None:
        return draw(JSON_VALUES) if change == "remove" else new
    if change == "remove":
        del parent[key]
    else:
        parent[key] = new
    return reply


def _body(draw, path: str) -> str:
    """The raw body: any JSON, or a near-valid reply (NDJSON for the pull, a line per element), or
    JSON nested deeper than json.loads goes (a RecursionError, not a ValueError)."""
    if draw(st.integers(0, 7)) == 0:
        return draw(st.integers(5_000, 30_000).map(lambda depth: "[" * depth + "]" * depth))
    value = draw(JSON_VALUES | TEMPLATES[path].flatmap(near_valid))
    if path == "/api/pull":
        lines = value if isinstance(value, list) else [value]
        return "".join(json.dumps(line) + "\n" for line in lines)
    return json.dumps(value)


@pytest.fixture(scope="module")
def stand_in():
    fake = FakeOllama().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def judges(stand_in):
    """One client of each backend for all examples (making one costs more than a request)."""
    return {backend: make_judge(_cfg(stand_in.url, backend)) for backend in ("ollama", "openai")}


STATUSES = st.sampled_from([200] * 6 + [400, 404, 422, 429, 500, 503])
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _cfg(url: str, backend: str) -> JudgeConfig:
    url = url if backend == "ollama" else f"{url}/v1"
    return JudgeConfig(judge_url=url, judge_backend=backend, judge_retries=0, judge_timeout=10.0)


@pytest.mark.parametrize("backend, path", [("ollama", "/api/chat"), ("openai", "/v1/chat/completions")])
@PROPERTY
@given(data=st.data(), status=STATUSES)
def test_any_chat_reply_is_a_score_a_null_score_a_failed_request_or_a_refusal(
    stand_in, judges, backend, path, data, status
):
    stand_in.mode, stand_in.shape = "shape", (status, _body(data.draw, path))
    cfg = _cfg(stand_in.url, backend)
    result = score_one(judges[backend], cfg, 0, ENTRY, Metrics(), sleep=lambda s: None)
    expected = "refused" if 400 <= status < 500 and status != 429 else "failed" if status != 200 else None
    assert result.outcome == expected if expected else result.outcome in ("ok", "unparsed", "failed")
    if result.outcome in ("ok", "unparsed"):
        assert isinstance(result.judge_reply, str)
        assert (result.score is not None) == (result.outcome == "ok")
        assert result.score is None or (type(result.score) is int and 0 <= result.score <= 100)
    else:
        assert result.score is None and result.judge_reply is None
        assert "\n" not in result.error and len(result.error) < 400


@pytest.mark.parametrize("backend, path", [("ollama", "/api/tags"), ("openai", "/v1/models"), ("ollama", "/api/pull")])
@PROPERTY
@given(data=st.data(), status=STATUSES)
def test_any_model_list_or_pull_reply_is_names_a_failed_request_or_a_refusal(
    stand_in, judges, backend, path, data, status
):
    stand_in.bodies = {path: (status, _body(data.draw, path))}
    stand_in.models = [] if path == "/api/pull" else ["llama3:latest"]
    judge = judges[backend]
    try:
        if path == "/api/pull":
            judge.ensure_model(allow_pull=True)
        else:
            assert all(isinstance(name, str) for name in judge.ping())
    except RetryableError as exc:
        assert "\n" not in str(exc) and (status == 200 or status >= 500 or status == 429)
    except JudgeError as exc:
        assert "\n" not in str(exc) and (path == "/api/pull" or 400 <= status < 500)
    finally:
        stand_in.bodies = {}
