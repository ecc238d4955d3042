"""A failure is never a success: real processes against moto's S3 server, the Ollama wire-protocol
server, a small tmpfs, and a second process with the same run id."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import boto3
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import cli, events, finetune_run, free_port, smoke_run, start_cli, wait_for_event, wait_until
from tests.ollama_server import FakeOllama


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


class RestartableS3:
    """moto's server on a fixed port, which a test can stop and start again (the data stays)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.make = lambda: ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server = None

    def start(self):
        self.server = self.make()
        self.server.start()
        wait_until(self._answers, 10, what="moto to answer")

    def stop(self):
        self.server.stop()
        self.server = None

    def _answers(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0


@pytest.fixture
def s3_outage(monkeypatch):
    s3 = RestartableS3()
    s3.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in {**env, "AWS_ENDPOINT_URL": s3.url}.items():
        monkeypatch.setenv(key, value)
    s3.client = boto3.client("s3", endpoint_url=s3.url)
    yield s3
    if s3.server is not None:
        s3.stop()


def _s3_manifest(s3, bucket: str, prefix: str) -> dict:
    return json.loads(s3.client.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())


# --- the run's options are its contract -----------------------------------------------------------


def test_a_rerun_with_another_lr_is_refused_and_one_with_another_metrics_port_skips_the_done_stages(cache, tmp_path):
    args = smoke_run(cache, tmp_path / "runs", "r1", "--skip-judge")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    config = (tmp_path / "runs" / "r1" / "config.yaml").read_bytes()

    changed = cli(*args, "--lr", "1e-3")
    assert changed.returncode == 2
    [line] = changed.stderr.splitlines()
    assert "run r1 was started with other options: lr 5e-05 (now 0.001)" in line
    assert (tmp_path / "runs" / "r1" / "config.yaml").read_bytes() == config

    port = free_port()
    same = cli(*args, "--metrics-port", str(port))  # the last of a repeated flag wins
    assert same.returncode == 0, same.stderr
    skipped = [e["stage"] for e in events(same.stdout) if e["event"] == "stage_skipped"]
    assert skipped == ["download", "finetune", "generate"]
    assert (tmp_path / "runs" / "r1" / "config.yaml").read_bytes() == config  # never rewritten


def test_a_smoke_rerun_from_another_cache_with_unused_dpo_options_skips_the_done_stages(cache, tmp_path):
    """The smoke's own data lies in --cache (an operational folder): another cache holds the same data; and
    --dpo-* options without --dpo change nothing the run makes."""
    other = tmp_path / "other-cache"
    shutil.copytree(cache, other)
    runs = tmp_path / "runs"
    args = ["run", "--smoke", "--output", runs, "--run-id", "r9", "--skip-judge", "--log-format", "json"]
    first = cli(*args, "--cache", cache)
    assert first.returncode == 0, first.stderr[-2000:]
    config = (runs / "r9" / "config.yaml").read_bytes()
    again = cli(*args, "--cache", other, "--dpo-data", tmp_path / "pairs.json", "--dpo-lr", "1e-4")
    assert again.returncode == 0, again.stderr[-2000:]
    skipped = [e["stage"] for e in events(again.stdout) if e["event"] == "stage_skipped"]
    assert skipped == ["download", "finetune", "generate"]
    assert (runs / "r9" / "config.yaml").read_bytes() == config


# --- one run id, one writer ---------------------------------------------------------------------


def _second_writer_is_refused(first_args: list, shared_data: Path) -> tuple[subprocess.Popen, str]:
    first = start_cli(*first_args)
    wait_for_event(first, lambda e: e.get("event") == "finetune_start", deadline_s=120)
    second = cli(*first_args)
    assert second.returncode == 1 and first.poll() is None  # refused while the first runs, not made to wait for it
    [line] = second.stderr.splitlines()
    assert f"pid {first.pid}" in line and f"host {socket.gethostname()}" in line and "already running" in line
    assert not [e for e in events(second.stdout) if e["event"] in ("stage_start", "preflight_ok")]
    return first, line


def test_two_runs_with_the_same_id_into_a_local_folder(cache, tmp_path):
    args = smoke_run(cache, tmp_path / "runs", "same", "--skip-judge", "--train-limit", "400")
    first, _ = _second_writer_is_refused(args, cache)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    manifest = _manifest(tmp_path / "runs" / "same")
    assert [manifest["stages"][s]["status"] for s in ("download", "finetune", "generate")] == ["complete"] * 3


def test_two_runs_with_the_same_id_into_s3_and_a_stale_lock_is_taken_over(s3_outage, cache, tmp_path):
    s3_outage.client.create_bucket(Bucket="locks")
    args = smoke_run(cache, "s3://locks/runs", "same", "--skip-judge", "--train-limit", "400")
    args += ["--scratch", tmp_path / "scratch"]
    first, line = _second_writer_is_refused(args, cache)
    assert "s3://locks/runs/same/.lock" in line
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert _s3_manifest(s3_outage, "locks", "runs/same")["stages"]["generate"]["status"] == "complete"
    keys = {o["Key"] for o in s3_outage.client.list_objects_v2(Bucket="locks", Prefix="runs/same/")["Contents"]}
    assert "runs/same/.lock" not in keys  # released at exit

    # A lock whose holder died without releasing it, its lease run out: the next run takes it over.
    stale = {
        "run_id": "other",
        "host": "gone-node",
        "pid": 1,
        "started": "2026-01-01T00:00:00+00:00",
        "expires": "2026-01-01T00:10:00+00:00",
    }
    s3_outage.client.put_object(Bucket="locks", Key="runs/other/.lock", Body=json.dumps(stale).encode())
    taken = cli(*smoke_run(cache, "s3://locks/runs", "other", "--skip-judge", "--scratch", tmp_path / "s2"))
    assert taken.returncode == 0, taken.stderr
    [event] = [e for e in events(taken.stdout) if e["event"] == "run_lock_taken_over"]
    assert "gone-node" in event["stale_holder"]


# --- the judge ------------------------------------------------------------------------------------


def test_a_judge_answering_500_fails_the_run_with_75_and_a_rerun_asks_only_for_the_failed(cache, tmp_path):
    server = FakeOllama().start()
    try:
        server.mode, server.healthy_for = "500", 3  # 3 of the smoke's 8 entries answered, then 500s
        args = smoke_run(cache, tmp_path / "runs", "j", "--judge-url", server.url, "--judge-retries", "1")
        failed = cli(*args)
        assert failed.returncode == 75
        [line] = failed.stderr.splitlines()
        assert line.startswith("Error: judge: 5 of 8 entries failed (HTTP 500") and line.endswith("are kept)")
        judge = _manifest(tmp_path / "runs" / "j")["stages"]["judge"]
        assert judge["status"] == "failed" and "5 of 8 entries failed" in judge["error"]
        assert not (tmp_path / "runs" / "j" / "scores.json").exists()  # a failure is never a result
        assert len(server.chats) == 3 + 5 * 2  # each failing entry tried twice (--judge-retries 1)
        server.mode = "ok"
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        assert len(server.chats) == 13 + 5  # exactly the failed entries, once each
        skipped = [e["stage"] for e in events(done.stdout) if e["event"] == "stage_skipped"]
        assert skipped == ["download", "finetune", "generate"]
        assert _manifest(tmp_path / "runs" / "j")["stages"]["judge"]["status"] == "complete"
        summary = json.loads((tmp_path / "runs" / "j" / "summary.json").read_text())
        assert (summary["scored"] + summary["unparsed"], summary["failed"]) == (8, 0)
    finally:
        server.stop()


# --- the object store -----------------------------------------------------------------------------


def _all_in_the_bucket(s3, bucket: str, prefix: str) -> None:
    import hashlib

    manifest = _s3_manifest(s3, bucket, prefix)
    assert {s["status"] for s in manifest["stages"].values()} == {"complete"}
    for stage in manifest["stages"].values():
        for key, meta in stage.get("artifacts", {}).items():
            body = s3.client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == meta["sha256"], key


def test_an_object_store_down_for_several_retries_mid_training_costs_nothing(s3_outage, cache, tmp_path):
    s3_outage.client.create_bucket(Bucket="flaky")
    args = smoke_run(cache, "s3://flaky/runs", "r", "--skip-judge", "--train-limit", "200")
    proc = start_cli(*args, "--checkpoint-every", "5", "--scratch", tmp_path / "scratch")
    wait_for_event(proc, lambda e: e.get("event") == "checkpoint", deadline_s=120)
    s3_outage.stop()
    # Down until the job has backed off five times (0.5 s doubling: about 15 s of waiting), then back
    retried = []
    wait_for_event(
        proc, lambda e: e.get("event") == "storage_retry" and not retried.append(e) and len(retried) >= 5, 120
    )
    s3_outage.start()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    _all_in_the_bucket(s3_outage, "flaky", "runs/r")
    keys = {
        o["Key"] for o in s3_outage.client.list_objects_v2(Bucket="flaky", Prefix="runs/r/checkpoints/")["Contents"]
    }
    assert "runs/r/checkpoints/step-00000050/trainer_state.json" in keys  # the last one, uploaded after the outage


def test_an_outage_past_the_retry_timeout_exits_75_and_a_rerun_finishes_the_same_weights(s3_outage, cache, tmp_path):
    s3_outage.client.create_bucket(Bucket="down")
    common = ["--skip-judge", "--train-limit", "200", "--checkpoint-every", "5"]
    straight = cli(*smoke_run(cache, "s3://down/runs", "straight", *common, "--scratch", tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr

    args = smoke_run(cache, "s3://down/runs", "cut", *common, "--scratch", tmp_path / "b", "--s3-retry-timeout", "3")
    proc = start_cli(*args)
    wait_for_event(proc, lambda e: e.get("event") == "checkpoint", deadline_s=120)
    s3_outage.stop()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 75
    [line] = err.splitlines()
    assert "object store s3://down" in line and "failed for 3s" in line and "rerun to resume" in line
    local = json.loads((tmp_path / "b" / "cut" / "manifest.json").read_text())  # the store was down
    assert local["stages"]["finetune"]["status"] == "failed" and "object store" in local["stages"]["finetune"]["error"]
    assert (tmp_path / "b" / "cut" / "checkpoints").is_dir()  # the work done is kept

    s3_outage.start()
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    _all_in_the_bucket(s3_outage, "down", "runs/cut")
    weights = [
        load_file(Path(tmp_path / d / run / "model" / "model.safetensors"))
        for d, run in (("a", "straight"), ("b", "cut"))
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# --- a full disk ------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 110 MB tmpfs: room for one checkpoint of the tiny model (~78 MB with its own head), not two."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=110m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_exit_75_with_no_partial_checkpoint_and_the_earlier_one_resumes(
    small_disk, tiny_model_dir, shared_data
):
    out = small_disk / "ft"
    args = finetune_run(
        tiny_model_dir, shared_data, out, "--max-steps", "12", "--checkpoint-every", "4", "--eval-freq", "4"
    )
    full = cli(*args)
    assert full.returncode == 75
    [line] = full.stderr.splitlines()
    assert line.startswith(f"Error: disk full: {out / 'checkpoints'} has ") and "checkpoint step-00000008" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]  # no .tmp left
    failed = [e for e in events(full.stdout) if e["event"] == "stage_failed"]
    assert failed and failed[0]["exit_code"] == 75

    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)  # space was freed
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    [resumed] = [e for e in events(done.stdout) if e["event"] == "resumed"]
    assert resumed["step"] == 4
    assert os.path.isfile(out / "model" / "model.safetensors")
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 12


def test_no_room_for_the_final_model_is_caught_before_it_is_written(small_disk, tiny_model_dir, cache):
    # The step-4 checkpoint (~78 MB) fits the 110 MB disk; the final model (~52 MB: safetensors and the
    # book's .pth) then does not: the check before it, not a half-written model.
    out = small_disk / "ft"
    args = finetune_run(tiny_model_dir, cache, out, "--max-steps", "4", "--checkpoint-every", "4")
    full = cli(*args)
    assert full.returncode == 75, full.stderr
    [line] = full.stderr.splitlines()
    assert (
        line.startswith(f"Error: disk full: {out} has ") and "the final model (safetensors and the book's .pth)" in line
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]
    assert not (out / "model").exists() and not list(out.glob("*.pth")) and not list(out.rglob("*.tmp*"))

    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    assert [e["step"] for e in events(done.stdout) if e["event"] == "resumed"] == [4]
    assert (out / "model" / "model.safetensors").is_file()


# --- the run lock on S3: renewed while the run lives, stale once its holder is gone ----------------


def _timestamp(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_the_s3_run_lock_is_renewed_past_its_lease_and_stale_once_its_holder_is_gone(s3):
    import time

    from job.run.lock import RunLocked, run_lock
    from job.storage.store import open_storage

    s3.create_bucket(Bucket="lease")
    storage = open_storage("s3://lease/runs/r")

    def record() -> dict:
        return json.loads(s3.get_object(Bucket="lease", Key="runs/r/.lock")["Body"].read())

    first = run_lock(storage, "r", lease_s=2.0)
    first.acquire()
    try:
        granted = record()["expires"]
        # A run longer than its lease: the holder's thread has moved the expiry on, twice
        wait_until(lambda: record()["expires"] > granted and time.time() > _timestamp(granted) + 1, 20)
        with pytest.raises(RunLocked, match="run r is already running"):
            run_lock(storage, "r", lease_s=2.0).acquire()
    finally:
        first.release()

    # A holder on this host whose process is gone (a job requeued onto the same node): stale at once,
    # though its lease has hours to run; a live one on this host is not.
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid, stale in ((gone.pid, True), (os.getpid(), False)):
        held = {
            "run_id": "r",
            "host": socket.gethostname(),
            "pid": pid,
            "started": granted,
            "expires": "2099-01-01T00:00:00+00:00",
        }
        s3.put_object(Bucket="lease", Key="runs/r/.lock", Body=json.dumps(held).encode())
        second = run_lock(storage, "r", lease_s=60.0)
        if stale:
            second.acquire()
            assert record()["pid"] == os.getpid()
            second.release()
        else:
            with pytest.raises(RunLocked, match=f"pid {pid}"):
                second.acquire()
