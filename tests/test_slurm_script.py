"""slurm/finetune.sbatch run by bash with stand-ins for srun and scontrol on PATH: what the real Slurm cannot
show (a refused requeue) and what happens before srun (limits, the job's settings, the judge), in seconds.
tests/test_slurm.py runs the same script on the real Slurm."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "slurm" / "finetune.sbatch"

# srun records its arguments and ends as FAKE_SRUN_EXIT says; scontrol names the node list's one host
# and answers a requeue with FAKE_REQUEUE_EXIT.
FAKE_SRUN = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_LOG/srun"
exit "${FAKE_SRUN_EXIT:-0}"
"""
FAKE_SCONTROL = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_LOG/scontrol"
case "$1" in
  show) echo "$3" ;;
  requeue) exit "${FAKE_REQUEUE_EXIT:-0}" ;;
esac
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """Runs the script as the batch step of job 4242 with the fakes first on PATH, then the test's python
    (the job's `python -m job.cli`), then the system's, where no ollama is installed."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    path = f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"
    assert shutil.which("ollama", path=path) is None

    def run(*args, **env: str) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SFT_JOB_", "SLURM_", "OLLAMA_"))}
        job = {"PATH": path, "FAKE_LOG": str(log), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node7"}
        return subprocess.run(
            ["bash", SCRIPT, *map(str, args)],
            cwd=tmp_path,
            env=base | job | env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    run.calls = lambda name: (log / name).read_text().splitlines() if (log / name).exists() else []
    return run


def _config(tmp_path, text: str = "skip_judge: true\n") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("code", [75, 70])
def test_a_requeue_slurm_refuses_ends_the_job_with_its_own_code_not_0(fake_slurm, tmp_path, code):
    result = fake_slurm(_config(tmp_path), FAKE_SRUN_EXIT=str(code), FAKE_REQUEUE_EXIT="1")
    assert result.returncode == code, result.stderr
    assert fake_slurm.calls("scontrol")[-1] == "requeue 4242"
    assert "scontrol requeue 4242 was refused: the job ends with exit" in result.stderr.splitlines()[-1]


def test_an_accepted_requeue_is_not_0_either(fake_slurm, tmp_path):
    result = fake_slurm(_config(tmp_path), FAKE_SRUN_EXIT="75")
    assert result.returncode == 75 and fake_slurm.calls("scontrol")[-1] == "requeue 4242", result.stderr
    assert "requeueing job 4242 (restart 1)" in result.stderr


LIMITS = ["SFT_JOB_MAX_REQUEUES", "SFT_JOB_MAX_RESTARTS"]
NOT_COUNTS = ["x", "twenty", "-1", "1.5", "1e3", "0x10", "3 ", " 3", "20\n", "99999999999999999999", "٣"]


@pytest.mark.parametrize("name", LIMITS)
@pytest.mark.parametrize("value", NOT_COUNTS)
def test_a_limit_that_is_not_a_whole_number_is_exit_2_in_one_line_before_anything_runs(
    fake_slurm, tmp_path, name, value
):
    result = fake_slurm(_config(tmp_path), **{name: value}, SFT_JOB_VENV=str(tmp_path / "never-read"))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"sft-job: {name} must be a whole number (0 to 999999), got ")
    assert fake_slurm.calls("srun") == fake_slurm.calls("scontrol") == []


@pytest.mark.parametrize(("name", "code"), [("SFT_JOB_MAX_REQUEUES", 75), ("SFT_JOB_MAX_RESTARTS", 70)])
def test_a_limit_of_0_written_00_is_no_requeue(fake_slurm, tmp_path, name, code):
    result = fake_slurm(_config(tmp_path), **{name: "00"}, FAKE_SRUN_EXIT=str(code))
    assert result.returncode == code, result.stderr
    assert "requeue 4242" not in fake_slurm.calls("scontrol") and "requeueing job" not in result.stderr


@pytest.mark.parametrize(
    ("config", "env"),
    [
        ("skip_judge: true\n", {}),
        ("", {"SFT_JOB_SKIP_JUDGE": "1"}),
        ("", {"SFT_JOB_SKIP_JUDGE": "True"}),
        ("", {"SFT_JOB_SKIP_JUDGE": "yes"}),
        ("skip_judge: false\n", {"SFT_JOB_SKIP_JUDGE": "on"}),  # SFT_JOB_* wins over the file
        ("judge_url: http://judge.example:11434\n", {}),  # a judge of its own: no ollama needed
        ("judge_backend: openai\n", {}),
    ],
)
def test_the_job_runs_without_ollama_when_its_own_settings_need_no_local_judge(fake_slurm, tmp_path, config, env):
    result = fake_slurm(_config(tmp_path, config), **env)
    assert result.returncode == 0, result.stderr
    [step] = fake_slurm.calls("srun")
    assert "'job.cli' 'run' '--config'" in step and "ollama" not in result.stderr


@pytest.mark.parametrize(
    ("config", "env"),
    [("", {}), ("skip_judge: false\n", {}), ("skip_judge: true\n", {"SFT_JOB_SKIP_JUDGE": "0"})],
)
def test_a_job_that_needs_ollama_on_a_node_without_it_stops_in_one_line_before_srun(fake_slurm, tmp_path, config, env):
    result = fake_slurm(_config(tmp_path, config), **env)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "no OLLAMA_HOST or judge_url given and no ollama binary on" in line and "skip_judge" in line
    assert fake_slurm.calls("srun") == []


@pytest.mark.parametrize(
    ("config", "env", "says"),
    [
        ("lr: .nan\n", {}, "lr must be a finite number"),
        ("", {"SFT_JOB_SKIP_JUDGE": "maybe"}, "'maybe' is not a valid boolean"),
        ("nodes: 2\n", {}, "unknown key 'nodes'"),
        ("skip_judge: true\n", {"SFT_JOB_RUN_ID": "../x"}, "run_id"),
        ("skip_judge: true\n", {"SFT_JOB_OLLAMA_PORT": "11434"}, None),  # not read: no local judge
    ],
)
def test_a_bad_job_setting_is_the_jobs_one_line_exit_2_before_srun(fake_slurm, tmp_path, config, env, says):
    result = fake_slurm(_config(tmp_path, config), **env)
    if says is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ") and says in line
    assert fake_slurm.calls("srun") == []


@pytest.mark.parametrize(
    ("name", "value"),
    [("SFT_JOB_MAIN_PORT", "0"), ("SFT_JOB_MAIN_PORT", "70000"), ("SFT_JOB_MAIN_PORT", "http"), ("SLURM_JOB_ID", "")],
)
def test_the_scripts_other_numbers_are_checked_before_anything_runs(fake_slurm, tmp_path, name, value):
    result = fake_slurm(_config(tmp_path), **{name: value})
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert name in line and fake_slurm.calls("srun") == []


def test_a_node_list_scontrol_cannot_expand_is_one_line_exit_1(fake_slurm, tmp_path):
    result = fake_slurm(_config(tmp_path), SLURM_JOB_NODELIST="")
    assert result.returncode == 1
    assert "named no node" in result.stderr.splitlines()[-1] and fake_slurm.calls("srun") == []


def test_without_the_jobs_python_the_script_says_so_in_one_line(fake_slurm, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    (venv / "bin" / "python").write_text("#!/bin/sh\necho 'No module named job' >&2\nexit 1\n")
    (venv / "bin" / "python").chmod(0o755)
    result = fake_slurm(_config(tmp_path), SFT_JOB_VENV=str(venv))
    assert result.returncode == 1
    assert "slurm-settings failed (exit 1)" in result.stderr.splitlines()[-1] and fake_slurm.calls("srun") == []


def test_every_variable_the_header_names_is_read_by_the_script_or_the_job():
    from job.config import RunConfig, field_names

    text = SCRIPT.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    options = {f"SFT_JOB_{name.upper()}" for name in field_names(RunConfig)}
    named = set(re.findall(r"SFT_JOB_[A-Z_]+", header))
    assert named and {n for n in named if n not in code and n.rstrip("_") not in options} == set()
