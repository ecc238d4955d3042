"""The checkpoint manager (save, rotate, verify, load), and the run's store of checkpoints (upload in the
background with the bucket's rotation, fetch back): unit tests on a tiny model, no CLI."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from job.core.errors import ConfigError
from job.core.observability import Metrics
from job.models.gpt2 import GPTConfig, GPTModel
from job.storage.store import LocalStorage
from job.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointUploader,
    fetch_checkpoint,
    remove_stale_tmp,
)
from job.training.checkpoint_files import INDEX, checkpoint_dirs

TINY = GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=1)
KEY = b"k" * 32


def _manager(folder, keep=2, key=None, on_checkpoint=None, shape=TINY, seed=0) -> CheckpointManager:
    """A manager over a tiny model whose AdamW has taken one step (so it has moments to save)."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    model = GPTModel(shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, shape.vocab_size, (2, 8))).sum().backward()
    optimizer.step()
    return CheckpointManager(
        folder, Accelerator(cpu=True), model, optimizer, keep, Metrics(), on_checkpoint=on_checkpoint, key=key
    )


def _save(manager: CheckpointManager, step: int):
    return manager.save(step, {"step": step, "epoch": 0, "batch_in_epoch": step, "tokens_seen": 0, "history": []}, {})


def _names(folder) -> list[str]:
    return [p.name for p in checkpoint_dirs(folder)]


def _tamper(checkpoint, name="model.safetensors") -> None:
    data = bytearray((checkpoint / name).read_bytes())
    data[-1] ^= 1  # one bit of the last tensor's data: the header still parses
    (checkpoint / name).write_bytes(bytes(data))


def test_rotation_keeps_the_newest_and_a_rejected_one_is_never_counted_among_them(tmp_path):
    manager = _manager(tmp_path / "ckpt", keep=2)
    for step in (1, 2, 3, 4):
        _save(manager, step)
    assert _names(tmp_path / "ckpt") == ["step-00000003", "step-00000004"]
    _tamper(tmp_path / "ckpt" / "step-00000004")
    path, _files = manager.latest()  # the tampered newest is skipped, the previous one used
    assert path.name == "step-00000003"
    _save(manager, 5)  # keeps 3 and 5 (two good ones); the rejected 4 is left where it is, not counted
    assert _names(tmp_path / "ckpt") == ["step-00000003", "step-00000004", "step-00000005"]
    _save(manager, 6)
    assert _names(tmp_path / "ckpt") == ["step-00000004", "step-00000005", "step-00000006"]


def test_a_crash_s_hidden_tmp_folder_is_removed_when_training_starts_and_nothing_else(tmp_path):
    from structlog.testing import capture_logs

    manager = _manager(tmp_path / "ckpt")
    good = _save(manager, 2)
    stale = tmp_path / "ckpt" / ".step-00000006.tmp"
    shutil.copytree(good, stale)  # a checkpoint half-written when the process died
    (tmp_path / "ckpt" / ".step-00000007.tmp").write_text("a file, not a folder")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("x")
    (tmp_path / "ckpt" / ".step-00000008.tmp").symlink_to(tmp_path / "elsewhere")
    others = [".step-00000009.fetch", ".step-9.tmp", "step-00000010.tmp", ".step-00000011.tmp.old", "notes"]
    for name in others:
        (tmp_path / "ckpt" / name).mkdir()
    with capture_logs() as logs:
        remove_stale_tmp(tmp_path / "ckpt")
    assert not stale.exists()
    assert [e["path"] for e in logs if e["event"] == "checkpoint_tmp_removed"] == [str(stale)]
    left = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert left == {"step-00000002", ".step-00000007.tmp", ".step-00000008.tmp", *others}
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "x"
    assert manager.latest()[0] == good


def test_a_tmp_folder_that_cannot_be_removed_is_a_warning_not_a_failed_start(tmp_path, monkeypatch):
    from structlog.testing import capture_logs

    from job.training import checkpoint

    stale = tmp_path / "ckpt" / ".step-00000006.tmp"
    stale.mkdir(parents=True)

    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint.shutil, "rmtree", refused)
    with capture_logs() as logs:
        remove_stale_tmp(tmp_path / "ckpt")
    [warned] = [e for e in logs if e["event"] == "checkpoint_tmp_not_removed"]
    assert warned["path"] == str(stale) and warned["error"] == "Permission denied"
    assert not [e for e in logs if e["event"] == "checkpoint_tmp_removed"]


def test_a_verified_load_restores_the_parameters_and_optimizer_state_bit_for_bit(tmp_path):
    manager = _manager(tmp_path / "ckpt", key=KEY)
    _save(manager, 7)
    saved = {n: p.detach().clone() for n, p in manager.model.named_parameters()}
    moments = {i: s["exp_avg"].clone() for i, s in manager.optimizer.state_dict()["state"].items()}
    other = _manager(tmp_path / "ckpt", key=KEY, seed=1)  # another start: other weights and moments
    assert any(not torch.equal(p, saved[n]) for n, p in other.model.named_parameters())
    state = other.load(*other.latest())
    assert state["step"] == 7
    assert all(torch.equal(p, saved[n]) for n, p in other.model.named_parameters())
    assert all(torch.equal(s["exp_avg"], moments[i]) for i, s in other.optimizer.state_dict()["state"].items())


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer-exp_avg.safetensors", "trainer_state.json", INDEX])
def test_a_tampered_file_in_the_only_checkpoint_stops_the_job_naming_it_rather_than_restart(name, tmp_path):
    manager = _manager(tmp_path / "ckpt", key=KEY)
    _save(manager, 3)
    _tamper(tmp_path / "ckpt" / "step-00000003", name)
    refused = rf"none of the 1 checkpoints .* can be resumed from \(step-00000003: {re.escape(name)}: "
    with pytest.raises(CheckpointError, match=refused):
        manager.latest()


def test_a_checkpoint_is_resumed_only_with_the_key_it_was_signed_with(tmp_path):
    _save(_manager(tmp_path / "ckpt", key=KEY), 2)
    _save(_manager(tmp_path / "ckpt"), 3)  # unsigned: refused where a key is required
    assert _manager(tmp_path / "ckpt", key=KEY).latest()[0].name == "step-00000002"
    with pytest.raises(CheckpointError, match="not signed with --checkpoint-key-file's key"):
        _manager(tmp_path / "ckpt", key=b"x" * 32).latest()


def test_a_signed_checkpoint_without_the_key_file_is_refused_not_resumed_unchecked(tmp_path):
    _save(_manager(tmp_path / "ckpt", key=KEY), 2)
    _save(_manager(tmp_path / "ckpt", key=KEY), 4)
    before = {p: p.read_bytes() for p in sorted((tmp_path / "ckpt").rglob("*")) if p.is_file()}
    unsigned = _manager(tmp_path / "ckpt")  # the rerun without --checkpoint-key-file
    with pytest.raises(ConfigError, match=r"checkpoint .*step-00000004 is signed: rerun with --checkpoint-key-file"):
        unsigned.latest()
    assert {p: p.read_bytes() for p in sorted((tmp_path / "ckpt").rglob("*")) if p.is_file()} == before
    assert _manager(tmp_path / "ckpt", key=KEY).latest()[0].name == "step-00000004"  # with it: resumed
    _save(_manager(tmp_path / "plain"), 3)  # a run never signed resumes without a key, as before
    assert _manager(tmp_path / "plain").latest()[0].name == "step-00000003"
    _save(_manager(tmp_path / "ckpt"), 6)  # an unsigned one above them (as the old code wrote): still refused
    with pytest.raises(ConfigError, match=r"checkpoint .*step-00000004 is signed: rerun with --checkpoint-key-file"):
        _manager(tmp_path / "ckpt").latest()


def test_a_checkpoint_of_another_shape_is_a_config_error_before_any_tensor_is_applied(tmp_path):
    _save(_manager(tmp_path / "ckpt"), 4)
    wider = _manager(
        tmp_path / "ckpt", shape=GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=1)
    )
    before = {n: p.detach().clone() for n, p in wider.model.named_parameters()}
    with pytest.raises(ConfigError, match="differently configured run"):
        wider.load(*wider.latest())
    assert all(torch.equal(p, before[n]) for n, p in wider.model.named_parameters())


def _as_shards(checkpoint, key=None) -> None:
    """The whole checkpoint at ``checkpoint`` rewritten as two processes' fsdp shards (each tensor's rows
    cut just past its middle), its index re-hashed and signed with ``key``: a sharded checkpoint that joins."""
    import json

    from safetensors.torch import load_file, save_file

    from job.storage.store import sha256_file
    from job.training.checkpoint_files import index_text

    whole = {"model": checkpoint / "model.safetensors", **{p.stem[10:]: p for p in checkpoint.glob("optimizer-*")}}
    listings: list[dict] = [{}, {}]
    for prefix, file in whole.items():
        tensors, ending = load_file(file), file.name.removesuffix(".safetensors")
        for rank in (0, 1):
            rows = {}
            for name, tensor in tensors.items():
                cut = min(tensor.shape[0] // 2 + 1, tensor.shape[0]) if tensor.dim() else 0  # rank 0 holds more
                rows[name] = (tensor[:cut] if rank == 0 else tensor[cut:]) if tensor.dim() else tensor
                listings[rank][f"{prefix}/{name}"] = {"shape": list(tensor.shape), "offset": rank * cut}
            save_file({n: t.contiguous() for n, t in rows.items()}, str(checkpoint / f"{ending}-{rank}.safetensors"))
        file.unlink()
    for rank, listing in enumerate(listings):
        (checkpoint / f"shards-{rank}.json").write_text(json.dumps({"world": 2, "rank": rank, "tensors": listing}))
    files = {p.name: sha256_file(p) for p in sorted(checkpoint.iterdir()) if p.name != INDEX}
    (checkpoint / INDEX).write_text(index_text(files, key))


def _rehash(checkpoint, key=None) -> None:
    from job.storage.store import sha256_file
    from job.training.checkpoint_files import index_text

    files = {p.name: sha256_file(p) for p in sorted(checkpoint.iterdir()) if p.name != INDEX}
    (checkpoint / INDEX).write_text(index_text(files, key))


def test_fsdp_shards_whose_listings_disagree_are_skipped_as_a_bad_sha256_is_and_the_previous_one_resumed(tmp_path):
    from structlog.testing import capture_logs

    manager = _manager(tmp_path / "ckpt", keep=2, key=KEY)
    for step in (1, 2, 3):
        _save(manager, step)
    for step in (2, 3):
        _as_shards(tmp_path / "ckpt" / f"step-0000000{step}", KEY)
    assert manager.latest()[0].name == "step-00000003"  # shards that join pass
    newest = tmp_path / "ckpt" / "step-00000003"
    (newest / "model-1.safetensors").write_bytes((newest / "model-0.safetensors").read_bytes())
    _rehash(newest, KEY)  # every sha256 and the HMAC true: only the rows disagree with the listing
    with capture_logs() as logs:
        path, _files = manager.latest()
    assert path.name == "step-00000002"
    [skipped] = [e for e in logs if e["event"] == "checkpoint_skipped"]
    assert skipped["checkpoint"] == "step-00000003" and skipped["file"] == "model-1.safetensors"
    assert "the shards of model/" in skipped["reason"]
    state = manager.load(path, _files)  # the previous one loads, its shards joined
    assert state["step"] == 2
    _save(manager, 4)  # keeps 2 and 4 (two good ones); the skipped 3 is not counted among them
    assert _names(tmp_path / "ckpt") == ["step-00000002", "step-00000003", "step-00000004"]
    for step in (2, 4):  # where none passes: exit 1 naming the file, not a restart from step 0
        shutil.rmtree(tmp_path / "ckpt" / f"step-0000000{step}")
    with pytest.raises(CheckpointError, match=r"none of the 1 checkpoints .*\(step-00000003: model-1.safetensors: "):
        manager.latest()


def _uploaded(bucket) -> list[str]:
    return sorted(p.name for p in (bucket / "checkpoints").iterdir()) if (bucket / "checkpoints").exists() else []


def test_the_uploader_mirrors_the_local_rotation_in_the_bucket_index_last(tmp_path):
    bucket = tmp_path / "bucket"
    with CheckpointUploader(LocalStorage(bucket), Metrics()) as uploader:
        manager = _manager(tmp_path / "work" / "checkpoints", keep=2, on_checkpoint=uploader)
        for step in (1, 2, 3):
            _save(manager, step)
    assert _uploaded(bucket) == ["step-00000002", "step-00000003"]
    local = tmp_path / "work" / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in (bucket / "checkpoints" / "step-00000003").iterdir()) == sorted(
        p.name for p in local.iterdir()
    )


def test_a_failed_upload_is_raised_after_training_and_only_logged_when_training_failed(tmp_path):
    (tmp_path / "not-a-folder").write_text("")  # a store that refuses every write
    checkpoint = _save(_manager(tmp_path / "work" / "checkpoints"), 1)
    with pytest.raises(OSError):
        with CheckpointUploader(LocalStorage(tmp_path / "not-a-folder"), Metrics()) as uploader:
            uploader(checkpoint)
    with pytest.raises(KeyboardInterrupt):  # training's own error is the one that comes out
        with CheckpointUploader(LocalStorage(tmp_path / "not-a-folder"), Metrics()) as uploader:
            uploader(checkpoint)
            raise KeyboardInterrupt


def test_a_checkpoint_counts_as_uploaded_once_it_is_in_the_store_and_not_when_the_store_fails(tmp_path):
    metrics, uploaded = Metrics(), "sft_job_last_checkpoint_upload_timestamp_seconds"
    metrics.for_run("u1", None)
    uploader = CheckpointUploader(LocalStorage(tmp_path / "bucket"), metrics)
    uploader(_checkpoint(tmp_path / "work"))
    uploader.wait()
    assert (tmp_path / "bucket/checkpoints/step-00000002/index.json").is_file()
    assert metrics.value(uploaded, {"run_id": "u1"}) > 1.7e9

    (tmp_path / "not-a-folder").write_text("")  # a store that refuses every write
    metrics = Metrics()
    metrics.for_run("u2", None)
    failing = CheckpointUploader(LocalStorage(tmp_path / "not-a-folder"), metrics)
    failing(_checkpoint(tmp_path / "work2"))
    with pytest.raises(OSError):
        failing.wait()
    assert metrics.value(uploaded, {"run_id": "u2"}) == 0  # what SftJobCheckpointNotUploaded waits on


def _checkpoint(work):
    checkpoint = work / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    (checkpoint / "index.json").write_text("{}")
    return checkpoint


def _bucket_with(tmp_path, steps, key=None):
    """A bucket holding checkpoints of ``steps``, as the uploader leaves them."""
    bucket = LocalStorage(tmp_path / "bucket")
    with CheckpointUploader(bucket, Metrics()) as uploader:
        manager = _manager(tmp_path / "written" / "checkpoints", keep=len(steps), key=key, on_checkpoint=uploader)
        for step in steps:
            _save(manager, step)
    return bucket


def test_fetch_brings_back_the_newest_good_checkpoint_and_falls_back_past_a_tampered_one(tmp_path):
    bucket = _bucket_with(tmp_path, (1, 2, 3), key=KEY)
    _tamper(tmp_path / "bucket" / "checkpoints" / "step-00000003")
    fetch_checkpoint(bucket, tmp_path / "node", key=KEY)
    assert _names(tmp_path / "node" / "checkpoints") == ["step-00000002"]
    assert not list((tmp_path / "node" / "checkpoints").glob(".*"))  # the refused one's download is gone
    fetch_checkpoint(bucket, tmp_path / "node", key=KEY)  # a folder holding one already asks the bucket nothing
    assert _names(tmp_path / "node" / "checkpoints") == ["step-00000002"]


def test_fetch_of_a_signed_checkpoint_without_the_key_file_is_refused_and_keeps_nothing(tmp_path):
    bucket = _bucket_with(tmp_path, (1, 2), key=KEY)
    with pytest.raises(
        ConfigError, match=r"checkpoint .*/checkpoints/step-00000002 is signed: rerun with --checkpoint"
    ):
        fetch_checkpoint(bucket, tmp_path / "node", key=None)
    assert not (tmp_path / "node" / "checkpoints").exists() or not list((tmp_path / "node" / "checkpoints").iterdir())
    assert _uploaded(tmp_path / "bucket") == ["step-00000001", "step-00000002"]  # the bucket's copies untouched


def test_fetch_where_none_passes_is_a_checkpoint_error_and_an_incomplete_one_is_not_counted(tmp_path):
    bucket = _bucket_with(tmp_path, (1,), key=KEY)
    (tmp_path / "bucket" / "checkpoints" / "step-00000009").mkdir()
    (tmp_path / "bucket" / "checkpoints" / "step-00000009" / "model.safetensors").write_bytes(b"half")  # no index
    with pytest.raises(CheckpointError, match=r"none of the 1 checkpoints in .*/checkpoints can be resumed"):
        fetch_checkpoint(bucket, tmp_path / "node", key=b"x" * 32)  # signed with another key
    assert _names(tmp_path / "node" / "checkpoints") == []
    empty = LocalStorage(tmp_path / "empty")
    fetch_checkpoint(empty, tmp_path / "fresh", key=KEY)  # no checkpoint at all: a fresh start
    assert not (tmp_path / "fresh" / "checkpoints").exists()
