"""An HTTP transport for the judge's clients that bounds each reply: its body in bytes, the whole
request in seconds (a server trickling a byte at a time included), and that turns a 429 or 503 with
``Retry-After`` into an error carrying the wait the server asked for.

It wraps the client library's own transport (``httpx`` for ollama, ``httpx2`` for openai: the same
API), so connection pooling, TLS and proxies stay the library's.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

MAX_REPLY_BYTES = 64 << 10
"""A judge's reply is one small JSON object; past this the request fails (nothing is kept)."""
MAX_RETRY_AFTER_S = 300.0
"""The longest wait a server's Retry-After may ask for; longer asks are cut to this."""


class ReplyError(Exception):
    """A reply the transport refused: too large, too slow, or a request to come back later."""

    retry_after: float | None = None


class ReplyTooLarge(ReplyError):
    pass


class ReplyTooSlow(ReplyError):
    pass


class RetryLater(ReplyError):
    def __init__(self, status: int, seconds: float):
        super().__init__(f"HTTP {status}, retry after {seconds:g}s")
        self.retry_after = seconds


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After``'s wait in seconds (delta-seconds or an HTTP date), within 0..300; None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= 10:
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def bounded_transport(httpx_module, timeout_s: float, paths: tuple[str, ...], max_bytes: int = MAX_REPLY_BYTES):
    """A transport of ``httpx_module`` whose requests to a path ending in one of ``paths`` take at most
    ``timeout_s`` in all and read at most ``max_bytes`` of reply; other requests pass through."""

    class BoundedStream(httpx_module.SyncByteStream):
        def __init__(self, inner, deadline: float):
            self.inner, self.deadline = inner, deadline

        def __iter__(self):
            received = 0
            for chunk in self.inner:
                received += len(chunk)
                if received > max_bytes:
                    raise ReplyTooLarge(f"reply over {max_bytes // 1024} KB")
                if time.monotonic() > self.deadline:
                    raise ReplyTooSlow(f"reply not complete within {timeout_s:g}s")
                yield chunk

        def close(self):
            self.inner.close()

    class BoundedTransport(httpx_module.BaseTransport):
        def __init__(self):
            self.inner = httpx_module.HTTPTransport()

        def handle_request(self, request):
            if not request.url.path.endswith(paths):
                return self.inner.handle_request(request)
            deadline = time.monotonic() + timeout_s
            # Each socket read waits at most the whole budget; the stream checks the deadline between reads.
            request.extensions["timeout"] = dict.fromkeys(("connect", "read", "write", "pool"), timeout_s)
            response = self.inner.handle_request(request)
            wait = retry_after_seconds(response.headers.get("retry-after"))
            if response.status_code in (429, 503) and wait is not None:
                response.close()
                raise RetryLater(response.status_code, wait)
            return httpx_module.Response(
                status_code=response.status_code,
                headers=response.headers,
                stream=BoundedStream(response.stream, deadline),
                extensions=response.extensions,
            )

        def close(self):
            self.inner.close()

    return BoundedTransport()
