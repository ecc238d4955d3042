"""slurm/finetune.sbatch run by bash with stand-ins for srun and scontrol on PATH: what the real Slurm cannot
show (a refused requeue) and what happens before srun (limits, the job's settings, the judge), in seconds.
tests/deploy/test_slurm.py runs the same script on the real Slurm."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest

from tests.helpers import REPO, events, wait_for_event, wait_until

SCRIPT = REPO / "slurm" / "finetune.sbatch"

# srun records its arguments and the run id it is given, then ends as FAKE_SRUN_EXIT says, or with
# FAKE_SRUN=run runs the job's command (as on one node), or with FAKE_SRUN=wait waits for a signal and
# exits 75 as the job does. scontrol names the node list's one host, the job's script (FAKE_COMMAND), and
# answers a requeue with FAKE_REQUEUE_EXIT.
FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$*" >> "$FAKE_LOG/srun"
printf '%s\\n' "${SFT_JOB_RUN_ID:-}" >> "$FAKE_LOG/run_id"
case "${FAKE_SRUN:-}" in
  run) while [[ "$1" == -* ]]; do shift; done; exec "$@" ;;
  wait) trap 'echo USR1 >> "$FAKE_LOG/signals"; exit 75' USR1
        trap 'echo TERM >> "$FAKE_LOG/signals"; exit 75' TERM
        touch "$FAKE_LOG/started"
        while :; do sleep 0.1; done ;;
esac
exit "${FAKE_SRUN_EXIT:-0}"
"""
FAKE_SCONTROL = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_LOG/scontrol"
case "$1 $2" in
  "show hostnames") echo "$3" ;;
  "show job") echo "   Command=${FAKE_COMMAND:-(null)}" ;;
  requeue*) exit "${FAKE_REQUEUE_EXIT:-0}" ;;
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

    def environment(env: dict) -> dict:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SFT_JOB_", "SLURM_", "OLLAMA_"))}
        job = {"PATH": path, "FAKE_LOG": str(log), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node7"}
        return base | job | env

    def run(*args, **env: str) -> subprocess.CompletedProcess:
        command = ["bash", SCRIPT, *map(str, args)]
        return subprocess.run(command, cwd=tmp_path, env=environment(env), capture_output=True, text=True, timeout=120)

    def start(*args, **env: str) -> subprocess.Popen:
        command = ["bash", SCRIPT, *map(str, args)]
        return subprocess.Popen(command, cwd=tmp_path, env=environment(env), stdout=PIPE, stderr=PIPE, text=True)

    run.start, run.path, run.environment = start, path, environment
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
    assert "requeue 4242" in fake_slurm.calls("scontrol")
    assert "scontrol requeue 4242 was refused: the job ends with exit" in result.stderr.splitlines()[-1]


def test_an_accepted_requeue_is_not_0_either(fake_slurm, tmp_path):
    result = fake_slurm(_config(tmp_path), FAKE_SRUN_EXIT="75")
    assert result.returncode == 75 and fake_slurm.calls("scontrol")[-1] == "requeue 4242", result.stderr
    assert "requeueing job 4242 (restart 1)" in result.stderr


LIMITS = ["SFT_JOB_MAX_REQUEUES", "SFT_JOB_MAX_RESTARTS", "SFT_JOB_OLLAMA_START_SECONDS"]
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
        ("skip_judge: true\n", {"SFT_JOB_RUN_ID": "../x"}, "SFT_JOB_RUN_ID"),  # the variable it came from
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
    from job.config import RunConfig
    from job.core.settings import field_names

    text = SCRIPT.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    options = {f"SFT_JOB_{name.upper()}" for name in field_names(RunConfig)}
    named = set(re.findall(r"SFT_JOB_[A-Z_]+", header))
    assert named and {n for n in named if n not in code and n.rstrip("_") not in options} == set()


@pytest.mark.parametrize(
    ("config", "args", "in_step"),
    [
        ("", ["--skip-judge"], "'--skip-judge'"),  # without the flag the job would need ollama: exit 2
        ("skip_judge: true\n", ["--run-id", "mine", "--epochs", "1"], "'--run-id' 'mine' '--epochs' '1'"),
        (None, ["--skip-judge", "--epochs", "3"], "'run' '--skip-judge' '--epochs' '3'"),  # flags, no file
    ],
)
def test_flags_after_the_config_file_reach_the_job_and_the_scripts_own_reading(
    fake_slurm, tmp_path, config, args, in_step
):
    given = [] if config is None else [_config(tmp_path, config)]
    result = fake_slurm(*given, *args)
    assert result.returncode == 0, result.stderr
    [step] = fake_slurm.calls("srun")
    assert in_step in step


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--epochs", "0"], "epochs"),
        (["--nodes", "2"], "No such option '--nodes'"),
        (["--epochs"], "requires an argument"),
        (["--help"], "--help: the job's flags are python -m job.cli run's"),
    ],
)
def test_a_bad_flag_after_the_config_file_is_one_line_exit_2_before_srun(fake_slurm, tmp_path, args, says):
    result = fake_slurm(_config(tmp_path), *args)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert says in line and fake_slurm.calls("srun") == []


@pytest.mark.parametrize(
    ("config", "args", "env", "run_id", "step_env"),
    [
        ("skip_judge: true\n", [], {}, "slurm-4242", "slurm-4242"),
        ("skip_judge: true\nrun_id: from-file\n", [], {}, "from-file", ""),  # the file's, not slurm-4242
        ("skip_judge: true\nrun_id: from-file\n", [], {"SFT_JOB_RUN_ID": "from-env"}, "from-env", "from-env"),
        ("skip_judge: true\n", ["--run-id", "from-flag"], {"SFT_JOB_RUN_ID": "from-env"}, "from-flag", "from-env"),
    ],
)
def test_a_refused_requeue_prints_the_command_that_resumes_the_same_run_id(
    fake_slurm, tmp_path, config, args, env, run_id, step_env
):
    config_file = _config(tmp_path, config)
    result = fake_slurm(config_file, *args, **env, FAKE_SRUN_EXIT="75", FAKE_REQUEUE_EXIT="1", FAKE_COMMAND=SCRIPT)
    assert result.returncode == 75
    assert fake_slurm.calls("run_id") == [step_env]
    advice = result.stderr.splitlines()[-1].split("to resume: ")[1]
    tail = " ".join([str(config_file), *args])
    assert advice == f"cd {tmp_path} && SFT_JOB_RUN_ID={run_id} sbatch {SCRIPT} {tail}"


def test_the_advised_command_after_a_refused_requeue_resumes_the_run_it_names(fake_slurm, cache, tmp_path):
    config = _config(
        tmp_path,
        f"smoke: true\nskip_judge: true\ndata: {cache / 'instruction-data.json'}\ncache: {cache}\n"
        f"output: {tmp_path / 'runs'}\nmetrics_port: 0\nlog_format: json\n",
    )
    sbatch = Path(fake_slurm.path.split(":")[0]) / "sbatch"  # the next job, 4243, runs the script at once
    sbatch.write_text('#!/bin/sh\nSLURM_JOB_ID=4243 exec bash "$@"\n')
    sbatch.chmod(0o755)
    job = {"FAKE_SRUN": "run", "FAKE_REQUEUE_EXIT": "1", "FAKE_COMMAND": str(SCRIPT)}
    first = fake_slurm.start(config, **job)
    wait_for_event(first, lambda e: e.get("event") == "eval")
    first.send_signal(signal.SIGUSR1)
    _out, err = first.communicate(timeout=300)
    assert first.returncode == 75, err[-3000:]
    advice = err.splitlines()[-1].split("to resume: ")[1]
    resumed = subprocess.run(
        ["bash", "-c", advice], env=fake_slurm.environment(job), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e for e in events(resumed.stdout) if e["event"] == "resumed"]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["slurm-4242"]
    assert json.loads((tmp_path / "runs" / "slurm-4242" / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_before_the_job_starts_is_a_requeue_in_one_line(fake_slurm, tmp_path, sig):
    # The job's reading of its settings waits for the signal: it arrives before srun, as it may on Slurm.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    (venv / "bin" / "python").write_text(
        f"#!/bin/sh\ntouch {tmp_path}/reading\nwhile [ ! -e {tmp_path}/go ]; do sleep 0.1; done\n"
        f'exec {sys.executable} "$@"\n'
    )
    (venv / "bin" / "python").chmod(0o755)
    job = fake_slurm.start(_config(tmp_path), SFT_JOB_VENV=str(venv))
    wait_until(lambda: (tmp_path / "reading").exists(), 60, what="the settings step")
    job.send_signal(sig)
    (tmp_path / "go").touch()
    _out, err = job.communicate(timeout=120)
    assert job.returncode == 75
    [line] = err.splitlines()
    assert f"{sig.name.removeprefix('SIG')} before the job started; requeueing job 4242 (restart 1)" in line
    assert fake_slurm.calls("srun") == [] and fake_slurm.calls("scontrol")[-1] == "requeue 4242"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
@pytest.mark.parametrize(("requeue_exit", "last_line"), [("0", "requeueing job 4242"), ("1", "to resume: ")])
def test_a_stop_signal_to_the_batch_shell_reaches_the_step_which_checkpoints_and_is_requeued(
    fake_slurm, tmp_path, sig, requeue_exit, last_line
):
    job = fake_slurm.start(_config(tmp_path), FAKE_SRUN="wait", FAKE_REQUEUE_EXIT=requeue_exit)
    wait_until(lambda: (tmp_path / "log" / "started").exists(), 60, what="the step")
    job.send_signal(sig)
    _out, err = job.communicate(timeout=120)
    name = sig.name.removeprefix("SIG")
    assert job.returncode == 75, err
    assert fake_slurm.calls("signals") == [name] and f"sft-job: {name}: checkpointing" in err
    assert last_line in err.splitlines()[-1]


def _with_ollama(fake_slurm, tmp_path, text: str) -> str:
    """PATH with an `ollama` stand-in that runs ``text`` as `ollama serve`."""
    folder = tmp_path / "ollama-bin"
    folder.mkdir()
    (folder / "ollama").write_text(f"#!/bin/sh\n{text}\n")
    (folder / "ollama").chmod(0o755)
    return f"{folder}:{fake_slurm.path}"


LISTENS = (
    f'exec {sys.executable} -c "import os, socket, time; s = socket.socket(); '
    "s.bind(('127.0.0.1', int(os.environ['OLLAMA_HOST'].rsplit(':', 1)[1]))); s.listen(); time.sleep(600)\""
)


@pytest.mark.parametrize(
    ("serve", "env", "says"),
    [
        ("echo 'Error: listen tcp: bind: address already in use' >&2; exit 1", {}, "ended before it listened"),
        ("exec sleep 600", {"SFT_JOB_OLLAMA_START_SECONDS": "1"}, "did not listen on 127.0.0.1:"),
        (LISTENS, {}, None),
    ],
)
def test_the_judge_started_on_the_node_must_listen_before_the_job_starts(fake_slurm, tmp_path, serve, env, says):
    result = fake_slurm(_config(tmp_path, ""), PATH=_with_ollama(fake_slurm, tmp_path, serve), **env)
    if says is None:
        assert result.returncode == 0, result.stderr
        assert len(fake_slurm.calls("srun")) == 1
        return
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert says in line and "see ollama-4242.log" in line and fake_slurm.calls("srun") == []
    assert (tmp_path / "ollama-4242.log").exists()


def test_an_image_without_apptainer_or_pyxis_names_the_missing_runtime_in_one_line(fake_slurm, tmp_path):
    result = fake_slurm(_config(tmp_path), SFT_JOB_IMAGE="docker://registry.example.com/sft-job:0.1.0")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "SFT_JOB_IMAGE=" in line and "no apptainer on PATH and no pyxis in srun" in line
    assert "activate the venv" not in line and fake_slurm.calls("srun") == ["--help"]


def test_two_nodes_whose_main_node_does_not_resolve_stop_in_one_line_naming_it(fake_slurm, tmp_path):
    result = fake_slurm(_config(tmp_path), SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu-no-such-node.invalid")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "the main node gpu-no-such-node.invalid does not resolve" in line and fake_slurm.calls("srun") == []


def test_preemptions_do_not_use_up_the_restarts_of_an_internal_error(fake_slurm, tmp_path):
    config = _config(tmp_path)
    for attempt, code in enumerate([75, 75, 70, 70, 70]):
        result = fake_slurm(config, FAKE_SRUN_EXIT=str(code), SLURM_RESTART_COUNT=str(attempt))
        assert result.returncode == code, result.stderr
        if attempt < 4:
            assert "requeueing job 4242" in result.stderr.splitlines()[-1]
    assert fake_slurm.calls("scontrol").count("requeue 4242") == 4
    [line] = result.stderr.splitlines()
    assert "internal error (exit 70) after 2 restarts (SFT_JOB_MAX_RESTARTS); not requeueing" in line
    assert not (tmp_path / "sft-job-4242.restarts").exists()  # the job has ended: its counts go with it


@pytest.mark.parametrize("left", ["5 5", "2 2", "x y", ""])
def test_counts_left_by_an_earlier_job_of_the_same_id_do_not_count_on_its_first_run(fake_slurm, tmp_path, left):
    (tmp_path / "sft-job-4242.restarts").write_text(left)
    result = fake_slurm(_config(tmp_path), FAKE_SRUN_EXIT="70", SLURM_RESTART_COUNT="0")
    assert result.returncode == 70
    assert "internal error (exit 70); requeueing job 4242 (restart 1)" in result.stderr.splitlines()[-1]
    assert (tmp_path / "sft-job-4242.restarts").read_text() == "0 1\n"


def test_a_75_past_max_requeues_prints_the_command_that_resumes_it_too(fake_slurm, tmp_path):
    config = _config(tmp_path)
    result = fake_slurm(config, FAKE_SRUN_EXIT="75", SFT_JOB_MAX_REQUEUES="0", FAKE_COMMAND=SCRIPT)
    assert result.returncode == 75 and "requeue 4242" not in fake_slurm.calls("scontrol")
    [line] = result.stderr.splitlines()
    assert "after 0 requeues (SFT_JOB_MAX_REQUEUES); not requeueing" in line
    command = f"cd {tmp_path} && SFT_JOB_RUN_ID=slurm-4242 sbatch {SCRIPT} {config}"
    assert line.endswith(f"to resume once the cause is gone: {command}")
