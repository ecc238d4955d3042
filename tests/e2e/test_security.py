"""Nothing from outside is trusted, and secrets never leave memory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import REPO, cli, events, finetune_run, smoke_run
from tests.ollama_server import FakeOllama


def _smoke_skip_judge(cache: Path, output, run_id: str, *extra) -> list:
    return smoke_run(cache, output, run_id, "--skip-judge", *extra)


# --- the bucket -----------------------------------------------------------------------------------


@pytest.mark.parametrize("escape", ["../../../../canary.txt", "ABSOLUTE"], ids=["dot-dot", "absolute"])
def test_keys_planted_in_the_bucket_cannot_write_outside_the_scratch_folder(escape, s3, cache, tmp_path):
    bucket = f"planted-{'abs' if escape == 'ABSOLUTE' else 'dots'}"  # the moto server outlives the test
    s3.create_bucket(Bucket=bucket)
    canary = tmp_path / "canary.txt"
    canary.write_text("untouched\n")
    escape = str(canary) if escape == "ABSOLUTE" else escape  # scratch/r/ + 4 levels up is tmp_path
    prefix = "runs/r/checkpoints/step-00000004"
    planted = {f"{prefix}/index.json": b'{"files": {}}', f"{prefix}/model.safetensors": b"x"}
    planted[f"{prefix}/{escape}"] = b"overwritten\n"
    for key, body in planted.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    done = cli(*_smoke_skip_judge(cache, f"s3://{bucket}/runs", "r", "--scratch", tmp_path / "scratch"))
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line == (
        f"Error: refusing storage key '{prefix[len('runs/r/') :]}/{escape}': "
        f"it would be written outside {tmp_path / 'scratch' / 'r'}"
    )
    assert canary.read_text() == "untouched\n"
    assert not (tmp_path / "scratch" / "r" / "checkpoints").exists()  # nothing written, not even the good keys


def test_a_symlink_in_the_scratch_folder_is_not_followed(s3, cache, tmp_path):
    s3.create_bucket(Bucket="links")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    prefix = "runs/r/checkpoints/step-00000004"
    for name in ("index.json", "model.safetensors"):
        s3.put_object(Bucket="links", Key=f"{prefix}/{name}", Body=b"{}")
    # A checkpoint folder in the scratch that is really a link to somewhere else.
    (tmp_path / "scratch" / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "scratch" / "r" / "checkpoints" / "step-00000004").symlink_to(elsewhere)
    done = cli(*_smoke_skip_judge(cache, "s3://links/runs", "r", "--scratch", tmp_path / "scratch"))
    assert done.returncode == 1 and "refusing storage key 'checkpoints/step-00000004/" in done.stderr
    assert list(elsewhere.iterdir()) == []


# --- checkpoints ----------------------------------------------------------------------------------


def test_an_altered_checkpoint_is_skipped_and_the_previous_one_resumes(tiny_model_dir, cache, tmp_path):
    args = finetune_run(tiny_model_dir, cache, tmp_path / "ft", "--checkpoint-every", "4", "--eval-freq", "4")
    first = cli(*args, "--max-steps", "8")
    assert first.returncode == 0, first.stderr
    latest = tmp_path / "ft" / "checkpoints" / "step-00000008"
    assert sorted(json.loads((latest / "index.json").read_text())["files"]) == [
        "config.yaml",
        "model.safetensors",
        "optimizer-exp_avg.safetensors",
        "optimizer-exp_avg_sq.safetensors",
        "optimizer-step.safetensors",
        "optimizer.json",
        "rng-0.json",
        "rng-0.safetensors",
        "trainer_state.json",
    ]
    data = bytearray((latest / "optimizer-exp_avg_sq.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one bit of the optimizer's state changed after the checkpoint was written
    (latest / "optimizer-exp_avg_sq.safetensors").write_bytes(bytes(data))

    resumed = cli(*args, "--max-steps", "12")
    assert resumed.returncode == 0, resumed.stderr
    [skipped] = [e for e in events(resumed.stdout) if e["event"] == "checkpoint_skipped"]
    assert skipped["checkpoint"] == "step-00000008" and skipped["file"] == "optimizer-exp_avg_sq.safetensors"
    assert [e["step"] for e in events(resumed.stdout) if e["event"] == "resumed"] == [4]


def test_no_code_path_unpickles_or_writes_pickles():
    pattern = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|safe_serialization\s*=\s*False|torch\.load\(")
    hits = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted((REPO / "job").glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and "book_model.load_state_dict(torch.load(path))" not in line
    ]
    assert hits == []


# --- secrets --------------------------------------------------------------------------------------

JUDGE_KEY = "sk-judge-SECRET-4f2a9c"
AWS_KEY_ID = "AKIASECRETTESTID7Q2"
AWS_SECRET = "aws-SECRET-d81e5b0c"

# Makes the generate stage crash with a secret in a local variable of the failing frame (a forced bug).
CRASH = """
import job.run.pipeline

def crash(self):
    key = self.cfg.judge_api_key
    raise RuntimeError("generate broke")

job.run.pipeline.Pipeline.generate = crash
"""


def _every_byte(tmp_path: Path, s3, bucket: str, *outputs: str) -> bytes:
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "sitecustomize" not in p.name)
    listing = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    stored = b"".join(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing)
    return written + stored + "".join(outputs).encode()


def test_secrets_are_in_no_byte_the_run_writes_through_a_crash_and_a_finish(s3, cache, tmp_path, monkeypatch):
    s3.create_bucket(Bucket="secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    (tmp_path / "key").write_text(JUDGE_KEY + "\n")
    server = FakeOllama().start()
    try:
        judge = ["--judge-backend", "openai", "--judge-url", f"{server.url}/v1", "--judge-model", "llama3:latest"]
        args = smoke_run(cache, "s3://secret/runs", "s", "--scratch", tmp_path / "scratch")
        hook = tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(CRASH)
        crashed = cli(*args, *judge, "--judge-api-key", JUDGE_KEY, env={"PYTHONPATH": str(hook)})
        assert crashed.returncode == 70 and "internal error in run: RuntimeError: generate broke" in crashed.stderr
        assert [e for e in events(crashed.stdout) if e["event"] == "job_crashed"]

        finished = cli(*args, *judge, "--judge-api-key-file", tmp_path / "key")
        assert finished.returncode == 0, finished.stderr
        assert len(server.chats) == 8  # the judge was asked, with the key
        assert [h.get("authorization") for h in server.chat_headers] == [f"Bearer {JUDGE_KEY}"] * 8
        everything = _every_byte(
            tmp_path, s3, "secret", crashed.stdout, crashed.stderr, finished.stdout, finished.stderr
        )
    finally:
        server.stop()
    everything = everything.replace(JUDGE_KEY.encode() + b"\n", b"", 1)  # the key file itself
    for secret in (JUDGE_KEY, AWS_KEY_ID, AWS_SECRET):
        assert secret.encode() not in everything, secret
    assert b"<redacted>" in everything  # config.yaml says a key was set, not what it is
