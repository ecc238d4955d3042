"""``--sharding fsdp`` at other world sizes and under the other stop signals: 4 CPU processes over gloo
(as ``accelerate launch --multi_gpu --num_processes 4`` starts them on a machine without GPUs) against
the single-process run of the same global batches, two "nodes" on localhost sharding one model, and
SIGUSR1 and SIGINT on 2 processes."""

from __future__ import annotations

import json
import re
import shutil
import signal

import pytest
import torch

from job.core.errors import ExitCode
from tests.e2e.test_fsdp import TWENTY_STEPS, assert_no_pickle, assert_same_run, launched, outputs, stage_args, started
from tests.e2e.test_multinode import _finish, _keys, _node_args, _start_nodes, _weights
from tests.helpers import cli, events, wait_for_event


def logged(stdout: str) -> list[dict]:
    """The JSON log records in ``stdout`` wherever they sit: the processes share one stdout, and a line
    another one writes may land between a record and its newline (print writes them apart)."""
    decoder, found = json.JSONDecoder(), []
    for start in (m.start() for m in re.finditer(r'\{"', stdout)):
        try:
            record, _end = decoder.raw_decode(stdout, start)
        except ValueError:
            continue
        if "event" in record and "rank" in record:
            found.append(record)
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "extra"),
    [("finetune", []), ("finetune", ["--lora-rank", "4"]), ("dpo", [])],
    ids=["full", "lora", "dpo"],
)
def test_fsdp_on_four_processes_trains_as_one_process_does(stage, extra, tiny_model_dir, cache, tmp_path):
    # --batch-size 8 (the default) over 4 processes x --grad-accum 2: one example a micro-batch; on one
    # process the same 8 in 2 micro-batches of 4
    sharded = launched(
        4, *stage_args(stage, tiny_model_dir, cache, tmp_path / "fsdp", *TWENTY_STEPS, *extra), "--sharding", "fsdp"
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    [start] = [e for e in logged(sharded.stdout) if e["event"] == f"{stage}_start"]
    assert start["processes"] == 4
    single = cli(*stage_args(stage, tiny_model_dir, cache, tmp_path / "one", *TWENTY_STEPS, *extra))
    assert single.returncode == 0, single.stderr[-3000:]
    assert_same_run(tmp_path / "fsdp", tmp_path / "one")
    assert len(outputs(tmp_path / "fsdp")[1]) == 4  # steps 0, 5, 10, 15 evaluated


@pytest.mark.slow
def test_two_nodes_with_fsdp_train_as_one_process_and_resume_from_s3_after_one_node_is_stopped(
    s3, tiny_model_dir, shared_data, tmp_path
):
    """Two "nodes" (test_multinode's launchers, each its own scratch) sharding one model over both: the
    state is gathered into the main process's whole files, which alone are uploaded."""
    if "multi" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket="multi")
    fsdp = ("--sharding", "fsdp")
    results = _finish(_start_nodes(tiny_model_dir, shared_data, tmp_path, "fsdp-two", *fsdp))
    for code, _out, err in results:
        assert code == 0, err[-3000:]
    (_, out0, _), (_, out1, _) = results
    log0, log1 = events(out0), events(out1)
    assert any(e["event"] == "finetune_start" and e["processes"] == 2 for e in log0)
    assert all(e["rank"] == 1 for e in log1)
    assert not [e for e in log1 if e["event"] in ("checkpoint", "checkpoint_uploaded", "stage_done", "run_complete")]
    uploads = [e["checkpoint"] for e in log0 if e["event"] == "checkpoint_uploaded"]
    assert uploads == ["step-00000004", "step-00000008", "step-00000012"]
    keys = _keys(s3, "fsdp-two")
    # whole files, gathered: no process's shards (node 1's never left its scratch)
    assert any(k.endswith("/step-00000012/model.safetensors") for k in keys)
    assert not [k for k in keys if "/checkpoints/" in k and k.rsplit("/", 1)[1].startswith(("model-", "shards-"))]
    assert not list((tmp_path / "fsdp-two" / "node1" / "scratch").glob("*/checkpoints/step-*"))

    single = cli(*_node_args(tiny_model_dir, shared_data, tmp_path / "one", "fsdp-one"))
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = _weights(s3, "fsdp-two"), _weights(s3, "fsdp-one")
    assert two.keys() == one.keys()
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-6

    # SIGTERM to node 1 once a checkpoint is uploaded: both groups checkpoint and exit 75; both rerun
    # with empty folders, the checkpoint fetched from the bucket and cut into each process's shard
    nodes = _start_nodes(tiny_model_dir, shared_data, tmp_path, "fsdp-cut", *fsdp)
    wait_for_event(nodes[0], lambda e: e.get("event") == "checkpoint_uploaded", deadline_s=400)
    nodes[1].send_signal(signal.SIGTERM)
    stopped = _finish(nodes)
    assert [code for code, _, _ in stopped] == [ExitCode.RETRY, ExitCode.RETRY], [e[-2000:] for _, _, e in stopped]
    shutil.rmtree(tmp_path / "fsdp-cut")
    resumed = _finish(_start_nodes(tiny_model_dir, shared_data, tmp_path, "fsdp-cut", *fsdp))
    for code, _out, err in resumed:
        assert code == 0, err[-3000:]
    for _, out, _ in resumed:
        assert any(e["event"] == "checkpoint_downloaded" for e in events(out))
    [at] = [e["step"] for e in events(resumed[0][1]) if e["event"] == "resumed"]
    assert 4 <= at < 12
    cut = _weights(s3, "fsdp-cut")
    assert cut.keys() == two.keys() and all(torch.equal(cut[k], two[k]) for k in two)


@pytest.mark.slow
def test_sigusr1_and_sigint_stop_every_fsdp_process_at_a_checkpoint_that_resumes_bit_for_bit(
    tiny_model_dir, cache, tmp_path
):
    """What the README promises for every stop signal, under fsdp through ``python -m job.launch``: every
    process finishes its step and writes its shards, the group exits 75, and the rerun ends as the
    uninterrupted run does."""
    steps = ["--max-steps", "12", "--checkpoint-every", "2", "--sharding", "fsdp", *TWENTY_STEPS[2:]]
    straight = launched(2, *stage_args("finetune", tiny_model_dir, cache, tmp_path / "straight", *steps))
    assert straight.returncode == 0, straight.stderr[-3000:]
    for stop in (signal.SIGUSR1, signal.SIGINT):
        output = tmp_path / stop.name
        cut = started(2, *stage_args("finetune", tiny_model_dir, cache, output, *steps))
        wait_for_event(cut, lambda e: e.get("event") == "checkpoint" and e["step"] >= 2, deadline_s=400)
        cut.send_signal(stop)
        _out, err = cut.communicate(timeout=300)
        assert cut.returncode == ExitCode.RETRY, err[-3000:]
        [line] = [line for line in err.splitlines() if line.startswith("Error:")]
        assert line.startswith(f"Error: stopped by {stop.name} at step"), err[-3000:]
        said = [e["rank"] for e in logged(_out) if e["event"] == "stage_failed" and stop.name in e["error"]]
        assert sorted(said) == [0, 1]  # each process says so in its log; the group once on stderr
        newest = max((output / "checkpoints").glob("step-*"))
        assert int(newest.name[5:]) < 12 and not (output / "model").exists()
        assert_no_pickle(newest)

        rerun = launched(2, *stage_args("finetune", tiny_model_dir, cache, output, *steps))
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert [e["step"] for e in logged(rerun.stdout) if e["event"] == "resumed"] == [int(newest.name[5:])]
        (weights, losses), (their_weights, their_losses) = outputs(output), outputs(tmp_path / "straight")
        assert losses == their_losses, stop.name
        assert weights.keys() == their_weights.keys()
        assert all(torch.equal(weights[k], their_weights[k]) for k in their_weights), stop.name
