"""One stage of a run, kept on record: skipped when the manifest marks it complete and its artifacts
still verify; else its start, its artifacts (uploaded first, then recorded with size and sha256), its
end or its failure go to the manifest and the metrics; and where the run stopped, and why."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from job.core.errors import Interrupted, stopped_by_signal
from job.core.observability import Metrics, MetricsPublisher, StageStatus, bind, get_logger
from job.run.manifest import Manifest, now
from job.storage.store import Storage, sha256_file

log = get_logger(__name__)


class StageRecorder:
    """Runs the stages of one run against its manifest (the main process's duty)."""

    def __init__(self, manifest: Manifest, storage: Storage, work: Path, metrics: Metrics):
        self.manifest, self.storage, self.work, self.metrics = manifest, storage, work, metrics
        self.publisher: MetricsPublisher | None = None  # pushed at each stage's end, where there is one
        self.current: str | None = None  # the stage (or step) running now
        self.last_done: str | None = None  # the last one done, or skipped as done

    def is_done(self, name: str, done: Callable[[], bool] | None = None) -> bool:
        """The manifest marks the stage complete and ``done`` (default: its artifacts' sha256 still match)
        confirms it."""
        return (
            self.manifest.stage(name).get("status") == "complete" and (done or (lambda: self.manifest.verified(name)))()
        )

    def run(self, name: str, body: Callable[[], list[str] | None], done: Callable[[], bool] | None = None) -> None:
        """``body`` (which returns its artifacts' keys) unless ``is_done`` says the stage is done."""
        bind(stage=name)
        m = self.metrics
        if self.is_done(name, done):
            log.info("stage_skipped", reason="complete in manifest, artifacts verified")
            m.stage_status.labels(stage=name).set(StageStatus.DONE)
            self.last_done = name
            return
        started = time.perf_counter()
        m.stage_status.labels(stage=name).set(StageStatus.RUNNING)
        self.current = name
        # A rerun starts the stage afresh: the last attempt's error goes (attempts counts them all).
        attempts = self.manifest.stage(name).get("attempts", 0) + 1
        self.manifest.record(
            name, status="running", start=now(), end=None, duration_s=None, error=None, attempts=attempts
        )
        log.info("stage_start")
        try:
            records = self._upload(body() or [])
        except BaseException as exc:
            m.stage_status.labels(stage=name).set(StageStatus.FAILED)
            status = "interrupted" if stopped_by_signal(exc) else "failed"
            seconds = round(time.perf_counter() - started, 3)  # written with the run's stop, below
            self.manifest.update(name, status=status, end=now(), duration_s=seconds, error=_one_line(exc))
            raise
        finally:
            m.stage_duration_seconds.labels(stage=name).set(time.perf_counter() - started)
        m.stage_status.labels(stage=name).set(StageStatus.DONE)
        self.current, self.last_done = None, name
        seconds = round(time.perf_counter() - started, 3)
        self.manifest.record(name, status="complete", end=now(), duration_s=seconds, artifacts=records)
        log.info("stage_done", seconds=seconds, artifacts=len(records))
        if self.publisher is not None:
            self.publisher.push()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A step of the run that is no stage of the manifest's (the report): where a stop is said to be."""
        self.current = name
        yield
        self.current, self.last_done = None, name

    def _upload(self, keys: list[str]) -> dict:
        records = {}
        for key in keys:
            local = self.work / key
            written = self.storage.put_file(local, key)
            if not self.storage.is_local_path(local, key):
                self.metrics.artifact_bytes_uploaded_total.inc(written)
            records[key] = {"size": local.stat().st_size, "sha256": sha256_file(local)}
        return records

    def record_stop(self, exc: BaseException) -> None:
        """The manifest says where the run stopped and why (a signal: interrupted; else failed), and the
        stage it stopped in (one write, with a short wait for the store at most)."""
        if isinstance(exc, Interrupted) and exc.where is None:  # the stage or step it came in
            exc.where = self.current
        where = {"stage": self.current} if self.current else {"after": self.last_done}
        stopped = {**where, "error": _one_line(exc), "at": now()}
        status = "interrupted" if stopped_by_signal(exc) else "failed"
        self.manifest.record_failure(status=status, stopped=stopped)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
