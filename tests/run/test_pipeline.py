"""`sft-job run` end to end: S3 (moto's real HTTP endpoint), resume, idempotence, config, logs, metrics."""

import json
import re
import shutil
import signal

import pytest
import torch
import yaml
from safetensors.torch import load

from job.config import RunConfig
from job.core.errors import ConfigError
from job.core.observability import Metrics
from job.models.hub import HF_FILES
from job.run.pipeline import run_pipeline
from tests.helpers import cli, events, start_cli, wait_for_event

STAGES = ["download", "finetune", "generate", "judge"]


def _args(tiny_model_dir, cache, ollama, tmp_path, output, *extra):
    return [
        "run",
        "--model-dir",
        tiny_model_dir,
        "--data",
        cache / "instruction-data.json",
        "--cache",
        cache,
        "--output",
        output,
        "--judge-url",
        ollama.url,
        "--scratch",
        tmp_path / "scratch",
        "--max-steps",
        "12",
        "--eval-freq",
        "4",
        "--checkpoint-every",
        "4",
        "--limit",
        "6",
        "--max-new-tokens",
        "8",
        "--metrics-port",
        "0",
        "--log-format",
        "json",
        *map(str, extra),
    ]


def _s3_object(s3, bucket, key) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.mark.slow
def test_whole_run_into_s3_then_the_same_command_does_nothing(s3, tiny_model_dir, cache, ollama, tmp_path):
    s3.create_bucket(Bucket="runs")
    args = _args(tiny_model_dir, cache, ollama, tmp_path, "s3://runs/team/sft", "--run-id", "r1")
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.splitlines()
    assert lines and all(json.loads(line)["run_id"] == "r1" and "stage" in json.loads(line) for line in lines)

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix="team/sft/r1/")["Contents"]}
    manifest = json.loads(_s3_object(s3, "runs", "team/sft/r1/manifest.json"))
    assert [manifest["stages"][s]["status"] for s in STAGES] == ["complete"] * 4
    artifacts = {k: v for s in STAGES for k, v in manifest["stages"][s]["artifacts"].items()}
    assert set(artifacts) == {
        "model/model.safetensors",
        "model/config.json",
        "gpt2-custom-sft.pth",
        "losses.json",
        "loss-plot.png",
        "instruction-data-with-response.json",
        "scores.json",
        "summary.json",
    }
    import hashlib

    for key, meta in artifacts.items():
        body = _s3_object(s3, "runs", f"team/sft/r1/{key}")
        assert (len(body), hashlib.sha256(body).hexdigest()) == (meta["size"], meta["sha256"]), key
    assert "team/sft/r1/config.yaml" in keys
    assert yaml.safe_load(_s3_object(s3, "runs", "team/sft/r1/config.yaml"))["run_id"] == "r1"
    assert any(k.startswith("team/sft/r1/checkpoints/step-00000012/") for k in keys)
    assert json.loads(_s3_object(s3, "runs", "team/sft/r1/summary.json"))["scored"] == 6

    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = [e["stage"] for e in events(again.stdout) if e["event"] == "stage_skipped"]
    assert skipped == STAGES
    assert not [e for e in events(again.stdout) if e["event"] in ("eval", "generate_start", "judge_start")]

    # the report, written at the end of each run; rebuilt from the bucket alone by `sft-job report`
    report = _s3_object(s3, "runs", "team/sft/r1/report.html")
    assert b"data:image/png;base64," in report and report.count(b"<tr") >= 6
    s3.delete_object(Bucket="runs", Key="team/sft/r1/report.html")
    rebuilt = cli("report", "s3://runs/team/sft/r1", "--log-format", "json")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert _s3_object(s3, "runs", "team/sft/r1/report.html") == report


@pytest.mark.slow
def test_sigterm_mid_finetune_resumes_from_the_checkpoint_in_s3(s3, tiny_model_dir, cache, ollama, tmp_path):
    s3.create_bucket(Bucket="preempt")
    # 40 steps, so training is still going when the step-4 checkpoint has reached S3 (a later flag wins).
    straight = cli(
        *_args(
            tiny_model_dir,
            cache,
            ollama,
            tmp_path / "a",
            "s3://preempt/runs",
            "--run-id",
            "straight",
            "--skip-judge",
            "--max-steps",
            "40",
        )
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    args = _args(
        tiny_model_dir,
        cache,
        ollama,
        tmp_path / "b",
        "s3://preempt/runs",
        "--run-id",
        "cut",
        "--skip-judge",
        "--max-steps",
        "40",
    )
    proc = start_cli(*args)
    wait_for_event(proc, lambda e: e.get("event") == "checkpoint_uploaded" and e["checkpoint"] == "step-00000004")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == 75
    manifest = json.loads(_s3_object(s3, "preempt", "runs/cut/manifest.json"))
    assert manifest["stages"]["finetune"]["status"] == "interrupted"
    shutil.rmtree(tmp_path / "b" / "scratch")  # a new pod: nothing local survives

    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    downloaded = [e for e in events(resumed.stdout) if e["event"] == "checkpoint_downloaded"]
    assert downloaded and downloaded[0]["checkpoint"] >= "step-00000004"
    a = load(_s3_object(s3, "preempt", "runs/straight/model/model.safetensors"))
    b = load(_s3_object(s3, "preempt", "runs/cut/model/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _s3_object(s3, "preempt", "runs/straight/losses.json") == _s3_object(s3, "preempt", "runs/cut/losses.json")


def test_missing_bucket_fails_at_preflight_with_nothing_written(s3, tiny_model_dir, cache, ollama, tmp_path):
    result = cli(*_args(tiny_model_dir, cache, ollama, tmp_path, "s3://no-such-bucket/x", "--run-id", "r"))
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "Error: output bucket s3://no-such-bucket at " + s3.meta.endpoint_url + " does not exist"
    )
    assert not (tmp_path / "scratch").exists()


def test_unreachable_s3_endpoint_fails_at_preflight(tiny_model_dir, cache, ollama, tmp_path):
    from tests.helpers import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    result = cli(
        *_args(tiny_model_dir, cache, ollama, tmp_path, "s3://bucket/x", "--s3-endpoint-url", endpoint),
        env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"},
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: cannot reach output s3://bucket at {endpoint}: EndpointConnectionError"
    assert not (tmp_path / "scratch").exists()


def test_config_file_unknown_key_and_wrong_type_are_one_line_errors(tmp_path):
    (tmp_path / "job.yaml").write_text("batch_size: 4\nbatch_sise: 8\n")
    result = cli("run", "--config", tmp_path / "job.yaml", "--output", tmp_path / "out")
    assert result.returncode == 2 and "unknown key 'batch_sise'" in result.stderr
    (tmp_path / "job.yaml").write_text("batch_size: eight\n")
    result = cli("run", "--config", tmp_path / "job.yaml", "--output", tmp_path / "out")
    assert result.returncode == 2 and "job.yaml: batch_size must be an integer, got 'eight'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_precedence_defaults_file_env_flags(tmp_path, monkeypatch):
    """defaults < --config file < SFT_JOB_* environment < flags, read back from the resolved config."""
    from click.testing import CliRunner

    from job import cli as cli_module

    seen = {}
    monkeypatch.setattr(cli_module, "_run", lambda stage, runner, cfg, *logging: seen.setdefault("cfg", cfg))
    (tmp_path / "job.yaml").write_text("batch_size: 4\nlr: 0.001\nepochs: 3\njudge_model: qwen2\n")
    runner = CliRunner()
    result = runner.invoke(
        cli_module.main,
        ["run", "--config", str(tmp_path / "job.yaml"), "--epochs", "5"],
        env={"SFT_JOB_LR": "0.002", "SFT_JOB_EPOCHS": "4", "SFT_JOB_SEED": "7"},
    )
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert isinstance(cfg, RunConfig)
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.seed, cfg.judge_model, cfg.weight_decay) == (
        4,
        0.002,
        5,
        7,
        "qwen2",
        0.1,
    )


def test_metrics_registry_holds_exact_values_after_a_local_run(tiny_model_dir, cache, ollama, tmp_path):
    metrics = Metrics()
    cfg = RunConfig(
        model_dir=str(tiny_model_dir),
        data=str(cache / "instruction-data.json"),
        cache=str(cache),
        output=str(tmp_path),
        run_id="m1",
        judge_url=ollama.url,
        max_steps=6,
        eval_freq=3,
        limit=4,
        max_new_tokens=5,
        metrics_port=0,
    )
    run_pipeline(cfg, metrics)
    value = metrics.value
    assert [value("sft_job_stage_status", {"stage": s}) for s in STAGES] == [2.0] * 4
    assert value("sft_job_train_step") == 6
    losses = json.loads((tmp_path / "m1" / "losses.json").read_text())
    assert value("sft_job_train_loss") == losses[-1]["train_loss"]
    assert value("sft_job_judge_requests_total", {"outcome": "ok"}) == 4
    assert value("sft_job_judge_score_count") == 4
    summary = json.loads((tmp_path / "m1" / "summary.json").read_text())
    assert value("sft_job_judge_score_mean") == summary["mean"]
    assert value("sft_job_last_success_timestamp_seconds") > 0
    assert value("sft_job_info", {"version": "0.1.0", "model": str(tiny_model_dir), "run_id": "m1"}) == 1
    assert value("sft_job_stage_duration_seconds", {"stage": "finetune"}) > 0


def test_download_stage_is_redone_where_this_machines_cache_lacks_the_files(
    tiny_model_dir, shared_data, ollama, tmp_path
):
    """The manifest travels with the run, the cache stays with the machine: a rerun on a machine
    whose cache is empty downloads again (the tokenizer in the preflight, which measures the test
    prompts with it; the weights in the download stage), and skips every stage whose artifacts verify."""
    from tests.file_server import FileServer

    files = {f"/mirror/gpt2/{n}": (shared_data / "gpt2" / n).read_bytes() for n in ("encoder.json", "vocab.bpe")}
    files |= {f"/mirror/gpt2-hf/gpt2-small/{n}": (tiny_model_dir / n).read_bytes() for n in HF_FILES}
    with FileServer(files) as mirror:
        args = [
            "run",
            "--model",
            "gpt2-small",
            "--source",
            "hf",
            "--data",
            shared_data / "instruction-data.json",
            "--cache",
            tmp_path / "cache",
            "--base-url",
            mirror.url + "/mirror",
            "--output",
            tmp_path / "runs",
            "--run-id",
            "moved",
            "--judge-url",
            ollama.url,
            "--max-steps",
            "2",
            "--limit",
            "2",
            "--max-new-tokens",
            "2",
            "--metrics-port",
            "0",
            "--log-format",
            "json",
        ]
        assert cli(*args).returncode == 0
        assert len(mirror.requests) == 4
        same_machine = cli(*args)
        assert [e["stage"] for e in events(same_machine.stdout) if e["event"] == "stage_skipped"] == STAGES
        assert len(mirror.requests) == 4
        shutil.rmtree(tmp_path / "cache")  # another machine: same output, empty cache
        other_machine = cli(*args)
        assert other_machine.returncode == 0, other_machine.stderr[-2000:]
        assert [e["stage"] for e in events(other_machine.stdout) if e["event"] == "stage_skipped"] == STAGES[1:]
        assert len(mirror.requests) == 8 and (tmp_path / "cache" / "gpt2-hf" / "gpt2-small" / "config.json").is_file()


def test_a_chat_template_is_an_input_of_the_run_and_an_edit_refuses_the_rerun(tiny_model_dir, cache, tmp_path):
    """A --chat-template file decides the tokens and the mask: the manifest records its sha256 beside the
    data's, and the same path with other bytes is refused on a rerun, as changed data is."""
    import hashlib

    from job.core.errors import ConfigError
    from job.run.pipeline import check_same_inputs, run_inputs

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    cfg = RunConfig(model_dir=str(tiny_model_dir), data=str(cache / "instruction-data.json"), cache=str(cache),
                    chat_template=str(template))  # fmt: skip
    first = run_inputs(cfg)
    assert first["chat_template"] == {
        "source": str(template),
        "sha256": hashlib.sha256(template.read_bytes()).hexdigest(),
    }
    check_same_inputs(first, run_inputs(cfg), "r")  # the same bytes: the rerun goes on
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}")
    with pytest.raises(ConfigError, match=r"^--chat-template .*chat\.jinja changed since run r began: sha256"):
        check_same_inputs(first, run_inputs(cfg), "r")


def _rerun_check(tmp_path, first: dict, second: dict):
    """The rerun rule where a rerun meets it: the run's config.yaml (made by ``first``) against ``second``."""
    from job.run.pipeline import Pipeline, recorded_options

    base = {"output": str(tmp_path / "runs"), "run_id": "r1", "smoke": True}
    started = RunConfig(**base, **first)
    saved = recorded_options(started) | {"run_id": "r1"}
    pipeline = Pipeline(RunConfig(**base, **second), Metrics())
    pipeline.storage.put_text("config.yaml", yaml.safe_dump(saved, sort_keys=False))
    return pipeline._check_same_run()


def test_a_rerun_may_change_the_options_of_a_stage_neither_enables(tmp_path):
    book = "https://example.com/pairs.json"
    assert _rerun_check(tmp_path, {}, {"dpo_data": book, "dpo_lr": 1e-4, "export_dtype": "q8_0"}) is not None
    # where either run enables the stage, its options are the run's contract as any other
    for first, second, change in (
        ({"dpo": True}, {"dpo": True, "dpo_lr": 1e-4}, "dpo_lr 5e-06 (now 0.0001)"),
        ({}, {"dpo": True, "dpo_data": book}, "dpo False (now True)"),
        ({"export": "gguf"}, {"export_dtype": "q8_0"}, "export_dtype 'f16' (now 'q8_0')"),
    ):
        with pytest.raises(ConfigError, match=re.escape(change)):
            _rerun_check(tmp_path, first, second)


def test_the_smokes_own_data_in_another_cache_is_the_same_data_a_path_elsewhere_is_not(tmp_path):
    first, second = {"cache": str(tmp_path / "a")}, {"cache": str(tmp_path / "b")}
    assert _rerun_check(tmp_path, first, second) is not None
    assert _rerun_check(tmp_path, first | {"dpo": True}, second | {"dpo": True}) is not None
    moved = second | {"data": str(tmp_path / "b" / "mine.json")}
    with pytest.raises(ConfigError, match="started with other options: data "):
        _rerun_check(tmp_path, first, moved)


@pytest.mark.parametrize(("named", "style"), [(None, "chat"), ("phi3", "phi3")])
def test_the_preflight_checks_dpos_pairs_in_the_style_the_stage_will_take(
    named, style, qwen3_dir, cache, tmp_path, book_data
):
    """After conversations the finetuned model records chat: the preflight lays the book's pairs out so (as the
    DPO stage will, reading that record), or in the --prompt-style named."""
    from job.run.pipeline import check_model_fit, check_preference_data
    from tests.helpers import conversations_file

    data = conversations_file(tmp_path / "conv.json", book_data)
    pairs = cache / "instruction-data-with-preference.json"
    named_style = {"prompt_style": named} if named else {}
    cfg = RunConfig(
        model_dir=str(qwen3_dir), data=str(data), dpo=True, dpo_data=str(pairs), cache=str(cache), **named_style
    )
    entries = json.loads(data.read_text())
    tokenizer, how, context = check_model_fit(cfg, entries[:2], "messages", entries)
    laid = check_preference_data(cfg, tokenizer, how, context)
    assert laid.style.name == style
    entry = json.loads(pairs.read_text())[0]
    expected = how.template.prompt([{"role": "user", "content": entry["instruction"] + f"\n\n{entry['input']}"}])
    assert (laid.style.format_input(entry) == expected) == (style == "chat")
