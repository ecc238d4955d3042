"""Where a named model's files come from and where they go in the cache: OpenAI's checkpoint of a GPT-2 size,
Hugging Face's copy of it, or a hub model's repository at a revision, pinned to the commit the hub names for
it. The files are fetched by ``job/storage/fetch.py``'s Downloader.

Cache layout (a mirror given by ``--base-url`` is a copy of a cache, with the same layout)::

    {cache}/gpt2/encoder.json, vocab.bpe          GPT-2's tokenizer
    {cache}/gpt2/355M/...                         OpenAI's TensorFlow checkpoint of a size
    {cache}/gpt2-hf/gpt2-medium/...               Hugging Face's safetensors of a size
    {cache}/hf/Qwen/Qwen3-0.6B-Base/main/...      a hub model at a revision: config.json, tokenizer.json,
                                                  tokenizer_config.json, model.safetensors (or the index
                                                  model.safetensors.index.json and the shards it names)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Protocol

from job.core.observability import Metrics
from job.models.gpt2_weights import WeightsError
from job.models.llama_weights import INDEX, index_shards, shard_files
from job.models.registry import MODELS, OPENAI_FILES, model_entry
from job.models.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256
from job.storage.fetch import (
    COMMIT_RE,
    Downloader,
    DownloadError,
    NotFound,
    RemoteFile,
    cached_whole,
    json_object_problem,
    mirror_urls,
)
from job.storage.store import atomic_write_text


class Origin(Protocol):
    """Where a named model comes from and goes: the fields of ``ModelOrigin`` (job/config.py) read here."""

    model: str
    source: str
    cache: str
    base_url: str | None
    hub_url: str | None
    hub_revision: str
    hf_token: str | None


OPENAI_BASES = (
    "https://openaipublic.blob.core.windows.net/gpt-2/models",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2",  # the book's backup
)
HF_BASE = "https://huggingface.co"
TOKENIZER_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
HF_FILES = ("config.json", "model.safetensors")
KNOWN_SHA256 = {"encoder.json": ENCODER_JSON_SHA256, "vocab.bpe": VOCAB_BPE_SHA256}
WEIGHTS_WAY_IN = "--model-dir DIR (a folder of GPT-2 weights: Hugging Face's or OpenAI's files)"
HUB_WAY_IN = "--model-dir DIR (the model's Hugging Face folder)"
HUB_HEAD_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
COMMIT_FILE = ".commit"  # in a hub model's cache folder: the commit its files come from


def tokenizer_files(base_url: str | None = None) -> list[RemoteFile]:
    def remote(name: str) -> RemoteFile:
        urls = mirror_urls(base_url, f"gpt2/{name}", (f"{TOKENIZER_BASE}/{name}",))
        return RemoteFile(f"gpt2/{name}", urls, KNOWN_SHA256[name])

    return [remote(name) for name in ("encoder.json", "vocab.bpe")]


def model_files(model: str, source: str, base_url: str | None = None, hub: str | None = None) -> list[RemoteFile]:
    """The files of a named size (``gpt2-medium``...) from ``openai`` or ``hf`` (the hub ``hub_url(hub)``)."""
    sizes = [name for name, entry in MODELS.items() if entry.openai_folder is not None]
    if model not in sizes:
        raise DownloadError(f"--model {model!r} is not a GPT-2 size: one of {', '.join(sizes)}")
    if source == "openai":
        size = model_entry(model).openai_folder
        return [
            RemoteFile(
                f"gpt2/{size}/{name}",
                mirror_urls(base_url, f"gpt2/{size}/{name}", tuple(f"{b}/{size}/{name}" for b in OPENAI_BASES)),
                KNOWN_SHA256.get(name),
                way_in=WEIGHTS_WAY_IN,
            )
            for name in OPENAI_FILES
        ]
    if source == "hf":
        repo, hub = model_entry(model).repo, hub_url(hub)
        return [
            RemoteFile(
                f"gpt2-hf/{model}/{name}",
                mirror_urls(base_url, f"gpt2-hf/{model}/{name}", (f"{hub}/{repo}/resolve/main/{name}",)),
                way_in=WEIGHTS_WAY_IN,
                check=json_object_problem if name.endswith(".json") else None,
            )
            for name in HF_FILES
        ]
    raise DownloadError(f"--source {source!r} is not one of openai, hf")


def hf_repo_id(model: str) -> str:
    """Hugging Face's repository of a named model (``openai-community/gpt2-medium``, ``Qwen/Qwen3-0.6B-Base``)."""
    return model_entry(model).repo


def cached_model_dir(origin: Origin) -> Path:
    """Where ``fetch_model`` puts ``origin``'s named model (a ``ModelOrigin``) in the cache."""
    if model_entry(origin.model).from_hub:
        return Path(origin.cache) / "hf" / model_entry(origin.model).repo / origin.hub_revision
    return Path(origin.cache) / Path(model_files(origin.model, origin.source)[0].relpath).parent


def hub_url(configured: str | None) -> str:
    """The hub the Llama 3.2 and Qwen3 models, GPT-2's Hugging Face weights and the hub's datasets come from:
    --hub-url, else HF_ENDPOINT, else Hugging Face."""
    return (configured or os.environ.get("HF_ENDPOINT") or HF_BASE).rstrip("/")


def hub_commit(origin: Origin) -> str | None:
    """The commit a hub model's cached files come from: --hub-revision where it is one, else the commit the
    hub named for the revision when the first file came (kept in the folder's ``.commit``), if it did."""
    if COMMIT_RE.fullmatch(origin.hub_revision):
        return origin.hub_revision
    recorded = cached_model_dir(origin) / COMMIT_FILE
    if not recorded.is_file():
        return None
    with open(recorded, "rb") as f:
        data = f.read(101)  # a commit and a newline are 41 bytes; a longer file is not this job's
    commit = data.decode("ascii", errors="replace").strip()
    # it goes into URLs; a damaged one is never guessed at, nor the revision asked for by name again
    if len(data) > 100 or not COMMIT_RE.fullmatch(commit):
        raise DownloadError(
            f"{recorded} does not hold a commit (40 hex digits): remove {recorded.parent} to download the model again"
        )
    return commit


def hub_file(origin: Origin, name: str, commit: str | None = None) -> RemoteFile:
    """One file of a hub model's repository, at ``commit`` (else at its revision's name); from --base-url's
    mirror where one is given. Its place in the cache is by the revision's name, as the user gave it."""
    repo, hub = model_entry(origin.model).repo, hub_url(origin.hub_url)
    relpath = f"hf/{repo}/{origin.hub_revision}/{name}"
    url = f"{hub}/{repo}/resolve/{commit or origin.hub_revision}/{name}"
    check = json_object_problem if name.endswith(".json") else None
    urls = mirror_urls(origin.base_url, relpath, (url,))
    return RemoteFile(relpath, urls, way_in=HUB_WAY_IN, token_prefix=f"{hub}/", check=check)


def model_downloader(origin: Origin, metrics: Metrics | None = None, attempts: int = 5) -> Downloader:
    """A Downloader into ``origin``'s cache carrying the hub token (--hf-token, else HF_TOKEN), ``attempts``
    tries per file."""
    token = origin.hf_token or os.environ.get("HF_TOKEN") or None
    return Downloader(Path(origin.cache), attempts=attempts, metrics=metrics, token=token)


def fetch_model_head(origin: Origin, downloader: Downloader) -> Path:
    """A hub model's config and tokenizer files (a few MB: what the preflight checks), and its folder.
    The first file asks for the revision by name and the hub says which commit that is; every other file
    comes from that commit, also in a rerun after ``main`` moved, so one run's files are one commit's."""
    folder, commit = cached_model_dir(origin), hub_commit(origin)
    first = hub_file(origin, HUB_HEAD_FILES[0], commit)
    try:
        downloader.fetch(first)
        if commit is None and (commit := downloader.commits.get(first.relpath)) is not None:
            atomic_write_text(folder / COMMIT_FILE, commit + "\n")
        downloader.fetch_all([hub_file(origin, name, commit) for name in HUB_HEAD_FILES])
    except NotFound as exc:
        raise _no_revision(origin, commit, str(exc)) from None
    return folder


def _no_revision(origin: Origin, commit: str | None, reason: str) -> DownloadError:
    """A 404 for a head file (config.json, tokenizer.json...), which every model of these families has: the
    hub lacks the revision (a commit gone after a force-push, a branch or tag deleted), unless it says the
    file alone is missing (``EntryNotFound``, as huggingface_hub reads it)."""
    if origin.base_url or "EntryNotFound" in reason:
        return NotFound(reason)
    repo, hub = model_entry(origin.model).repo, hub_url(origin.hub_url)
    if commit is not None and commit != origin.hub_revision:  # the commit .commit recorded is gone
        folder = cached_model_dir(origin)
        return DownloadError(
            f"{hub} no longer has commit {commit} of {repo}, which {folder / COMMIT_FILE} records for "
            f"revision {origin.hub_revision} ({reason}): remove {folder} to download the revision as it is now"
        )
    return DownloadError(f"{hub} has no revision {origin.hub_revision} of {repo} ({reason}): check --hub-revision")


def tokenizer_folder(origin: Origin, model_dir: str | Path | None) -> Path | None:
    """The folder whose tokenizer a stage reads: ``model_dir`` (--model-dir) where given, else a named hub
    model's (its head files fetched), else None: GPT-2's tokenizer, from the cache."""
    if model_dir:
        return Path(model_dir)
    return fetch_model_head(origin, model_downloader(origin)) if model_entry(origin.model).from_hub else None


def fetch_model(origin: Origin, downloader: Downloader) -> Path:
    """A named model's files into the cache, and its folder there: GPT-2's fixed set; a hub model's head
    files and generation_config.json, then its ``model.safetensors``, or its index and every shard the
    index names."""
    if not model_entry(origin.model).from_hub:
        downloader.fetch_all(model_files(origin.model, origin.source, origin.base_url, origin.hub_url))
        return cached_model_dir(origin)
    if model_cached(origin):  # an offline rerun asks the hub nothing
        return cached_model_dir(origin)
    folder = fetch_model_head(origin, downloader)
    commit = hub_commit(origin)
    with contextlib.suppress(NotFound):  # the decoding defaults transformers reads, where the repository has them
        downloader.fetch(hub_file(origin, "generation_config.json", commit))
    single = hub_file(origin, "model.safetensors", commit)
    begun = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.part").is_file()
    if begun and not (folder / INDEX).is_file():  # offline reruns never ask the hub for an index
        downloader.fetch(single)
        return folder
    try:
        index = downloader.fetch(hub_file(origin, INDEX, commit))
    except NotFound:  # a repository with one file of weights
        downloader.fetch(single)
        return folder
    try:
        shards = sorted(set(index_shards(index).values()))
    except WeightsError as exc:
        raise DownloadError(str(exc)) from None
    downloader.fetch_all([hub_file(origin, shard, commit) for shard in shards])
    return folder


def model_cached(origin: Origin) -> bool:
    """Whether every file of ``origin``'s named model is in the cache (no network asked)."""
    folder = cached_model_dir(origin)
    if not model_entry(origin.model).from_hub:
        return all(cached_whole(Path(origin.cache), f) for f in model_files(origin.model, origin.source))
    if not all((folder / name).is_file() and json_object_problem(folder / name) is None for name in HUB_HEAD_FILES):
        return False  # the downloader names a damaged one and fetches it again
    try:
        shard_files(folder)
    except WeightsError:
        return False
    return True
