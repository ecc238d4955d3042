"""``--sharding fsdp`` at other world sizes and under the other stop signals: 4 CPU processes over gloo
(as ``accelerate launch --multi_gpu --num_processes 4`` starts them on a machine without GPUs) against
the single-process run of the same global batches, and SIGUSR1 and SIGINT on 2 processes."""

from __future__ import annotations

import pytest

from tests.e2e.test_fsdp import TWENTY_STEPS, assert_same_run, launched, outputs, stage_args
from tests.helpers import cli, events


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
    [start] = [e for e in events(sharded.stdout) if e["event"] == f"{stage}_start"]
    assert start["processes"] == 4
    single = cli(*stage_args(stage, tiny_model_dir, cache, tmp_path / "one", *TWENTY_STEPS, *extra))
    assert single.returncode == 0, single.stderr[-3000:]
    assert_same_run(tmp_path / "fsdp", tmp_path / "one")
    assert len(outputs(tmp_path / "fsdp")[1]) == 4  # steps 0, 5, 10, 15 evaluated
