"""Where artifacts go: a local folder (atomic renames) or S3-compatible storage (boto3), one interface."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from job.core import retry
from job.core.errors import DiskFullError, JobError, TransientError
from job.core.observability import get_logger
from job.core.parsing import ParseError
from job.core.retry import BOTOCORE_RETRIES, Policy, Retried

log = get_logger(__name__)

CHUNK = 8 << 20


class StorageError(JobError):
    """Output storage that cannot be used; the message names the location."""


class StorageUnavailable(TransientError):
    """The object store kept failing past ``--s3-retry-timeout``; a rerun continues (exit 75)."""


TRANSIENT_S3_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling", "503", "500"}


def transient_reason(exc: BaseException) -> str | None:
    """Why ``exc`` is an outage worth waiting out (connection trouble, 5xx, throttling), or None."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return type(exc).__name__
    if isinstance(exc, ClientError):
        error, meta = exc.response.get("Error", {}), exc.response.get("ResponseMetadata", {})
        if error.get("Code") in TRANSIENT_S3_CODES or meta.get("HTTPStatusCode", 0) >= 500:
            return f"{error.get('Code')} (HTTP {meta.get('HTTPStatusCode')})"
        return None
    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return transient_reason(exc.__context__)
    return None


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """A temporary path beside ``final`` that is renamed onto it only if the block succeeds,
    so a reader never sees a half-written file under the final name."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and some writers) make 0600; give the usual mode
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(final: str | Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def read_progress(path: Path) -> dict[int, dict]:
    """A stage's JSON Lines progress file, keyed by each record's ``index``; a line torn by a kill (or
    not a record at all) is ignored: its entry is simply done again."""
    done: dict[int, dict] = {}
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError, ValueError):
                continue
            if isinstance(record, dict) and type(record.get("index")) is int:
                done[record["index"]] = record
    return done


MAX_TEXT_BYTES = 16 << 20  # a manifest, config or lock read back from storage: ours are KBs


def _text(data: bytes, where: str) -> str:
    if len(data) > MAX_TEXT_BYTES:
        raise ParseError(f"{where} holds more than {MAX_TEXT_BYTES >> 20} MB: not a file this job wrote")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError(f"{where} is not UTF-8 text: not a file this job wrote") from None


class UnsafeKeyError(JobError):
    """A key read from storage that would be written outside its folder (exit 1, nothing written)."""


def unsafe_key(key: str) -> bool:
    """Whether a key read from outside could name a place outside its folder: an absolute, empty,
    ``.`` or ``..`` part, a backslash or a NUL."""
    parts = key.split("/")
    return key.startswith("/") or "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts)


def contained_path(root: Path, key: str) -> Path:
    """``root / key`` for a ``key`` read from outside (a bucket's listing). An ``unsafe_key``, or one
    whose path passes through a symlink, would leave ``root`` or could: it is refused, naming the key."""
    parts = key.split("/")
    if unsafe_key(key) or any(Path(root).joinpath(*parts[:n]).is_symlink() for n in range(1, len(parts) + 1)):
        raise UnsafeKeyError(f"refusing storage key {key!r}: it would be written outside {root}")
    return Path(root).joinpath(*parts)


def ensure_room(folder: Path, needed: int, what: str) -> None:
    """Fail before writing ``what`` (about ``needed`` bytes) into ``folder`` where it cannot fit."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFullError(
            f"disk full: {folder} has {free / 1e6:.0f} MB free and {what} needs about {needed / 1e6:.0f} MB: "
            "free space (or point --output/--scratch elsewhere) and rerun"
        )


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def sha256_files(paths: list[Path]) -> list[str]:
    """Each file's sha256, several at once (hashlib lets go of the GIL on large blocks)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths)))) as pool:
        return list(pool.map(sha256_file, paths))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class Storage(Protocol):
    """Keys are relative paths ("model/config.json") under one root (a folder or s3://bucket/prefix)."""

    url: str

    def put_file(self, local: Path, key: str) -> int:
        """Store ``local`` under ``key``; returns the bytes written."""
        ...

    def put_text(self, key: str, text: str) -> None: ...

    def get_text(self, key: str) -> str | None:
        """The text under ``key``, or None where there is none; a ParseError names a key that holds more
        than ``MAX_TEXT_BYTES`` or no UTF-8 text."""
        ...

    def get_file(self, key: str, local: Path) -> None: ...

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix``."""
        ...

    def delete_prefix(self, prefix: str) -> None: ...

    def sha256(self, key: str) -> str | None:
        """The sha256 of what is stored under ``key`` (read back, not trusted from metadata), or None."""
        ...

    def check_writable(self) -> None:
        """Write and remove a probe; a StorageError says why not."""
        ...

    def is_local_path(self, local: Path, key: str) -> bool:
        """Whether ``key`` already is ``local`` (a local store working in place)."""
        ...

    def patience(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        """A block in which transient failures are retried for at most ``seconds``."""
        ...


class LocalStorage:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def is_local_path(self, local: Path, key: str) -> bool:
        return Path(local).resolve() == self._path(key).resolve()

    def put_file(self, local: Path, key: str) -> int:
        if not self.is_local_path(local, key):
            with atomic_path(self._path(key)) as tmp:
                shutil.copyfile(local, tmp)
        return self._path(key).stat().st_size

    def put_text(self, key: str, text: str) -> None:
        atomic_write_text(self._path(key), text)

    def get_text(self, key: str) -> str | None:
        path = self._path(key)
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            return _text(f.read(MAX_TEXT_BYTES + 1), f"{self.url}/{key}")

    def get_file(self, key: str, local: Path) -> None:
        if not self.is_local_path(local, key):
            with atomic_path(local) as tmp:
                shutil.copyfile(self._path(key), tmp)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")
        )

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def sha256(self, key: str) -> str | None:
        path = self._path(key)
        return sha256_file(path) if path.is_file() else None

    def patience(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:
            raise StorageError(f"output {self.root} is not writable: {exc.strerror or exc}") from None


class S3Storage:
    """S3 or any S3-compatible store (MinIO, Ceph): multipart transfers, botocore's standard retries,
    and around every operation our own retries with backoff for up to ``retry_timeout`` seconds, so
    an outage of minutes costs nothing; past that a StorageUnavailable (exit 75) names the store."""

    def __init__(self, url: str, endpoint_url: str | None = None, client=None, retry_timeout: float = 900.0):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        parsed = urlparse(url)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.url = url.rstrip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        self.retry_timeout = retry_timeout
        config = Config(retries=BOTOCORE_RETRIES, connect_timeout=10, read_timeout=120)
        self.client = client or boto3.client("s3", endpoint_url=self.endpoint_url, config=config)
        self.transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=8)

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    def object_key(self, key: str) -> str:
        """The bucket's key for a run-relative ``key``."""
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def patience(self, seconds: float) -> Iterator[None]:
        """Retry for at most ``seconds`` inside the block (the way out of a failed run must not wait long)."""
        saved, self.retry_timeout = self.retry_timeout, min(seconds, self.retry_timeout)
        try:
            yield
        finally:
            self.retry_timeout = saved

    def _retry(self, what: str, fn, *args, **kwargs):
        def give_up(last: Retried) -> StorageUnavailable:
            return StorageUnavailable(
                f"object store {self.where} failed for {self.retry_timeout:.0f}s ({what}: {last.reason}); "
                "the work done is kept in the scratch folder: rerun to resume"
            )

        def on_retry(last: Retried) -> None:
            log.warning("storage_retry", operation=what, error=last.reason, wait_s=round(last.wait_s, 2))

        policy = Policy(first_s=0.5, cap_s=30.0, within_s=self.retry_timeout)
        return retry.call(lambda: fn(*args, **kwargs), policy, transient_reason, give_up, on_retry)

    def is_local_path(self, local: Path, key: str) -> bool:
        return False

    def put_file(self, local: Path, key: str) -> int:
        upload = self.client.upload_file
        self._retry(f"upload {key}", upload, str(local), self.bucket, self.object_key(key), Config=self.transfer)
        return Path(local).stat().st_size

    def put_text(self, key: str, text: str) -> None:
        put = self.client.put_object
        self._retry(f"put {key}", put, Bucket=self.bucket, Key=self.object_key(key), Body=text.encode())

    def get_text(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        def get():
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))["Body"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            try:
                return body.read(MAX_TEXT_BYTES + 1)
            finally:
                body.close()

        data = self._retry(f"get {key}", get)
        return None if data is None else _text(data, f"{self.url}/{key}")

    def get_file(self, key: str, local: Path) -> None:
        def download():
            with atomic_path(local) as tmp:
                self.client.download_file(self.bucket, self.object_key(key), str(tmp), Config=self.transfer)

        self._retry(f"download {key}", download)

    def list(self, prefix: str) -> list[str]:
        def list_keys():
            keys, start = [], self.object_key(prefix)
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    keys.append(obj["Key"][len(self.prefix) + 1 :] if self.prefix else obj["Key"])
            return sorted(keys)

        return self._retry(f"list {prefix}", list_keys)

    def delete_prefix(self, prefix: str) -> None:
        keys = [self.object_key(k) for k in self.list(prefix)]
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]]}
            self._retry(f"delete {prefix}", self.client.delete_objects, Bucket=self.bucket, Delete=batch)

    def sha256(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        def read():
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))["Body"]
            except ClientError as exc:
                if transient_reason(exc):
                    raise
                return None
            digest = hashlib.sha256()
            for block in body.iter_chunks(CHUNK):
                digest.update(block)
            return digest.hexdigest()

        return self._retry(f"read {key}", read)

    def check_writable(self) -> None:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        # A quick client for the probe, so a wrong endpoint fails in seconds, not after long retries.
        probe = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=10),
        )
        where = self.where
        try:
            probe.head_bucket(Bucket=self.bucket)
            key = self.object_key(".sft-job-probe")
            probe.put_object(Bucket=self.bucket, Key=key, Body=b"")
            probe.delete_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket"):
                raise StorageError(f"output bucket {where} does not exist") from None
            raise StorageError(f"output {where} is not writable: {code or exc}") from None
        except NoCredentialsError:
            raise StorageError(
                f"no credentials for output {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            ) from None
        except BotoCoreError as exc:
            raise StorageError(f"cannot reach output {where}: {type(exc).__name__}") from None


def open_storage(url: str, endpoint_url: str | None = None, retry_timeout: float = 900.0) -> Storage:
    """``s3://bucket/prefix`` or a local folder."""
    if url.startswith("s3://"):
        if not urlparse(url).netloc:
            raise StorageError(f"output {url!r} names no bucket")
        return S3Storage(url, endpoint_url, retry_timeout=retry_timeout)
    if "://" in url:
        raise StorageError(f"output {url!r} must be a local folder or s3://bucket/prefix")
    return LocalStorage(url)


def upload_tree(
    storage: Storage,
    local_root: Path,
    prefix: str,
    on_bytes: Callable[[int], None] | None = None,
    last: str | None = None,
) -> list[str]:
    """Upload every file under ``local_root`` to ``prefix/``; ``last`` (a file name) goes up last,
    so its presence marks the whole tree as complete."""
    files = sorted(p for p in local_root.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)
    keys = []
    for path in files:
        key = f"{prefix}/{path.relative_to(local_root)}"
        written = storage.put_file(path, key)
        if on_bytes:
            on_bytes(written)
        keys.append(key)
    return keys
