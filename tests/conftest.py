"""Shared fixtures: the read-only reference data, each test's own cache, tiny random GPT-2 weights in both layouts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# The book's data, tokenizer files and saved responses; CI lays shared/ beside the clone.
SHARED_ROOT = REPO.parent / "shared"
SHARED_DATA = Path(os.environ.get("SFT_JOB_TEST_DATA", SHARED_ROOT / "data")).resolve()
TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)


def pytest_configure(config):
    if not (SHARED_DATA / "instruction-data.json").is_file():
        raise pytest.UsageError(f"reference data not found at {SHARED_DATA}; set SFT_JOB_TEST_DATA")
    config.stash[_SHARED_LISTING] = shared_listing()


def pytest_sessionfinish(session, exitstatus):
    """The reference data is read, never written: any file added, removed or changed under it fails the run."""
    before = session.config.stash.get(_SHARED_LISTING, None)
    if before is None:
        return
    after = shared_listing()
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"FAILED: the suite wrote into the reference data: {', '.join(changed[:20])}"
        if reporter:
            reporter.write("\n")
            reporter.write_sep("=", message, red=True)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def shared_listing() -> dict[str, tuple[int, str]]:
    """Every file below the reference data (and the checkout's ``../shared``): its path, size and sha256."""
    roots = {SHARED_DATA, *([SHARED_ROOT] if SHARED_ROOT.is_dir() else [])}
    return {
        str(path): (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        for root in roots
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


_SHARED_LISTING = pytest.StashKey[dict]()


@pytest.fixture(autouse=True)
def _logs_to_the_real_stdout():
    """Each test starts with logs on the process's stdout: a CLI test run in this process may have
    pointed them at a capture stream that is closed by now."""
    import sys

    from job.core.observability import configure_logging

    configure_logging("json", stream=sys.__stdout__)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture
def cache(tmp_path_factory) -> Path:
    """A cache of this test's own, holding copies of the reference files a filled cache has: whatever the job
    writes into its cache (the smoke's data, S3 scratch, downloads) stays in the test's folder."""
    from tests.helpers import filled_cache

    return filled_cache(tmp_path_factory.mktemp("cache"), SHARED_DATA)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return SHARED_DATA / "gpt2"


@pytest.fixture(scope="session")
def book_data() -> list[dict]:
    return json.loads((SHARED_DATA / "instruction-data.json").read_text())


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """A tiny random ``transformers`` GPT-2 saved with ``save_pretrained`` (safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY)).eval()
    path = tmp_path_factory.mktemp("hf-tiny")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


@pytest.fixture(scope="session")
def openai_tiny(tmp_path_factory, hf_tiny):
    """The same weights as ``hf_tiny`` written as OpenAI's TF1 checkpoint with OpenAI's names."""
    from tests.tf_checkpoint import write_openai_checkpoint

    model, _ = hf_tiny
    path = tmp_path_factory.mktemp("openai-tiny")
    write_openai_checkpoint(model, path)
    return model, path


@pytest.fixture(scope="session")
def tiny_model_dir(hf_tiny) -> Path:
    """A folder ``load_pretrained`` reads: the tiny model most stage tests start from."""
    return hf_tiny[1]


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's threaded server)."""
    from moto.server import ThreadedMotoServer

    from tests.helpers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """A boto3 client for the moto endpoint, with the environment the job reads set to match."""
    import boto3

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_server,
    }.items():
        monkeypatch.setenv(key, value)
    return boto3.client("s3", endpoint_url=moto_server)


@pytest.fixture(scope="module")
def ollama():
    """A judge server speaking Ollama's wire protocol, one per test module (test_judge has one per test)."""
    from tests.ollama_server import FakeOllama

    server = FakeOllama().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory, book_data) -> Path:
    """A tiny random Qwen3 folder with its trained tokenizer (tests/family_folders.py)."""
    from tests.family_folders import write_family_folder

    return write_family_folder(tmp_path_factory.mktemp("qwen3"), "qwen3", book_data)
