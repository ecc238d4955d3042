"""A finetuned model records the layout it was trained on, through the CLI: conversations as ``chat`` (a
``--chat-template FILE`` carried in the model's folder as ``chat_template.jinja``), so export and generate use
the model's own template; text, which has no layout, is refused by export (and ``run --export``) unless
``--prompt-style`` names one."""

from __future__ import annotations

import json

import pytest

from job.data.chat_layout import entry_message
from job.data.instructions import prompt_style
from job.models.families import model_tokenizer
from job.stages.export import MODELFILE
from tests.go_template import (
    build_modelfile_parser,
    build_renderer,
    go_render,
    modelfile_template,
    ollama_chat_messages,
    parse_modelfile,
)
from tests.helpers import cli, events, smoke_run

GPT2_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
    "{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _conversations(book_data, count=40):
    return [
        {"messages": [{"role": "user", "content": e["instruction"]}, {"role": "assistant", "content": e["output"]}]}
        for e in book_data[:count]
    ]


def _finetune(model_dir, data, cache, output, *extra):
    return cli(
        "finetune", "--model-dir", model_dir, "--output", output, "--data", data, "--cache", cache,
        "--max-steps", "1", "--eval-freq", "1", "--eval-iter", "1", "--log-format", "json", *extra,
    )  # fmt: skip


def _recorded(model):
    return json.loads((model / "config.json").read_text())["sft_job"]


def _modelfile_prompts(tmp_path, output, style, entries):
    (tmp_path / "go").mkdir(exist_ok=True)
    renderer = build_renderer(tmp_path / "go")
    template = modelfile_template((output / MODELFILE).read_text())
    return go_render(renderer, template, [[{"role": "user", "content": entry_message(style, e)}] for e in entries])


@pytest.mark.slow
def test_a_messages_trained_qwen3_exports_its_chat_template(qwen3_dir, cache, tmp_path, book_data):
    data = _jsonl(tmp_path / "conv.jsonl", _conversations(book_data))
    trained = _finetune(qwen3_dir, data, cache, tmp_path / "ft")
    assert trained.returncode == 0, trained.stderr[-2000:]
    model = tmp_path / "ft" / "model"
    assert _recorded(model)["prompt_style"] == "chat"
    done = cli("export", "--model-dir", model, "--output", tmp_path / "out", "--cache", cache)
    assert done.returncode == 0, done.stderr[-2000:]
    modelfile = (tmp_path / "out" / MODELFILE).read_text()
    assert "### Instruction" not in modelfile and "\nSYSTEM " not in modelfile  # no conversation had a system turn
    style = prompt_style("chat", model_tokenizer(model, cache))
    entries = book_data[:20]
    assert _modelfile_prompts(tmp_path, tmp_path / "out", style, entries) == [style.format_input(e) for e in entries]


@pytest.mark.slow
def test_a_system_prompt_trained_in_every_conversation_reaches_the_modelfile(qwen3_dir, cache, tmp_path, book_data):
    """Conversations with a system prompt in each (the adversarial report's item 5): the exported Modelfile's
    TEMPLATE, run by Go as Ollama runs it, renders the system turn and the turns after it as transformers renders
    the model's own template, one turn and several."""
    from transformers import AutoTokenizer

    system = {"role": "system", "content": "Be brief."}
    rows = [{"messages": [system, *row["messages"]]} for row in _conversations(book_data)]
    trained = _finetune(qwen3_dir, _jsonl(tmp_path / "conv.jsonl", rows), cache, tmp_path / "ft")
    assert trained.returncode == 0, trained.stderr[-2000:]
    done = cli("export", "--model-dir", tmp_path / "ft" / "model", "--output", tmp_path / "out", "--cache", cache)
    assert done.returncode == 0, done.stderr[-2000:]
    asked = [row["messages"][:2] for row in rows[:5]] + [row["messages"] + [row["messages"][1]] for row in rows[5:8]]
    asked += [[{"role": "user", "content": "no system"}]]
    (tmp_path / "go").mkdir()
    template = modelfile_template((tmp_path / "out" / MODELFILE).read_text())
    rendered = go_render(build_renderer(tmp_path / "go"), template, asked)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "ft" / "model")
    assert rendered == [theirs.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in asked]
    assert all(text.count("Be brief.") == 1 for text in rendered[:8])


# A system prompt the Modelfile's triple quotes must carry as it is: quotes, backslashes, a line end, non-ASCII.
SYSTEM_PROMPT = 'Answer as """the guide""" says; keep C:\\dir\\ as typed.\nRéponds en français, 東京 🙂'


def _with_system(rows: list[dict], systems) -> list[dict]:
    return [
        {"messages": [{"role": "system", "content": s}, *r["messages"]]} for r, s in zip(rows, systems, strict=True)
    ]


def _ollama_modelfile(tmp_path, output) -> dict[str, str]:
    (tmp_path / "go-parser").mkdir(exist_ok=True)
    return parse_modelfile(build_modelfile_parser(tmp_path / "go-parser"), (output / MODELFILE).read_text())


@pytest.mark.slow
def test_the_system_prompt_every_conversation_began_with_is_the_modelfiles_system(
    qwen3_dir, cache, tmp_path, book_data
):
    """Conversations that all begin with one system prompt: the finetuned model records it, the export writes it
    as the Modelfile's SYSTEM (read back exactly by Ollama's own parser), and a chat of a user's message alone, as
    Ollama fills it (SYSTEM as its first message) and renders it (Go's text/template), is the prompt training
    rendered for that conversation, byte for byte."""
    from transformers import AutoTokenizer

    rows = _with_system(_conversations(book_data), [SYSTEM_PROMPT] * 40)
    trained = _finetune(qwen3_dir, _jsonl(tmp_path / "conv.jsonl", rows), cache, tmp_path / "ft")
    assert trained.returncode == 0, trained.stderr[-2000:]
    model = tmp_path / "ft" / "model"
    assert _recorded(model)["system_prompt"] == SYSTEM_PROMPT
    done = cli("export", "--model-dir", model, "--output", tmp_path / "out", "--cache", cache)
    assert done.returncode == 0, done.stderr[-2000:]
    commands = _ollama_modelfile(tmp_path, tmp_path / "out")
    assert commands["system"] == SYSTEM_PROMPT
    requests = [row["messages"][1:2] for row in rows[:8]]  # the user's message alone
    (tmp_path / "go").mkdir()
    rendered = go_render(
        build_renderer(tmp_path / "go"),
        commands["template"],
        [ollama_chat_messages(commands["system"], request) for request in requests],
    )
    template = model_tokenizer(model, cache).chat_template  # as training rendered each conversation
    assert rendered == [template.prompt(row["messages"][:2]) for row in rows[:8]]
    assert all(
        template.render(row["messages"])[0].startswith(text) for row, text in zip(rows[:8], rendered, strict=True)
    )
    theirs = AutoTokenizer.from_pretrained(model)
    assert rendered == [
        theirs.apply_chat_template(r["messages"][:2], tokenize=False, add_generation_prompt=True) for r in rows[:8]
    ]


@pytest.mark.slow
def test_differing_system_prompts_leave_the_modelfile_without_one(qwen3_dir, cache, tmp_path, book_data):
    """Two system prompts a letter's case apart: none is recorded, and the Modelfile has no SYSTEM."""
    rows = _with_system(_conversations(book_data), ["Be brief.", "be brief."] * 20)
    trained = _finetune(qwen3_dir, _jsonl(tmp_path / "conv.jsonl", rows), cache, tmp_path / "ft")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "system_prompt" not in _recorded(tmp_path / "ft" / "model")
    done = cli("export", "--model-dir", tmp_path / "ft" / "model", "--output", tmp_path / "out", "--cache", cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "system" not in _ollama_modelfile(tmp_path, tmp_path / "out")


@pytest.mark.slow
def test_dpo_on_pairs_that_share_a_system_prompt_records_it_for_the_export(qwen3_dir, cache, tmp_path, book_data):
    """TRL's conversational pairs (an explicit prompt, and chosen/rejected sharing it), all after one system
    prompt: the DPO model records it and its Modelfile's SYSTEM is it."""
    system = {"role": "system", "content": SYSTEM_PROMPT}
    pairs = []
    for i, entry in enumerate(book_data[:40]):
        ask = [system, {"role": "user", "content": entry["instruction"]}]
        chosen, rejected = {"role": "assistant", "content": entry["output"]}, {"role": "assistant", "content": "No."}
        pair = {"chosen": [*ask, chosen], "rejected": [*ask, rejected]}
        pairs.append(pair if i % 2 else {"prompt": ask, "chosen": [chosen], "rejected": [rejected]})
    preferred = cli(
        "dpo", "--model-dir", qwen3_dir, "--output", tmp_path / "dpo", "--cache", cache, "--max-steps", "1",
        "--eval-freq", "1", "--eval-iter", "1", "--batch-size", "2", "--log-format", "json",
        "--data", _jsonl(tmp_path / "pairs.jsonl", pairs),
    )  # fmt: skip
    assert preferred.returncode == 0, preferred.stderr[-2000:]
    model = tmp_path / "dpo" / "model"
    assert _recorded(model)["system_prompt"] == SYSTEM_PROMPT
    done = cli("export", "--model-dir", model, "--output", tmp_path / "out", "--cache", cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _ollama_modelfile(tmp_path, tmp_path / "out")["system"] == SYSTEM_PROMPT


@pytest.mark.slow
def test_gpt2_trained_with_a_chat_template_file_carries_it_to_generate_and_export(
    tiny_model_dir, cache, tmp_path, book_data
):
    template = tmp_path / "chat.jinja"
    template.write_text(GPT2_TEMPLATE)
    data = _jsonl(tmp_path / "conv.jsonl", _conversations(book_data))
    trained = _finetune(tiny_model_dir, data, cache, tmp_path / "ft", "--chat-template", template)
    assert trained.returncode == 0, trained.stderr[-2000:]
    model = tmp_path / "ft" / "model"
    assert (model / "chat_template.jinja").read_text() == GPT2_TEMPLATE
    assert _recorded(model)["prompt_style"] == "chat"
    # without --chat-template: conversations, and the book's entries laid out in the model's template
    for n, source in enumerate((data, cache / "instruction-data.json")):
        made = cli(
            "generate", "--model-dir", model, "--data", source, "--cache", cache, "--output", tmp_path / f"gen{n}",
            "--limit", "2", "--max-new-tokens", "2", "--log-format", "json",
        )  # fmt: skip
        assert made.returncode == 0, made.stderr[-2000:]
        [start] = [e for e in events(made.stdout) if e["event"] == "generate_start"]
        assert start["prompt_style"] == "chat"
    # DPO from it (the book's pairs, laid out in the recorded chat style) carries the template on
    preferred = cli(
        "dpo", "--model-dir", model, "--output", tmp_path / "dpo", "--cache", cache, "--max-steps", "1",
        "--eval-freq", "1", "--eval-iter", "1", "--batch-size", "2", "--log-format", "json",
        "--data", cache / "instruction-data-with-preference.json",
    )  # fmt: skip
    assert preferred.returncode == 0, preferred.stderr[-2000:]
    assert (tmp_path / "dpo" / "model" / "chat_template.jinja").read_text() == GPT2_TEMPLATE
    assert _recorded(tmp_path / "dpo" / "model")["prompt_style"] == "chat"
    exported = cli("export", "--model-dir", model, "--output", tmp_path / "out", "--cache", cache)
    assert exported.returncode == 0, exported.stderr[-2000:]
    style = prompt_style("chat", model_tokenizer(model, cache))
    entries = book_data[:10]
    assert _modelfile_prompts(tmp_path, tmp_path / "out", style, entries) == [style.format_input(e) for e in entries]
    assert (
        style.format_input(entries[0])
        == f"user: {entries[0]['instruction']}"
        + (f"\n\n{entries[0]['input']}" if entries[0]["input"] else "")
        + "\nassistant: "
    )


@pytest.mark.slow
def test_a_text_trained_model_is_not_exported_with_a_guessed_layout(tiny_model_dir, cache, tmp_path, book_data):
    data = _jsonl(tmp_path / "text.jsonl", [{"text": e["instruction"] + " " + e["output"]} for e in book_data[:40]])
    trained = _finetune(tiny_model_dir, data, cache, tmp_path / "ft")
    assert trained.returncode == 0, trained.stderr[-2000:]
    model = tmp_path / "ft" / "model"
    refused = cli("export", "--model-dir", model, "--output", tmp_path / "out", "--cache", cache)
    assert refused.returncode == 2, refused.stderr[-2000:]
    [line] = refused.stderr.splitlines()
    assert line.startswith("Error: ") and "text data" in line and "--prompt-style" in line
    assert not (tmp_path / "out").exists()
    out = tmp_path / "out"
    named = cli("export", "--model-dir", model, "--output", out, "--cache", cache, "--prompt-style", "phi3")
    assert named.returncode == 0, named.stderr[-2000:]
    assert "<|user|>" in (tmp_path / "out" / MODELFILE).read_text()


def test_run_export_of_text_data_is_exit_2_at_preflight_unless_a_style_is_named(cache, tmp_path, book_data):
    data = _jsonl(tmp_path / "text.jsonl", [{"text": e["instruction"] + " " + e["output"]} for e in book_data[:60]])
    args = smoke_run(cache, tmp_path / "runs", "t", "--skip-judge", "--export", "gguf")
    args[args.index("--data") + 1] = data
    done = cli(*args)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.splitlines()
    assert line.startswith("Error: --export gguf: ") and "--prompt-style" in line
    assert not (tmp_path / "runs" / "t").exists()
    again = cli(*args, "--prompt-style", "alpaca")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "### Instruction" in (tmp_path / "runs" / "t" / "export" / MODELFILE).read_text()
