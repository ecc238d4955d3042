"""``--sharding fsdp`` through the real CLI: processes started as ``accelerate launch --multi_gpu`` starts
them on a machine without GPUs (each on the CPU over gloo), against the single-process run of the same
global batches: the same losses and final weights within 1e-6, and checkpoints written as each process's
shards that resume on as many processes or on another number."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from job.core.errors import ExitCode
from tests.helpers import REPO, cli, events, free_port, wait_for_event

# 20 steps of --batch-size 8 in 2 micro-batches a process, the gradient norm clipped (far below a fresh
# model's, so every step clips), evaluations every 5 steps on one batch a split.
TWENTY_STEPS = ["--max-steps", "20", "--eval-freq", "5", "--eval-iter", "1", "--grad-accum", "2"]
TWENTY_STEPS += ["--grad-clip", "0.05", "--log-format", "json"]


def launched(processes: int, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """``sft-job ARGS`` on ``processes`` CPU processes over gloo, as accelerate launches them."""
    launch = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "job.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def stage_args(stage: str, model_dir: Path, cache: Path, output: Path, *extra) -> list:
    data = cache / ("instruction-data-with-preference.json" if stage == "dpo" else "instruction-data.json")
    return [stage, "--model-dir", model_dir, "--data", data, "--cache", cache, "--output", output, *extra]


def outputs(folder: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    weights = load_file(str(folder / "model" / "model.safetensors"))
    return weights, json.loads((folder / "losses.json").read_text())


def assert_same_run(got: Path, want: Path, tolerance: float = 1e-6) -> None:
    """The same final weights within ``tolerance`` and losses within ``tolerance`` of their size (float32's
    spacing at a fresh model's loss of 10.5 is 9.5e-7: one rounding apart is 1e-6 there), the same
    evaluations, tokens counted alike."""
    (weights, losses), (their_weights, their_losses) = outputs(got), outputs(want)
    assert weights.keys() == their_weights.keys()
    assert max((weights[k] - their_weights[k]).abs().max().item() for k in weights) < tolerance
    assert [h["step"] for h in losses] == [h["step"] for h in their_losses]
    assert [h["tokens_seen"] for h in losses] == [h["tokens_seen"] for h in their_losses]
    for ours, theirs in zip(losses, their_losses, strict=True):
        for k in (k for k in ours if k.endswith(("loss", "reward"))):
            assert abs(ours[k] - theirs[k]) <= tolerance * max(1.0, abs(theirs[k])), (k, ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "extra"),
    [
        ("finetune", ["--batched-eval"]),
        ("finetune", ["--lora-rank", "4", "--gradient-checkpointing"]),
        ("dpo", []),
        ("dpo", ["--lora-rank", "4", "--no-untie-head"]),
    ],
    ids=["full", "lora-checkpointed", "dpo", "dpo-lora"],
)
def test_fsdp_on_two_processes_trains_as_one_process_does(stage, extra, tiny_model_dir, cache, tmp_path):
    sharded = launched(
        2, *stage_args(stage, tiny_model_dir, cache, tmp_path / "fsdp", *TWENTY_STEPS, *extra), "--sharding", "fsdp"
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    single = cli(*stage_args(stage, tiny_model_dir, cache, tmp_path / "one", *TWENTY_STEPS, *extra))
    assert single.returncode == 0, single.stderr[-3000:]
    assert_same_run(tmp_path / "fsdp", tmp_path / "one")
    assert len(outputs(tmp_path / "fsdp")[1]) == 4  # steps 0, 5, 10, 15 evaluated
    pth = list((tmp_path / "fsdp").glob("*.pth"))  # the book's .pth, gathered as the safetensors are
    assert [p.name for p in pth] == [p.name for p in (tmp_path / "one").glob("*.pth")] and len(pth) == 1


def test_fp16_with_fsdp_is_refused_before_anything_is_written(tiny_model_dir, cache, tmp_path):
    done = cli(
        *stage_args("finetune", tiny_model_dir, cache, tmp_path / "out", "--sharding", "fsdp"), "--precision", "fp16"
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "--precision fp16 does not combine with --sharding fsdp" in done.stderr
    assert not (tmp_path / "out").exists()


def started(processes: int, *args) -> subprocess.Popen:
    """``sft-job ARGS`` on ``processes`` CPU processes through ``python -m job.launch`` (which passes a stop
    signal to the workers and exits with their code)."""
    launch = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    command = [sys.executable, "-m", "job.launch", *launch, "-m", "job.cli", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def assert_no_pickle(checkpoint: Path) -> None:
    """Only safetensors and JSON (and the run's config.yaml), none of them a pickle."""
    names = sorted(p.name for p in checkpoint.iterdir())
    assert all(n.endswith((".safetensors", ".json")) or n == "config.yaml" for n in names), names
    assert not [n for n in names if (checkpoint / n).read_bytes()[:1] == b"\x80"]  # pickle's protocol mark
    assert {"model-0.safetensors", "model-1.safetensors", "shards-0.json", "shards-1.json"} <= set(names)


def straight_and_cut(tiny_model_dir: Path, cache: Path, tmp_path: Path) -> list:
    """20 fsdp steps on 2 processes, checkpointed every 2, into ``straight``; the same into ``cut``, stopped by
    SIGTERM once a checkpoint of step 4 or later is written (every process finishes its step, the checkpoint,
    exit 75). Returns the runs' arguments after the stage's own."""
    steps = [*TWENTY_STEPS[:2], "--checkpoint-every", "2", "--sharding", "fsdp", *TWENTY_STEPS[2:]]
    straight = launched(2, *stage_args("finetune", tiny_model_dir, cache, tmp_path / "straight", *steps))
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = started(2, *stage_args("finetune", tiny_model_dir, cache, tmp_path / "cut", *steps))
    wait_for_event(cut, lambda e: e.get("event") == "checkpoint" and e["step"] >= 4, deadline_s=400)
    cut.send_signal(signal.SIGTERM)
    _out, err = cut.communicate(timeout=300)
    assert cut.returncode == ExitCode.RETRY, err[-3000:]
    return steps


@pytest.mark.slow
def test_fsdp_checkpoints_are_shards_that_resume_on_as_many_processes_or_on_one(tiny_model_dir, cache, tmp_path):
    steps = straight_and_cut(tiny_model_dir, cache, tmp_path)
    newest, older = sorted((tmp_path / "cut" / "checkpoints").glob("step-*"), reverse=True)[:2]
    assert int(newest.name[5:]) < 20
    for checkpoint in (newest, older):
        assert_no_pickle(checkpoint)
    shutil.copytree(tmp_path / "cut", tmp_path / "on-one")
    shutil.copytree(tmp_path / "cut", tmp_path / "tampered")

    # the rerun on 2 processes ends bit for bit with the uninterrupted run
    rerun = launched(2, *stage_args("finetune", tiny_model_dir, cache, tmp_path / "cut", *steps))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    [resumed] = [e for e in events(rerun.stdout) if e["event"] == "resumed"]
    assert resumed["step"] == int(newest.name[5:])
    (weights, losses), (their_weights, their_losses) = outputs(tmp_path / "cut"), outputs(tmp_path / "straight")
    assert losses == their_losses and all(torch.equal(weights[k], their_weights[k]) for k in their_weights)

    # on one process, the shards joined and cut for one: the same losses and weights within 1e-6
    one = cli(*stage_args("finetune", tiny_model_dir, cache, tmp_path / "on-one", *steps))
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_run(tmp_path / "on-one", tmp_path / "straight")

    # a shard changed by one byte: that checkpoint is skipped, naming the file, and the one before is used
    shard = tmp_path / "tampered" / "checkpoints" / newest.name / "model-1.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    tampered = cli(*stage_args("finetune", tiny_model_dir, cache, tmp_path / "tampered", *steps))
    assert tampered.returncode == 0, tampered.stderr[-3000:]
    log = events(tampered.stdout)
    [skipped] = [e for e in log if e["event"] == "checkpoint_skipped"]
    assert skipped["checkpoint"] == newest.name and skipped["file"] == "model-1.safetensors"
    assert [e["step"] for e in log if e["event"] == "resumed"] == [int(older.name[5:])]
    assert_same_run(tmp_path / "tampered", tmp_path / "straight")


@pytest.mark.slow
def test_fsdp_checkpoint_of_two_processes_resumes_on_four_with_the_same_losses_and_weights(
    tiny_model_dir, cache, tmp_path
):
    # --batch-size 8 (the default) of --grad-accum 2 on 4 processes: one entry a micro-batch each
    steps = straight_and_cut(tiny_model_dir, cache, tmp_path)
    newest = max((tmp_path / "cut" / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
    assert_no_pickle(newest)

    # each of the 4 processes reads its own rows of the 2 processes' shards
    four = launched(4, *stage_args("finetune", tiny_model_dir, cache, tmp_path / "cut", *steps))
    assert four.returncode == 0, four.stderr[-3000:]
    [resumed] = [e for e in events(four.stdout) if e["event"] == "resumed"]
    assert resumed["step"] == int(newest.name[5:]) < 20
    assert_same_run(tmp_path / "cut", tmp_path / "straight")
    after = max((tmp_path / "cut" / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
    assert {f"model-{rank}.safetensors" for rank in range(4)} <= {p.name for p in after.iterdir()}
