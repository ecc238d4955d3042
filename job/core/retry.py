"""One retry policy for every call to a server: the object store, download hosts, the judge.

What counts as transient is each caller's (it knows its errors: ``transient`` names the reason or
says no); how long to wait between tries, the jitter, a server's ``Retry-After`` and when to give up
are here, on tenacity. A failure that is not transient is raised at once; giving up raises the
caller's own error, so each stage keeps its exit code (75 for an outage).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

T = TypeVar("T")

# botocore's own retries stay on, deliberately, with its standard mode's 3 tries: they redo one part of a
# multipart transfer in place within seconds, where ours (around each call) would restart the whole file;
# ours wait out outages of minutes. The OpenAI client's are off (max_retries=0): ours are the only ones.
BOTOCORE_RETRIES = {"mode": "standard", "max_attempts": 3}


@dataclass(frozen=True)
class Policy:
    """When to try again: exponential waits with jitter, bounded by tries, by time, or both."""

    first_s: float = 0.5
    """The first wait; each next one doubles, up to ``cap_s``."""
    cap_s: float = 30.0
    """The longest wait between two tries (a server's Retry-After may ask for longer)."""
    attempts: int | None = None
    """Tries in all, the first included; None: as many as ``within_s`` allows."""
    within_s: float | None = None
    """Seconds from the first try after which no new try starts; a wait is cut to end there."""
    jitter: bool = True
    """Each wait times a random factor in [0.5, 1.5), so clients that failed together do not retry together."""

    def wait(self, tries: int, asked: float | None = None, elapsed: float = 0.0) -> float:
        """The wait after ``tries`` failed tries: the backoff, or ``asked`` (Retry-After) if longer,
        cut to end at ``within_s``."""
        wait = min(self.first_s * 2 ** (tries - 1), self.cap_s)
        if self.jitter:
            wait *= 0.5 + random.random()
        wait = max(wait, asked or 0.0)
        if self.within_s is not None:
            wait = min(wait, max(self.within_s - elapsed, 0.0))
        return wait

    def _stop(self):
        stops = [tenacity.stop_never]
        if self.attempts is not None:
            stops.append(tenacity.stop_after_attempt(self.attempts))
        if self.within_s is not None:
            stops.append(tenacity.stop_after_delay(self.within_s))
        return tenacity.stop_any(*stops)


@dataclass
class Retried:
    """What a retry saw: the last error's reason, the tries so far, the wait before the next one."""

    reason: str
    tries: int
    wait_s: float
    error: BaseException


def call(
    fn: Callable[[], T],
    policy: Policy,
    transient: Callable[[BaseException], str | None],
    give_up: Callable[[Retried], BaseException],
    on_retry: Callable[[Retried], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()`` until it returns; an error ``transient`` gives no reason for is raised at once; when the
    policy's tries or time are spent, ``give_up(last)`` is raised instead of the last error."""

    def worth_retrying(exc: BaseException) -> bool:
        return transient(exc) is not None

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception()
        return policy.wait(state.attempt_number, getattr(exc, "retry_after", None), state.seconds_since_start or 0.0)

    def seen(state: tenacity.RetryCallState) -> Retried:
        exc = state.outcome.exception()
        return Retried(transient(exc) or str(exc), state.attempt_number, state.upcoming_sleep, exc)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None:
            on_retry(seen(state))

    def gave_up(state: tenacity.RetryCallState):
        raise give_up(seen(state)) from None

    retrying = tenacity.Retrying(
        sleep=sleep,
        stop=policy._stop(),
        wait=wait,
        retry=tenacity.retry_if_exception(worth_retrying),
        before_sleep=before_sleep,
        retry_error_callback=gave_up,
        reraise=True,
    )
    return retrying(fn)
