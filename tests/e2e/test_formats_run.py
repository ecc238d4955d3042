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
