import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict

from job.config import DownloadConfig
from job.data.book_datasets import DATASETS
from job.data.instructions import dataset_file
from job.models.hub import (
    HUB_HEAD_FILES,
    WEIGHTS_WAY_IN,
    fetch_model,
    hub_commit,
    model_downloader,
    model_files,
    tokenizer_files,
)
from job.models.llama_weights import INDEX
from job.models.registry import MODELS
from job.storage.fetch import Downloader, DownloadError, DownloadUnavailable, RemoteFile, _stated
from tests.file_server import FileServer
from tests.helpers import cli, free_port

BLOB = os.urandom(3 * (1 << 20) + 123)  # bigger than one chunk, so a cut lands mid-transfer


def _downloader(tmp_path, **kw):
    waits = []
    return Downloader(tmp_path / "cache", backoff_seconds=0.01, sleep=waits.append, **kw), waits


def test_cut_off_transfer_resumes_with_range(tmp_path):
    with FileServer({"/m/w.bin": BLOB}) as server:
        server.faults["/m/w.bin"].append("cut")
        dl, waits = _downloader(tmp_path)
        path = dl.fetch(RemoteFile("w.bin", (server.url + "/m/w.bin",), hashlib.sha256(BLOB).hexdigest()))
        assert path.read_bytes() == BLOB
        ranges = server.gets("/m/w.bin")
        assert ranges[0] is None and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) > 0
        assert len(waits) == 1
        assert not (tmp_path / "cache" / "w.bin.part").exists()


def test_503_is_retried_with_backoff(tmp_path):
    with FileServer({"/f": b"hello"}) as server:
        server.faults["/f"].extend(["503", "503"])
        dl, waits = _downloader(tmp_path)
        assert dl.fetch(RemoteFile("f", (server.url + "/f",))).read_bytes() == b"hello"
        assert len(server.gets("/f")) == 3
        # Exponential backoff with jitter: try n waits base * 2**(n-1) * [0.5, 1.5).
        assert len(waits) == 2 and 0.005 <= waits[0] < 0.015 and 0.01 <= waits[1] < 0.03


def test_hash_mismatch_is_a_clear_error_and_leaves_nothing(tmp_path):
    with FileServer({"/f": b"tampered"}) as server:
        dl, _ = _downloader(tmp_path)
        with pytest.raises(
            DownloadError,
            match=r"^f: sha256 mismatch from http://127\.0\.0\.1:\d+/f: got [0-9a-f]{64}, expected 0{64}$",
        ):
            dl.fetch(RemoteFile("f", (server.url + "/f",), sha256="0" * 64))
    assert list((tmp_path / "cache").iterdir()) == []


def test_size_mismatch_is_a_clear_error_and_leaves_nothing(tmp_path):
    with FileServer({"/f": b"12345"}) as server:
        dl, _ = _downloader(tmp_path)
        with pytest.raises(DownloadError, match="size mismatch.*got 5 bytes, expected 9"):
            dl.fetch(RemoteFile("f", (server.url + "/f",), size=9))
    assert list((tmp_path / "cache").iterdir()) == []


def test_second_run_downloads_nothing(tmp_path):
    files = {f"/gpt2/124M/{n}": n.encode() * 10 for n in ("checkpoint", "hparams.json", "model.ckpt.index")}
    with FileServer(files) as server:
        specs = [RemoteFile(p.lstrip("/"), (server.url + p,)) for p in files]
        dl, _ = _downloader(tmp_path)
        dl.fetch_all(specs)
        assert len(server.requests) == 3
        dl.fetch_all(specs)
        assert len(server.requests) == 3


def test_persistent_404_falls_back_to_the_backup_url(tmp_path):
    with FileServer({"/backup/f": b"data"}) as server:
        dl, _ = _downloader(tmp_path)
        path = dl.fetch(RemoteFile("f", (server.url + "/primary/f", server.url + "/backup/f")))
        assert path.read_bytes() == b"data"


GIVING_UP = r"^f: giving up on 127\.0\.0\.1:\d+ after 3 tries \(HTTP 503\); without internet, use --base-url URL"


def test_giving_up_after_the_last_try_names_the_file_and_asks_for_a_rerun(tmp_path):
    with FileServer({"/f": b"x"}) as server:
        server.faults["/f"].extend(["503"] * 3)
        dl, _ = _downloader(tmp_path, attempts=3)
        with pytest.raises(
            DownloadUnavailable,
            match=GIVING_UP,
        ) as raised:
            dl.fetch(RemoteFile("f", (server.url + "/f",)))
        assert raised.value.exit_code == 75  # an outage: worth a rerun, unlike a 404 or a bad hash


def test_an_outage_on_one_source_and_a_404_on_the_other_is_not_worth_a_rerun(tmp_path):
    with FileServer({"/f": b"x"}) as server:
        server.faults["/f"].extend(["503"] * 2)
        dl, _ = _downloader(tmp_path, attempts=2)
        with pytest.raises(DownloadError, match="giving up .*; .*HTTP 404") as raised:
            dl.fetch(RemoteFile("f", (server.url + "/f", server.url + "/missing")))
        assert raised.value.exit_code == 1


@pytest.mark.parametrize(
    "remote, way_in",
    [
        (dataset_file(DATASETS["instructions"].url), "--data FILE, "),
        (dataset_file(DATASETS["preferences"].url), "--dpo-data FILE, "),
        (model_files("gpt2-small", "hf")[1], f"{WEIGHTS_WAY_IN}, "),
        (model_files("gpt2-medium", "openai")[3], f"{WEIGHTS_WAY_IN}, "),
        (tokenizer_files()[0], ""),
    ],
    ids=["dataset", "preference data", "hf weights", "openai weights", "tokenizer"],
)
def test_a_host_whose_name_does_not_resolve_is_no_internet_exit_1_naming_every_way_in(
    tmp_path, monkeypatch, remote, way_in
):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    dl, waits = _downloader(tmp_path, attempts=3)
    with pytest.raises(DownloadError) as raised:
        dl.fetch(remote)
    message = str(raised.value)
    # Retried like any blip (3 tries on each of the file's hosts), but then not an outage worth a requeue.
    assert raised.value.exit_code == 1 and len(waits) == 2 * len(remote.urls)
    assert "--model-dir" in WEIGHTS_WAY_IN
    assert message.startswith(f"{remote.relpath}: host ") and " not found after 3 tries" in message
    copied = tmp_path / "cache" / remote.relpath
    ways_in = f"; without internet, use {way_in}--base-url URL (a mirror of the cache) or the file copied to {copied}"
    assert message.endswith(ways_in), message
    assert "\n" not in message and not copied.exists()


def test_a_host_that_refuses_connections_is_an_outage_worth_a_rerun_naming_the_ways_in(tmp_path):
    dl, waits = _downloader(tmp_path, attempts=2)
    remote = dataset_file(f"http://127.0.0.1:{free_port()}/instruction-data.json")
    with pytest.raises(
        DownloadUnavailable, match=r"giving up on 127\.0\.0\.1:\d+ after 2 tries .*--data FILE"
    ) as raised:
        dl.fetch(remote)
    assert raised.value.exit_code == 75 and len(waits) == 1


def test_a_first_run_offline_ends_at_once_with_one_line_naming_the_flag(tmp_path):
    # ".invalid" never resolves (RFC 6761): what a site without internet sees for every download host.
    done = cli(
        "run",
        "--data",
        "http://sft-job.invalid/instruction-data.json",
        "--skip-judge",
        "--output",
        tmp_path / "runs",
        "--cache",
        tmp_path / "cache",
        "--metrics-port",
        0,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "host sft-job.invalid not found" in last
    assert "--data FILE" in last and "--base-url URL" in last, last
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_catalog_urls_and_mirror_layout():
    files = model_files("gpt2-medium", "openai")
    assert [f.relpath for f in files][:3] == [
        "gpt2/355M/checkpoint",
        "gpt2/355M/encoder.json",
        "gpt2/355M/hparams.json",
    ]
    assert files[0].urls == (
        "https://openaipublic.blob.core.windows.net/gpt-2/models/355M/checkpoint",
        "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/355M/checkpoint",
    )
    hf = model_files("gpt2-xl", "hf", base_url="s3://bucket/mirror/")
    assert [f.urls for f in hf] == [
        ("s3://bucket/mirror/gpt2-hf/gpt2-xl/config.json",),
        ("s3://bucket/mirror/gpt2-hf/gpt2-xl/model.safetensors",),
    ]
    assert model_files("gpt2-small", "hf")[1].urls == (
        "https://huggingface.co/openai-community/gpt2/resolve/main/model.safetensors",
    )
    with pytest.raises(DownloadError, match="--model 'gpt2-huge'"):
        model_files("gpt2-huge", "openai")


def test_cli_download_from_a_mirror_then_again_offline(tmp_path, tokenizer_dir):
    """`sft-job download` against a local mirror with the cache layout; the rerun asks for nothing."""
    from job.cli import main

    files = {"/mirror/gpt2-hf/gpt2-small/config.json": b"{}", "/mirror/gpt2-hf/gpt2-small/model.safetensors": b"w"}
    files |= {f"/mirror/gpt2/{n}": (tokenizer_dir / n).read_bytes() for n in ("encoder.json", "vocab.bpe")}
    with FileServer(files) as server:
        args = [
            "download",
            "--model",
            "gpt2-small",
            "--source",
            "hf",
            "--cache",
            str(tmp_path),
            "--base-url",
            server.url + "/mirror",
            "--no-dataset",
        ]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert len(server.requests) == 4
        assert (tmp_path / "gpt2-hf/gpt2-small/model.safetensors").read_bytes() == b"w"
        assert (tmp_path / "gpt2/vocab.bpe").read_bytes() == (tokenizer_dir / "vocab.bpe").read_bytes()
        assert CliRunner().invoke(main, args).exit_code == 0
        assert len(server.requests) == 4


def test_download_attempts_is_the_number_of_tries_of_a_file_before_exit_75(cache):
    """``--download-attempts 2``: a mirror answering 503 is asked twice for the file, then the stage ends 75."""
    from job.cli import main

    config = "/mirror/gpt2-hf/gpt2-small/config.json"
    with FileServer({config: b"{}", "/mirror/gpt2-hf/gpt2-small/model.safetensors": b"w"}) as server:
        server.faults[config].extend(["503"] * 3)
        args = ["download", "--model", "gpt2-small", "--source", "hf", "--cache", str(cache), "--no-dataset"]
        result = CliRunner().invoke(main, [*args, "--base-url", f"{server.url}/mirror", "--download-attempts", "2"])
    assert result.exit_code == 75, result.output
    assert len(server.gets(config)) == 2 and not (cache / "gpt2-hf" / "gpt2-small" / "config.json").exists()


def test_gpt2s_hugging_face_weights_come_from_the_hub_hub_url_names(cache, monkeypatch):
    """``--source hf --hub-url URL`` (a site's own hub, as for the Llama and Qwen3 models): GPT-2's files are
    asked of that hub, not of huggingface.co nor HF_ENDPOINT's."""
    from job.cli import main

    files = {"/openai-community/gpt2/resolve/main/config.json": b"{}"}
    files["/openai-community/gpt2/resolve/main/model.safetensors"] = b"w"
    with FileServer(files) as hub, FileServer({}) as other:
        monkeypatch.setenv("HF_ENDPOINT", other.url)
        args = ["download", "--model", "gpt2-small", "--source", "hf", "--cache", str(cache), "--no-dataset"]
        result = CliRunner().invoke(main, [*args, "--hub-url", hub.url, "--download-attempts", "1"])
    assert result.exit_code == 0, result.output
    assert sorted(hub.requests) == [(path, None) for path in sorted(files)] and not other.requests
    assert (cache / "gpt2-hf" / "gpt2-small" / "model.safetensors").read_bytes() == b"w"


def test_tokenizer_files_have_pinned_hashes():
    assert [f.sha256[:8] for f in tokenizer_files()] == ["19613966", "1ce16647"]


def test_s3_mirror_resumes_a_partial_file(tmp_path, s3):
    s3.create_bucket(Bucket="mirror")
    s3.put_object(Bucket="mirror", Key="cache/gpt2/124M/model.ckpt.index", Body=BLOB)
    dl, _ = _downloader(tmp_path)
    part = tmp_path / "cache/gpt2/124M/model.ckpt.index.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(BLOB[:1000])  # left by an earlier, interrupted run
    spec = [
        f for f in model_files("gpt2-small", "openai", base_url="s3://mirror/cache") if f.relpath.endswith("index")
    ][0]
    assert spec.urls == ("s3://mirror/cache/gpt2/124M/model.ckpt.index",)
    assert dl.fetch(spec).read_bytes() == BLOB
    assert not part.exists()


def test_s3_missing_key_is_a_clear_error(tmp_path, s3):
    s3.create_bucket(Bucket="empty")
    dl, _ = _downloader(tmp_path)
    with pytest.raises(DownloadError, match=r"S3 (NoSuchKey|404) for s3://empty/nothing"):
        dl.fetch(RemoteFile("nothing", ("s3://empty/nothing",)))


def test_progress_is_json_events_when_no_terminal_watches(tmp_path, monkeypatch):
    import structlog

    import job.storage.fetch

    monkeypatch.setattr(job.storage.fetch, "stderr_is_terminal", lambda: False)
    with FileServer({"/f": BLOB}) as server, structlog.testing.capture_logs() as logs:
        dl, _ = _downloader(tmp_path)
        dl.fetch(RemoteFile("f", (server.url + "/f",)))
    progress = [e for e in logs if e["event"] == "download_progress"]
    assert len(progress) >= 3 and progress[-1]["total"] == len(BLOB)
    assert [e["bytes"] for e in progress] == sorted(e["bytes"] for e in progress)
    assert any(e["event"] == "download_done" and e["bytes"] == len(BLOB) for e in logs)


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=1, max_size=5000), st.data())
def test_bytes_from_the_hubs_cdn_are_checked_against_the_sha256_the_hub_states(body, data):
    """The hub redirects a large file to its CDN and states the file's sha256 (``X-Linked-Etag``): any byte
    the CDN gets wrong is a one-line error naming the file and nothing stays in the cache; the right bytes
    pass."""
    where = data.draw(st.integers(0, len(body) - 1))
    wrong = body[:where] + bytes([body[where] ^ data.draw(st.integers(1, 255))]) + body[where + 1 :]
    stated = hashlib.sha256(body).hexdigest()
    for served, good in ((wrong, False), (body, True)):
        cdn = FileServer({"/cdn/model.safetensors": served})
        with cdn, tempfile.TemporaryDirectory() as folder:
            resolve = "/Qwen/Qwen3-0.6B-Base/resolve/main/model.safetensors"
            hub = FileServer({}, redirects={resolve: f"{cdn.url}/cdn/model.safetensors"}, linked={resolve: stated})
            with hub:
                downloader = Downloader(Path(folder), attempts=1)
                remote = RemoteFile("hf/model.safetensors", (hub.url + resolve,))
                if good:
                    assert downloader.fetch(remote).read_bytes() == body
                    continue
                with pytest.raises(DownloadError) as refused:
                    downloader.fetch(remote)
            assert f"sha256 mismatch from {hub.url}{resolve}" in str(refused.value)
            assert str(refused.value).endswith(f"expected {stated} (the hub's X-Linked-Etag)")
            assert "\n" not in str(refused.value) and not list(Path(folder).rglob("*.safetensors*"))


def test_a_hub_download_takes_every_file_from_the_commit_its_first_file_named_also_after_main_moved(tmp_path):
    """The first file asks for ``main`` and the hub names its commit; the rest come from that commit. A
    download cut off, then resumed after ``main`` moved on the hub, still ends with one commit's files."""
    repo, before, after = MODELS["qwen3-0.6b"].repo, "a" * 40, "b" * 40
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.dumps({"weight_map": {"x": shards[0], "y": shards[1]}}).encode()

    def repository(revision: str, tag: str) -> dict[str, bytes]:
        names = [*HUB_HEAD_FILES, "generation_config.json", *shards]
        return {f"/{repo}/resolve/{revision}/{n}": json.dumps({tag: n}).encode() for n in names} | {
            f"/{repo}/resolve/{revision}/{INDEX}": index
        }

    origin = DownloadConfig(model="qwen3-0.6b", cache=str(tmp_path / "cache"), download_attempts=1)
    with FileServer(repository("main", "old") | repository(before, "old"), commit=before) as hub:
        origin.hub_url = hub.url
        hub.faults[f"/{repo}/resolve/{before}/{shards[1]}"].append("503")
        with pytest.raises(DownloadUnavailable):
            fetch_model(origin, model_downloader(origin, attempts=origin.download_attempts))
        hub.files |= repository("main", "new") | repository(after, "new")  # main moves on
        hub.commit = after
        folder = fetch_model(origin, model_downloader(origin, attempts=origin.download_attempts))
    asked = [path for path, _ in hub.requests]
    assert asked[0] == f"/{repo}/resolve/main/config.json"
    assert all(path.startswith(f"/{repo}/resolve/{before}/") for path in asked[1:])
    assert (folder / ".commit").read_text() == before + "\n" and hub_commit(origin) == before
    assert {p.read_bytes() for p in folder.iterdir() if p.name.startswith("model-")} == {
        json.dumps({"old": n}).encode() for n in shards
    }


NEAR_HEX = st.text("0123456789abcdefABCDEF/.", min_size=38, max_size=66)  # about a hash's length and digits
HEADER_VALUES = st.one_of(st.text(max_size=80), NEAR_HEX, NEAR_HEX.map(lambda v: f'W/"{v}"'))


@given(HEADER_VALUES, HEADER_VALUES)
def test_only_a_sha256_and_a_commit_of_their_exact_form_are_taken_from_the_hubs_headers(etag, commit):
    """Whatever the hub's headers say, the hash is 64 hex digits of either case, read as lower case (a weak
    ``W/"..."`` etag included, as huggingface_hub reads it) and the commit 40 lowercase ones, or nothing: a
    commit goes into URLs and the cache folder's ``.commit``."""
    redirect, answer = requests.Response(), requests.Response()
    redirect.headers = CaseInsensitiveDict({"X-Linked-Etag": etag, "X-Repo-Commit": commit})
    answer.history = [redirect]
    stated = _stated(answer)
    bare = etag.removeprefix("W/").strip('"')
    assert stated.sha256 == (bare.lower() if re.fullmatch(r"[0-9a-fA-F]{64}", bare) else None)
    assert stated.commit == (commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None)


def test_the_hubs_headers_of_the_right_form_are_read_from_the_redirect_or_the_answer():
    digest, commit = hashlib.sha256(b"x").hexdigest(), "0123456789abcdef" * 2 + "01234567"
    redirect, answer = requests.Response(), requests.Response()
    redirect.headers = CaseInsensitiveDict({"X-Linked-Etag": f'W/"{digest}"'})
    answer.headers = CaseInsensitiveDict({"X-Repo-Commit": commit})
    answer.history = [redirect]
    assert _stated(answer) == (digest, commit)
    assert _stated(requests.Response()) == (None, None)


@given(st.binary(max_size=100).filter(lambda b: not re.fullmatch(rb"\s*[0-9a-f]{40}\s*", b)))
def test_a_cached_commit_file_that_holds_no_commit_is_one_line_naming_it_before_any_request(damaged):
    with tempfile.TemporaryDirectory() as cache:
        origin = DownloadConfig(model="qwen3-0.6b", cache=cache, hub_url="http://127.0.0.1:9")
        folder = Path(cache) / "hf" / MODELS["qwen3-0.6b"].repo / "main"
        folder.mkdir(parents=True)
        (folder / ".commit").write_bytes(damaged)
        with pytest.raises(DownloadError) as refused:
            fetch_model(origin, model_downloader(origin, attempts=origin.download_attempts))
    assert str(refused.value) == (
        f"{folder / '.commit'} does not hold a commit (40 hex digits): remove {folder} to download the model again"
    )
