"""A hub dataset (``--data hf://datasets/ORG/NAME[@REVISION]``) fetched from a local server laid out as the hub
(its revision API and its resolve URLs): pinned to the commit the listing names, resumed, checked against the
listing's sha256 (LFS files) and git blob ids (small ones), and through ``finetune``."""

from __future__ import annotations

import hashlib
import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from job.data.hub_dataset import fetch_hub_dataset
from job.data.instructions import DataError
from job.data.sources import load_splits, resolve_source, source_digest
from job.storage.fetch import DownloadError
from tests.file_server import FileServer
from tests.helpers import cli, events

REPO = "tatsu-lab/alpaca-like"
COMMIT = "c0ffee" * 6 + "beef"
MOVED = "beef" * 10


def _parquet(rows: list[dict]) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


def _blob(body: bytes) -> str:
    return hashlib.sha1(f"blob {len(body)}\0".encode() + body).hexdigest()  # noqa: S324  (git's id)


def _files(book: list[dict]) -> dict[str, bytes]:
    return {
        "data/train-00000-of-00002.parquet": _parquet(book[:30]),
        "data/train-00001-of-00002.parquet": _parquet(book[30:60]),
        "data/validation-00000-of-00001.parquet": _parquet(book[60:72]),
        "data/test.jsonl": "".join(json.dumps(e) + "\n" for e in book[72:80]).encode(),
        "README.md": b"# a dataset card\n",
    }


def _listing(files: dict[str, bytes], commit: str) -> bytes:
    siblings = []
    for name, body in files.items():
        sibling = {"rfilename": name, "size": len(body), "blobId": _blob(body)}
        if name.endswith(".parquet"):  # the hub keeps Parquet in LFS: the listing states its sha256
            sibling |= {"blobId": "0" * 40, "lfs": {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}}
        siblings.append(sibling)
    return json.dumps({"id": REPO, "sha": commit, "siblings": siblings}).encode()


def _hub(files: dict[str, bytes], commit: str = COMMIT, listed: dict[str, bytes] | None = None) -> FileServer:
    served = {f"/datasets/{REPO}/resolve/{commit}/{name}": body for name, body in files.items()}
    served[f"/api/datasets/{REPO}/revision/main?blobs=true"] = _listing(listed or files, commit)
    return FileServer(served)


@pytest.fixture
def book(cache) -> list[dict]:
    return json.loads((cache / "instruction-data.json").read_text())


def test_a_hub_dataset_is_fetched_at_the_listings_commit_by_split_and_then_read_offline(book, cache, monkeypatch):
    files = _files(book)
    with _hub(files) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        source = resolve_source(f"hf://datasets/{REPO}", cache)
        asked = [path for path, _ in hub.requests]
    folder = cache / "hf" / "datasets" / REPO / "main"
    assert source.splits == (
        ("train", (folder / "data/train-00000-of-00002.parquet", folder / "data/train-00001-of-00002.parquet")),
        ("validation", (folder / "data/validation-00000-of-00001.parquet",)),
        ("test", (folder / "data/test.jsonl",)),
    )
    assert f"/datasets/{REPO}/resolve/{COMMIT}/README.md" not in asked  # not data: not fetched
    splits = load_splits(source)
    assert (splits.train, splits.val, splits.test) == (book[:60], book[60:72], book[72:80])
    # The hub gone, main moved: the cached listing still names the commit, so the same files are read.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    again = resolve_source(f"hf://datasets/{REPO}", cache)
    assert again == source and source_digest(again) == source_digest(source)
    only = resolve_source(f"hf://datasets/{REPO}", cache, data_split="validation")
    assert load_splits(only).train == book[60:70]  # the one split, cut 85/10/5 as a file is


def test_a_broken_transfer_resumes_and_a_wrong_byte_is_refused_against_the_listing(book, cache, monkeypatch):
    files = _files(book)
    train = f"/datasets/{REPO}/resolve/{COMMIT}/data/train-00000-of-00002.parquet"
    body = files["data/train-00000-of-00002.parquet"]
    part = cache / f"hf/datasets/{REPO}/main/data/train-00000-of-00002.parquet.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(body[:1000])  # a transfer that broke off, as the downloader leaves it
    with _hub(files) as hub:
        hub.faults[train].append("503")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        fetch_hub_dataset(f"hf://datasets/{REPO}", cache)
        assert hub.gets(train) == ["bytes=1000-", "bytes=1000-"]  # retried after the 503, resumed, not restarted
    assert (part.parent / "train-00000-of-00002.parquet").read_bytes() == body
    for name in ("data/validation-00000-of-00001.parquet", "data/test.jsonl"):
        other = cache / "other"
        damaged = dict(files, **{name: files[name][:-1] + b"\0"})
        with _hub(damaged, listed=files) as hub:
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            with pytest.raises(DownloadError) as info:
                fetch_hub_dataset(f"hf://datasets/{REPO}", other)
        relpath = f"hf/datasets/{REPO}/main/{name}"
        expected = "sha256 mismatch" if name.endswith(".parquet") else "what .* sent is of git blob"
        assert relpath in str(info.value) and re.search(expected, str(info.value)), info.value
        assert not (other / relpath).exists() and not (other / f"{relpath}.part").exists()


def test_a_listing_of_another_shape_a_path_outside_or_an_unknown_dataset_is_one_line(book, cache, monkeypatch):
    listing = f"/api/datasets/{REPO}/revision/main?blobs=true"
    cases = {
        json.dumps({"sha": COMMIT, "siblings": [{"rfilename": "../../escape.json"}]}): "a file outside",
        json.dumps({"sha": COMMIT, "siblings": [{"rfilename": "/etc/passwd.json"}]}): "a file outside",
        json.dumps({"sha": COMMIT, "siblings": [{"rfilename": "data/../../../escape.json"}]}): "a file outside",
        json.dumps({"sha": "main", "siblings": []}): "names no commit",
        json.dumps({"siblings": []}): "sha: Field required",
    }
    for number, (body, message) in enumerate(cases.items()):
        with FileServer({listing: body.encode()}) as hub:
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            with pytest.raises(DownloadError, match=message) as info:
                fetch_hub_dataset(f"hf://datasets/{REPO}", cache / str(number))
        assert "\n" not in str(info.value)
    assert not list((cache / "0").rglob("escape.json")) and not (cache.parent / "escape.json").exists()
    with FileServer({}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(DownloadError, match=f"{hub.url} has no dataset {REPO} at revision v2"):
            fetch_hub_dataset(f"hf://datasets/{REPO}@v2", cache)
    with _hub({"train.jsonl": _files(book)["data/test.jsonl"]}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(DataError, match=f"hub dataset hf://datasets/{REPO} has no test split .*it has: train"):
            resolve_source(f"hf://datasets/{REPO}", cache / "one", data_split="test")


def test_finetune_trains_on_a_hub_dataset_and_binds_its_files(book, cache, tiny_model_dir, tmp_path):
    with _hub(_files(book)) as hub:
        args = ("finetune", "--model-dir", tiny_model_dir, "--data", f"hf://datasets/{REPO}", "--cache", cache,
                "--output", tmp_path / "ft", "--log-format", "json", "--max-steps", "2", "--eval-freq", "2",
                "--eval-iter", "1", "--batch-size", "4")  # fmt: skip
        done = cli(*args, env={"HF_ENDPOINT": hub.url})
    assert done.returncode == 0, done.stderr[-2000:]
    start = next(e for e in events(done.stdout) if e["event"] == "finetune_start")
    assert (start["train_examples"], start["val_examples"]) == (60, 12)
    index = json.loads(next((tmp_path / "ft" / "checkpoints").glob("step-*/index.json")).read_text())
    binding = index["binding"]
    source = resolve_source(f"hf://datasets/{REPO}", cache)
    assert binding["data"] == {"file": f"hf://datasets/{REPO}", "sha256": source_digest(source)}


def test_hub_url_and_hf_token_name_the_hub_a_dataset_comes_from_over_hf_endpoint(book, cache, tiny_model_dir, tmp_path):
    """--hub-url (a site's own hub) is asked for the listing and the files, with --hf-token, and HF_ENDPOINT's
    hub never is; generate takes both too."""
    with _hub(_files(book)) as hub, FileServer({}) as other:
        hub.token = "hf_site"  # a gated dataset: every request without the token is refused
        args = ("finetune", "--model-dir", tiny_model_dir, "--data", f"hf://datasets/{REPO}", "--cache", cache,
                "--output", tmp_path / "ft", "--max-steps", "1", "--eval-freq", "1", "--eval-iter", "1",
                "--batch-size", "4", "--hub-url", hub.url, "--hf-token", "hf_site")  # fmt: skip
        done = cli(*args, env={"HF_ENDPOINT": other.url, "HF_TOKEN": "hf_elsewhere"})
        assert done.returncode == 0, done.stderr[-2000:]
        assert not other.requests and hub.requests
        assert set(hub.authorizations) == {"Bearer hf_site"}
        listing = json.loads((cache / "hf" / "datasets" / REPO / "main" / ".listing.json").read_text())
        assert listing["sha"] == COMMIT
        args = ("generate", "--model-dir", tmp_path / "ft" / "model", "--data", f"hf://datasets/{REPO}@v1",
                "--cache", cache, "--output", tmp_path / "gen", "--limit", "1", "--max-new-tokens", "2",
                "--hub-url", hub.url, "--hf-token", "hf_site")  # fmt: skip
        generated = cli(*args, env={"HF_ENDPOINT": other.url})
    assert generated.returncode == 1 and not other.requests
    assert generated.stderr.splitlines() == [
        f"Error: {hub.url} has no dataset {REPO} at revision v1 "
        f"(HTTP 404 from {hub.url}/api/datasets/{REPO}/revision/v1?blobs=true)"
    ]


def test_a_hub_dataset_comes_from_base_urls_mirror_of_the_cache_checked_against_its_listing(book, cache, monkeypatch):
    """A site without internet copies a cache to a mirror (--base-url): the listing and the files come from
    there, checked against the listing as the hub's are, and the hub is never asked."""
    with _hub(_files(book)) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        fetched = load_splits(resolve_source(f"hf://datasets/{REPO}", cache))
    folder = cache / "hf" / "datasets" / REPO / "main"
    mirrored = {f"/mirror/{p.relative_to(cache)}": p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with FileServer(mirrored) as mirror, FileServer({}) as gone:
        monkeypatch.setenv("HF_ENDPOINT", gone.url)
        source = resolve_source(f"hf://datasets/{REPO}", cache / "site", f"{mirror.url}/mirror")
        splits = load_splits(source)
        assert (splits.train, splits.val, splits.test) == (fetched.train, fetched.val, fetched.test)
        assert not gone.requests
        damaged = f"/mirror/hf/datasets/{REPO}/main/data/test.jsonl"
        mirror.files[damaged] = mirror.files[damaged].replace(b"a", b"b", 1)  # its size kept
        with pytest.raises(DownloadError, match="data/test.jsonl.*of git blob"):
            fetch_hub_dataset(f"hf://datasets/{REPO}", cache / "damaged", base_url=f"{mirror.url}/mirror")
    assert not (cache / "damaged" / "hf" / "datasets" / REPO / "main" / "data" / "test.jsonl").exists()
