"""Fetching files into a folder over HTTP(S), S3 or a local path: resumable, retried, verified, atomic.

What to fetch is a ``RemoteFile``: its place under the folder (the cache), its URLs in order, and what it must
be (a known sha256 or size, a content check). The ``Downloader`` resumes a partial file (``.part`` + HTTP
Range), retries outages with the one retry policy (exit 75 past it), verifies, and renames into place only
when whole; a file already complete is never fetched again. Also the preflight's probe of a host and its one
line naming every piece a cache lacks with its way in (README: Without internet).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import requests

from job.core import retry
from job.core.errors import JobError, TransientError
from job.core.observability import Metrics, get_logger, stderr_is_terminal
from job.core.parsing import ParseError, load_json, read_bounded
from job.core.retry import BOTOCORE_RETRIES, Policy, Retried
from job.storage.store import sha256_file

log = get_logger(__name__)

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
CHUNK = 1 << 20
MAX_JSON_BYTES = 64 << 20  # a model's largest JSON file is its tokenizer.json (Qwen3's: 11 MB)
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(JobError):
    """A file could not be fetched or did not verify; the message is one line."""


class HostNotFound(DownloadError):
    """A host's name did not resolve past the retries: this machine has no internet (exit 1)."""


class NotFound(DownloadError):
    """The file is at none of its URLs (HTTP 404, no such S3 key or local file)."""


class DownloadUnavailable(TransientError):
    """Every source failed with transient errors (dropped connections, timeouts, 5xx) past the retries."""


class Retryable(Exception):
    """Worth retrying: a dropped connection, a timeout, a 5xx or 429."""


class HostUnknown(Retryable):
    """The host's name does not resolve. Retried (a DNS blip passes), but past the retries it is a machine
    without internet, not an outage to wait out: exit 1 naming the ways in, so Slurm does not requeue it."""


def _name_unresolved(exc: BaseException | None) -> bool:
    """Whether a connection error comes from a name that does not resolve (``socket.gaierror`` below
    requests' and urllib3's wrappers)."""
    for _ in range(10):
        if exc is None:
            return False
        if isinstance(exc, socket.gaierror):
            return True
        nested = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
        exc = getattr(exc, "reason", None) or exc.__cause__ or nested or exc.__context__
    return False


def _retryable(exc: BaseException) -> str | None:
    return str(exc) if isinstance(exc, Retryable) else None


class Stated(NamedTuple):
    """What a source says of a file beside its bytes: its sha256 (the hub's, for its large files) and the
    repository commit it comes from (the hub's ``X-Repo-Commit``)."""

    sha256: str | None = None
    commit: str | None = None


class Stream(NamedTuple):
    """An opened download: the file's total size, whether it starts at the offset asked, its bytes, and
    what the source states of it."""

    total: int | None
    resumed: bool
    chunks: Iterator[bytes]
    stated: Stated = Stated()


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: where it goes in the cache and where it may come from, in order."""

    relpath: str
    urls: tuple[str, ...]
    sha256: str | None = None
    size: int | None = None
    way_in: str = ""
    """The option that replaces this download (``--data FILE``), named when it cannot be fetched."""
    token_prefix: str | None = None
    """URLs under this prefix (the hub's) are sent the Downloader's token; a mirror's never are."""
    check: Callable[[Path], str | None] | None = None
    """What the file must hold beyond its hash (a JSON object...): the problem with a copy, or None."""


def json_object_problem(path: Path) -> str | None:
    """Why a model's JSON file (config, tokenizer, index) is not a JSON object, or None: a hub or a proxy
    that answers with a login page (HTTP 200) must not leave it in the cache, where it would be read as
    the file on every rerun."""
    try:
        data = read_bounded(path, MAX_JSON_BYTES, path.name)
        if data.lstrip()[:1] == b"<":
            return "an HTML page, not JSON"
        value = load_json(data, path.name)
    except OSError as exc:
        return f"not readable: {exc.strerror or exc}"
    except ParseError as exc:  # "config.json is not JSON: ..." -> "not JSON: ..."
        return re.sub(rf"^{re.escape(path.name)}(: | is )", "", str(exc))
    return None if isinstance(value, dict) else "JSON but not an object"


@dataclass(frozen=True)
class Needed:
    """A piece of a run that the cache lacks: what it is, its files, and the way in without a download."""

    what: str
    files: tuple[RemoteFile, ...]
    way_in: str


PROBE = Policy(first_s=0.5, cap_s=1.0, attempts=3)  # a blip passes; no network ends in seconds


def host_fails(url: str, timeout_s: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> Retryable | None:
    """Why ``url``'s host gives no answer to a request (through the environment's proxies, as downloads go; 3
    tries within about 2 s): ``HostUnknown`` where its name does not resolve, else ``Retryable``; None where it
    answers at all (any HTTP status). Only http(s) is asked: an S3 mirror's errors are the download's own."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return None

    def ask() -> None:
        try:
            requests.head(url, timeout=timeout_s, allow_redirects=False).close()
        except (requests.ConnectionError, requests.Timeout) as exc:
            if _name_unresolved(exc):
                raise HostUnknown(f"host {parsed.hostname} not found") from None
            raise Retryable(f"no answer from {parsed.netloc} ({type(exc).__name__})") from None

    try:
        retry.call(ask, PROBE, _retryable, lambda last: last.error, sleep=sleep)
    except Retryable as exc:
        return exc
    return None


def check_reachable(needed: list[Needed], cache: Path) -> None:
    """Where the cache lacks pieces whose hosts give no answer, one line names every such piece with its way in,
    before anything waits (retries, the judge): a first run offline learns all it must bring at once, not one
    piece per try. Names that do not resolve are a machine without internet (exit 1, as a download's); a host
    that resolves but does not answer may be an outage, so that line is exit 75 (rerun, or bring the files)."""
    failed: dict[str, Retryable | None] = {}
    for piece in needed:
        url = piece.files[0].urls[0]
        host = urlparse(url).netloc or url
        if host not in failed:
            failed[host] = host_fails(url)
    unreachable = [p for p in needed if failed[urlparse(p.files[0].urls[0]).netloc or p.files[0].urls[0]]]
    if not unreachable:
        return
    reasons = [why for why in failed.values() if why]
    pieces = _listed(unreachable)
    message = (
        f"the cache {cache} lacks pieces this run needs and their hosts cannot be reached "
        f"({'; '.join(map(str, reasons))}): {pieces}; or --base-url URL, a mirror laid out like the cache "
        "(README: Without internet)"
    )
    if all(isinstance(why, HostUnknown) for why in reasons):
        raise DownloadError(message)
    raise DownloadUnavailable(f"{message}; or rerun once the hosts answer")


def file_problem(path: Path, remote: RemoteFile) -> str | None:
    """What is wrong with a cached copy of ``remote`` (its size, its hash, its content), or None: it is complete."""
    if remote.size is not None and path.stat().st_size != remote.size:
        return f"{path.stat().st_size} bytes, not {remote.size}"
    if remote.sha256 is not None and sha256_file(path) != remote.sha256.lower():
        return "not the known file's sha256"
    return remote.check(path) if remote.check is not None else None


def cached_whole(cache: Path, remote: RemoteFile) -> bool:
    """The file is in the cache and holds what it must, as the downloader checks it (a damaged one is the
    downloader's to name and fetch again)."""
    path = cache / remote.relpath
    return path.is_file() and file_problem(path, remote) is None


def damaged_files(cache: Path, files) -> list[str]:
    """Each of ``files`` that the cache holds but damaged: its path and what is wrong with it."""
    found = [(cache / f.relpath, f) for f in files if (cache / f.relpath).is_file()]
    return [f"{path} ({why})" for path, f in found if (why := file_problem(path, f)) is not None]


def check_local_inputs(absent: list[str], needed: list[Needed], cache: Path) -> None:
    """Local files the run reads that are not there are bad input (exit 1, nothing a rerun changes): one line
    names them and every piece the cache lacks too, before any host is asked."""
    if not absent:
        return
    lacking = f"; the cache {cache} also lacks: {_listed(needed)} (README: Without internet)" if needed else ""
    raise DownloadError("; ".join(absent) + lacking)


def _listed(needed: list[Needed]) -> str:
    return "; ".join(f"{p.what}: {p.way_in}" for p in needed)


def mirror_urls(base_url: str | None, relpath: str, defaults: tuple[str, ...]) -> tuple[str, ...]:
    return (f"{base_url.rstrip('/')}/{relpath}",) if base_url else defaults


def _damaged(cache: Path, final: Path, why: str, reason: str) -> DownloadError:
    """A cached file that is not what it must be, and no source gave a good copy: what to remove and why
    (a hub model's whole folder: its files are one commit's, which its ``.commit`` records)."""
    hub_model = final.relative_to(cache).parts[0] == "hf"
    remove = f"remove {final.parent} to fetch them again" if hub_model else "replace it"
    return DownloadError(
        f"cached {final} is damaged ({why}) and no good copy could be fetched ({reason[:100]}): "
        f"{remove}, or pass --base-url with a mirror"
    )


def _ways_in(cache: Path, remote: RemoteFile) -> str:
    """Every way to run without this download, for the one line a failed fetch ends with."""
    ways = [remote.way_in] if remote.way_in else []
    ways += ["--base-url URL (a mirror of the cache)", f"the file copied to {cache / remote.relpath}"]
    return f"without internet, use {', '.join(ways[:-1])} or {ways[-1]}"


def _open_file(path: str, offset: int):
    """A local file (a mirror on a shared disk) as ``Downloader._open`` returns a stream."""
    if not os.path.isfile(path):
        raise NotFound(f"no file at {path}")
    total = os.path.getsize(path)

    def chunks():
        with open(path, "rb") as f:
            f.seek(offset)
            while block := f.read(CHUNK):
                yield block

    return Stream(total, True, chunks())


def _stated(resp: requests.Response) -> Stated:
    """What the hub says of a file, as huggingface_hub reads it: the sha256 of a large file it redirects to
    its CDN (``X-Linked-Etag`` on the redirect), so the CDN's bytes are checked against the hub's word, and
    the commit the revision's name resolved to (``X-Repo-Commit``). A hash is hex in either case (read as
    lower case, as huggingface_hub compares it); a value of another form is not used."""
    sha256 = commit = None
    for answer in (*resp.history, resp):
        etag = answer.headers.get("X-Linked-Etag", "").removeprefix("W/").strip('"')
        sha256 = sha256 or (etag.lower() if SHA256_RE.fullmatch(etag) else None)
        named = answer.headers.get("X-Repo-Commit", "")
        commit = commit or (named if COMMIT_RE.fullmatch(named) else None)
    return Stated(sha256, commit)


def _verify(part: Path, remote: RemoteFile, url: str, stated: str | None = None) -> None:
    """The file's size and sha256 against the known ones, else against the hash its source ``stated``."""
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        part.unlink()
        raise DownloadError(f"{remote.relpath}: size mismatch from {url}: got {size} bytes, expected {remote.size}")
    expected = (remote.sha256 or stated or "").lower() or None
    if expected is not None:
        actual = sha256_file(part)
        if actual != expected:
            part.unlink()
            whose = "" if remote.sha256 else " (the hub's X-Linked-Etag)"
            raise DownloadError(
                f"{remote.relpath}: sha256 mismatch from {url}: got {actual}, expected {expected}{whose}"
            )


def _check_content(part: Path, remote: RemoteFile, url: str) -> None:
    """The downloaded file holds what it must (a JSON object...), else it is removed: a page answered in
    its place (HTTP 200) is never cached."""
    problem = remote.check(part) if remote.check is not None else None
    if problem is not None:
        part.unlink()
        raise DownloadError(f"{remote.relpath}: what {url} sent is {problem}, not the file; nothing was kept")


def _refused(status: int, url: str, token: str | None, code: str = "") -> DownloadError:
    """The error of an HTTP answer that no retry changes."""
    if status == 404:  # the hub says what is missing (RevisionNotFound, EntryNotFound...), as huggingface_hub reads it
        return NotFound(f"HTTP 404 from {url}" + (f" ({code})" if code else ""))
    if status in (401, 403):
        hint = "gated: accept its license on the hub, then set HF_TOKEN" if token is None else "token refused"
        return DownloadError(f"HTTP {status} from {url} ({hint})")
    return DownloadError(f"HTTP {status} from {url}")


@dataclass
class Downloader:
    """Fetches ``RemoteFile``s into ``cache``; a file already complete there is never fetched again."""

    cache: Path
    attempts: int = 5
    """Tries per URL for transient errors; each try resumes where the last stopped."""
    backoff_seconds: float = 1.0
    """First wait between tries; doubled each time, with jitter."""
    timeout_seconds: float = 60.0
    metrics: Metrics | None = None
    token: str | None = None
    """Bearer token for the URLs a RemoteFile's ``token_prefix`` names (the hub's); never logged."""
    sleep: Callable[[float], None] = time.sleep
    commits: dict[str, str] = field(default_factory=dict)
    """The repository commit each file fetched came from, where its source said (the hub does)."""
    _s3: object = None

    def __post_init__(self) -> None:
        self.cache = Path(self.cache)

    def fetch_all(self, files: list[RemoteFile]) -> list[Path]:
        return [self.fetch(f) for f in files]

    def fetch(self, remote: RemoteFile) -> Path:
        final = self.cache / remote.relpath
        damaged = file_problem(final, remote) if final.is_file() else None
        if final.is_file() and not damaged:
            log.debug("download_skipped", file=remote.relpath, reason="complete")
            return final
        if damaged:  # kept in place until a good copy replaces it, so a rerun offline names it again
            log.warning("cache_file_damaged", file=str(final), problem=damaged)
        final.parent.mkdir(parents=True, exist_ok=True)
        part = final.with_name(final.name + ".part")
        errors, outages, unreachable, missing = [], 0, 0, 0
        for url in remote.urls:
            try:
                stated = self._fetch_with_retries(url, part, remote)
                _verify(part, remote, url, stated.sha256)
                _check_content(part, remote, url)
                if stated.commit is not None:
                    self.commits[remote.relpath] = stated.commit
                os.replace(part, final)
                log.info("download_done", file=remote.relpath, url=url, bytes=final.stat().st_size)
                return final
            except (DownloadError, DownloadUnavailable) as exc:
                errors.append(str(exc))
                outages += isinstance(exc, DownloadUnavailable)
                unreachable += isinstance(exc, DownloadUnavailable | HostNotFound)
                missing += isinstance(exc, NotFound)
        if damaged:  # no rerun fixes this offline: the file must be replaced by hand or from a mirror
            raise _damaged(self.cache, final, damaged, errors[-1].split(";")[0].removeprefix(f"{remote.relpath}: "))
        # Only outages everywhere are worth a rerun (exit 75); a 404, a bad hash or no DNS is not.
        kind = DownloadUnavailable if outages == len(errors) else NotFound if missing == len(errors) else DownloadError
        ways_in = f"; {_ways_in(self.cache, remote)}" if unreachable else ""
        raise kind("; ".join(errors) + ways_in)

    def _fetch_with_retries(self, url: str, part: Path, remote: RemoteFile) -> Stated:
        """Tries resume the partial file; an outage past ``attempts`` is DownloadUnavailable (exit 75).
        Returns what the source stated of the file."""

        def give_up(last: Retried) -> JobError:
            host, reason = urlparse(url).netloc or url, last.reason.split(" for ")[0].split(" from ")[0]
            if isinstance(last.error, HostUnknown):
                return HostNotFound(f"{remote.relpath}: host {host} not found after {last.tries} tries")
            return DownloadUnavailable(f"{remote.relpath}: giving up on {host} after {last.tries} tries ({reason})")

        def on_retry(last: Retried) -> None:
            log.warning(
                "download_retry",
                file=remote.relpath,
                url=url,
                attempt=last.tries,
                error=last.reason,
                wait_s=round(last.wait_s, 2),
            )

        policy = Policy(first_s=self.backoff_seconds, cap_s=60.0, attempts=self.attempts)

        def once() -> Stated:
            return self._fetch_once(url, part, remote)

        return retry.call(once, policy, _retryable, give_up, on_retry, self.sleep)

    def _fetch_once(self, url: str, part: Path, remote: RemoteFile) -> Stated:
        offset = part.stat().st_size if part.exists() else 0
        token = self.token if remote.token_prefix and url.startswith(remote.token_prefix) else None
        total, resumed, chunks, stated = self._open(url, offset, token)
        if not resumed:
            offset = 0
        if total is not None and offset == total:
            return stated
        with open(part, "ab" if resumed else "wb") as out, self._progress(remote.relpath, total, offset) as advance:
            expected_end = total
            try:
                for chunk in chunks:
                    out.write(chunk)
                    advance(len(chunk))
                    if self.metrics:
                        self.metrics.download_bytes_total.inc(len(chunk))
            except (requests.RequestException, OSError) as exc:
                raise Retryable(f"transfer broke off: {type(exc).__name__}") from None
        size = part.stat().st_size
        if expected_end is not None and size < expected_end:
            raise Retryable(f"transfer ended at {size} of {expected_end} bytes")
        if expected_end is not None and size > expected_end:
            part.unlink()
            raise DownloadError(
                f"{remote.relpath}: size mismatch from {url}: got {size} bytes, server said {expected_end}"
            )
        return stated

    def _open(self, url: str, offset: int, token: str | None = None) -> Stream:
        """The file from ``offset`` on; ``token`` is sent as a bearer."""
        scheme = urlparse(url).scheme
        if scheme in ("http", "https"):
            return self._open_http(url, offset, token)
        if scheme == "s3":
            return self._open_s3(url, offset)
        if scheme in ("", "file"):
            return _open_file(urlparse(url).path if scheme else url, offset)
        raise DownloadError(f"unsupported URL scheme in {url}")

    def _open_http(self, url: str, offset: int, token: str | None = None):
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if token:  # requests drops it on a redirect to another host (the hub's CDN)
            headers["Authorization"] = f"Bearer {token}"
        try:
            resp = requests.get(url, headers=headers, stream=True, timeout=self.timeout_seconds)
        except (requests.ConnectionError, requests.Timeout) as exc:
            kind = HostUnknown if _name_unresolved(exc) else Retryable
            raise kind(f"{type(exc).__name__} for {url}") from None
        if resp.status_code == 416 and offset:  # the part file is already whole (or longer)
            resp.close()
            return Stream(offset, True, iter(()), _stated(resp))
        if resp.status_code in TRANSIENT_HTTP:
            resp.close()
            raise Retryable(f"HTTP {resp.status_code} from {url}")
        if resp.status_code not in (200, 206):
            resp.close()
            code = resp.headers.get("X-Error-Code", "")
            raise _refused(resp.status_code, url, token, code if re.fullmatch(r"[A-Za-z]{1,40}", code) else "")
        resumed = resp.status_code == 206
        length = resp.headers.get("Content-Length")
        if resumed:
            content_range = resp.headers.get("Content-Range", "")
            total = (
                int(content_range.rsplit("/", 1)[1])
                if "/" in content_range and not content_range.endswith("*")
                else None
            )
        else:
            total = int(length) if length is not None else None
        return Stream(total, resumed, resp.iter_content(CHUNK), _stated(resp))

    def _open_s3(self, url: str, offset: int):
        import botocore.exceptions

        parsed = urlparse(url)
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        client = self._s3_client()
        try:
            if offset:
                resp = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-")
            else:
                resp = client.get_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code == "InvalidRange" and offset:
                return Stream(offset, True, iter(()))
            if status >= 500:
                raise Retryable(f"S3 {code or status} for {url}") from None
            if code == "NoSuchKey" or status == 404:
                raise NotFound(f"S3 {code or status} for {url}") from None
            raise DownloadError(f"S3 {code or status} for {url}") from None
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError) as exc:
            kind = HostUnknown if _name_unresolved(exc) else Retryable
            raise kind(f"{type(exc).__name__} for {url}") from None
        content_range = resp.get("ContentRange")
        total = int(content_range.rsplit("/", 1)[1]) if content_range else resp["ContentLength"]
        return Stream(total, bool(offset), resp["Body"].iter_chunks(CHUNK))

    def _s3_client(self):
        if self._s3 is None:
            import boto3
            from botocore.config import Config

            self._s3 = boto3.client("s3", config=Config(retries=BOTOCORE_RETRIES))
        return self._s3

    def _progress(self, name: str, total: int | None, initial: int):
        return _Progress(name, total, initial, bar=stderr_is_terminal())


class _Progress:
    """A tqdm bar on a terminal; otherwise a JSON event every 10% (or 100 MiB when size is unknown)."""

    def __init__(self, name: str, total: int | None, initial: int, bar: bool):
        self.name, self.total, self.done, self.bar = name, total, initial, None
        self.next_report = initial
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name)

    def __enter__(self):
        return self.advance

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_report:
            log.info("download_progress", file=self.name, bytes=self.done, total=self.total)
            step = self.total // 10 if self.total else 100 << 20
            self.next_report = self.done + max(step, 1)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
