"""One step off the tested paths, through the real CLI: values that passed the checks and failed
later, unbounded inputs, files in the bucket that are not what the job wrote, and a damaged cache.
Each case asserts the exit code, one stderr line and its length, and what is left on disk and in the
bucket. (Stop signals at every stage: tests/e2e/test_signals.py; judge replies: tests/stages/test_judge_replies.py;
the readers fuzzed: tests/test_untrusted.py.)"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from job import cli
from tests.helpers import cli as run_cli
from tests.helpers import events, free_port, smoke_run


def _in_process(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        cli.entrypoint([str(a) for a in argv])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return exited.value.code, lines[0]


def _one_line(result, code: int, limit: int = 300) -> str:
    assert result.returncode == code, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ") and len(line) < limit, line
    return line


# --- every float finite, from flags, the environment and YAML ------------------------------------------


@pytest.mark.parametrize(
    "argv, env, named",  # the flag or variable the value came through
    [
        (["run", "--lr", "nan"], {}, "--lr"),
        (["run", "--lr", "inf"], {}, "--lr"),
        (["finetune", "--weight-decay", "-inf"], {}, "--weight-decay"),
        (["generate", "--temperature", "nan"], {}, "--temperature"),
        (["judge", "--judge-timeout", "inf"], {}, "--judge-timeout"),
        (["run", "--lora-alpha", "nan"], {}, "--lora-alpha"),
        (["run"], {"SFT_JOB_LR": "nan"}, "SFT_JOB_LR"),
        (["run"], {"SFT_JOB_GRAD_CLIP": "inf"}, "SFT_JOB_GRAD_CLIP"),
    ],
)
def test_nan_and_infinities_are_refused_before_anything_is_written(argv, env, named, capsys, monkeypatch, tmp_path):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, line = _in_process([*argv, "--output", tmp_path / "out"], capsys)
    assert code == 2 and line.startswith(f"Error: {named} must be a finite number"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, key", [("lr: .nan\n", "lr"), ("judge_timeout: .inf\n", "judge_timeout")])
def test_nan_and_infinities_from_yaml_are_refused(text, key, capsys, tmp_path):
    (tmp_path / "job.yaml").write_text(text)
    code, line = _in_process(["run", "--config", tmp_path / "job.yaml", "--output", tmp_path / "out"], capsys)
    assert code == 2 and f"{key} must be a finite number" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["run", "--seed", "-1"], "seed must be in 0..9223372036854775807"),
        (["run", "--seed", str(2**70)], "seed must be in 0.."),
        (["run", "--judge-seed", str(2**64)], "--judge-seed must be in 0.."),
        (["run", "--judge-wait", "9" * 13], "--judge-wait '9999999999999' must look like"),
        (["run", "--lock-lease", "800h"], "--lock-lease '800h' is longer than 30 days"),
        (["run", "--judge-timeout", "1e300"], "--judge-timeout must be at most 86400 seconds"),
        (["run", "--pad-to-multiple", "5000"], "--pad-to-multiple 5000 must be at most allowed_max_length 1024"),
        (["judge", "--judge-url", "http://[::1"], "--judge-url must be a http:// or https:// URL"),
        (["judge", "--judge-url", "localhost"], "--judge-url must be a http:// or https:// URL"),
    ],
)
def test_values_too_large_to_work_are_refused_by_their_bound(argv, words, capsys, tmp_path):
    code, line = _in_process([*argv, "--output", tmp_path / "out"], capsys)
    assert code == 2 and words in line and not (tmp_path / "out").exists()


def test_a_long_run_id_and_a_bad_bucket_name_are_config_errors_that_say_the_rule(capsys, tmp_path):
    code, line = _in_process(["run", "--run-id", "a" * 300, "--output", tmp_path], capsys)
    assert code == 2 and "(300 characters) must be 1 to 128 letters" in line and len(line) < 250
    code, line = _in_process(["run", "--output", "s3://Bad_Bucket/runs"], capsys)
    assert code == 2 and "'Bad_Bucket' is not an S3 bucket name" in line


# --- cross-option rules in the preflight: nothing written, and the corrected rerun runs -------------------


def test_batch_rules_fail_the_preflight_and_the_corrected_rerun_is_not_other_options(cache, tmp_path):
    args = smoke_run(cache, tmp_path / "runs", "b", "--skip-judge", "--train-limit", "16")
    uneven = run_cli(*args, "--grad-accum", "3")
    line = _one_line(uneven, 2)
    assert "--batch-size 8 must divide by processes x --grad-accum (1 x 3): use --batch-size 9" in line
    assert not (tmp_path / "runs" / "b").exists()
    small = run_cli(*args, "--train-limit", "4")
    assert "larger than the training split of 4 entries (--train-limit 4)" in _one_line(small, 2)
    assert not (tmp_path / "runs" / "b").exists()
    fixed = run_cli(*args, "--grad-accum", "2")
    assert fixed.returncode == 0, fixed.stderr


def test_max_new_tokens_past_the_context_fails_the_preflight_with_a_value_that_works(cache, tmp_path):
    args = smoke_run(cache, tmp_path / "runs", "m", "--skip-judge", "--max-new-tokens", "1020")
    line = _one_line(run_cli(*args), 2)
    hint = int(re.search(r"use --max-new-tokens (-?\d+) or fewer", line).group(1))
    assert 0 < hint < 1020 and not (tmp_path / "runs" / "m").exists()


@pytest.mark.parametrize(
    "backend, variable, words",
    [
        ("ollama", "OLLAMA_HOST", "OLLAMA_HOST 'http://[::1' is not a host or URL"),
        ("openai", "OPENAI_BASE_URL", "is not a URL"),
    ],
)
def test_a_judge_host_from_the_environment_that_is_no_url_is_a_config_error(
    backend, variable, words, shared_data, capsys, monkeypatch, tmp_path
):
    monkeypatch.setenv(variable, "http://[::1")
    responses = shared_data / "seed-eval" / "instruction-data-with-response.json"
    argv = ["judge", "--judge-backend", backend, "--responses", responses, "--output", tmp_path / "j"]
    code, line = _in_process(argv, capsys)
    assert code == 2 and words in line and not (tmp_path / "j").exists()


def test_a_metrics_address_that_cannot_be_served_is_a_config_error(cache, tmp_path):
    args = smoke_run(cache, tmp_path / "runs", "x", "--skip-judge", "--metrics-address", "not-an-ip")
    args[args.index("--metrics-port") + 1] = str(free_port())
    line = _one_line(run_cli(*args), 2)
    assert "on not-an-ip cannot be served" in line and "--metrics-address" in line
    assert not (tmp_path / "runs" / "x").exists()


def test_a_lora_rank_wider_than_the_model_fails_the_preflight(cache, tmp_path):
    args = smoke_run(cache, tmp_path / "runs", "l", "--skip-judge", "--lora-rank", "100000")
    assert "--lora-rank 100000 is more than the model's width of 64" in _one_line(run_cli(*args), 2)
    assert not (tmp_path / "runs" / "l").exists()


def test_a_test_prompt_longer_than_the_context_is_found_before_training(cache, tmp_path):
    entries = json.loads((cache / "instruction-data.json").read_text())[:20]
    entries[17]["instruction"] = "word " * 1100  # entry 17 opens the test split (17 train, 2 test, 1 validation)
    (tmp_path / "data.json").write_text(json.dumps(entries))
    args = smoke_run(cache, tmp_path / "runs", "p", "--skip-judge", "--train-limit", "8")
    args[args.index("--data") + 1] = tmp_path / "data.json"
    line = _one_line(run_cli(*args), 1)
    assert "the longest test prompt (test entry 0) has" in line and "shorten or drop that entry" in line
    assert not (tmp_path / "runs" / "p").exists()


# --- unbounded inputs ---------------------------------------------------------------------------------


def _bomb(levels: int) -> str:
    lines = ['x0: &x0 ["lol"]'] + [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nlora_targets: *x{levels - 1}\n"


@pytest.mark.parametrize("levels", [6, 9])
def test_a_yaml_alias_bomb_under_a_known_key_is_one_short_line(levels, capsys, tmp_path):
    (tmp_path / "bomb.yaml").write_text(_bomb(levels))
    code, line = _in_process(["run", "--config", tmp_path / "bomb.yaml", "--output", tmp_path / "out"], capsys)
    assert code == 2 and "expands to more than 100000 values" in line and len(line) < 200
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, words",
    [("[" * 200_000 + "]" * 200_000, "nested too deep"), ('[{"instruction": ' + "9" * 5000 + "}]", "5000 characters")],
    ids=["nested-200000-deep", "5000-digit-number"],
)
def test_a_dataset_nested_deep_or_with_a_huge_number_is_exit_1(text, words, tiny_model_dir, capsys, tmp_path):
    (tmp_path / "data.json").write_text(text)
    argv = ["finetune", "--model-dir", tiny_model_dir, "--data", tmp_path / "data.json", "--output", tmp_path / "o"]
    code, line = _in_process(argv, capsys)
    assert code == 1 and words in line and len(line) < 300 and not (tmp_path / "o").exists()


def test_a_damaged_cached_tokenizer_file_offline_is_exit_1_naming_it(tiny_model_dir, shared_data, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(shared_data / "gpt2", cache / "gpt2")
    (cache / "gpt2" / "vocab.bpe").write_bytes((cache / "gpt2" / "vocab.bpe").read_bytes()[:-100])  # truncated
    offline = f"http://127.0.0.1:{free_port()}/mirror"  # nothing listens there
    result = run_cli(
        "finetune",
        *("--model-dir", tiny_model_dir, "--data", shared_data / "instruction-data.json", "--cache", cache),
        *("--base-url", offline, "--output", tmp_path / "o", "--log-format", "json"),
    )
    line = _one_line(result, 1)
    assert f"cached {cache / 'gpt2' / 'vocab.bpe'} is damaged" in line and "replace it" in line
    assert [e["file"] for e in events(result.stdout) if e["event"] == "cache_file_damaged"] == [
        str(cache / "gpt2" / "vocab.bpe")
    ]
    assert not (tmp_path / "o").exists()


# --- the bucket's contents ---------------------------------------------------------------------------

LOCK = {"run_id": "r", "host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00+00:00"}


@pytest.mark.parametrize(
    "key, body, words",
    [
        ("manifest.json", b"{not json", "manifest.json of run r (s3://tamper/runs/r) is not JSON"),
        ("manifest.json", json.dumps({"run_id": "r", "version": "1", "stages": {"x": {}}}).encode(), "stages.x.status"),
        ("manifest.json", b"\xff\xfe", "is not UTF-8 text"),
        ("config.yaml", b"lr: [unclosed", "config.yaml of run r (s3://tamper/runs/r) is not YAML"),
        ("config.yaml", b"- a list", "is not a mapping of option names"),
        (".lock", json.dumps({**LOCK, "expires": 1767225600}).encode(), "lock s3://tamper/runs/r/.lock: expires"),
        (".lock", b"[]", "lock s3://tamper/runs/r/.lock: the document"),
    ],
    ids=[
        "manifest-not-json",
        "manifest-shape",
        "manifest-bytes",
        "config-not-yaml",
        "config-list",
        "lock",
        "lock-list",
    ],
)
def test_files_in_the_bucket_that_the_job_did_not_write_are_exit_1_naming_them(key, body, words, s3, cache, tmp_path):
    s3.create_bucket(Bucket="tamper")
    for old in s3.list_objects_v2(Bucket="tamper").get("Contents", []):
        s3.delete_object(Bucket="tamper", Key=old["Key"])
    s3.put_object(Bucket="tamper", Key=f"runs/r/{key}", Body=body)
    result = run_cli(*smoke_run(cache, "s3://tamper/runs", "r", "--skip-judge", "--scratch", tmp_path / "s"))
    line = _one_line(result, 1)
    assert words in line, line
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="tamper")["Contents"]}
    assert keys == {f"runs/r/{key}"}  # nothing written beside it, the lock released
    assert not [e for e in events(result.stdout) if e["event"] in ("stage_start", "job_crashed")]


# --- a judge that misbehaves, through the CLI -------------------------------------------------------------


def test_a_judge_sending_megabytes_ends_the_stage_with_75_and_writes_no_scores(shared_data, tmp_path):
    from tests.ollama_server import FakeOllama

    server = FakeOllama().start()
    try:
        server.mode, server.huge_bytes = "huge", 8 << 20
        responses = shared_data / "seed-eval" / "instruction-data-with-response.json"
        result = run_cli(
            "judge",
            *("--responses", responses, "--output", tmp_path / "j", "--judge-url", server.url),
            *("--judge-retries", "0", "--log-format", "json"),
        )
    finally:
        server.stop()
    line = _one_line(result, 75)
    assert line.startswith("Error: judge: 110 of 110 entries failed (reply over 64 KB")
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == ["scores.progress.jsonl"]
    assert (tmp_path / "j" / "scores.progress.jsonl").stat().st_size == 0
