"""``sft-job export`` through the CLI: model.gguf and a Modelfile whose TEMPLATE Go's own text/template renders
into the prompt the model was trained on, byte for byte, per prompt style; the failures' codes and lines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import trl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from job.data.chat_layout import entry_message, turn_layout
from job.data.instructions import PROMPT_STYLES, ChatStyle, prompt_style
from job.models.chat_template import ChatTemplate
from job.models.gpt2 import GPTConfig, GPTModel
from job.models.gpt2_weights import save_hf
from job.models.tokenizer import ByteTokenizer, load_hf_tokenizer
from job.stages.export import GGUF_FILE, MODELFILE, modelfile, unwritable_system
from job.stages.export_config import ExportConfig
from tests.family_folders import write_family_folder
from tests.go_template import (
    build_modelfile_parser,
    build_renderer,
    go_render,
    modelfile_template,
    ollama_chat_messages,
    parse_modelfile,
    read_modelfile,
)
from tests.helpers import cli, events


@pytest.fixture(scope="module")
def renderer(tmp_path_factory):
    return build_renderer(tmp_path_factory.mktemp("go"))


@pytest.fixture(scope="module")
def parser(tmp_path_factory):
    return build_modelfile_parser(tmp_path_factory.mktemp("go-parser"))


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


SYSTEM_PROMPTS = [
    'Answer as """the guide""" says, "quoted" or not.',
    "Paths stay as typed: C:\\new\\table and \\n are not line ends.",
    "Two lines:\nthe second, with\ttabs and\r\nWindows line ends.",
    "Réponds en français, 東京で, in 🙂 too.",
    '"""At the start; and at the end"""',
    '  blanks around, a quote at the end"',
    "\nA line end first.",
]
# What Ollama's parser cannot read back: an empty text, """ before a line end, runes it drops (not printable).
UNWRITABLE = ["", 'Stop here"""\nor not', 'Ends in quotes"""  \n', "zero\u200bwidth", "no\u00a0break", "bell\x07"]
PARSER_ALPHABET = st.sampled_from(['"', '"""', "\\", "\n", "\r", "\t", " ", "a", "é", "東", "🙂", "\u200b", "\x00"])


def _modelfile_with(system: str) -> str:
    return modelfile(
        turn_layout(PROMPT_STYLES["alpaca"], "<|endoftext|>"), "<|endoftext|>", 512, ExportConfig(), system
    )


@pytest.mark.parametrize("system", SYSTEM_PROMPTS)
def test_a_system_prompt_is_read_back_by_ollamas_parser_exactly(parser, system):
    """Quotes (triple ones inside), backslashes, line ends and non-ASCII: Ollama's own parser (parser.go, built
    from its source) reads the SYSTEM back as written, and the TEMPLATE and parameters around it unchanged."""
    assert unwritable_system(system) is None
    written = _modelfile_with(system)
    commands = parse_modelfile(parser, written)
    assert commands["system"] == system
    assert commands["template"] == modelfile_template(written) and commands["num_ctx"] == "512"


@pytest.mark.parametrize("system", UNWRITABLE)
def test_what_ollamas_parser_cannot_read_back_is_said(parser, system):
    why = unwritable_system(system)
    assert why is not None
    if system:  # an empty SYSTEM parses, but Ollama sends no system message for it
        assert read_modelfile(parser, _modelfile_with(system)).get("commands", {}).get("system") != system


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(PARSER_ALPHABET, min_size=1, max_size=12).map("".join))
def test_any_system_prompt_is_written_exactly_or_said_unwritable(parser, system):
    """Whatever the text, ``unwritable_system`` says no exactly where Ollama's parser would not read it back."""
    parsed = read_modelfile(parser, _modelfile_with(system)).get("commands", {})
    assert (unwritable_system(system) is None) == (parsed.get("system") == system), parsed


USER_HI = {"role": "user", "content": "Hi"}


def _recording(llama_dir, folder: Path, **record) -> Path:
    """A copy of the Llama folder whose config.json records what a finetune on conversations records."""
    shutil.copytree(llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["sft_job"] = {"prompt_style": "chat", "data_format": "messages"} | record
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_recorded_system_prompt_is_the_modelfiles_system(renderer, parser, llama_dir, cache, tmp_path):
    """The system prompt the model records every training conversation began with is the Modelfile's SYSTEM, which
    Ollama sends ahead of a chat that has none: a user's message alone renders the prompt trained on; a chat's own
    system message replaces it."""
    from transformers import AutoTokenizer

    system = 'Keep """this""" and C:\\dir\\ as typed.\nRéponds 🙂'
    folder = _recording(llama_dir, tmp_path / "model", system_prompt=system)
    done = export(folder, tmp_path / "out", cache)
    assert done.returncode == 0, done.stderr[-2000:]
    commands = parse_modelfile(parser, (tmp_path / "out" / MODELFILE).read_text())
    assert commands["system"] == system
    asked = [[{"role": "user", "content": "Name a colour."}], [{"role": "system", "content": "Other."}, USER_HI]]
    rendered = go_render(renderer, commands["template"], [ollama_chat_messages(system, c) for c in asked])
    theirs = AutoTokenizer.from_pretrained(folder)
    trained = [[{"role": "system", "content": system}, *asked[0]], asked[1]]
    assert rendered == [theirs.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in trained]


@pytest.mark.parametrize(
    ("record", "extra", "warned"),
    [
        ({}, (), False),  # a model from before the record
        ({"system_prompt": "Be brief."}, ("--prompt-style", "alpaca"), False),  # not the layout it trained on
        ({"system_prompt": ["Be brief."]}, (), False),  # a config.json from elsewhere: not text
        ({"system_prompt": 'Stop"""\nhere'}, (), True),
        ({"system_prompt": ""}, (), True),
    ],
)
def test_no_system_line_where_none_was_trained_or_it_cannot_be_written(
    parser, llama_dir, cache, tmp_path, record, extra, warned
):
    folder = _recording(llama_dir, tmp_path / "model", **record)
    done = export(folder, tmp_path / "out", cache, *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "system" not in parse_modelfile(parser, (tmp_path / "out" / MODELFILE).read_text())
    said = [e["why"] for e in events(done.stdout) if e["event"] == "modelfile_system_unwritten"]
    assert len(said) == warned and all("SYSTEM" in why for why in said), said


@pytest.mark.parametrize(("data_format", "named"), [("prompt-completion", "prompt-completion"), (["x"], "text")])
def test_a_model_trained_without_a_layout_names_its_data_format(llama_dir, cache, tmp_path, data_format, named):
    """The line names the format the model records (text where the record is not one of ours), nothing written."""
    folder = _recording(llama_dir, tmp_path / "model", prompt_style=None, data_format=data_format)
    done = export(folder, tmp_path / "out", cache)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.splitlines()
    assert f"was trained on {named} data" in line and "--prompt-style" in line
    assert not (tmp_path / "out").exists()


# Runes Ollama's parser drops (strconv.IsPrint): a no-break space, a zero-width space, a line separator, a
# byte-order mark, a tag character outside the BMP.
DROPPED_RUNES = ["\u00a0", "\u200b", "\u2028", "\ufeff", "\U000e0001"]


@pytest.mark.parametrize("rune", DROPPED_RUNES)
def test_template_text_the_parser_would_drop_reaches_ollama_as_the_model_has_it(renderer, parser, rune):
    """A chat template whose fixed text holds a rune Ollama's Modelfile parser drops: the Modelfile's TEMPLATE,
    read by Ollama's parser and rendered by Go, is still the model's own render (the rune went in escaped)."""
    source = (
        "{% for m in messages %}<" + rune + "{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<" + rune + "assistant>{% endif %}"
    )
    style = ChatStyle("chat", "", "", render=ChatTemplate(source, {}, "test").prompt)
    written = modelfile(turn_layout(style, "</s>"), "</s>", 512, ExportConfig())
    template = parse_modelfile(parser, written)["template"]
    conversation = [{"role": "system", "content": "S"}, USER_HI, {"role": "assistant", "content": "A"}, USER_HI]
    assert go_render(renderer, template, [conversation]) == [style.render(conversation)]
    assert rune in style.render(conversation) and rune not in written
