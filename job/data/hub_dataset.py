"""A hub dataset (``--data hf://datasets/ORG/NAME[@REVISION]``) fetched into the cache as the hub's models are:
the revision's listing asked for once (it names the commit the revision stands at, and is kept in the cache,
so every file and every rerun is that commit's), each data file from that commit by the downloader
(resumable, retried), checked against the sha256 the listing states for a large (LFS) file, or the git blob
id it states for a small one.

    {cache}/hf/datasets/ORG/NAME/REVISION/.listing.json   the hub's answer: the commit and its files
    {cache}/hf/datasets/ORG/NAME/REVISION/data/train-00000-of-00001.parquet ...
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import pydantic

from job.core.parsing import ParseError, load_json, read_bounded, validated
from job.data.instructions import DataError
from job.data.sources import SPLITS, files_by_split, parse_hub_dataset
from job.models.hub import hub_url
from job.models.origin import HubAccess
from job.storage.fetch import (
    COMMIT_RE,
    Downloader,
    DownloadError,
    NotFound,
    RemoteFile,
    json_object_problem,
    mirror_urls,
)

LISTING = ".listing.json"
MAX_LISTING_BYTES = 64 << 20
WAY_IN = "--data FILE or FOLDER (the dataset's files, copied by hand)"
Mirror = Callable[[str, tuple[str, ...]], tuple[str, ...]]  # (relpath, the hub's URLs) -> where to fetch from


class _Lfs(pydantic.BaseModel):
    sha256: str
    size: int


class _Sibling(pydantic.BaseModel):
    rfilename: str
    size: int | None = None
    blobId: str | None = None  # noqa: N815  (the hub's name)
    lfs: _Lfs | None = None


class _Listing(pydantic.BaseModel):
    sha: str
    siblings: list[_Sibling]


def fetch_hub_dataset(
    data: str, cache: Path, data_split: str | None = None, access: HubAccess | None = None, base_url: str | None = None
) -> dict[str, tuple[Path, ...]]:
    """The hub dataset's data files in the cache, by split (shards in name order; only ``data_split``'s where
    given), from the hub ``access`` names (else HF_ENDPOINT's) or from ``base_url``'s mirror of the cache. A
    repository with one data file and no split in its name is its train split."""
    repo, revision = parse_hub_dataset(data)
    hub, folder = hub_url(access and access.hub_url), f"hf/datasets/{repo}/{revision}"
    downloader = Downloader(cache, token=(access and access.hf_token) or os.environ.get("HF_TOKEN") or None)
    mirror = functools.partial(mirror_urls, base_url)
    listing = _listing(downloader, hub, repo, revision, folder, mirror)
    commit = listing.sha
    siblings = {s.rfilename: s for s in listing.siblings}
    by_split, _unnamed = files_by_split(list(siblings), f"hub dataset {data}")
    if data_split and data_split not in by_split:
        have = ", ".join(s for s in SPLITS if s in by_split) or "none"
        raise DataError(f"hub dataset {data} has no {data_split} split (--data-split; it has: {have})")
    wanted = [data_split] if data_split else list(by_split)
    fetched = {}
    for split in wanted:
        remotes = [_remote(hub, repo, commit, folder, siblings[name], mirror) for name in by_split[split]]
        fetched[split] = tuple(downloader.fetch_all(remotes))
    return fetched


def _listing(downloader: Downloader, hub: str, repo: str, revision: str, folder: str, mirror: Mirror) -> _Listing:
    """The revision's listing (its commit and files with their hashes), fetched once and then read from the
    cache; a listing of another shape, or naming a file outside the repository, is refused."""
    url = f"{hub}/api/datasets/{repo}/revision/{quote(revision, safe='')}?blobs=true"
    relpath = f"{folder}/{LISTING}"
    urls = mirror(relpath, (url,))
    remote = RemoteFile(relpath, urls, way_in=WAY_IN, token_prefix=f"{hub}/", check=json_object_problem)
    try:
        path = downloader.fetch(remote)
    except NotFound as exc:
        raise DownloadError(f"{hub} has no dataset {repo} at revision {revision} ({exc})") from None
    what = f"the hub's listing of {repo} at {revision} ({path})"
    try:
        listing = validated(_Listing, load_json(read_bounded(path, MAX_LISTING_BYTES, what), what), what)
    except ParseError as exc:
        raise DownloadError(f"{exc}: remove it to ask the hub again") from None
    if not COMMIT_RE.fullmatch(listing.sha):
        raise DownloadError(f"{what} names no commit (40 hex digits): remove it to ask the hub again")
    for sibling in listing.siblings:
        parts = PurePosixPath(sibling.rfilename).parts
        if not parts or parts[0] == "/" or ".." in parts or "\\" in sibling.rfilename or parts[0].startswith("."):
            raise DownloadError(f"{what} names a file outside the dataset's folder: {sibling.rfilename[:80]!r}")
    return listing


def _remote(hub: str, repo: str, commit: str, folder: str, sibling: _Sibling, mirror: Mirror) -> RemoteFile:
    """One data file at the listing's commit: an LFS file checked by the sha256 and size the listing states,
    a small one by its git blob id."""
    relpath = f"{folder}/{sibling.rfilename}"
    urls = mirror(relpath, (f"{hub}/datasets/{repo}/resolve/{commit}/{quote(sibling.rfilename)}",))
    if sibling.lfs is not None:
        sha256 = sibling.lfs.sha256.lower()
        return RemoteFile(relpath, urls, sha256, sibling.lfs.size, WAY_IN, f"{hub}/")
    blob = (sibling.blobId or "").lower()
    return RemoteFile(relpath, urls, None, sibling.size, WAY_IN, f"{hub}/", check=lambda p: _blob_problem(p, blob))


def _blob_problem(path: Path, blob_id: str) -> str | None:
    """Why a small file is not the one the listing names by its git blob id (sha1 of ``blob SIZE\\0`` and the
    bytes), or None; a listing without one leaves the file unchecked but for its size."""
    if not blob_id:
        return None
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # noqa: S324  (git's id, not a security hash)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return None if digest.hexdigest() == blob_id else f"of git blob {digest.hexdigest()}, not {blob_id}"
