"""What the user typed wins, and everything that can fail does so before anything is written, through the
real CLI: the smoke's preset fills in only the options not given by hand (flag, SFT_JOB_* variable or
--config key, a default's value included), records the model that ran, and trains a --model-dir it is
given."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import yaml

from job import cli
from tests.helpers import cli as run_cli
from tests.helpers import conversations_file, events, free_port


def _smoke(cache, runs, run_id: str, *extra) -> list:
    """``run --smoke`` on the smoke's own data in the test's cache, no judge, logging JSON."""
    common = ["--cache", cache, "--output", runs, "--run-id", run_id, "--metrics-port", "0", "--log-format", "json"]
    return ["run", "--smoke", "--skip-judge", *common, *extra]


def _one_line(result, code: int) -> str:
    assert result.returncode == code, result.stderr[-2000:]
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: "), line
    return line


BY_HAND = {"temperature": 0.0, "max_new_tokens": 256, "judge_wait": "300s"}  # each the default's value


def test_a_smoke_uses_and_records_values_given_by_hand_that_equal_the_defaults(cache, tmp_path):
    runs = tmp_path / "runs"
    hand = ["--temperature", "0", "--max-new-tokens", "256", "--judge-wait", "300s"]
    result = run_cli(*_smoke(cache, runs, "hand", *hand))
    assert result.returncode == 0, result.stderr[-3000:]
    run = runs / "hand"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: config[k] for k in BY_HAND} == BY_HAND
    assert (config["train_limit"], config["limit"], config["top_k"]) == (40, 8, 50)  # the rest: the preset's
    [started] = [e for e in events(result.stdout) if e["event"] == "generate_start"]
    [done] = [e for e in events(result.stdout) if e["event"] == "generate_done"]
    assert started["max_new_tokens"] == 256 and done["new_tokens"] > 8 * 16  # 256 used, not the preset's 16
    # the model recorded is the one that ran: the smoke's random one, in config.yaml and the report
    assert config["model"] == "smoke" and config["model_dir"] is None
    assert (run / "config.yaml").read_text().startswith("# model used: random 2-layer GPT-2 (the smoke's own")
    report = (run / "report.html").read_text()
    assert "gpt2-medium" not in report and "random 2-layer GPT-2" in report
    # config.yaml stays a --config: the same run again, every stage skipped
    flags = ["--skip-judge", "--metrics-port", "0", "--log-format", "json"]
    again = run_cli("run", "--config", run / "config.yaml", *flags)
    assert again.returncode == 0, again.stderr[-2000:]
    skipped = [e["stage"] for e in events(again.stdout) if e["event"] == "stage_skipped"]
    assert skipped == ["download", "finetune", "generate"]


def _cfg_from_cli(argv, monkeypatch, capsys):
    """The RunConfig the CLI builds from ``argv`` (the stage itself not run)."""
    given = []
    monkeypatch.setattr(cli, "_run", lambda stage, runner, cfg, *args: given.append(cfg))
    with pytest.raises(SystemExit) as exited:
        cli.entrypoint([str(a) for a in argv])
    assert exited.value.code == 0, capsys.readouterr().err
    [cfg] = given
    return cfg


@pytest.mark.parametrize("source", ["flags", "environment", "config file"])
def test_values_equal_to_the_defaults_win_over_the_smoke_from_every_source(source, tmp_path, monkeypatch, capsys):
    argv = ["run", "--smoke", "--output", tmp_path / "runs", "--cache", tmp_path / "cache"]
    if source == "flags":
        argv += ["--temperature", "0", "--max-new-tokens", "256", "--judge-wait", "300s", "--top-k", "50"]
    elif source == "environment":
        for key, value in BY_HAND.items():
            monkeypatch.setenv(f"SFT_JOB_{key.upper()}", str(value))
    else:
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(BY_HAND))
        argv += ["--config", tmp_path / "job.yaml"]
    cfg = _cfg_from_cli(argv, monkeypatch, capsys)
    assert (cfg.temperature, cfg.max_new_tokens, cfg.judge_wait) == (0.0, 256, "300s")
    assert (cfg.train_limit, cfg.epochs, cfg.limit, cfg.top_k, cfg.model) == (40, 2, 8, 50, "smoke")
    # the smoke's own data where none is named, in the cache given
    assert cfg.data == cfg.dpo_data == str(tmp_path / "cache" / "smoke" / "instruction-data.json")


def test_a_data_url_given_by_hand_is_not_replaced_by_the_smokes_data(tmp_path, monkeypatch, capsys):
    from job.data.data_config import BOOK_DATA

    book = BOOK_DATA  # the default's URL, typed by hand
    cfg = _cfg_from_cli(["run", "--smoke", "--data", book, "--output", tmp_path], monkeypatch, capsys)
    assert cfg.data == book and cfg.dpo_data.endswith("smoke/instruction-data.json")


def test_a_smoke_with_a_model_dir_trains_that_folder_on_the_smokes_data(cache, tiny_model_dir, tmp_path):
    runs = tmp_path / "runs"
    result = run_cli(*_smoke(cache, runs, "dir", "--model-dir", tiny_model_dir, "--max-steps", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    run = runs / "dir"
    assert (run / "config.yaml").read_text().startswith(f"# model used: {tiny_model_dir}\n")
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model_dir"] == str(tiny_model_dir) and config["train_limit"] == 40
    assert config["data"] == str(cache / "smoke" / "instruction-data.json")
    trained = json.loads((run / "model" / "config.json").read_text())
    assert trained["vocab_size"] == 50257 and trained["n_positions"] == 128  # the folder's GPT-2, not the smoke's
    assert not (run / "smoke-model").exists()


@pytest.mark.parametrize("smoke", [True, False], ids=["smoke", "full"])
def test_a_model_dir_run_records_no_named_model_and_reruns_from_its_config(smoke, cache, tiny_model_dir, tmp_path):
    runs = tmp_path / "runs"
    small = ["--max-steps", "1", "--train-limit", "8", "--batch-size", "4", "--limit", "2", "--max-new-tokens", "4"]
    if smoke:
        args = _smoke(cache, runs, "dir", "--model-dir", tiny_model_dir, *small)
    else:
        common = ["--cache", cache, "--output", runs, "--run-id", "dir", "--metrics-port", "0", "--skip-judge"]
        data = ["--data", cache / "instruction-data.json"]
        args = ["run", *common, *data, "--model-dir", tiny_model_dir, *small, "--log-format", "json"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((runs / "dir" / "config.yaml").read_text())
    assert config["model"] is None and config["model_dir"] == str(tiny_model_dir)  # what ran, not gpt2-medium
    assert "gpt2-medium" not in (runs / "dir" / "config.yaml").read_text()
    flags = ["--skip-judge", "--metrics-port", "0", "--log-format", "json"]
    again = run_cli("run", "--config", runs / "dir" / "config.yaml", *flags)
    assert again.returncode == 0, again.stderr[-2000:]
    skipped = [e["stage"] for e in events(again.stdout) if e["event"] == "stage_skipped"]
    assert skipped == ["download", "finetune", "generate"]
    # a run whose config.yaml still names the unused default (as recorded before) resumes with its command
    written = runs / "dir" / "config.yaml"
    written.write_text(written.read_text().replace("\nmodel: null\n", "\nmodel: gpt2-medium\n"))
    assert yaml.safe_load(written.read_text())["model"] == "gpt2-medium"
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [e["stage"] for e in events(again.stdout) if e["event"] == "stage_skipped"] == skipped
    # null with no folder to start from is a config error naming both keys
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config | {"model_dir": None}))
    line = _one_line(run_cli("run", "--config", tmp_path / "bad.yaml", *flags), 2)
    assert "model is null and no model_dir is given" in line


def test_the_smoke_model_and_a_model_dir_together_are_refused_at_once(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.entrypoint(["run", "--model", "smoke", "--model-dir", str(tmp_path), "--output", str(tmp_path / "r")])
    [line] = capsys.readouterr().err.splitlines()
    # named as the flags they were given as
    assert exited.value.code == 2 and "--model smoke (the smoke's random model) and --model-dir" in line
    assert not (tmp_path / "r").exists()


# --- the DPO data, checked by the preflight as the instruction data is ---------------------------------


def _preference_file(path, long_in: str = "", count: int = 40):
    """The smoke's entries (chosen and rejected) as a file; ``long_in`` (training or validation) gives that
    split's entries a 400-character input (200 GPT-2 tokens): no pair of it fits a short --allowed-max-length."""
    from job.data.instructions import split_entries
    from job.data.smoke import smoke_entries

    entries = smoke_entries(count)
    train, _test, val = split_entries(list(range(count)))
    for i in {"training": train, "validation": val}.get(long_in, []):
        entries[i] = entries[i] | {"input": "x " * 200}
    path.write_text(json.dumps(entries))
    return path


def test_run_dpo_with_a_bad_preference_entry_fails_before_training_and_the_fixed_command_is_a_new_run(cache, tmp_path):
    data = _preference_file(tmp_path / "pref.json")
    entries = json.loads(data.read_text())
    del entries[7]["rejected"]
    data.write_text(json.dumps(entries))
    runs = tmp_path / "runs"
    args = _smoke(cache, runs, "pref", "--dpo", "--dpo-data", data, "--max-steps", "2", "--dpo-epochs", "1")
    bad = run_cli(*args)
    line = _one_line(bad, 1)
    assert line == (
        f"Error: dataset {data}: entry 7: field 'rejected' is missing (preference data needs chosen and rejected "
        "responses) (--skip-invalid drops such entries)"
    )
    assert not [e for e in events(bad.stdout) if e["event"] in ("finetune_start", "stage_started")]
    assert not (runs / "pref").exists()  # nothing written: the corrected command is a new run
    _preference_file(data)
    fixed = run_cli(*args)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    manifest = json.loads((runs / "pref" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stages"]["dpo"]["status"] == "complete"


@pytest.mark.parametrize(
    "long_in, code, words",
    [
        ("validation", 1, "no validation pair keeps a response token within --allowed-max-length 200 "
         "(34 of 34 training pairs, 0 of 2 validation pairs fit)"),
        ("training", 1, "no training pair keeps a response token within --allowed-max-length 200 "
         "(0 of 34 training pairs, 2 of 2 validation pairs fit)"),
    ],
)  # fmt: skip
def test_run_dpo_with_every_pair_of_a_split_too_long_names_the_file_the_limit_and_the_counts(
    long_in, code, words, cache, tmp_path
):
    data = _preference_file(tmp_path / "long.json", long_in)
    runs = tmp_path / "runs"
    result = run_cli(*_smoke(cache, runs, "long", "--dpo", "--dpo-data", data, "--allowed-max-length", "200"))
    line = _one_line(result, code)
    assert line == f"Error: preference dataset {data}: {words}: raise --allowed-max-length or shorten the entries"
    assert not (runs / "long").exists()


def test_run_dpo_with_fewer_fitting_pairs_than_a_batch_is_exit_2_before_anything(cache, tmp_path):
    data = _preference_file(tmp_path / "few.json", "training")
    entries = json.loads(data.read_text())
    for entry in entries[:3]:
        entry["input"] = ""  # 3 training pairs fit, a batch is 8
    data.write_text(json.dumps(entries))
    runs = tmp_path / "runs"
    result = run_cli(*_smoke(cache, runs, "few", "--dpo", "--dpo-data", data, "--allowed-max-length", "200"))
    line = _one_line(result, 2)
    assert (
        f"preference dataset {data}: fewer training pairs than --batch-size 8 within --allowed-max-length 200" in line
    )
    assert "(3 of 34 training pairs, 2 of 2 validation pairs fit)" in line and not (runs / "few").exists()


def test_the_dpo_stage_alone_says_the_same_naming_the_models_context(cache, tiny_model_dir, tmp_path):
    data = _preference_file(tmp_path / "long.json", "validation")
    out = tmp_path / "dpo"
    args = ["dpo", "--model-dir", tiny_model_dir, "--data", data, "--cache", cache, "--output", out]
    result = run_cli(*args, "--log-format", "json")
    line = _one_line(result, 1)
    assert line == (
        f"Error: preference dataset {data}: no validation pair keeps a response token within --allowed-max-length "
        "1024 (the model's context: 128) (34 of 34 training pairs, 0 of 2 validation pairs fit): raise "
        "--allowed-max-length or shorten the entries"
    )
    assert not (out / "model").exists() and not (out / "checkpoints").exists()


def _with_responses(data, indices, **responses):
    """``data``'s entries at ``indices`` given these responses (chosen, rejected)."""
    entries = json.loads(data.read_text())
    for i in indices:
        entries[i] |= {k: (entries[i]["rejected"] if v == "rejected" else v) for k, v in responses.items()}
    data.write_text(json.dumps(entries))
    return data


def _dpo_alone(model_dir, cache, data, out, *extra):
    args = ["dpo", "--model-dir", model_dir, "--data", data, "--cache", cache, "--output", out]
    return run_cli(*args, "--log-format", "json", *extra)


def test_pairs_left_without_a_response_are_told_apart_empty_from_too_long(cache, tiny_model_dir, tmp_path):
    from job.data.instructions import split_entries

    train, _test, _val = split_entries(list(range(40)))
    empty = _with_responses(_preference_file(tmp_path / "empty.json"), range(40), chosen="")
    line = _one_line(_dpo_alone(tiny_model_dir, cache, empty, tmp_path / "a", "--prompt-style", "phi3"), 1)
    assert line == (
        f"Error: preference dataset {empty}: no training pair has a response token to score (0 of 34 training "
        "pairs, 0 of 2 validation pairs fit; left out: 34 with an empty chosen or rejected response "
        "(--prompt-style phi3 scores the response alone)): give every pair a non-empty chosen and rejected response"
    )  # no advice to raise the limit: it would not help
    both = _with_responses(_preference_file(tmp_path / "both.json", "training"), train[:10], rejected="")
    line = _one_line(_dpo_alone(tiny_model_dir, cache, both, tmp_path / "b", "--prompt-style", "phi3"), 1)
    assert (
        "left out: 10 with an empty chosen or rejected response (--prompt-style phi3 scores the response alone), 24 "
        "with no response token within --allowed-max-length 1024 (the model's context: 128)): give every pair a "
        "non-empty chosen and rejected response, and raise --allowed-max-length or shorten the entries"
    ) in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "model").exists()


def test_pairs_whose_chosen_is_their_rejected_are_counted_and_a_training_split_of_only_them_refused(
    cache, tiny_model_dir, tmp_path
):
    from job.data.instructions import split_entries

    train, _test, _val = split_entries(list(range(40)))
    same = _with_responses(_preference_file(tmp_path / "same.json"), range(40), chosen="rejected")
    line = _one_line(_dpo_alone(tiny_model_dir, cache, same, tmp_path / "a"), 1)
    assert line == (
        f"Error: preference dataset {same}: every one of its 34 training pairs has the same chosen and rejected "
        "response: DPO has nothing to prefer (the loss stays ln 2); give each pair two different responses"
    )
    # both empty is the same pair twice (alpaca scores the response header); run --dpo refuses it in its preflight
    blank = _with_responses(_preference_file(tmp_path / "blank.json"), range(40), chosen="", rejected="")
    assert "every one of its 34 training pairs has the same" in _one_line(
        _dpo_alone(tiny_model_dir, cache, blank, tmp_path / "b"), 1
    )
    runs = tmp_path / "runs"
    line = _one_line(run_cli(*_smoke(cache, runs, "same", "--dpo", "--dpo-data", same)), 1)
    assert "every one of its 34 training pairs has the same chosen and rejected response" in line
    assert not runs.joinpath("same").exists() and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # some of them: trained on, with one warning line counting them
    some = _with_responses(_preference_file(tmp_path / "some.json"), train[:5], chosen="rejected")
    result = _dpo_alone(tiny_model_dir, cache, some, tmp_path / "c", "--max-steps", "1", "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    warned = [e for e in events(result.stdout) if e["event"] == "identical_pairs"]
    assert [(e["count"], e["pairs"]) for e in warned] == [(5, 34)]


# --- offline: everything missing named at once, before any wait -----------------------------------------

WEIGHTS = "the weights of gpt2-medium: --model-dir DIR (a folder of GPT-2 weights: Hugging Face's or OpenAI's files)"


def _emptied(cache):
    for path in cache.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return cache


def _offline_run(cache, tmp_path, *extra, env=None):
    """``run`` against a judge that is not there with the full 300 s wait; returns the result and its seconds."""
    dead_judge = f"http://127.0.0.1:{free_port()}"
    args = ["run", "--cache", cache, "--output", tmp_path / "runs", "--run-id", "off", "--metrics-port", "0"]
    started = time.monotonic()
    result = run_cli(*args, "--judge-url", dead_judge, "--judge-wait", "300s", "--log-format", "json", *extra, env=env)
    return result, time.monotonic() - started


def test_an_offline_first_run_names_dataset_tokenizer_and_weights_at_once_before_any_judge_wait(cache, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    proxies = {name: closed for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}
    result, seconds = _offline_run(_emptied(cache), tmp_path, env=proxies | {"NO_PROXY": "", "no_proxy": ""})
    line = _one_line(result, 75)  # a proxy that does not answer may come back: an outage, rerun
    assert seconds < 150, seconds  # not the judge's 300 s (nor a download's retries): mostly torch's import
    assert line.startswith(f"Error: the cache {cache} lacks pieces this run needs and their hosts cannot be reached (")
    assert "no answer from raw.githubusercontent.com (ProxyError)" in line
    assert "no answer from openaipublic.blob.core.windows.net (ProxyError)" in line
    assert "the dataset instruction-data.json: --data FILE" in line
    assert f"GPT-2's tokenizer: encoder.json and vocab.bpe copied into {cache / 'gpt2'}" in line and WEIGHTS in line
    assert line.endswith("(README: Without internet); or rerun once the hosts answer")
    assert not [e for e in events(result.stdout) if e["event"].startswith("judge_")]
    assert not (tmp_path / "runs" / "off").exists() and not any(cache.rglob("*"))  # nothing written, no .part


def test_a_dead_mirror_names_what_the_cache_lacks_and_only_that(cache, tmp_path):
    mirror = f"127.0.0.1:{free_port()}"
    (cache / "gpt2" / "vocab.bpe").unlink()  # the dataset is there; the tokenizer half; the weights not at all
    result, seconds = _offline_run(cache, tmp_path, "--base-url", f"http://{mirror}/sft-cache")
    line = _one_line(result, 75)
    assert seconds < 150, seconds
    assert f"(no answer from {mirror} (ConnectionError)): GPT-2's tokenizer: encoder.json and vocab.bpe" in line
    assert WEIGHTS in line and "dataset" not in line and not (tmp_path / "runs" / "off").exists()


def test_an_unreachable_hub_names_the_hub_models_weights_and_tokenizer(cache, tmp_path):
    hub = f"127.0.0.1:{free_port()}"
    data = cache / "instruction-data.json"
    result, seconds = _offline_run(
        cache, tmp_path, "--model", "qwen3-0.6b", "--hub-url", f"http://{hub}", "--data", data
    )
    line = _one_line(result, 75)
    assert seconds < 150, seconds
    assert (
        f"(no answer from {hub} (ConnectionError)): the weights and tokenizer of qwen3-0.6b: --model-dir DIR " in line
    )
    assert "GPT-2's tokenizer" not in line and "dataset" not in line and not (tmp_path / "runs" / "off").exists()


def test_a_mirror_whose_name_does_not_resolve_is_no_internet_exit_1_naming_every_piece(cache, tmp_path):
    result, seconds = _offline_run(_emptied(cache), tmp_path, "--base-url", "http://sft-job.invalid/m")
    line = _one_line(result, 1)  # a name that never resolves: no retry or rerun brings the files
    assert seconds < 150, seconds
    assert "(host sft-job.invalid not found): the dataset instruction-data.json: --data FILE" in line
    assert "GPT-2's tokenizer" in line and WEIGHTS in line and "rerun" not in line
    assert line.endswith("or --base-url URL, a mirror laid out like the cache (README: Without internet)")
    assert not (tmp_path / "runs" / "off").exists() and not any(cache.rglob("*"))


def _dead_proxy() -> dict:
    closed = f"http://127.0.0.1:{free_port()}"
    proxies = {name: closed for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}
    return proxies | {"NO_PROXY": "", "no_proxy": ""}


def test_a_missing_local_data_file_is_named_with_every_missing_piece_before_any_host_is_asked(cache, tmp_path):
    nope, gone = tmp_path / "nope.json", tmp_path / "gone.json"
    extra = ["--data", nope, "--dpo", "--dpo-data", gone]
    result, seconds = _offline_run(_emptied(cache), tmp_path, *extra, env=_dead_proxy())
    line = _one_line(result, 1)  # bad input: nothing a rerun changes
    assert line.startswith(f"Error: --data {nope} does not exist; --dpo-data {gone} does not exist; the cache {cache} ")
    assert f"also lacks: GPT-2's tokenizer: encoder.json and vocab.bpe copied into {cache / 'gpt2'}" in line
    assert WEIGHTS in line and "no answer" not in line and "rerun" not in line  # no host was asked
    assert seconds < 150, seconds
    assert not (tmp_path / "runs" / "off").exists() and not any(cache.rglob("*"))
    # a hub model's the same; a folder given as --data without a train file is named so
    hub = f"http://127.0.0.1:{free_port()}"
    result, _ = _offline_run(cache, tmp_path, "--model", "qwen3-0.6b", "--hub-url", hub, "--data", tmp_path)
    line = _one_line(result, 1)
    assert line.startswith(
        f"Error: --data {tmp_path} is a folder without a train file (train.json, train.jsonl, train.parquet); "
        f"the cache {cache} also lacks: the weights and "
    )
    assert "tokenizer of qwen3-0.6b: --model-dir DIR" in line and "no answer" not in line
    result, _ = _offline_run(cache, tmp_path, "--data", "")
    assert _one_line(result, 1).startswith(f"Error: --data is empty; the cache {cache} also lacks: GPT-2's tokenizer")


def test_a_damaged_cached_tokenizer_file_is_named_by_the_preflight_with_the_rest(cache, tmp_path):
    vocab = cache / "gpt2" / "vocab.bpe"
    vocab.write_bytes(vocab.read_bytes()[:20_000])  # cut short: not the known sha256
    result, seconds = _offline_run(cache, tmp_path, "--data", cache / "instruction-data.json", env=_dead_proxy())
    line = _one_line(result, 75)
    assert f"GPT-2's tokenizer (damaged in the cache: {vocab} (not the known file's sha256)): encoder.json" in line
    assert WEIGHTS in line and "encoder.json (" not in line and seconds < 150, seconds
    assert len(vocab.read_bytes()) == 20_000  # left in place: the downloader names it again, or replaces it


def test_run_dpo_with_preference_data_too_small_to_split_names_the_file(cache, tmp_path):
    data = _preference_file(tmp_path / "one.json", count=1)
    runs = tmp_path / "runs"
    line = _one_line(run_cli(*_smoke(cache, runs, "one", "--dpo", "--dpo-data", data)), 1)
    assert line == f"Error: dataset {data} of 1 entries is too small for the 85/10/5 split"
    assert not (runs / "one").exists()


def test_a_host_that_answers_on_a_later_try_is_not_taken_for_no_network():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from job.storage.fetch import host_fails

    port = free_port()
    servers, waits = [], []

    def comes_up(seconds: float) -> None:  # the wait between tries: the host starts answering meanwhile
        waits.append(seconds)
        if not servers:
            servers.append(ThreadingHTTPServer(("127.0.0.1", port), BaseHTTPRequestHandler))
            threading.Thread(target=servers[0].serve_forever, daemon=True).start()

    try:
        assert host_fails(f"http://127.0.0.1:{port}/instruction-data.json", sleep=comes_up) is None  # 501: an answer
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert len(waits) == 1
    closed, waits = free_port(), []
    assert str(host_fails(f"http://127.0.0.1:{closed}/x", sleep=waits.append)) == (
        f"no answer from 127.0.0.1:{closed} (ConnectionError)"
    )
    assert len(waits) == 2 and sum(waits) < 3  # 3 tries in about 2 s


@pytest.mark.parametrize(
    ("long", "limit", "words"),
    [
        (range(0), "20", "none of the 51 messages entries of its training split"),
        (range(57, 60), "200", "none of the 3 messages entries of its validation split"),
    ],
)
def test_run_on_conversations_with_a_split_left_nothing_to_train_names_it_before_anything(
    long, limit, words, qwen3_dir, cache, tmp_path, book_data
):
    data = conversations_file(tmp_path / "conv.json", book_data, long)
    runs = tmp_path / "runs"
    result = run_cli(
        "run", "--model-dir", qwen3_dir, "--data", data, "--cache", cache, "--output", runs, "--run-id", "tr3",
        "--skip-judge", "--limit", "2", "--max-new-tokens", "4", "--allowed-max-length", limit,
    )  # fmt: skip
    line = _one_line(result, 1)
    assert line == (
        f"Error: dataset {data}: {words} has a token to train on within --allowed-max-length {limit}: raise it or "
        "shorten those entries"
    )
    assert not (runs / "tr3").exists()  # no run folder: the run id is not used up
