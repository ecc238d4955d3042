"""``sft-job run`` on data of other formats, end to end on the tiny Qwen3 folder with the wire-protocol judge:
multi-turn conversations with system prompts through finetune, generate, judge and the report."""

from __future__ import annotations

import html
import json

import pytest

from job.data.instructions import prompt_style
from job.models.families import model_tokenizer
from job.stages.export import MODELFILE
from tests.helpers import cli, events


def conversations(book_data: list[dict], count: int) -> list[dict]:
    """Conversations from the book's entries: every other one with a system prompt, every third two rounds."""
    rows = []
    for i, entry in enumerate(book_data[:count]):
        turns = [{"role": "system", "content": f"Answer briefly ({i})."}] if i % 2 else []
        ask = entry["instruction"] + (f"\n\n{entry['input']}" if entry["input"] else "")
        turns += [{"role": "user", "content": ask}, {"role": "assistant", "content": entry["output"]}]
        if i % 3 == 0:
            turns += [
                {"role": "user", "content": "Once more, shorter?"},
                {"role": "assistant", "content": entry["output"][:30]},
            ]
        rows.append({"messages": turns})
    return rows


@pytest.mark.slow
def test_run_on_conversations_finetunes_generates_judges_and_reports_the_conversation(
    qwen3_dir, cache, ollama, tmp_path, book_data
):
    data = tmp_path / "conversations.jsonl"
    rows = conversations(book_data, 120)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cli(
        "run", "--model-dir", qwen3_dir, "--data", data, "--cache", cache, "--output", tmp_path / "runs",
        "--run-id", "conv", "--judge-url", ollama.url, "--max-steps", "6", "--eval-freq", "3", "--limit", "4",
        "--max-new-tokens", "8", "--metrics-port", "0", "--log-format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "conv"
    responses = json.loads((run / "instruction-data-with-response.json").read_text())
    test = rows[int(len(rows) * 0.85) :][:4]
    assert [r["messages"] for r in responses] == [t["messages"] for t in test]
    for response, entry in zip(responses, test, strict=True):
        turns = entry["messages"]
        last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
        assert response["output"] == turns[last]["content"]
        assert response["instruction"] == "\n\n".join(f"{t['role']}: {t['content']}" for t in turns[:last])
    # the judge saw the book's prompt with the conversation as its input and the last answer as the output
    prompts = [chat["messages"][-1]["content"] for chat in ollama.chats[-4:]]  # in the order they were answered
    for response in responses:
        shown = f"### Instruction:\n{response['instruction']}` and correct output `{response['output']}`"
        assert sum(shown in prompt for prompt in prompts) == 1
    assert json.loads((run / "summary.json").read_text())["scored"] == 4
    report = (run / "report.html").read_text()
    assert all(html.escape(r["instruction"]) in report for r in responses)


def conversational_pairs(preference_data: list[dict], count: int) -> list[dict]:
    """TRL's conversational preference shapes from the book's pairs: an explicit prompt of turns (even entries)
    and two conversations sharing their first turns as the prompt (odd ones)."""
    rows = []
    for i, entry in enumerate(preference_data[:count]):
        ask = [{"role": "system", "content": "Be polite."}] if i % 4 < 2 else []
        ask += [{"role": "user", "content": entry["instruction"] + (f"\n\n{entry['input']}" if entry["input"] else "")}]
        chosen, rejected = ({"role": "assistant", "content": entry[k]} for k in ("chosen", "rejected"))
        if i % 2:
            rows.append({"chosen": [*ask, chosen], "rejected": [*ask, rejected]})
        else:
            rows.append({"prompt": ask, "chosen": [chosen], "rejected": [rejected]})
    return rows


@pytest.mark.slow
def test_run_dpo_on_trl_shaped_conversational_pairs(qwen3_dir, cache, tmp_path, book_data):
    data, pairs = tmp_path / "conversations.jsonl", tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(book_data, 60)))
    preference = json.loads((cache / "instruction-data-with-preference.json").read_text())
    pairs.write_text("".join(json.dumps(r) + "\n" for r in conversational_pairs(preference, 60)))
    result = cli(
        "run", "--model-dir", qwen3_dir, "--data", data, "--dpo", "--dpo-data", pairs, "--cache", cache,
        "--output", tmp_path / "runs", "--run-id", "pairs", "--skip-judge", "--max-steps", "4", "--eval-freq", "2",
        "--limit", "2", "--max-new-tokens", "4", "--metrics-port", "0", "--log-format", "json",
        "--train-on", "last",  # its finetune's: DPO's pairs train on their responses, and DPO is built without it
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs" / "pairs" / "manifest.json").read_text())
    assert manifest["stages"]["dpo"]["status"] == "complete"
    dpo_evals = [e for e in events(result.stdout) if e.get("stage") == "dpo" and e["event"] == "eval"]
    assert dpo_evals and all(e["train_loss"] == e["train_loss"] for e in dpo_evals)  # numbers, not NaN

    # the pairs' own template lays them out: no prompt style was asked for, none is said to differ
    assert not [e for e in events(result.stdout) if e["event"] == "prompt_style_differs_from_model"]
    recorded = json.loads((tmp_path / "runs" / "pairs" / "dpo" / "model" / "config.json").read_text())["sft_job"]
    assert recorded["prompt_style"] == "chat"


STRICT_TEMPLATE = (  # as many models' templates do: turns must alternate, else raise_exception(...)
    "{% for m in messages %}{% if m.role != 'system' and (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_an_entry_the_chat_template_refuses_is_named_at_preflight_and_skip_invalid_drops_it_as_any_other(
    tiny_model_dir, cache, tmp_path, book_data
):
    template = tmp_path / "strict.jinja"
    template.write_text(STRICT_TEMPLATE)
    rows = [{"messages": t["messages"][-2:]} for t in conversations(book_data, 40)]
    rows[36]["messages"].insert(1, {"role": "user", "content": "And again?"})  # a test entry: generate's alone
    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused = (
        f"--chat-template {template}: the chat template refused the messages: Conversation roles must alternate "
        "user/assistant/user/assistant/..."
    )
    common = ("--model-dir", tiny_model_dir, "--data", data, "--cache", cache, "--chat-template", template)
    run = ("run", *common, "--output", tmp_path / "runs", "--skip-judge", "--max-steps", "1", "--max-new-tokens", "4",
           "--metrics-port", "0", "--log-format", "json")  # fmt: skip
    refusal = cli(*run, "--run-id", "r")
    assert refusal.returncode == 1 and refusal.stderr.splitlines() == [
        f"Error: dataset {data}: entry 36: {refused} (--skip-invalid drops such entries)"
    ]
    assert not (tmp_path / "runs" / "r").exists()

    # --skip-invalid drops it as it drops an entry of the wrong shape (2), counted: a training entry (20) too;
    # an entry is named by its row in the file, not by its place among the entries kept
    rows[2] = {"messages": []}
    rows[20]["messages"].append({"role": "assistant", "content": "Twice."})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skipped = cli(*run, "--run-id", "s", "--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    dropped = [e for e in events(skipped.stdout) if e["event"] == "dataset_entries_skipped"]
    by_template = [e for e in dropped if e.get("reason") == "the chat template refused them"]
    assert by_template and {e["count"] for e in by_template} <= {1, 2}, dropped  # finetune's splits hold row 20 only
    assert all(e["first"] == f"dataset {data}: entry 20: {refused}" for e in by_template), by_template
    assert {e["count"] for e in dropped if "reason" not in e} == {1}  # row 2, the empty conversation
    # 39 entries cut 85/10/5: the test split is rows 34, 35 and 36, less the refused one
    responses = json.loads((tmp_path / "runs" / "s" / "instruction-data-with-response.json").read_text())
    assert [r["messages"] for r in responses] == [rows[34]["messages"], rows[35]["messages"]]

    # a split the drops leave empty is still refused at preflight, naming it, before anything is written
    for split, first in (("test", 34), ("validation", 37)):
        for row in rows[first : first + 3]:
            row["messages"].insert(0, {"role": "assistant", "content": "First?"})
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        emptied = cli(*run, "--run-id", split, "--skip-invalid")
        assert emptied.returncode == 1 and emptied.stderr.splitlines() == [
            f"Error: dataset {data}: the chat template refused every entry of its {split} split (3; --skip-invalid "
            "dropped them): fix the entries or the template"
        ], emptied.stderr[-2000:]
        assert not (tmp_path / "runs" / split).exists()


def test_train_on_or_a_chat_template_that_this_data_would_not_use_is_exit_2_at_preflight(
    tiny_model_dir, cache, tmp_path, book_data
):
    book = cache / "instruction-data.json"
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": e["instruction"] + " " + e["output"]}) + "\n" for e in book_data[:40]))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": e["instruction"], "completion": e["output"]}) + "\n"
                             for e in book_data[:40]))  # fmt: skip
    template = tmp_path / "chat.jinja"
    template.write_text(STRICT_TEMPLATE)
    config = tmp_path / "job.yaml"
    config.write_text("train_on: last\n")
    run = ("run", "--model-dir", tiny_model_dir, "--cache", cache, "--output", tmp_path / "runs", "--skip-judge",
           "--metrics-port", "0", "--max-new-tokens", "8", "--max-steps", "1", "--limit", "1",
           "--log-format", "json")  # fmt: skip
    finetune = ("finetune", "--model-dir", tiny_model_dir, "--cache", cache, "--max-steps", "1", "--log-format", "json")
    train_on = "applies to messages data (conversations' turns); this dataset is"
    for args, env, message in (
        ((*run, "--run-id", "a", "--data", book, "--train-on", "all"), {}, f"--train-on all {train_on} alpaca data"),
        ((*finetune, "--output", tmp_path / "b", "--data", texts, "--config", config), {},
         f"{config}: train_on last {train_on} text data"),  # named as the file's key, the file first
        ((*finetune, "--output", tmp_path / "c", "--data", pairs), {"SFT_JOB_TRAIN_ON": "last"},
         f"SFT_JOB_TRAIN_ON last {train_on} prompt-completion data"),
        ((*run, "--run-id", "d", "--data", book, "--chat-template", template), {},
         f"--chat-template {template} applies to conversations"),
        ((*finetune, "--output", tmp_path / "e", "--data", texts, "--chat-template", template), {},
         f"--chat-template {template} applies to conversations"),
    ):  # fmt: skip
        done = cli(*args, env=env)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, (args, done.stderr[-2000:])
        assert done.stderr.startswith(f"Error: {message}"), done.stderr
    assert not any((tmp_path / name).exists() for name in ("runs/a", "runs/d", "b", "c", "e"))
    # the default, given or not, has nothing to say
    given = cli(*finetune, "--output", tmp_path / "f", "--data", texts, "--train-on", "assistant")
    assert given.returncode == 0, given.stderr[-2000:]


@pytest.mark.slow
def test_run_dpo_lays_book_pairs_out_as_the_model_was_finetuned_and_exports_that(qwen3_dir, cache, tmp_path, book_data):
    """Finetuned on conversations, the model records chat: run's DPO on the book's pairs (no --prompt-style) lays
    them out in its chat template as ``sft-job dpo`` does, the DPO model records it and the export writes it."""
    data, pairs = tmp_path / "conversations.jsonl", tmp_path / "pairs.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(book_data, 60)))
    preference = json.loads((cache / "instruction-data-with-preference.json").read_text())[:60]
    pairs.write_text(json.dumps(preference))
    result = cli(
        "run", "--model-dir", qwen3_dir, "--data", data, "--dpo", "--dpo-data", pairs, "--export", "gguf",
        "--cache", cache, "--output", tmp_path / "runs", "--run-id", "book", "--skip-judge", "--max-steps", "1",
        "--train-limit", "2", "--batch-size", "2", "--limit", "2", "--max-new-tokens", "4", "--log-format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    logged = events(result.stdout)
    assert not [e for e in logged if e["event"] == "prompt_style_differs_from_model"]
    [started] = [e for e in logged if e["event"] == "dpo_start"]
    assert started["prompt_style"] == "chat"
    run = tmp_path / "runs" / "book"
    style = prompt_style("chat", model_tokenizer(run / "model", cache))
    [sample] = [e for e in logged if e["event"] == "sample" and e.get("stage") == "dpo"]
    assert sample["prompt"] == style.format_input({"input": "", **preference[59]})  # the book's val_data[2]
    assert sample["prompt"].startswith("<|begin_of_text|><|user|>\n")
    assert json.loads((run / "dpo" / "model" / "config.json").read_text())["sft_job"]["prompt_style"] == "chat"
    modelfile = (run / "export" / MODELFILE).read_text()
    assert "<|user|>" in modelfile and "### Instruction" not in modelfile


def test_dpo_pairs_the_chat_template_refuses_are_named_or_dropped_and_an_emptied_split_is_named_at_preflight(
    tiny_model_dir, cache, tmp_path, book_data
):
    template = tmp_path / "strict.jinja"
    template.write_text(STRICT_TEMPLATE)
    data, pairs = tmp_path / "conversations.jsonl", tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"][-2:]}) + "\n" for r in conversations(book_data, 40)))
    preference = json.loads((cache / "instruction-data-with-preference.json").read_text())[:40]
    rows = []
    for i, entry in enumerate(preference):  # 34 training pairs, 4 test, 2 validation: those the template refuses
        ask = [{"role": "assistant", "content": "Hm?"}] if i >= 38 else []
        ask += [{"role": "user", "content": entry["instruction"]}]
        said = {k: [{"role": "assistant", "content": entry[k]}] for k in ("chosen", "rejected")}
        rows.append({"prompt": ask, **said})
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = ("run", "--model-dir", tiny_model_dir, "--data", data, "--dpo", "--dpo-data", pairs, "--cache", cache,
           "--chat-template", template, "--output", tmp_path / "runs", "--skip-judge", "--metrics-port", "0",
           "--max-new-tokens", "8", "--log-format", "json")  # fmt: skip
    named = cli(*run, "--run-id", "n")
    assert named.returncode == 1 and named.stderr.startswith(f"Error: dataset {pairs}: entry 38: --chat-template"), (
        named.stderr[-2000:]
    )
    emptied = cli(*run, "--run-id", "e", "--skip-invalid")
    assert emptied.returncode == 1 and emptied.stderr.splitlines() == [
        f"Error: dataset {pairs}: the chat template refused every entry of its validation split (2; --skip-invalid "
        "dropped them): fix the entries or the template"
    ], emptied.stderr[-2000:]
    assert not (tmp_path / "runs" / "n").exists() and not (tmp_path / "runs" / "e").exists()
