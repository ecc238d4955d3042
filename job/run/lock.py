"""One run id, one writer: a lock held for a run's whole life.

A local output holds an ``flock`` on ``{run}/.lock`` (the kernel drops it when the process dies).
On S3 the lock is the object ``{run}/.lock``, created with a conditional write (``If-None-Match:
*``) and holding its holder and an expiry; a thread renews it (``If-Match`` its own ETag) while the
run lives, and a lock past its expiry (a run that died without releasing it), or one held by a
process of this host that is gone, may be taken over.
"""

from __future__ import annotations

import contextvars
import fcntl
import json
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_validator

from job.core.errors import JobError
from job.core.observability import get_logger
from job.core.parsing import ParseError, load_json, validated
from job.storage.store import LocalStorage, S3Storage, Storage

log = get_logger(__name__)
LOCK_KEY = ".lock"
MAX_LOCK_BYTES = 64 << 10


class RunLocked(JobError):
    """Another process holds the run's lock; the message names it (exit 1, nothing done)."""


def holder(run_id: str, lease_s: float) -> dict:
    now = time.time()
    return {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _iso(now),
        "expires": _iso(now + lease_s),
    }


def describe(record: dict) -> str:
    return f"host {record.get('host')} pid {record.get('pid')} since {record.get('started')}"


class LocalRunLock:
    def __init__(self, root: Path, run_id: str):
        self.path, self.run_id = Path(root) / LOCK_KEY, run_id
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            current = _parse(os.read(fd, 4096))
            os.close(fd)
            raise RunLocked(
                f"run {self.run_id} is already running ({describe(current)} holds {self.path}): "
                "wait for it to finish, or stop that process"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder(self.run_id, lease_s=0)).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class S3RunLock:
    def __init__(self, storage: S3Storage, run_id: str, lease_s: float):
        self.storage, self.run_id, self.lease_s = storage, run_id, lease_s
        self.client, self.bucket, self.key = storage.client, storage.bucket, storage.object_key(LOCK_KEY)
        self.etag: str | None = None
        self.stop = threading.Event()
        self.renewer: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def acquire(self) -> None:
        from botocore.exceptions import ClientError

        body = json.dumps(holder(self.run_id, self.lease_s)).encode()
        try:
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")["ETag"]
        except ClientError as exc:
            if not _precondition_failed(exc):
                raise
            self._take_over_if_stale(body)
        log.info("run_lock_acquired", lock=self.where, lease_s=self.lease_s)
        context = contextvars.copy_context()
        self.renewer = threading.Thread(target=context.run, args=(self._renew,), name="run-lock", daemon=True)
        self.renewer.start()

    def _take_over_if_stale(self, body: bytes) -> None:
        from botocore.exceptions import ClientError

        current = self.client.get_object(Bucket=self.bucket, Key=self.key)
        record = parse_lock_record(current["Body"].read(MAX_LOCK_BYTES + 1), self.where, self.run_id)
        if _timestamp(record["expires"]) > time.time() and _alive(record):
            raise RunLocked(
                f"run {self.run_id} is already running ({describe(record)} holds {self.where} until "
                f"{record.get('expires')}): wait for it to finish, or delete the lock if that run is gone"
            )
        try:  # If-Match: only one of several processes finding the same stale lock takes it over
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfMatch=current["ETag"])[
                "ETag"
            ]
        except ClientError as exc:
            if _precondition_failed(exc):
                raise RunLocked(f"run {self.run_id} was just taken over by another process ({self.where})") from None
            raise
        log.warning(
            "run_lock_taken_over", lock=self.where, stale_holder=describe(record), expired=record.get("expires")
        )

    def _renew(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self.stop.wait(self.lease_s / 3):
            body = json.dumps(holder(self.run_id, self.lease_s)).encode()
            try:
                reply = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfMatch=self.etag)
                self.etag = reply["ETag"]
            except ClientError as exc:
                if _precondition_failed(exc):
                    log.error("run_lock_lost", lock=self.where)
                    return
                log.warning("run_lock_renew_failed", lock=self.where, error=str(exc))
            except BotoCoreError as exc:  # an outage: the next tick tries again
                log.warning("run_lock_renew_failed", lock=self.where, error=type(exc).__name__)

    def release(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        if self.etag is None:  # never acquired: the lock (if any) is another process's
            return
        self.stop.set()
        if self.renewer is not None:
            self.renewer.join()
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except (BotoCoreError, ClientError) as exc:  # the lease runs out by itself
            log.warning("run_lock_release_failed", lock=self.where, error=type(exc).__name__)


class LockRecord(BaseModel):
    """The lock object's body (written by ``holder``)."""

    model_config = ConfigDict(extra="allow")
    run_id: str
    host: str
    pid: int
    started: str
    expires: str

    @field_validator("started", "expires")
    @classmethod
    def _a_time(cls, text: str) -> str:
        datetime.fromisoformat(text)  # a ValueError names the field
        return text


def parse_lock_record(data: bytes, where: str, run_id: str) -> dict:
    """A lock object's holder record; anything else is refused (exit 1) rather than guessed at."""
    hint = f": not a lock this job wrote; delete it if no run of {run_id} is running"
    try:
        if len(data) > MAX_LOCK_BYTES:
            raise ParseError(f"lock {where} holds more than {MAX_LOCK_BYTES} bytes")
        record = load_json(data, f"lock {where}")
        validated(LockRecord, record, f"lock {where}")
        _timestamp(record["expires"])
    except ParseError as exc:
        raise ParseError(f"{exc}{hint}") from None
    except (ValueError, OverflowError, OSError):  # a time outside what the platform represents
        raise ParseError(f"lock {where}: expires is not a usable time{hint}") from None
    return record


def run_lock(storage: Storage, run_id: str, lease_s: float) -> LocalRunLock | S3RunLock:
    if isinstance(storage, LocalStorage):
        return LocalRunLock(storage.root, run_id)
    return S3RunLock(storage, run_id, lease_s)


def _alive(record: dict) -> bool:
    """Whether the holder may still run: on another host we cannot tell (the lease decides); on this
    host a holder whose process is gone (a requeued job on the same node) is not."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return True
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _precondition_failed(exc) -> bool:
    error = exc.response.get("Error", {})
    return error.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _timestamp(text: str) -> float:
    """A checked record's time in seconds (a time without a zone is UTC)."""
    when = datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
