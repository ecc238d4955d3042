"""``python -m job.launch``: a group of processes that fails says so in one ``Error:`` line, the line of the
lowest rank whose code is the group's, whether every process refused alike or only a non-main one failed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from job.core.errors import ExitCode
from job.launch import group_error_line
from tests.helpers import REPO, free_port

# A worker that runs the real ``sft-job`` entrypoint with the arguments its rank is given: a refusal
# where told, else ``--help`` (exit 0 at once).
WORKER = """
import os, sys
from job.cli import entrypoint
failing = os.environ["FAILING_RANKS"].split(",")
rank = os.environ["RANK"]
entrypoint(["finetune", "--epochs", f"-{int(rank) + 1}"] if rank in failing else ["finetune", "--help"])
"""


def launched(tmp_path, failing: str, *flags: str) -> subprocess.CompletedProcess:
    """Two CPU processes under ``job.launch`` (as ``accelerate launch --multi_gpu`` starts them), ranks
    ``failing`` refusing their flag; ``flags``: more of the launcher's own."""
    (tmp_path / "worker.py").write_text(WORKER)
    launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", *flags]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
    env = {**os.environ, "FAILING_RANKS": failing, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "job.launch", *launch, str(tmp_path / "worker.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )


@pytest.mark.parametrize(("failing", "rank"), [("0,1", "0"), ("1", "1")], ids=["every-process", "a-non-main-one"])
def test_a_failed_group_prints_one_error_line_the_lowest_failing_rank_s(tmp_path, failing, rank):
    done = launched(tmp_path, failing)
    assert done.returncode == ExitCode.BAD_CONFIG, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: --epochs must be positive, got -{int(rank) + 1}"], done.stderr[-3000:]
    assert done.stderr.rstrip().endswith(errors[0])  # the last line, below the launcher's own output


def test_the_line_is_the_group_code_s_lowest_rank_else_the_lowest_rank_s_else_why_none_said():
    lines = {0: "Error: stopped by SIGTERM at step 4", 1: "Error: --data: entry 3", 2: "Error: bad flag"}
    # rank 0 stopped by the agent after rank 1 refused its data: the data's line speaks for the group
    assert group_error_line(1, {0: 75, 1: 1, 2: 2}, lines) == lines[1]
    assert group_error_line(2, {0: 2, 1: 2, 2: 2}, lines) == lines[0]
    assert group_error_line(70, {2: 2}, {2: lines[2]}) == lines[2]  # no worker's code is the group's
    assert "no process said why" in group_error_line(70, {}, {})
    assert "stopped by a signal" in group_error_line(75, {}, {}, signalled=True)


def test_a_launch_flag_the_launcher_refuses_before_any_process_starts_is_exit_2_saying_so(tmp_path):
    """accelerate refuses ``--cpu`` beside ``--multi_gpu`` before starting anyone: a bad flag (2), said as the
    launcher's, not "a process killed by the kernel" (70)."""
    done = launched(tmp_path, "", "--cpu")
    assert done.returncode == ExitCode.BAD_CONFIG, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [done.stderr.rstrip().splitlines()[-1]] and "before starting any process" in errors[0], errors
