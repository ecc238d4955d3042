"""Every byte a judge sends: scores parsed strictly (any text gives a score in 0..100 or none, never an
exception), replies bounded in size and time, and a server's Retry-After honoured; against the
Ollama wire-protocol server on 127.0.0.1, through both clients."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job.config import JudgeConfig
from job.core.bounded_http import MAX_RETRY_AFTER_S, retry_after_seconds
from job.core.errors import TransientError
from job.core.observability import Metrics
from job.stages.judge import KEPT_REPLY_CHARS, make_judge, parse_score, run_judge, score_one
from tests.helpers import wait_until
from tests.ollama_server import FakeOllama

ENTRY = {"instruction": "Say hi.", "input": "", "output": "Hi.", "model_response": "Hi."}

# --- the parser: properties ------------------------------------------------------------------------


@settings(max_examples=500)
@given(st.text(max_size=300), st.booleans())
def test_any_text_is_a_score_in_range_or_none(reply, structured):
    score = parse_score(reply, structured)
    assert score is None or (type(score) is int and 0 <= score <= 100)


@settings(max_examples=300)
@given(st.binary(max_size=200).map(lambda b: b.decode("latin-1")), st.booleans())
def test_any_bytes_as_text_never_raise(reply, structured):
    score = parse_score(reply, structured)
    assert score is None or 0 <= score <= 100


@given(st.integers(0, 100), st.sampled_from(["", " ", "\n", "\t "]), st.sampled_from(["", ".", " .", ". \n"]))
def test_the_integer_alone_is_its_score(value, before, after):
    reply = f"{before}{value}{after}"
    expected = value if not after.startswith(" .") else None  # the period must follow the digits
    assert parse_score(reply, structured=False) == expected


@given(st.integers(), st.dictionaries(st.sampled_from(["reason", "note"]), st.text(max_size=20), max_size=2))
def test_a_json_object_scores_its_integer_only_within_0_to_100(value, extra):
    reply = json.dumps({"score": value, **extra})
    assert parse_score(reply, structured=True) == (value if 0 <= value <= 100 else None)


@given(st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5) | st.booleans() | st.none())
def test_a_score_that_is_no_json_integer_is_none(value):
    assert parse_score(json.dumps({"score": value}), structured=True) is None


@given(st.text(max_size=40).filter(lambda t: not t.strip().rstrip(".").strip().isdigit()), st.integers(0, 100))
def test_prose_around_a_number_is_no_score(prefix, value):
    assert parse_score(f"{prefix} {value} out of 100" if prefix.strip() else f"score: {value}/100", False) is None


# --- Retry-After ----------------------------------------------------------------------------------


@given(st.text(max_size=40))
def test_any_retry_after_header_is_none_or_a_bounded_wait(value):
    wait = retry_after_seconds(value)
    assert wait is None or 0.0 <= wait <= MAX_RETRY_AFTER_S


def test_retry_after_reads_seconds_and_http_dates():
    now = datetime(2026, 12, 2, tzinfo=UTC)
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0.0
    assert retry_after_seconds("99999999") == MAX_RETRY_AFTER_S
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


# --- a misbehaving server, through both clients ------------------------------------------------------


@pytest.fixture
def server():
    fake = FakeOllama().start()
    yield fake
    fake.stop()


def _cfg(url: str, backend: str, **kw) -> JudgeConfig:
    return JudgeConfig(judge_url=url if backend == "ollama" else f"{url}/v1", judge_backend=backend, **kw)


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_a_reply_over_64_kb_fails_the_request_and_nothing_of_it_is_kept(server, backend, tmp_path):
    server.mode, server.huge_bytes = "huge", 4 << 20
    cfg = _cfg(server.url, backend, judge_retries=1)
    result = score_one(make_judge(cfg), cfg, 0, ENTRY, Metrics(), sleep=lambda s: None)
    assert (result.outcome, result.score, result.judge_reply) == ("failed", None, None)
    assert "over 64 KB" in result.error and len(server.chats) == 2  # retried once, then failed


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_a_server_trickling_its_reply_is_cut_at_the_judge_timeout(server, backend):
    server.mode, server.trickle_s = "trickle", 0.25  # the ~60-byte reply would take ~15 s
    cfg = _cfg(server.url, backend, judge_timeout=1.0, judge_retries=0)
    result = score_one(make_judge(cfg), cfg, 0, ENTRY, Metrics(), sleep=lambda s: None)
    assert result.outcome == "failed" and "within 1s" in result.error
    server.release.set()  # the server's handler stops and counts what it had sent when the client hung up
    [sent] = wait_until(lambda: server.trickled, 10, what="the trickling handler to end")
    assert sent < 20


@pytest.mark.parametrize("backend", ["ollama", "openai"])
@pytest.mark.parametrize("status", ["429", "503"])
def test_retry_after_is_honoured_then_the_answer_is_scored(server, backend, status):
    server.faults.append((status, "7"))
    cfg = _cfg(server.url, backend, judge_retries=2)
    waits = []
    result = score_one(make_judge(cfg), cfg, 0, ENTRY, Metrics(), sleep=waits.append)
    assert result.outcome == "ok" and result.score == 100
    assert len(waits) == 1 and waits[0] >= 7.0  # the server's 7 s, not the ~0.5 s backoff
    assert len(server.chats) == 2


def test_a_long_unscored_reply_is_kept_cut_and_the_stage_writes_bounded_files(server, tmp_path, shared_data):
    responses = shared_data / "seed-eval" / "instruction-data-with-response.json"
    server.faults.append(("reply", "x" * 60_000))  # under the body limit: a real (unscored) answer
    cfg = JudgeConfig(
        responses=str(responses), output=str(tmp_path), judge_url=server.url, judge_wait="5s", judge_concurrency=1
    )
    summary = run_judge(cfg)
    [first, *_] = json.loads((tmp_path / "scores.json").read_text())
    assert first["score"] is None and first["judge_reply"] == "x" * KEPT_REPLY_CHARS
    assert summary["unparsed"] == 1 and (tmp_path / "scores.json").stat().st_size < 400_000


def test_huge_replies_end_the_stage_with_75_and_no_scores_written(server, tmp_path, shared_data):
    responses = shared_data / "seed-eval" / "instruction-data-with-response.json"
    server.mode, server.healthy_for = "huge", 100
    cfg = JudgeConfig(
        responses=str(responses), output=str(tmp_path), judge_url=server.url, judge_wait="5s", judge_retries=0
    )
    with pytest.raises(TransientError, match=r"^judge: 10 of 110 entries failed \(reply over 64 KB"):
        run_judge(cfg)
    assert not (tmp_path / "scores.json").exists()
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 100_000  # the 100 replies' progress, not MBs
