"""``sft-job export`` through the CLI: model.gguf and a Modelfile whose TEMPLATE Go's own text/template renders
into the prompt the model was trained on, byte for byte, per prompt style; the failures' codes and lines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import trl

from job.data.chat_layout import entry_message
from job.data.instructions import PROMPT_STYLES, prompt_style
from job.models.gpt2 import GPTConfig, GPTModel
from job.models.gpt2_weights import save_hf
from job.models.tokenizer import ByteTokenizer, load_hf_tokenizer
from job.stages.export import GGUF_FILE, MODELFILE
from tests.family_folders import write_family_folder
from tests.go_template import build_renderer, go_render, modelfile_template
from tests.helpers import cli, events


@pytest.fixture(scope="module")
def renderer(tmp_path_factory):
    return build_renderer(tmp_path_factory.mktemp("go"))


@pytest.fixture(scope="module")
def bytes_model(tmp_path_factory):
    """A tiny model on the smoke's byte tokenizer, finetuned with phi3 as its config.json records."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("bytes-model")
    model = GPTModel(GPTConfig(vocab_size=257, context_length=512, emb_dim=32, n_heads=2, n_layers=1))
    save_hf(model, path, extra_config={"sft_job": {"tokenizer": ByteTokenizer.name, "prompt_style": "phi3"}})
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, book_data):
    return write_family_folder(tmp_path_factory.mktemp("llama"), "llama", book_data)


def export(model_dir, output, cache, *extra):
    return cli("export", "--model-dir", model_dir, "--output", output, "--cache", cache, "--log-format", "json", *extra)


def rendered_prompts(renderer, output, style, entries) -> list[str]:
    template = modelfile_template((output / MODELFILE).read_text())
    return go_render(renderer, template, [[{"role": "user", "content": entry_message(style, e)}] for e in entries])


def test_recorded_style_and_byte_tokenizer(renderer, bytes_model, cache, tmp_path, book_data):
    """Without --prompt-style, the style the model was finetuned with (phi3); the smoke's byte tokenizer."""
    done = export(bytes_model, tmp_path / "out", cache, "--dtype", "q8_0")
    assert done.returncode == 0, done.stderr
    modelfile = (tmp_path / "out" / MODELFILE).read_text()
    assert modelfile.startswith(f"FROM ./{GGUF_FILE}\n")
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and "PARAMETER num_ctx 512" in modelfile
    assert "PARAMETER temperature 0\n" in modelfile and "PARAMETER num_predict 256\n" in modelfile
    style = PROMPT_STYLES["phi3"]
    entries = book_data[:30]
    expected = [style.format_input(e) + style.response_header for e in entries]
    assert rendered_prompts(renderer, tmp_path / "out", style, entries) == expected
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MODELFILE, GGUF_FILE]


def test_gpt2_alpaca_and_decoding_settings(renderer, tiny_model_dir, cache, tmp_path, book_data):
    done = export(
        tiny_model_dir, tmp_path / "out", cache, "--prompt-style", "alpaca", "--temperature", "0.7", "--top-k", "5"
    )
    assert done.returncode == 0, done.stderr
    modelfile = (tmp_path / "out" / MODELFILE).read_text()
    assert "PARAMETER temperature 0.7\n" in modelfile and "PARAMETER top_k 5\n" in modelfile
    style = PROMPT_STYLES["alpaca"]
    entries = book_data[:30]
    expected = [style.format_input(e) + style.response_header for e in entries]
    assert rendered_prompts(renderer, tmp_path / "out", style, entries) == expected


def test_chat_style_is_the_models_template(renderer, llama_dir, cache, tmp_path, book_data):
    done = export(llama_dir, tmp_path / "out", cache, "--prompt-style", "chat")
    assert done.returncode == 0, done.stderr
    style = prompt_style("chat", load_hf_tokenizer(llama_dir))
    entries = book_data[:30]
    assert rendered_prompts(renderer, tmp_path / "out", style, entries) == [style.format_input(e) for e in entries]
    assert 'PARAMETER stop "<|eot_id|>"' in (tmp_path / "out" / MODELFILE).read_text()


def test_a_folder_that_is_not_a_model_is_exit_1(cache, tmp_path):
    (tmp_path / "empty").mkdir()
    done = export(tmp_path / "empty", tmp_path / "out", cache)
    assert done.returncode == 1
    assert done.stderr.startswith("Error: ") and "no config.json" in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_what_gguf_cannot_represent_is_exit_2(llama_dir, cache, tmp_path):
    """A tokenizer that is not byte-level BPE, and a chat template no Go template can copy: exit 2 naming why,
    nothing written."""
    odd = tmp_path / "odd"
    shutil.copytree(llama_dir, odd)
    spec = json.loads((odd / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (odd / "tokenizer.json").write_text(json.dumps(spec))
    done = export(odd, tmp_path / "out", cache)
    assert done.returncode == 2 and "pre-tokenizer" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    config = json.loads((odd / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content | lower }}{% endfor %}"
    (odd / "tokenizer_config.json").write_text(json.dumps(config))
    done = export(odd, tmp_path / "out", cache, "--prompt-style", "chat")
    assert done.returncode == 2 and "TEMPLATE" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("flags", "named"),
    [(("--dtype", "q4_0"), "--dtype"), (("--format", "onnx"), "--format"), (("--top-k", "0"), "--top-k")],
)
def test_bad_flags_are_exit_2(tiny_model_dir, cache, tmp_path, flags, named):
    done = export(tiny_model_dir, tmp_path / "out", cache, *flags)
    assert done.returncode == 2 and named in done.stderr


def test_chat_for_gpt2_is_exit_2(tiny_model_dir, cache, tmp_path):
    done = export(tiny_model_dir, tmp_path / "out", cache, "--prompt-style", "chat")
    assert done.returncode == 2 and "chat template" in done.stderr


def test_an_output_that_is_a_file_is_exit_2(tiny_model_dir, cache, tmp_path):
    (tmp_path / "out").write_text("a file")
    done = export(tiny_model_dir, tmp_path / "out", cache)
    assert done.returncode == 2 and "--output" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert (tmp_path / "out").read_text() == "a file"


@pytest.mark.parametrize("taken", [GGUF_FILE, MODELFILE])
def test_a_folder_where_an_exported_file_goes_is_exit_2_and_nothing_is_written(tiny_model_dir, cache, tmp_path, taken):
    (tmp_path / "out" / taken).mkdir(parents=True)
    done = export(tiny_model_dir, tmp_path / "out", cache, "--prompt-style", "alpaca")
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.splitlines()
    assert line.startswith("Error: --output ") and str(tmp_path / "out" / taken) in line
    assert [p.name for p in (tmp_path / "out").iterdir()] == [taken] and not any((tmp_path / "out" / taken).iterdir())


@pytest.mark.parametrize("missing", ["tokenizer_config.json", "tokenizer.json"])
def test_a_folder_with_half_a_tokenizer_is_exit_1_naming_the_missing_file(llama_dir, cache, tmp_path, missing):
    """A folder from another tool may carry tokenizer.json alone: the missing file named as missing, nothing written."""
    folder = tmp_path / "half"
    shutil.copytree(llama_dir, folder)
    (folder / missing).unlink()
    done = export(folder, tmp_path / "out", cache)
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"Error: {folder / missing} is missing: ") and "tokenizer_config.json" in line
    assert not (tmp_path / "out").exists()


def test_extra_files_and_an_output_inside_the_model_folder_export_the_same_bytes(llama_dir, cache, tmp_path):
    """A folder with files of other tools (a stale model.gguf among them), exported into itself and twice."""
    plain = export(llama_dir, tmp_path / "plain", cache, "--dtype", "f32")
    assert plain.returncode == 0, plain.stderr
    folder = tmp_path / "busy" / llama_dir.name  # the GGUF's general.name is the folder's
    shutil.copytree(llama_dir, folder)
    (folder / "README.md").write_text("# another tool's card")
    (folder / GGUF_FILE).write_bytes(b"not a gguf")
    for output in (folder, folder, folder / "export"):
        done = export(folder, output, cache, "--dtype", "f32")
        assert done.returncode == 0, done.stderr
        for name in (GGUF_FILE, MODELFILE):
            assert (output / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), (output, name)


def test_what_the_template_cannot_copy_is_said(renderer, llama_dir, cache, tmp_path):
    """Llama 3.2's own template (as TRL ships it) trims each message and writes the day's date, neither of which
    Go's text/template can follow: the export writes the TEMPLATE (system turns included, equal to transformers'
    for messages without whitespace around them) and says both, one warning each; a template with neither says
    nothing."""
    from transformers import AutoTokenizer

    folder = tmp_path / "llama32"
    shutil.copytree(llama_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (Path(trl.__file__).parent / "chat_templates" / "llama3_2.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    done = export(folder, tmp_path / "out", cache, "--prompt-style", "chat")
    assert done.returncode == 0, done.stderr[-2000:]
    warned = [e["why"] for e in events(done.stdout) if e["event"] == "modelfile_template_inexact"]
    assert len(warned) == 2 and "whitespace" in warned[0] and "date" in warned[1], warned
    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    ]
    theirs = AutoTokenizer.from_pretrained(folder)
    expected = [theirs.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    template = modelfile_template((tmp_path / "out" / MODELFILE).read_text())
    assert go_render(renderer, template, conversations) == expected
    plain = export(llama_dir, tmp_path / "plain", cache, "--prompt-style", "chat")
    assert plain.returncode == 0 and not [e for e in events(plain.stdout) if e["event"] == "modelfile_template_inexact"]
