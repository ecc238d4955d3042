"""Every value is checked where it enters: a bad flag, YAML value or environment variable is one stderr
line naming the key, exit 2, and nothing written."""

from __future__ import annotations

import re

import pytest

from job import cli

FLAGS = [
    ("epochs", ["--epochs", "0"]),
    ("epochs", ["--epochs", "1.5"]),
    ("batch_size", ["--batch-size", "-8"]),
    ("lr", ["--lr", "0"]),
    ("lr", ["--lr", "fast"]),
    ("weight_decay", ["--weight-decay", "-0.1"]),
    ("eval_freq", ["--eval-freq", "0"]),
    ("eval_iter", ["--eval-iter", "0"]),
    ("grad_accum", ["--grad-accum", "0"]),
    ("grad_clip", ["--grad-clip", "-1"]),
    ("grad_clip", ["--grad-clip", "0"]),
    ("max_steps", ["--max-steps", "0"]),
    ("checkpoint_every", ["--checkpoint-every", "0"]),
    ("keep_checkpoints", ["--keep-checkpoints", "0"]),
    ("precision", ["--precision", "fp8"]),
    ("model", ["--model", "gpt2-huge"]),
    ("max_new_tokens", ["--max-new-tokens", "0"]),
    ("temperature", ["--temperature", "-1"]),
    ("top_k", ["--top-k", "0"]),
    ("generate_batch_size", ["--generate-batch-size", "0"]),
    ("metrics_port", ["--metrics-port", "70000"]),
    ("run_id", ["--run-id", "../elsewhere"]),
    ("output", ["--output", "s3://"]),
    ("output", ["--output", "http://host/runs"]),
    ("s3_endpoint_url", ["--s3-endpoint-url", "notaurl"]),
    ("judge_wait", ["--judge-wait", "soon"]),
    ("judge_concurrency", ["--judge-concurrency", "0"]),
    ("judge_timeout", ["--judge-timeout", "0"]),
    ("judge_retries", ["--judge-retries", "-1"]),
    ("judge_format", ["--judge-format", "xml"]),
    ("s3_retry_timeout", ["--s3-retry-timeout", "0"]),
    ("lock_lease", ["--lock-lease", "never"]),
    ("base_url", ["--base-url", "ftp://mirror/cache"]),
    ("allowed_max_length", ["--allowed-max-length", "0"]),
    ("train_limit", ["--train-limit", "0"]),
    ("data_order", ["--data-order", "random"]),
    ("pad_to_multiple", ["--pad-to-multiple", "0"]),
    ("eos_check_every", ["--eos-check-every", "16", "--temperature", "0.7"]),
    ("lora_rank", ["--lora-rank", "0"]),
    ("lora_alpha", ["--lora-rank", "8", "--lora-alpha", "0"]),
    ("lora_dropout", ["--lora-dropout", "1"]),
    ("lora_targets", ["--lora-targets", "attn,query"]),
]
YAML = [
    ("batch_size", "batch_size: [8]"),
    ("epochs", "epochs: null"),
    ("epochs", "epochs: 1.5"),
    ("eval_freq", "eval_freq: true"),
    ("lr", "lr: fast"),
    ("smoke", "smoke: 'yes'"),
    ("model", "model: {name: gpt2}"),
    ("precision", "precision: fp8"),
    ("judge_num_ctx", "judge_num_ctx: 2048.5"),
    ("batch_sise", "batch_sise: 8"),
    ("grad_clip", "grad_clip: -1"),
    ("lora_targets", "lora_targets: [attn]"),
    ("s3_endpoint_url", "s3_endpoint_url: notaurl"),
]
ENV = [
    ("epochs", {"SFT_JOB_EPOCHS": "two"}),
    ("metrics_port", {"SFT_JOB_METRICS_PORT": "-1"}),
]


def _run(argv, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exited:
        cli.entrypoint(argv)
    return exited.value.code, capsys.readouterr().err.splitlines()


def _check(key: str, code: int, err: list[str], out) -> None:
    assert code == 2
    assert len(err) == 1 and err[0].startswith("Error: ") and len(err[0]) < 300, err
    assert re.search(key.replace("_", "[-_]"), err[0], re.IGNORECASE), err[0]  # SFT_JOB_EPOCHS names epochs
    assert not out.exists()


@pytest.mark.parametrize(("key", "flags"), FLAGS, ids=[" ".join(f) for _, f in FLAGS])
def test_a_bad_flag(key, flags, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(["run", "--output", str(out), *flags], capsys)
    _check(key, code, err, out)


@pytest.mark.parametrize(("key", "text"), YAML, ids=[t for _, t in YAML])
def test_a_bad_yaml_value(key, text, tmp_path, capsys):
    (tmp_path / "job.yaml").write_text(text + "\n")
    out = tmp_path / "out"
    code, err = _run(["run", "--config", str(tmp_path / "job.yaml"), "--output", str(out)], capsys)
    _check(key, code, err, out)


@pytest.mark.parametrize(("key", "env"), ENV, ids=list(map(str, ENV)))
def test_a_bad_environment_value(key, env, tmp_path, capsys, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    code, err = _run(["run", "--output", str(out)], capsys)
    _check(key, code, err, out)


def test_good_values_of_the_same_kinds_reach_the_run_as_given(tmp_path, capsys, monkeypatch):
    # Through the same three doors as the bad ones above (YAML, environment, flags), to the config the run gets.
    given = []
    monkeypatch.setattr(cli, "_run", lambda stage, runner, cfg, *args: given.append(cfg))
    (tmp_path / "job.yaml").write_text("lr: 1\njudge_wait: 300\nmax_steps: null\nprecision: bf16\n")
    monkeypatch.setenv("SFT_JOB_EPOCHS", "3")
    flags = ["--output", "s3://bucket/runs", "--s3-endpoint-url", "http://127.0.0.1:9000", "--grad-clip", "1.0"]
    code, err = _run(["run", "--config", str(tmp_path / "job.yaml"), *flags], capsys)
    assert (code, err) == (0, [])
    [cfg] = given
    assert (cfg.lr, cfg.judge_wait, cfg.max_steps, cfg.precision, cfg.epochs) == (1, "300", None, "bf16", 3)
    assert (cfg.output, cfg.s3_endpoint_url, cfg.grad_clip) == ("s3://bucket/runs", "http://127.0.0.1:9000", 1.0)


# One option of each kind (a literal, a number, strings a validator checks), bad through each door: the
# line names the door the value came through, as the user wrote it.
SOURCED = [("precision", "fp8"), ("epochs", "0"), ("data_fields", "bad"), ("lora_targets", "attn,query")]


@pytest.mark.parametrize("door", ["flag", "env", "config"])
@pytest.mark.parametrize(("key", "value"), SOURCED, ids=[k for k, _ in SOURCED])
def test_a_bad_value_names_the_flag_variable_or_file_key_it_came_from(door, key, value, tmp_path, capsys, monkeypatch):
    flag, variable, config = "--" + key.replace("_", "-"), f"SFT_JOB_{key.upper()}", tmp_path / "job.yaml"
    out = tmp_path / "out"
    argv = ["run", "--output", str(out)]
    if door == "flag":
        argv += [flag, value]
    elif door == "env":
        monkeypatch.setenv(variable, value)
    else:
        config.write_text(f"{key}: {value}\n")
        argv += ["--config", str(config)]
    code, err = _run(argv, capsys)
    _check(key, code, err, out)
    named = {"flag": flag, "env": variable, "config": f"{config}: {key}"}
    assert named[door] in err[0], err[0]
    assert (variable in err[0]) == (door == "env"), err[0]  # click's own line names the flag beside it
    assert (config.name in err[0]) == (door == "config"), err[0]


def test_a_rule_between_options_names_each_ones_door_and_not_an_innocent_one(tmp_path, capsys, monkeypatch):
    # packing from the file, dpo from the environment, data_order from a flag: only the first two break the rule
    # (without data_order's flag another check would speak, which does not make it the culprit).
    config = tmp_path / "job.yaml"
    config.write_text("packing: true\n")
    monkeypatch.setenv("SFT_JOB_DPO", "1")
    out = tmp_path / "out"
    code, err = _run(["run", "--config", str(config), "--output", str(out), "--data-order", "seeded"], capsys)
    _check("packing", code, err, out)
    assert err[0].startswith(f"Error: {config}: packing and SFT_JOB_DPO cannot go together"), err[0]
    assert err[0].endswith("drop packing or SFT_JOB_DPO"), err[0]  # every mention of a flag
    assert "data-order" not in err[0] and "data_order" not in err[0], err[0]


def test_a_value_a_check_applies_with_is_named_beside_the_one_it_names(tmp_path, capsys, monkeypatch):
    # --lora-alpha is checked only with --lora-rank: the rank from the environment is what it applied with;
    # metrics_sd_dir's rule names metrics_port twice, and both read as the variable it came from
    monkeypatch.setenv("SFT_JOB_LORA_RANK", "8")
    code, err = _run(["run", "--output", str(tmp_path / "a"), "--lora-alpha", "0"], capsys)
    assert code == 2 and err == ["Error: --lora-alpha must be positive, got 0.0 (with SFT_JOB_LORA_RANK)"], err
    monkeypatch.setenv("SFT_JOB_METRICS_PORT", "0")
    argv = ["run", "--output", str(tmp_path / "b"), "--metrics-sd-dir", str(tmp_path / "sd")]
    code, err = _run([*argv, "--metrics-address", "0.0.0.0", "--lora-alpha", "8"], capsys)
    assert code == 2 and err == [
        "Error: --metrics-sd-dir publishes the metrics endpoint, which SFT_JOB_METRICS_PORT 0 turns off: leave "
        "SFT_JOB_METRICS_PORT unset (a free port) or drop --metrics-sd-dir"
    ], err


def test_every_flag_a_line_names_is_called_by_where_its_value_came_from(cache, tmp_path, capsys, monkeypatch):
    """The rules the settings check and those the preflight checks once the data is read: an option given in
    the config file reads as its key (the file named first), one from the environment as its variable, even
    where it is not the culprit the check blames (data_order's value is also its default)."""
    config = tmp_path / "job.yaml"
    smoke = ["run", "--smoke", "--skip-judge", "--cache", str(cache), "--output", str(tmp_path / "runs")]
    config.write_text("data_order: book\n")
    monkeypatch.setenv("SFT_JOB_PACKING", "1")
    code, err = _run([*smoke, "--config", str(config)], capsys)
    assert code == 2 and err[0].startswith(f"Error: {config}: SFT_JOB_PACKING and data_order book cannot go"), err
    monkeypatch.delenv("SFT_JOB_PACKING")
    config.write_text("train_on: last\n")  # the preflight's check: alpaca data has no turns to choose from
    code, err = _run([*smoke, "--config", str(config)], capsys)
    assert code == 2 and err[0].startswith(f"Error: {config}: train_on last applies to messages data"), err
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    monkeypatch.setenv("SFT_JOB_CHAT_TEMPLATE", str(template))
    code, err = _run(smoke, capsys)
    assert code == 2 and err[0].startswith(f"Error: SFT_JOB_CHAT_TEMPLATE {template} applies to conversations"), err
    assert "--chat-template" not in err[0] and "job.yaml" not in err[0], err
