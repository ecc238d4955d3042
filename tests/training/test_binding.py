"""State that belongs to another run is refused: a checkpoint is bound to its run id, its stage, the options
that change its trajectory and the sha256 of its data and starting weights (``job/training/binding.py``), under the
HMAC with ``--checkpoint-key-file``; a rerun whose data or starting weights changed is exit 2 naming them.
Through the real CLI: the exit code, the one stderr line, and what is left in the folder or the bucket."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from job.training.checkpoint_files import INDEX, checkpoint_problem, index_text
from tests.helpers import cli, finetune_run, smoke_run

KEY = b"a secret of thirty-two bytes....\n"
LAST = "step-00000010"  # the smoke's last checkpoint: 40 entries, batches of 8, 2 epochs


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with its sha256 (the run's lock left out: each holder writes itself
    into it): what a refused rerun must leave as it was."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock")
    return {str(p.relative_to(folder)): _digest(p) for p in files}


def _keys(s3, bucket: str, prefix: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}


def _signing(tmp_path: Path, signed: bool) -> list:
    if not signed:
        return []
    (tmp_path / "key").write_bytes(KEY)
    return ["--checkpoint-key-file", tmp_path / "key"]


@pytest.mark.slow
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_a_checkpoint_copied_from_another_run_is_refused_locally_and_from_s3(signed, s3, cache, tmp_path):
    key = _signing(tmp_path, signed)
    a = cli(*smoke_run(cache, tmp_path / "a-runs", "a", "--skip-judge", "--seed", "7", *key))
    assert a.returncode == 0, a.stderr
    theirs = tmp_path / "a-runs" / "a" / "checkpoints" / LAST

    # Locally: run A's last checkpoint copied into run B's folder before B starts.
    runs = tmp_path / "runs"
    shutil.copytree(theirs, runs / "b" / "checkpoints" / LAST)
    b = cli(*smoke_run(cache, runs, "b", "--skip-judge", *key))
    assert b.returncode == 1, b.stderr
    assert b.stderr.splitlines() == [
        f"Error: checkpoint {runs / 'b' / 'checkpoints' / LAST} belongs to the finetune stage of run a, "
        "not to the finetune stage of run b: move it away; it is not resumed"
    ]
    assert _listing(runs / "b" / "checkpoints") == {f"{LAST}/{k}": v for k, v in _listing(theirs).items()}
    assert not (runs / "b" / "model").exists()  # A's model is never shipped as B's
    assert json.loads((runs / "b" / "manifest.json").read_text())["stages"]["finetune"]["status"] == "failed"

    # Through S3, on a machine with an empty scratch folder: the same refusal, the bucket as it was.
    bucket = f"bind-{'signed' if signed else 'unsigned'}"  # one moto server for the session
    s3.create_bucket(Bucket=bucket)
    for path in theirs.iterdir():
        s3.upload_file(str(path), bucket, f"runs/b/checkpoints/{LAST}/{path.name}")
    before = _keys(s3, bucket, "runs/b/")
    scratch = tmp_path / "scratch"
    remote = cli(*smoke_run(cache, f"s3://{bucket}/runs", "b", "--skip-judge", "--scratch", scratch, *key))
    assert remote.returncode == 1, remote.stderr
    assert remote.stderr.splitlines() == [
        f"Error: checkpoint s3://{bucket}/runs/b/checkpoints/{LAST} belongs to the finetune stage of run a, "
        "not to the finetune stage of run b: move it away; it is not resumed"
    ]
    after = _keys(s3, bucket, "runs/b/")
    assert {k for k in after if "/checkpoints/" in k} == before and not any("/model/" in k for k in after)
    assert [p for p in (scratch / "b").rglob("*") if p.is_file() and "checkpoints" in p.parts] == []


@pytest.mark.slow
def test_the_finetune_checkpoint_under_dpo_checkpoints_is_refused_with_one_line(cache, tmp_path):
    runs = tmp_path / "runs"
    first = cli(*smoke_run(cache, runs, "r", "--skip-judge", "--dpo"))
    assert first.returncode == 0, first.stderr
    run = runs / "r"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["dpo"]["binding"]["stage"] == "dpo"
    manifest["stages"]["dpo"]["status"] = "failed"  # the DPO stage to be run again
    (run / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(run / "dpo" / "checkpoints")
    shutil.copytree(run / "checkpoints" / LAST, run / "dpo" / "checkpoints" / LAST)
    dpo_model = _listing(run / "dpo" / "model")

    rerun = cli(*smoke_run(cache, runs, "r", "--skip-judge", "--dpo"))
    assert rerun.returncode == 1, rerun.stderr  # not 70: no KeyError from a finetune optimizer in DPO
    assert rerun.stderr.splitlines() == [
        f"Error: checkpoint {run / 'dpo' / 'checkpoints' / LAST} belongs to the finetune stage of run r, "
        "not to the dpo stage of run r: move it away; it is not resumed"
    ]
    assert sorted(p.name for p in (run / "dpo" / "checkpoints").iterdir()) == [LAST]
    assert _listing(run / "dpo" / "model") == dpo_model


@pytest.mark.slow
def test_a_rerun_after_the_dataset_changed_is_exit_2_naming_it_with_both_sha256s_and_writes_nothing(cache, tmp_path):
    runs, data = tmp_path / "runs", cache / "instruction-data.json"
    first = cli(*smoke_run(cache, runs, "r", "--skip-judge"))
    assert first.returncode == 0, first.stderr
    was = _digest(data)
    binding = json.loads((runs / "r" / "manifest.json").read_text())["stages"]["finetune"]["binding"]
    assert (binding["run_id"], binding["stage"], binding["data"]["sha256"]) == ("r", "finetune", was)
    entries = json.loads(data.read_text())
    entries[0]["output"] += " (edited)"
    data.write_text(json.dumps(entries))
    before = _listing(runs)

    rerun = cli(*smoke_run(cache, runs, "r", "--skip-judge"))
    assert rerun.returncode == 2, rerun.stderr
    assert rerun.stderr.splitlines() == [
        f"Error: --data {data} changed since run r began: sha256 {was} then, {_digest(data)} now. "
        "Restore it, or give another --run-id"
    ]
    assert _listing(runs) == before


def _changed_weights(source: Path, into: Path) -> Path:
    """A copy of the model folder ``source`` with one weight changed."""
    shutil.copytree(source, into)
    tensors = load_file(into / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(into / "model.safetensors"), metadata={"format": "pt"})
    return into


@pytest.mark.slow
def test_a_rerun_after_the_starting_weights_changed_is_exit_2_naming_them_with_both_sha256s(
    tiny_model_dir, cache, tmp_path
):
    model, runs = tmp_path / "model", tmp_path / "runs"
    shutil.copytree(tiny_model_dir, model)
    small = ["--train-limit", "8", "--max-steps", "1", "--limit", "1", "--max-new-tokens", "2", "--skip-judge"]
    args = ["run", "--model-dir", model, "--data", cache / "instruction-data.json", "--cache", cache]
    args += ["--output", runs, "--run-id", "m", "--metrics-port", "0", *small]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    was = json.loads((runs / "m" / "manifest.json").read_text())["inputs"]["model_dir"]["sha256"]
    shutil.rmtree(model)
    _changed_weights(tiny_model_dir, model)
    now = json.loads((runs / "m" / "manifest.json").read_text())  # (unchanged by the refusal below)
    before = _listing(runs)

    rerun = cli(*args)
    assert rerun.returncode == 2, rerun.stderr
    [line] = rerun.stderr.splitlines()
    assert line.startswith(f"Error: --model-dir {model} changed since run m began: sha256 {was} then, ")
    assert line.endswith(" now. Restore it, or give another --run-id") and line.count(" sha256 ") == 1
    assert _listing(runs) == before and now["inputs"]["model_dir"]["sha256"] == was


# --- sft-job finetune on its own: its run is its output folder ----------------------------------------------


@pytest.fixture
def stopped_at_two(tiny_model_dir, cache, tmp_path) -> Path:
    """A standalone finetune that stopped at step 2 with a checkpoint there."""
    out = tmp_path / "ft"
    done = cli(*finetune_run(tiny_model_dir, cache, out, "--max-steps", "2", "--eval-freq", "2"))
    assert done.returncode == 0, done.stderr
    return out


def test_a_standalone_rerun_on_other_weights_data_or_options_is_exit_2_and_resumes_nothing(
    stopped_at_two, tiny_model_dir, cache, tmp_path
):
    out, data = stopped_at_two, cache / "instruction-data.json"
    checkpoint = out / "checkpoints" / "step-00000002"
    before = _listing(out)
    other_model = _changed_weights(tiny_model_dir, tmp_path / "other-model")
    moved = cli(*finetune_run(other_model, cache, out, "--max-steps", "4", "--eval-freq", "2"))
    assert moved.returncode == 2, moved.stderr
    [line] = moved.stderr.splitlines()
    assert line.startswith(f"Error: --model-dir {other_model} changed since checkpoint {checkpoint} was written")

    other_lr = cli(*finetune_run(tiny_model_dir, cache, out, "--max-steps", "4", "--eval-freq", "2", "--lr", "1e-3"))
    assert other_lr.returncode == 2, other_lr.stderr
    assert other_lr.stderr.splitlines() == [
        f"Error: checkpoint {checkpoint} was written with other options: lr 5e-05 (now 0.001). "
        "Rerun with them, or train into another output"
    ]

    was = _digest(data)
    data.write_text(data.read_text().replace("Evaluate", "Assess", 1))
    edited = cli(*finetune_run(tiny_model_dir, cache, out, "--max-steps", "4", "--eval-freq", "2"))
    assert edited.returncode == 2, edited.stderr
    assert edited.stderr.splitlines() == [
        f"Error: --data {data} changed since checkpoint {checkpoint} was written: sha256 {was} then, "
        f"{_digest(data)} now. Restore it, or train into another output"
    ]
    assert _listing(out) == before


def test_a_checkpoint_without_a_binding_is_refused_with_a_line_that_says_how_to_go_on(
    stopped_at_two, tiny_model_dir, cache
):
    checkpoint = stopped_at_two / "checkpoints" / "step-00000002"
    index = json.loads((checkpoint / INDEX).read_text())
    del index["binding"]  # as the previous version wrote it
    (checkpoint / INDEX).write_text(json.dumps(index))
    rerun = cli(*finetune_run(tiny_model_dir, cache, stopped_at_two, "--max-steps", "4", "--eval-freq", "2"))
    assert rerun.returncode == 1, rerun.stderr
    assert rerun.stderr.splitlines() == [
        f"Error: checkpoint {checkpoint} records no run binding (written by an earlier sft-job): finish it "
        "with that version, or move it away to train from the start"
    ]
    assert sorted(p.name for p in (stopped_at_two / "checkpoints").iterdir()) == ["step-00000002"]


def test_a_standalone_rerun_with_only_where_it_stops_changed_still_resumes(stopped_at_two, tiny_model_dir, cache):
    args = finetune_run(tiny_model_dir, cache, stopped_at_two, "--eval-freq", "2", "--gradient-checkpointing")
    resumed = cli(*args, "--max-steps", "4", "--checkpoint-every", "3", "--keep-checkpoints", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert '"event": "resumed"' in resumed.stdout and '"step": 2' in resumed.stdout


# --- the binding under the signature ------------------------------------------------------------------------


def _signed_checkpoint(folder: Path, binding: dict) -> None:
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": [{"params": [0], "lr": 1.0, "betas": [0, 0]}]}))
    state = {"step": 1, "epoch": 0, "batch_in_epoch": 1, "tokens_seen": 1, "history": []}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    files = {p.name: _digest(p) for p in sorted(folder.iterdir())}
    (folder / INDEX).write_text(index_text(files, KEY, binding))


BINDING = {
    "run_id": "a",
    "stage": "finetune",
    "options": {"lr": 5e-05, "seed": 123},
    "data": {"file": "d.json", "sha256": "0" * 64},
    "model": {"folder": "m", "sha256": "1" * 64},
}


@settings(max_examples=25, deadline=None)
@given(
    field=st.sampled_from(["run_id", "stage", "options", "data", "model"]),
    value=st.one_of(st.text(max_size=8), st.none(), st.dictionaries(st.text(max_size=4), st.text(max_size=4))),
)
def test_a_binding_changed_without_the_key_fails_the_signature(tmp_path_factory, field, value):
    folder = tmp_path_factory.mktemp("ck") / "step-00000001"
    _signed_checkpoint(folder, BINDING)
    assert checkpoint_problem(folder, KEY) is None
    index = json.loads((folder / INDEX).read_text())
    if index["binding"][field] == value:
        return
    index["binding"][field] = value  # what a bucket writer without the key could do: claim another run
    (folder / INDEX).write_text(json.dumps(index))
    problem = checkpoint_problem(folder, KEY)
    assert problem is not None and problem.file == INDEX
