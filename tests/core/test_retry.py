"""The one retry policy (job/core/retry.py) that S3, downloads and the judge share."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from job.core import retry
from job.core.retry import Policy, Retried


class Outage(Exception):
    def __init__(self, retry_after: float | None = None):
        super().__init__("503")
        self.retry_after = retry_after


class GaveUp(Exception):
    pass


def _transient(exc: BaseException) -> str | None:
    return "HTTP 503" if isinstance(exc, Outage) else None


def _failing(times: int, error=Outage):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise error()
        return "ok"

    return fn, calls


@given(
    tries=st.integers(1, 40),
    first=st.floats(0.001, 10),
    cap=st.floats(0.001, 100),
    asked=st.none() | st.floats(0, 1000),
)
def test_every_wait_is_the_jittered_backoff_or_the_servers_ask_whichever_is_longer(tries, first, cap, asked):
    wait = Policy(first_s=first, cap_s=cap).wait(tries, asked)
    backoff = min(first * 2 ** (tries - 1), cap)
    assert (asked or 0.0) <= wait
    assert wait == asked or 0.5 * backoff <= wait < 1.5 * backoff


@given(within=st.floats(0.1, 1000), elapsed=st.floats(0, 2000), tries=st.integers(1, 30))
def test_a_wait_never_ends_past_the_deadline(within, elapsed, tries):
    wait = Policy(within_s=within).wait(tries, asked=5000.0, elapsed=elapsed)
    assert 0.0 <= wait <= max(within - elapsed, 0.0)


@pytest.mark.parametrize("failures", [0, 1, 3])
def test_transient_failures_are_retried_until_the_call_succeeds(failures):
    fn, calls = _failing(failures)
    waits, seen = [], []
    result = retry.call(fn, Policy(first_s=0.01, attempts=5), _transient, GaveUp, seen.append, waits.append)
    assert result == "ok" and len(calls) == failures + 1 and len(waits) == failures
    assert [r.tries for r in seen] == list(range(1, failures + 1))
    assert all(r.reason == "HTTP 503" and r.wait_s == w for r, w in zip(seen, waits, strict=True))


def test_the_callers_error_is_raised_when_the_tries_are_spent():
    fn, calls = _failing(10)
    given_up: list[Retried] = []

    def give_up(last: Retried) -> GaveUp:
        given_up.append(last)
        return GaveUp(f"after {last.tries} tries: {last.reason}")

    with pytest.raises(GaveUp, match="after 3 tries: HTTP 503") as raised:
        retry.call(fn, Policy(first_s=0.01, attempts=3), _transient, give_up, sleep=lambda s: None)
    assert len(calls) == 3 and isinstance(given_up[0].error, Outage)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # one line, not a chain


def test_an_error_that_is_not_transient_is_raised_at_once():
    fn, calls = _failing(5, error=KeyError)
    waits = []
    with pytest.raises(KeyError):
        retry.call(fn, Policy(attempts=5), _transient, GaveUp, sleep=waits.append)
    assert len(calls) == 1 and waits == []


def test_retry_after_is_waited_even_past_the_backoff():
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            raise Outage(retry_after=7.0)
        return "ok"

    waits = []
    assert retry.call(fn, Policy(first_s=0.5, attempts=3), _transient, GaveUp, sleep=waits.append) == "ok"
    assert waits == [7.0]


def test_a_deadline_stops_the_tries_once_it_has_passed():
    """Time is spent for real here (the waits are about 10 ms): tries stop once 0.1 s have passed."""
    fn, calls = _failing(10_000)
    with pytest.raises(GaveUp):
        retry.call(fn, Policy(first_s=0.01, cap_s=0.02, within_s=0.1), _transient, GaveUp)
    assert 3 <= len(calls) < 100
