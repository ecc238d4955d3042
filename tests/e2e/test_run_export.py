"""``sft-job run --export gguf``: the last model trained as GGUF with its Modelfile under {run_id}/export/, in
the manifest (sha256 of each file), the report and the bucket; a rerun adds it to a finished run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from tests.family_folders import write_family_folder
from tests.helpers import cli, events, smoke_run


def gguf_tensor(path, name: str) -> np.ndarray:
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(path).tensors if t.name == name)
    return np.asarray(tensor.data).reshape([int(n) for n in reversed(tensor.shape)])


@pytest.mark.slow
def test_rerun_with_export_writes_the_dpo_model_as_gguf(cache, tmp_path):
    first = cli(*smoke_run(cache, tmp_path / "runs", "r1", "--dpo", "--skip-judge"))
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "r1"
    assert not (run / "export").exists()

    args = smoke_run(cache, tmp_path / "runs", "r1", "--dpo", "--skip-judge", "--export", "gguf")
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    ran = [e["stage"] for e in events(again.stdout) if e["event"] == "stage_start"]
    assert ran == ["export"]
    manifest = json.loads((run / "manifest.json").read_text())
    artifacts = manifest["stages"]["export"]["artifacts"]
    assert set(artifacts) == {"export/model.gguf", "export/Modelfile"}
    for key, meta in artifacts.items():
        body = (run / key).read_bytes()
        assert (len(body), hashlib.sha256(body).hexdigest()) == (meta["size"], meta["sha256"]), key
    assert "export/model.gguf" in (run / "report.html").read_text()
    # the DPO model's weights (f16, the default), not the finetuned one's (they differ after DPO's steps)
    dpo, sft = load_file(run / "dpo" / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    exported = gguf_tensor(run / "export" / "model.gguf", "token_embd.weight")
    assert np.array_equal(exported, dpo["transformer.wte.weight"].astype(np.float16))
    assert not np.array_equal(exported, sft["transformer.wte.weight"].astype(np.float16))
    assert "### Response:" in (run / "export" / "Modelfile").read_text()

    third = cli(*args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "export" in [e["stage"] for e in events(third.stdout) if e["event"] == "stage_skipped"]

    # another --export-dtype: not a skipped stage keeping the f16 files under a q8_0 command, but exit 2
    exported = {name: (run / "export" / name).read_bytes() for name in ("model.gguf", "Modelfile")}
    fourth = cli(*args, "--export-dtype", "q8_0")
    assert fourth.returncode == 2, fourth.stderr[-3000:]
    [line] = fourth.stderr.splitlines()
    assert "export_dtype 'f16' (now 'q8_0')" in line
    assert line.endswith("sft-job export --dtype q8_0 --model-dir its model/ (dpo/model/ with --dpo)")
    assert {name: (run / "export" / name).read_bytes() for name in exported} == exported


@pytest.mark.slow
def test_export_is_uploaded_to_the_bucket(s3, cache, tmp_path):
    s3.create_bucket(Bucket="runs")
    scratch = tmp_path / "scratch"
    args = smoke_run(cache, "s3://runs/team", "r2", "--skip-judge", "--scratch", scratch)
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads(s3.get_object(Bucket="runs", Key="team/r2/manifest.json")["Body"].read())
    assert "export" not in before["stages"]
    done = cli(*args, "--export", "gguf")  # added by a rerun of the finished run in the bucket
    assert done.returncode == 0, done.stderr[-3000:]
    assert [e["stage"] for e in events(done.stdout) if e["event"] == "stage_start"] == ["export"]
    manifest = json.loads(s3.get_object(Bucket="runs", Key="team/r2/manifest.json")["Body"].read())
    for key, meta in manifest["stages"]["export"]["artifacts"].items():
        body = s3.get_object(Bucket="runs", Key=f"team/r2/{key}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == meta["sha256"], key
    assert set(manifest["stages"]["export"]["artifacts"]) == {"export/model.gguf", "export/Modelfile"}


def _unexportable(kind: str, tmp_path, book_data, gpt2_dir) -> tuple:
    """A model folder and flags the run trains but the export cannot represent, and what the error names."""
    if kind == "chat for GPT-2":
        return gpt2_dir, ("--prompt-style", "chat"), "chat template"
    folder = write_family_folder(tmp_path / "llama", "llama", book_data)
    if kind == "not byte-level BPE":
        spec = json.loads((folder / "tokenizer.json").read_text())
        spec["pre_tokenizer"] = {"type": "Whitespace"}
        (folder / "tokenizer.json").write_text(json.dumps(spec))
        return folder, (), "pre-tokenizer"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content | lower }}{% endfor %}"  # changes the text
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, ("--prompt-style", "chat"), "TEMPLATE"


@pytest.mark.parametrize("kind", ["not byte-level BPE", "chat template changing the text", "chat for GPT-2"])
def test_a_model_the_export_cannot_represent_is_exit_2_at_preflight(cache, tmp_path, book_data, tiny_model_dir, kind):
    """Before any training: one line naming why, and no run folder (nothing trained, nothing to resume)."""
    folder, flags, named = _unexportable(kind, tmp_path, book_data, tiny_model_dir)
    args = smoke_run(cache, tmp_path / "runs", "r3", "--model-dir", folder, *flags, "--skip-judge", "--export", "gguf")
    done = cli(*args)
    assert done.returncode == 2, done.stderr[-3000:]
    [line] = done.stderr.splitlines()
    assert line.startswith("Error: ") and named in line
    if kind != "chat for GPT-2":  # that one the run itself refuses (no chat template to train with)
        assert line.startswith("Error: --export gguf: ")
        assert "preflight_ok" not in [e["event"] for e in events(done.stdout)]  # refused by it, not after it
    assert not (tmp_path / "runs" / "r3").exists()
    assert not [e for e in events(done.stdout) if e["event"] == "stage_start"]


@pytest.mark.slow
def test_a_lora_dpo_runs_folder_names_its_models_and_its_dpo_model_exports_as_the_run_did(cache, tmp_path):
    """A LoRA run's models are merged: the run's export is its DPO model's, byte for byte what ``sft-job export``
    writes of ``dpo/model``; the run's folder itself is no model: exit 1 naming both model folders."""
    args = smoke_run(cache, tmp_path / "runs", "r4", "--dpo", "--lora-rank", "4", "--skip-judge")
    done = cli(*args, "--export", "gguf", "--export-dtype", "f32")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "r4"
    merged = load_file(run / "dpo" / "model" / "model.safetensors")["transformer.wte.weight"]
    assert np.array_equal(gguf_tensor(run / "export" / "model.gguf", "token_embd.weight"), merged)
    export = ["export", "--cache", cache, "--dtype", "f32", "--log-format", "json"]
    recorded = yaml.safe_load((run / "config.yaml").read_text())  # the run's decoding: the Modelfile's defaults
    decoding = [f"--{key.replace('_', '-')}={recorded[key]}" for key in ("max_new_tokens", "temperature", "top_k")]
    again = cli(*export, *decoding, "--model-dir", run / "dpo" / "model", "--output", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    for name in ("model.gguf", "Modelfile"):
        assert (tmp_path / "again" / name).read_bytes() == (run / "export" / name).read_bytes(), name
    refused = cli(*export, "--model-dir", run, "--output", tmp_path / "whole")
    assert refused.returncode == 1, refused.stderr
    [line] = refused.stderr.splitlines()
    assert line == (
        f"Error: {run} is a run's folder, not a model's: give --model-dir {run / 'dpo' / 'model'} (its DPO model) "
        f"or {run / 'model'} (its finetuned model)"
    )
    assert not (tmp_path / "whole").exists()


@pytest.mark.slow
def test_run_export_writes_the_system_prompt_every_conversation_began_with(qwen3_dir, cache, tmp_path, book_data):
    """``run --export`` exports the run's model as ``sft-job export`` does: its Modelfile's SYSTEM is the system
    prompt all the run's conversations began with, read back exactly by Ollama's own parser."""
    from tests.go_template import build_modelfile_parser, parse_modelfile

    system = 'Reply as """the manual""" says: C:\\docs\\ stays.\nUne ligne de plus.'
    rows = [
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": e["instruction"]},
                      {"role": "assistant", "content": e["output"]}]}
        for e in book_data[:60]
    ]  # fmt: skip
    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = cli(
        "run", "--model-dir", qwen3_dir, "--data", data, "--export", "gguf", "--cache", cache,
        "--output", tmp_path / "runs", "--run-id", "sys", "--skip-judge", "--max-steps", "1", "--eval-freq", "1",
        "--eval-iter", "1", "--limit", "1", "--max-new-tokens", "2", "--log-format", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    modelfile = (tmp_path / "runs" / "sys" / "export" / "Modelfile").read_text()
    (tmp_path / "go").mkdir()
    assert parse_modelfile(build_modelfile_parser(tmp_path / "go"), modelfile)["system"] == system


def test_what_the_modelfile_cannot_copy_is_said_at_preflight_before_training_as_the_export_says_it(
    cache, tmp_path, book_data
):
    """Llama 3.2's template (as TRL ships it) trims messages and writes the day's date, which the Modelfile's
    TEMPLATE cannot follow: ``run --export`` says so before any stage starts, once each, in the export's words."""
    import trl

    folder = write_family_folder(tmp_path / "llama32", "llama", book_data)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (Path(trl.__file__).parent / "chat_templates" / "llama3_2.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    args = smoke_run(cache, tmp_path / "runs", "x", "--model-dir", folder, "--prompt-style", "chat", "--skip-judge",
                     "--export", "gguf", "--train-limit", "8", "--limit", "1", "--max-new-tokens", "2")  # fmt: skip
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = events(done.stdout)
    first_stage = next(i for i, e in enumerate(logged) if e["event"] == "stage_start")
    said = [(i, e) for i, e in enumerate(logged) if e["event"] == "modelfile_template_inexact"]
    before = [e["why"] for i, e in said if i < first_stage]
    by_export = [e["why"] for _i, e in said if e.get("stage") == "export"]
    assert len(before) == 2 and "whitespace" in before[0] and "date" in before[1], before
    assert before == by_export  # the stage, which sft-job export also is, says the same after the training
    # the family folder's own template, which the TEMPLATE copies exactly: nothing to say, before or after
    plain = write_family_folder(tmp_path / "plain", "llama", book_data)
    args = smoke_run(cache, tmp_path / "runs", "p", "--model-dir", plain, *args[args.index("--prompt-style") :])
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not [e for e in events(done.stdout) if e["event"] == "modelfile_template_inexact"]
