"""A hub model's cache through `sft-job download` against a local server laid out like the hub: a page
answered for a file (HTTP 200) never stays in the cache, a damaged cached file is named and fetched
again, a revision the hub lacks is one line naming it, and the hub's sha256 is read in either case."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from job.models.hub import HF_FILES, HUB_HEAD_FILES
from job.models.registry import MODELS
from tests.file_server import FileServer
from tests.helpers import cli, events, free_port

REPO = MODELS["qwen3-0.6b"].repo
COMMIT = "5eed" * 10
LOGIN_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Log in to continue</body></html>\n"
GOOD = {
    "config.json": json.dumps({"model_type": "qwen3", "num_hidden_layers": 2}).encode(),
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode(),
    "tokenizer_config.json": json.dumps({"eos_token": "<|endoftext|>"}).encode(),
    "model.safetensors": save({"model.norm.weight": torch.arange(300.0)}),  # what model_cached reads the table of
}


def _hub(revision: str = "main", **kw) -> FileServer:
    """The repository at ``main`` (the first file, asked by name) and at the commit main stands at."""
    files = {f"/{REPO}/resolve/{COMMIT}/{name}": body for name, body in GOOD.items()}
    files[f"/{REPO}/resolve/{revision}/config.json"] = GOOD["config.json"]
    return FileServer(files, commit=COMMIT, **kw)


def _download(url: str, cache: Path, *extra) -> tuple[int, str, str]:
    done = cli("download", "--model", "qwen3-0.6b", "--no-dataset", "--download-attempts", "1", "--hub-url", url,
               "--cache", cache, "--log-format", "json", *extra)  # fmt: skip
    lines = done.stderr.splitlines()
    assert done.returncode == 0 or len(lines) == 1, done.stderr[-3000:]
    return done.returncode, (lines[-1] if lines else ""), done.stdout


def _folder(cache: Path, revision: str = "main") -> Path:
    return cache / "hf" / REPO / revision


@pytest.mark.parametrize("name", HUB_HEAD_FILES)
def test_a_login_page_answered_for_a_head_file_is_never_cached_and_the_rerun_after_the_fix_succeeds(
    name, cache, tmp_path
):
    with _hub() as hub:
        served = f"/{REPO}/resolve/{'main' if name == 'config.json' else COMMIT}/{name}"
        hub.files[served] = LOGIN_PAGE  # a proxy or a login wall answers 200 with a page
        code, line, _ = _download(hub.url, cache)
        assert code == 1 and line == (
            f"Error: hf/{REPO}/main/{name}: what {hub.url}{served} sent is an HTML page, not JSON, not the file; "
            "nothing was kept"
        )
        assert not (_folder(cache) / name).exists() and not list(_folder(cache).glob("*.part"))
        hub.files[served] = GOOD[name]  # the hub is fixed: the same command, nothing removed by hand
        code, line, _ = _download(hub.url, cache)
    assert code == 0, line
    assert {n: (_folder(cache) / n).read_bytes() for n in GOOD} == GOOD
    assert (_folder(cache) / ".commit").read_text() == COMMIT + "\n"


@pytest.mark.parametrize(
    "name, damage, problem",
    [
        ("config.json", LOGIN_PAGE, "an HTML page, not JSON"),
        ("tokenizer.json", b'{"model": {"type": "BPE"', "not JSON: Expecting ',' delimiter at line 1 column 25"),
        ("tokenizer_config.json", b"[]", "JSON but not an object"),
        ("tokenizer.json", b"", "not JSON: Expecting value at line 1 column 1"),
    ],
    ids=["login page", "truncated", "a list", "empty"],
)
def test_a_damaged_head_file_in_the_cache_is_named_offline_and_fetched_again_online(
    name, damage, problem, cache, tmp_path
):
    """A cache an earlier version left a page in (or a file cut short): offline, one line naming the file,
    why, and the folder to remove, the file kept as it was; with the hub reachable, fetched again."""
    with _hub() as hub:
        assert _download(hub.url, cache)[0] == 0
        (_folder(cache) / name).write_bytes(damage)
        offline = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        code, line, stdout = _download(offline, cache)
        assert code == 1 and line.startswith(f"Error: cached {_folder(cache) / name} is damaged ({problem}) "), line
        assert line.endswith(f"remove {_folder(cache)} to fetch them again, or pass --base-url with a mirror"), line
        assert (_folder(cache) / name).read_bytes() == damage
        assert [e["problem"] for e in events(stdout) if e["event"] == "cache_file_damaged"] == [problem]
        code, line, _ = _download(hub.url, cache)
    assert code == 0, line
    assert (_folder(cache) / name).read_bytes() == GOOD[name]


def test_a_pinned_commit_the_hub_does_not_have_is_one_line_naming_the_repository_and_the_revision(cache):
    gone = "0dd" + "f" * 37
    with _hub() as hub:
        code, line, _ = _download(hub.url, cache, "--hub-revision", gone)
    url = f"{hub.url}/{REPO}/resolve/{gone}/config.json"
    assert (
        code == 1
        and line == f"Error: {hub.url} has no revision {gone} of {REPO} (HTTP 404 from {url}): check --hub-revision"
    )
    assert not [p for p in _folder(cache, gone).parent.rglob("*") if p.is_file()]


def test_a_tag_the_hub_does_not_have_and_a_recorded_commit_gone_from_it_are_one_line_each(cache):
    with _hub() as hub:
        code, line, _ = _download(hub.url, cache, "--hub-revision", "v9")
        assert code == 1 and line.startswith(f"Error: {hub.url} has no revision v9 of {REPO} (HTTP 404 from "), line
        assert _download(hub.url, cache)[0] == 0
        for name in GOOD:  # a force-push on the hub: the commit main stood at is gone, and a file with it
            del hub.files[f"/{REPO}/resolve/{COMMIT}/{name}"]
        (_folder(cache) / "tokenizer.json").unlink()
        code, line, _ = _download(hub.url, cache)
    assert code == 1 and line.startswith(f"Error: {hub.url} no longer has commit {COMMIT} of {REPO}"), line
    assert line.endswith(f"remove {_folder(cache)} to download the revision as it is now")


@pytest.mark.parametrize("etag", [str.upper, str.lower], ids=["upper case", "lower case"])
def test_a_corrupted_shard_is_refused_against_the_hubs_sha256_in_either_case_and_the_right_one_kept(etag, cache):
    """The hub states a large file's sha256 in ``X-Linked-Etag`` on its redirect to the CDN; huggingface_hub
    reads any case of it, and so do we: a byte the CDN gets wrong is exit 1 with nothing kept."""
    weights = GOOD["model.safetensors"]
    wrong = weights[:500] + bytes([weights[500] ^ 1]) + weights[501:]
    resolve = f"/{REPO}/resolve/{COMMIT}/model.safetensors"
    stated = etag(hashlib.sha256(weights).hexdigest())
    with FileServer({"/cdn/model.safetensors": wrong}) as cdn, _hub() as hub:
        hub.redirects[resolve], hub.linked[resolve] = f"{cdn.url}/cdn/model.safetensors", stated
        code, line, _ = _download(hub.url, cache)
        assert code == 1 and f"Error: hf/{REPO}/main/model.safetensors: sha256 mismatch from {hub.url}{resolve}" in line
        assert line.endswith(f"expected {stated.lower()} (the hub's X-Linked-Etag)"), line
        assert not list(_folder(cache).glob("model.safetensors*"))
        cdn.files["/cdn/model.safetensors"] = weights
        code, line, _ = _download(hub.url, cache)
    assert code == 0, line
    assert (_folder(cache) / "model.safetensors").read_bytes() == weights


# --- a sha256 read in either case, wherever one is read -----------------------------------------------


def test_a_manifests_artifact_sha256_in_upper_case_verifies_and_a_changed_artifact_still_does_not(tmp_path):
    from job.run.manifest import Manifest
    from job.storage.store import LocalStorage

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_bytes(b"{}")
    digest = hashlib.sha256(b"{}").hexdigest().upper()
    stage = {"status": "complete", "artifacts": {"model/config.json": {"size": 2, "sha256": digest}}}
    (tmp_path / "manifest.json").write_text(json.dumps({"run_id": "r", "version": "0", "stages": {"finetune": stage}}))
    assert Manifest(LocalStorage(tmp_path), "r").verified("finetune")
    (tmp_path / "model" / "config.json").write_bytes(b"[]")
    assert not Manifest(LocalStorage(tmp_path), "r").verified("finetune")


def test_a_checkpoint_index_in_upper_case_hex_passes_and_a_changed_file_is_still_named(tmp_path):
    from job.training.checkpoint_files import INDEX, checkpoint_problem, index_text
    from tests.test_untrusted import GOOD as STATE

    files = {n: json.dumps(v).encode() for n, v in STATE.items()} | {"model.safetensors": save({"w": torch.zeros(2)})}
    tmp_path.joinpath("ckpt").mkdir()
    for name, data in files.items():
        (tmp_path / "ckpt" / name).write_bytes(data)
    digests = {n: hashlib.sha256(d).hexdigest().upper() for n, d in files.items()}
    (tmp_path / "ckpt" / INDEX).write_text(index_text(digests, b"k" * 32))
    assert checkpoint_problem(tmp_path / "ckpt", b"k" * 32) is None
    (tmp_path / "ckpt" / "optimizer.json").write_bytes(b"{}")
    rejected = checkpoint_problem(tmp_path / "ckpt", b"k" * 32)
    assert (rejected.file, rejected.reason) == ("optimizer.json", "sha256 differs from the index")


def test_a_page_cached_for_gpt2s_config_json_is_not_a_cached_model_and_is_fetched_again(cache, tiny_model_dir):
    """GPT-2's Hugging Face files too: a stage never takes the page as the config (the cache is not
    complete), the download names it offline and fetches it again from the mirror."""
    from job.config import DownloadConfig
    from job.models.hub import model_cached

    files = {f"/gpt2-hf/gpt2-small/{n}": (tiny_model_dir / n).read_bytes() for n in HF_FILES}
    origin = DownloadConfig(model="gpt2-small", source="hf", cache=str(cache))
    config = cache / "gpt2-hf" / "gpt2-small" / "config.json"
    args = ["download", "--model", "gpt2-small", "--source", "hf", "--no-dataset", "--download-attempts", "1"]
    with FileServer(files) as mirror:
        assert cli(*args, "--base-url", mirror.url, "--cache", cache).returncode == 0 and model_cached(origin)
        config.write_bytes(LOGIN_PAGE)
        assert not model_cached(origin)
        offline = cli(*args, "--base-url", f"http://127.0.0.1:{free_port()}", "--cache", cache)
        assert offline.returncode == 1 and offline.stderr.splitlines() == [
            f"Error: cached {config} is damaged (an HTML page, not JSON) and no good copy could be fetched "
            f"(giving up on {offline.stderr.split('giving up on ')[1].split(' ')[0]} after 1 tries (ConnectionError)): "
            "replace it, or pass --base-url with a mirror"
        ]
        assert cli(*args, "--base-url", mirror.url, "--cache", cache).returncode == 0
    assert config.read_bytes() == (tiny_model_dir / "config.json").read_bytes() and model_cached(origin)
