"""slurm/finetune.sbatch on a real single-node cluster (slurmctld + slurmd on localhost, munge)."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.deploy.monitoring import prometheus, query
from tests.helpers import REPO, cli, filled_cache, free_port, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    ports = [str(free_port()), str(free_port())]
    started = subprocess.run(
        ["bash", REPO / "tests/slurm/start-cluster.sh", state, *ports], capture_output=True, text=True
    )
    assert started.returncode == 0, started.stdout + started.stderr
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}

    def node_up() -> bool:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.split()
        return bool({"idle", "mixed", "allocated"} & set(states))

    try:
        wait_until(node_up, 60, 0.2, what=f"Slurm's node (see {state}/slurmctld.log and slurmd.log)")
        yield env
    finally:
        subprocess.run(["bash", REPO / "tests/slurm/stop-cluster.sh", state])


def _config(tmp_path, tiny_model_dir, shared_data, **overrides) -> Path:
    config = {
        "model_dir": str(tiny_model_dir),
        "data": str(shared_data / "instruction-data.json"),
        "cache": str(filled_cache(tmp_path / "job-cache", shared_data)),
        "output": str(tmp_path / "runs"),
        "scratch": str(tmp_path / "scratch"),
        "max_steps": 12,
        "eval_freq": 4,
        "checkpoint_every": 4,
        "limit": 4,
        "max_new_tokens": 8,
        "metrics_port": 0,
        "log_format": "json",
    } | overrides
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _sbatch(slurm, ollama, config: Path, out: Path, **env: str) -> str:
    return _submit(slurm, config, out, {"OLLAMA_HOST": ollama.url, **env})


def _submit(slurm, config: Path, out: Path, env: dict) -> str:
    """sbatch the script on ``config``; the job's ``python`` is this test's (its venv), first on PATH."""
    path = f"{Path(sys.executable).parent}:{slurm['PATH']}"
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--gres=none",
            "--cpus-per-task=1",
            f"--output={out}",
            REPO / "slurm/finetune.sbatch",
            config,
        ],
        cwd=out.parent,  # the job's folder, where the script keeps its restart counts
        env={**slurm, "PATH": path, **env},
        capture_output=True,
        text=True,
    )
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def _job(slurm, job_id: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job_id], env=slurm, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def _node_idle(slurm) -> bool:
    """The node holds no job, not even one still completing (its steps being torn down)."""
    text = subprocess.run(["scontrol", "show", "node", "localhost"], env=slurm, capture_output=True, text=True).stdout
    return "State=IDLE " in text


def _finished(slurm, job_id):
    """A poll for wait_until: the job's fields once it has ended, None before.

    Slurm holds a requeued job for a while before it may start again (its policy, not ours); the poll lets
    it go once the node has torn the last run down and a whole second has passed since: slurmd refuses a
    launch whose credential is dated (in whole seconds) no later than the last run's revocation, and
    fails the job.
    """
    idle_since = None

    def poll():
        nonlocal idle_since
        job = _job(slurm, job_id)
        held = job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime" and int(job.get("Restarts", 0))
        if not (held and _node_idle(slurm)):
            idle_since = None
        elif idle_since is None:
            idle_since = time.time()
        elif time.time() >= idle_since + 1:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm, capture_output=True)
        return job if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None

    return poll


def _account(slurm, job: dict, out: Path) -> str:
    """What Slurm and the job said, for a failed assertion: the job's fields, Slurm's log lines on it, the output."""
    state = Path(slurm["SLURM_CONF"]).parent
    job_id = job["JobId"]
    lines = [
        line
        for log in ("slurmctld.log", "slurmd.log")
        for line in (state / log).read_text().splitlines()
        if f"jobid={job_id} " in line.lower() + " " or f"job {job_id}" in line.lower() or f"[{job_id}." in line
    ]
    fields = {k: job.get(k) for k in ("JobState", "Reason", "ExitCode", "Restarts")}
    return f"{fields}\n" + "\n".join(lines[-40:]) + "\n" + out.read_text()[-3000:]


def test_sbatch_runs_the_whole_job_to_completed(slurm, ollama, tiny_model_dir, shared_data, tmp_path):
    job_id = _sbatch(slurm, ollama, _config(tmp_path, tiny_model_dir, shared_data), tmp_path / "job.out")
    job = wait_until(_finished(slurm, job_id), 600, 1, what=f"Slurm job {job_id}")
    assert job["JobState"] == "COMPLETED", _account(slurm, job, tmp_path / "job.out")
    run = tmp_path / "runs" / f"slurm-{job_id}"
    manifest = json.loads((run / "manifest.json").read_text())
    assert {s: v["status"] for s, v in manifest["stages"].items()} == dict.fromkeys(
        ["download", "finetune", "generate", "judge"], "complete"
    )
    assert json.loads((run / "summary.json").read_text())["scored"] == 4
    assert (run / "model" / "model.safetensors").is_file()


def test_usr1_checkpoints_requeues_and_completes_with_the_same_weights(
    slurm, ollama, tiny_model_dir, shared_data, tmp_path
):
    config = _config(tmp_path, tiny_model_dir, shared_data, max_steps=60, checkpoint_every=5, skip_judge=True)
    out = tmp_path / "job.out"
    job_id = _sbatch(slurm, ollama, config, out)
    wait_until(
        lambda: out.is_file() and '"event": "checkpoint"' in out.read_text(), 300, 0.2, what="the first checkpoint"
    )
    signalled = subprocess.run(
        ["scancel", "--signal=USR1", "--batch", job_id], env=slurm, capture_output=True, text=True
    )
    assert signalled.returncode == 0, signalled.stderr
    job = wait_until(_finished(slurm, job_id), 900, 1, what=f"Slurm job {job_id} after requeue")
    log = out.read_text()
    assert job["JobState"] == "COMPLETED", _account(slurm, job, out)
    assert int(job["Restarts"]) == 1
    assert "requeueing job" in log
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    preempted = [e for e in events if e["event"] == "stage_failed" and e.get("exit_code") == 75]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(preempted) == 1 and len(resumed) == 1 and 0 < resumed[0]["step"] < 60

    straight = cli("run", "--config", config, "--run-id", "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = load_file(str(tmp_path / "runs" / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / f"slurm-{job_id}" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _exit_code(job: dict) -> int:
    return int(job["ExitCode"].split(":")[0])


def test_an_origin_that_stays_unreachable_is_requeued_at_most_max_requeues_then_ends_with_75(
    slurm, ollama, tiny_model_dir, shared_data, tmp_path
):
    # The dataset's host answers 503 to every request (an outage): exit 75, which the script requeues, but
    # only SFT_JOB_MAX_REQUEUES times, then the job ends with 75. (A host that gives no answer at all while the
    # cache lacks the file is a machine without network: the preflight's exit 1, tests/run/test_preflight.py.)
    from tests.file_server import FileServer

    cache = tmp_path / "cache"
    shutil.copytree(shared_data / "gpt2", cache / "gpt2")
    with FileServer({"/instruction-data.json": b"[]"}) as origin:
        origin.faults["/instruction-data.json"].extend(["503"] * 1000)
        unreachable = f"{origin.url}/instruction-data.json"
        config = _config(tmp_path, tiny_model_dir, shared_data, data=unreachable, cache=str(cache))
        out = tmp_path / "job.out"
        job_id = _sbatch(slurm, ollama, config, out, SFT_JOB_MAX_REQUEUES="1")
        job = wait_until(_finished(slurm, job_id), 600, 1, what=f"Slurm job {job_id}")
    log = out.read_text()
    assert job["JobState"] == "FAILED" and _exit_code(job) == 75 and int(job["Restarts"]) == 1, _account(
        slurm, job, out
    )
    assert log.count("requeueing job") == 1 and "after 1 requeues (SFT_JOB_MAX_REQUEUES); not requeueing" in log
    assert log.count("Error: instruction-data.json: giving up on 127.0.0.1") == 2 and "--data FILE" in log


def test_an_internal_error_is_requeued_at_most_max_restarts_with_the_venv_it_names(slurm, ollama, tmp_path):
    # SFT_JOB_VENV is activated on the node; its python stands in for a job that hits a bug (exit 70).
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    python = venv / "bin" / "python"
    python.write_text(
        f'#!/bin/sh\ncase "$*" in *slurm-settings*) exec {sys.executable} "$@" ;; esac\n'  # the script's own reading
        f'echo "attempt ${{SLURM_RESTART_COUNT:-0}}" >> {tmp_path}/attempts\nexit 70\n'
    )
    python.chmod(0o755)
    config = tmp_path / "job.yaml"
    config.write_text("skip_judge: true\n")
    out = tmp_path / "job.out"
    job_id = _sbatch(slurm, ollama, config, out, SFT_JOB_VENV=str(venv), SFT_JOB_MAX_RESTARTS="1")
    job = wait_until(_finished(slurm, job_id), 600, 1, what=f"Slurm job {job_id}")
    assert job["JobState"] == "FAILED" and _exit_code(job) == 70, _account(slurm, job, out)
    assert int(job["Restarts"]) == 1 and (tmp_path / "attempts").read_text() == "attempt 0\nattempt 1\n"
    assert out.read_text().count("internal error (exit 70); requeueing") == 1


def _hold_9100(stack) -> None:
    """Port 9100 taken on the node for the test's length, as node_exporter takes it on most clusters."""
    holder = stack.enter_context(socket.socket())
    try:
        holder.bind(("0.0.0.0", 9100))
        holder.listen()
    except OSError as exc:  # another process has it already: taken all the same
        assert exc.errno == errno.EADDRINUSE, exc


def _prometheus_on(stack, tmp_path, sd_dir: Path) -> str:
    """A real Prometheus that finds its targets in ``sd_dir`` (file_sd_configs), as README's Slurm section says."""
    scrape_configs = f"""  - job_name: sft-job-slurm
    file_sd_configs: [{{files: ["{sd_dir}/*.json"], refresh_interval: 1s}}]
"""
    return stack.enter_context(prometheus(tmp_path, scrape_configs))


def test_two_jobs_on_one_node_with_9100_taken_and_no_judge_by_file_or_by_env_both_run_and_are_scraped(
    slurm, tiny_model_dir, cache, tmp_path
):
    from contextlib import ExitStack

    sd_dir = tmp_path / "file_sd"
    # skip_judge must be read as the job reads it, or the script stops for want of a judge
    assert shutil.which("ollama") is None and "OLLAMA_HOST" not in slurm
    jobs = {}
    with ExitStack() as stack:
        _hold_9100(stack)
        api = _prometheus_on(stack, tmp_path, sd_dir)
        for name, skip in (("by-file", {"skip_judge": True}), ("by-env", {})):
            folder = tmp_path / name
            folder.mkdir()
            config = _config(folder, tiny_model_dir, cache, max_steps=40, **skip)
            config.write_text(config.read_text().replace("metrics_port: 0\n", ""))  # unset: a free port
            env = {"SFT_JOB_METRICS_SD_DIR": str(sd_dir)} | ({} if skip else {"SFT_JOB_SKIP_JUDGE": "1"})
            jobs[name] = (_submit(slurm, config, folder / "job.out", env), folder)
        for name, (job_id, _folder) in jobs.items():
            wait_until(
                lambda job_id=job_id: query(api, f'up{{run_id="slurm-{job_id}"}} == 1'),
                300,
                what=f"a scrape of job {name} ({job_id}) through its file_sd target",
            )
        ended = {name: wait_until(_finished(slurm, job_id), 600, 1, what=name) for name, (job_id, _) in jobs.items()}
    for name, job in ended.items():
        assert job["JobState"] == "COMPLETED", _account(slurm, job, jobs[name][1] / "job.out")
    a, b = ended.values()
    assert a["StartTime"] <= b["EndTime"] and b["StartTime"] <= a["EndTime"], "the two jobs ran at the same time"
    assert list(sd_dir.iterdir()) == []  # each job removed its target at exit
    for job_id, folder in jobs.values():
        manifest = json.loads((folder / "runs" / f"slurm-{job_id}" / "manifest.json").read_text())
        assert {s: v["status"] for s, v in manifest["stages"].items()} == dict.fromkeys(
            ["download", "finetune", "generate"], "complete"
        )
