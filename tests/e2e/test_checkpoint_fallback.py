"""A checkpoint that fails any check is skipped for the previous one, and no good checkpoint is ever
deleted because a later one was bad: locally for every kind of forged file (the index re-hashed, as a
bucket writer would), and through S3 with signed indexes, where a forged latest checkpoint is refused
and the run resumes from the previous one, which is still in the bucket afterwards."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import load_file, save_file

from job.training.checkpoint_files import INDEX, checkpoint_problem
from tests.helpers import cli, events, filled_cache, finetune_run, smoke_run, start_cli, wait_for_event


def _rehash(folder: Path) -> None:
    """What a writer without the key does after changing a file: the index made to match again."""
    index = json.loads((folder / INDEX).read_text())
    index["files"] = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in index["files"]}
    (folder / INDEX).write_text(json.dumps(index))


def _extra_key(folder: Path) -> str:
    state = json.loads((folder / "trainer_state.json").read_text())
    (folder / "trainer_state.json").write_text(json.dumps({**state, "extra": 1}))
    return "trainer_state.json"


def _huge_header(folder: Path) -> str:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[:8] = (1 << 40).to_bytes(8, "little")
    (folder / "model.safetensors").write_bytes(bytes(data))
    return "model.safetensors"


def _optimizer_groups(folder: Path) -> str:
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": "all"}))
    return "optimizer.json"


def _python_random(folder: Path) -> str:
    (folder / "rng-0.json").write_text(json.dumps({"python": [3, [1, 2, 3], None]}))
    return "rng-0.json"


@pytest.fixture(scope="module")
def eight_steps(tiny_model_dir, shared_data, tmp_path_factory) -> Path:
    """A finetune that stopped at step 8 with checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("eight") / "ft"
    cache = filled_cache(tmp_path_factory.mktemp("cache"), shared_data)
    done = cli(
        *finetune_run(tiny_model_dir, cache, out, "--checkpoint-every", "4", "--eval-freq", "4"),
        "--max-steps",
        "8",
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("forge", [_extra_key, _huge_header, _optimizer_groups, _python_random])
def test_a_forged_latest_checkpoint_is_skipped_and_no_good_one_is_rotated_away_for_it(
    forge, eight_steps, tiny_model_dir, cache, tmp_path
):
    out = tmp_path / "ft"
    shutil.copytree(eight_steps, out)
    latest = out / "checkpoints" / "step-00000008"
    name = forge(latest)
    _rehash(latest)
    # Resumed from step 4 and stopped at 6 with one checkpoint kept: the forged step 8 must not count
    # among the kept, or the new step-6 checkpoint would be rotated away in its favour.
    args = finetune_run(tiny_model_dir, cache, out, "--checkpoint-every", "100", "--eval-freq", "4")
    resumed = cli(*args, "--max-steps", "6", "--keep-checkpoints", "1")
    assert resumed.returncode == 0, resumed.stderr
    [skipped] = [e for e in events(resumed.stdout) if e["event"] == "checkpoint_skipped"]
    assert (skipped["checkpoint"], skipped["file"]) == ("step-00000008", name)
    assert [e["step"] for e in events(resumed.stdout) if e["event"] == "resumed"] == [4]
    assert checkpoint_problem(out / "checkpoints" / "step-00000006") is None  # kept, and good


def test_no_checkpoint_that_passes_is_exit_1_not_a_silent_restart(eight_steps, tiny_model_dir, cache, tmp_path):
    out = tmp_path / "ft"
    shutil.copytree(eight_steps, out)
    for folder in (out / "checkpoints").iterdir():
        _extra_key(folder)
        _rehash(folder)
    result = cli(*finetune_run(tiny_model_dir, cache, out, "--max-steps", "12"))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert f"none of the 2 checkpoints in {out / 'checkpoints'} can be resumed from (step-00000008:" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_fsdp_shards_that_do_not_join_are_skipped_naming_the_file_and_the_run_resumes_before_them(
    tiny_model_dir, cache, tmp_path
):
    out, steps = tmp_path / "ft", ["--sharding", "fsdp", "--checkpoint-every", "2", "--eval-freq", "2"]
    first = cli(*finetune_run(tiny_model_dir, cache, out, *steps, "--max-steps", "4"))
    assert first.returncode == 0, first.stderr
    latest = out / "checkpoints" / "step-00000004"
    shard = load_file(latest / "model-0.safetensors")
    name = next(n for n, t in shard.items() if t.dim() == 2)
    shard[name] = torch.cat([shard[name], shard[name][:1]])  # one row more than the listing's shape
    save_file(shard, latest / "model-0.safetensors")
    _rehash(latest)  # every sha256 true: only the rows disagree with shards-0.json
    rerun = cli(*finetune_run(tiny_model_dir, cache, out, *steps, "--max-steps", "6"))
    assert rerun.returncode == 0, rerun.stderr
    [skipped] = [e for e in events(rerun.stdout) if e["event"] == "checkpoint_skipped"]
    assert (skipped["checkpoint"], skipped["file"]) == ("step-00000004", "model-0.safetensors")
    assert f"the shards of model/{name}" in skipped["reason"]
    assert [e["step"] for e in events(rerun.stdout) if e["event"] == "resumed"] == [2]


def test_a_signed_run_rerun_without_its_key_file_is_exit_2_and_changes_nothing(tiny_model_dir, cache, tmp_path):
    (tmp_path / "key").write_bytes(b"a secret of thirty-two bytes....\n")
    out, steps = tmp_path / "ft", ["--checkpoint-every", "2", "--eval-freq", "2"]
    signed = cli(
        *finetune_run(tiny_model_dir, cache, out, *steps, "--max-steps", "2"), "--checkpoint-key-file", tmp_path / "key"
    )
    assert signed.returncode == 0, signed.stderr
    before = _files(out)
    rerun = cli(*finetune_run(tiny_model_dir, cache, out, *steps, "--max-steps", "4"))
    assert rerun.returncode == 2
    [line] = rerun.stderr.splitlines()
    assert line.startswith(
        f"Error: checkpoint {out / 'checkpoints' / 'step-00000002'} is signed: rerun with --checkpoint-key-file"
    )
    assert _files(out) == before  # nothing written, nothing deleted


def _keys(s3, bucket: str, prefix: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}


@pytest.mark.slow
def test_a_forged_checkpoint_in_the_bucket_is_refused_by_its_signature_and_the_previous_one_resumes(
    s3: boto3.client, cache, tmp_path
):
    s3.create_bucket(Bucket="signed")
    (tmp_path / "key").write_bytes(b"a secret of thirty-two bytes....\n")
    common = ["--skip-judge", "--train-limit", "80", "--checkpoint-key-file", tmp_path / "key"]
    straight = cli(*smoke_run(cache, "s3://signed/runs", "straight", *common, "--scratch", tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr

    args = smoke_run(cache, "s3://signed/runs", "cut", *common, "--scratch", tmp_path / "b")
    proc = start_cli(*args)
    wait_for_event(proc, lambda e: e.get("event") == "checkpoint" and e.get("step") == 10, deadline_s=300)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    names = sorted({k.split("/")[3] for k in _keys(s3, "signed", "runs/cut/checkpoints/")})
    assert names[0] == "step-00000010" and len(names) == 2
    forged = tmp_path / "forged"  # the latest, changed by a writer who has the bucket but not the key
    forged.mkdir()
    for key in _keys(s3, "signed", f"runs/cut/checkpoints/{names[1]}/"):
        s3.download_file("signed", key, str(forged / Path(key).name))
    state = json.loads((forged / "trainer_state.json").read_text())
    (forged / "trainer_state.json").write_text(json.dumps({**state, "step": 10}))
    _rehash(forged)
    for name in ("trainer_state.json", INDEX):
        s3.upload_file(str(forged / name), "signed", f"runs/cut/checkpoints/{names[1]}/{name}")

    rerun = cli(*args[:-1], tmp_path / "c")  # another machine: an empty scratch folder
    assert rerun.returncode == 0, rerun.stderr
    [skipped] = [e for e in events(rerun.stdout) if e["event"] == "checkpoint_skipped"]
    assert skipped == {**skipped, "checkpoint": names[1], "file": INDEX}
    assert skipped["reason"] == "not signed with --checkpoint-key-file's key"
    assert [e["step"] for e in events(rerun.stdout) if e["event"] == "resumed"] == [10]
    assert "runs/cut/checkpoints/step-00000010/index.json" in _keys(s3, "signed", "runs/cut/")  # still there
    weights = [
        load_file(tmp_path / d / run / "model" / "model.safetensors") for d, run in (("a", "straight"), ("c", "cut"))
    ]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
