"""One registry of model names (``job/models/registry.py``): a new size of a known family is one entry, and
the download and finetune stages take it from there."""

from __future__ import annotations

import json
import typing

import pytest
import torch

from job.config import DownloadConfig, FinetuneConfig, ModelOrigin, RunConfig
from job.core.errors import ConfigError
from job.core.observability import Metrics
from job.models.families import family
from job.models.gpt2 import GPTModel, gpt2_config
from job.models.gpt2_weights import read_config, save_hf
from job.models.registry import MODELS, GPT2Shape, ModelEntry, model_names
from job.stages.download import run_download
from job.stages.finetune import run_finetune
from tests.file_server import FileServer

TINY_GPT2 = ModelEntry("gpt2", "test-org/gpt2-tiny", "9M", GPT2Shape(64, n_layers=2, n_heads=4, context_length=256))
TINY_QWEN3 = ModelEntry("qwen3", "test-org/Qwen3-Tiny-Base")
HUB_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def new_sizes(monkeypatch):
    """Two sizes of known families, registered for this test alone (monkeypatch takes them out after)."""
    monkeypatch.setitem(MODELS, "gpt2-tiny", TINY_GPT2)
    monkeypatch.setitem(MODELS, "qwen3-tiny", TINY_QWEN3)


def _finetune(cache, output, **model) -> dict:
    cfg = FinetuneConfig(
        cache=str(cache),
        data=str(cache / "instruction-data.json"),
        output=str(output),
        train_limit=16,
        batch_size=4,
        max_steps=1,
        eval_freq=1,
        eval_iter=1,
        **model,
    )
    return run_finetune(cfg, Metrics())


def test_a_new_gpt2_size_is_one_entry_downloaded_from_a_mirror_and_finetuned(new_sizes, cache, tmp_path):
    """``gpt2-tiny``'s files come from a mirror laid out like the cache (the safetensors of ``--source hf``), in
    the size's own folder; finetune builds the registry's shape and names the book's ``.pth`` after it."""
    torch.manual_seed(0)
    folder = tmp_path / "made"
    save_hf(GPTModel(gpt2_config("gpt2-tiny")), folder)
    mirror = {f"/mirror/gpt2-hf/gpt2-tiny/{p.name}": p.read_bytes() for p in folder.iterdir()}
    with FileServer(mirror) as server:
        origin = dict(model="gpt2-tiny", source="hf", base_url=f"{server.url}/mirror")
        target = run_download(DownloadConfig(cache=str(cache), dataset=False, **origin))
        asked = sorted(path for path, _ in server.requests)
    assert target == cache / "gpt2-hf" / "gpt2-tiny" and asked == sorted(mirror)
    assert read_config(target) == gpt2_config("gpt2-tiny")
    outputs = _finetune(cache, tmp_path / "ft", model="gpt2-tiny", source="hf", base_url="http://127.0.0.1:9")
    assert (tmp_path / "ft" / "gpt2-tiny9M-sft.pth").is_file(), outputs
    assert read_config(tmp_path / "ft" / "model").emb_dim == 64


def test_a_new_qwen3_size_is_one_entry_downloaded_from_the_hub_and_finetuned_offline(
    new_sizes, qwen3_dir, cache, tmp_path
):
    """``qwen3-tiny`` comes from a server laid out like the hub, under the entry's repository; finetune then
    reads the cached folder with the hub gone (nothing listens on port 9)."""
    repo = TINY_QWEN3.repo
    files = {f"/{repo}/resolve/main/{name}": (qwen3_dir / name).read_bytes() for name in HUB_FILES}
    with FileServer(files) as hub:
        target = run_download(DownloadConfig(model="qwen3-tiny", hub_url=hub.url, cache=str(cache), dataset=False))
        asked = {path for path, _ in hub.requests}
    assert target == cache / "hf" / repo / "main" and asked >= set(files)
    assert family(target) == "qwen3" and not (cache / "gpt2-hf").exists()
    _finetune(cache, tmp_path / "ft", model="qwen3-tiny", hub_url="http://127.0.0.1:9")
    saved = json.loads((tmp_path / "ft" / "model" / "config.json").read_text())
    assert saved["model_type"] == "qwen3" and (tmp_path / "ft" / "model" / "tokenizer.json").is_file()


def test_an_unregistered_name_is_refused_naming_the_registrys_names_and_a_registered_one_is_gone_after(new_sizes):
    assert ModelOrigin(model="qwen3-tiny").model == "qwen3-tiny"
    assert RunConfig(model="gpt2-tiny").model == "gpt2-tiny"
    with pytest.raises(ConfigError) as refused:
        ModelOrigin(model="qwen3-huge")
    assert str(refused.value) == f"model must be one of {', '.join(model_names())}, got 'qwen3-huge'"
    assert "gpt2-tiny, qwen3-tiny" in str(refused.value)
    with pytest.raises(ConfigError, match="llama3.2-3b, gpt2-tiny, qwen3-tiny, smoke, got 'Smoke'"):
        RunConfig(model="Smoke")


def test_an_entry_is_a_gpt2_size_with_its_openai_folder_and_shape_or_a_hub_model_with_neither():
    shape = TINY_GPT2.shape
    for kind, folder, shaped in [
        ("gpt2", "9M", None),
        ("gpt2", None, shape),
        ("qwen3", "9M", shape),
        ("llama", None, shape),
    ]:
        with pytest.raises(ValueError, match=f"a {kind} entry"):
            ModelEntry(kind, "test-org/x", folder, shaped)


def test_the_registry_is_as_it_was_without_a_registering_test():
    assert "gpt2-tiny" not in model_names() and "qwen3-tiny" not in model_names()
    with pytest.raises(ConfigError, match="got 'gpt2-tiny'"):
        DownloadConfig(model="gpt2-tiny")


def test_the_flags_choices_and_a_config_files_type_are_the_registrys_names():
    """Click's ``--model`` choices come from the registry (as imported); ``run`` adds the smoke's model."""
    from job.cli import main

    choices = {
        name: next(p for p in main.commands[name].params if p.name == "model").type.choices
        for name in ("download", "finetune", "dpo", "run")
    }
    assert choices == {
        "download": model_names(),
        "finetune": model_names(),
        "dpo": model_names(),
        "run": (*model_names(), "smoke"),
    }
    assert typing.get_args(typing.get_type_hints(ModelOrigin)["model"]) == model_names()
