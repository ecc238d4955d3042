"""The job's log lines as they reach a stream that several processes share."""

from __future__ import annotations

import io
import json

import structlog

from job.core.observability import configure_logging


class Writes(io.StringIO):
    """A stream that keeps each ``write`` call apart, as the processes sharing a pipe see them."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_each_json_record_reaches_the_stream_in_one_write_with_its_newline():
    """One write per record: on a pipe that a node's processes share, another process's line can land
    only between records, never between a record and its newline (tqdm.write writes them apart)."""
    stream = Writes()
    configure_logging("json", stream=stream)
    try:
        log = structlog.get_logger("test")
        log.info("first", step=1)
        log.warning("second", text="x" * 3000)
    finally:
        structlog.reset_defaults()
    assert len(stream.calls) == 2 and all(call.endswith("\n") and call.count("\n") == 1 for call in stream.calls)
    assert [json.loads(call)["event"] for call in stream.calls] == ["first", "second"]
