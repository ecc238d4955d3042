"""Where a prompt style's response starts, for every style and every tokenizer: DPO scores a pair from its
response's first token (Alpaca: the book's mask), finetuning's masked targets start there too, and a chat
template is read wherever transformers writes it (``chat_template.jinja``)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from job.config import DPOConfig
from job.data.instructions import IGNORE_INDEX, Collator, prompt_style, tokenize
from job.data.preference import collate_pairs, tokenize_pairs
from job.models.families import load_model
from job.models.tokenizer import END_OF_TEXT, ByteTokenizer, load_hf_tokenizer, load_tokenizer
from job.stages.dpo import dpo_task
from tests.family_folders import CHAT_TEMPLATE, write_tokenizer
from tests.helpers import cli

QUESTIONS = ["Is the sky blue?", "Is snow white?", "Is grass green?", "Is coal black?", "Is milk white?"]
# Twenty entries (17 train, 2 test, 1 validation) whose chosen and rejected differ in the first token only.
PAIRS = [
    {"instruction": f"{q} Answer A for yes, B for no.", "input": "", "output": "A", "chosen": c, "rejected": r}
    for q in QUESTIONS * 4
    for c, r in [("A, it is.", "B, it is.")]
]


def _bytes(tokenizer, ids: list[int]) -> bytes:
    """The tokens' bytes, told by each tokenizer's own decoder."""
    if isinstance(tokenizer, ByteTokenizer):
        return b"".join(bytes([i]) if i < 256 else END_OF_TEXT.encode() for i in ids)
    return tokenizer.decode_bytes(ids)


def _first_response_token(tokenizer, ids: list[int], head: str) -> int:
    """The first token whose bytes reach past ``head`` (the prompt and its header)."""
    size = len(head.encode())
    return next((k for k in range(len(ids)) if len(_bytes(tokenizer, ids[: k + 1])) > size), len(ids))


@pytest.mark.parametrize(
    ("style", "start"), [("alpaca", "tiny_model_dir"), ("phi3", "tiny_model_dir"), ("chat", "qwen3_dir")]
)
def test_dpo_learns_a_pair_that_differs_in_its_first_response_token(style, start, cache, tmp_path, request):
    model_dir = request.getfixturevalue(start)
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(PAIRS))
    cfg = DPOConfig(
        model_dir=str(model_dir), data=str(data), cache=str(cache), output=str(tmp_path), prompt_style=style
    )
    task, _ = dpo_task(cfg)  # the pairs the stage trains on
    chosen, rejected, chosen_mask, rejected_mask = collate_pairs(
        task.objective.pairs[:1], 1024, task.tokenizer.eot_token
    )
    differ = (chosen[0] != rejected[0]).nonzero().flatten().tolist()
    assert len(differ) == 1  # one token tells them apart...
    assert chosen_mask[0, differ[0]] and rejected_mask[0, differ[0]]  # ...and it is scored
    scored = task.tokenizer.decode(chosen[0][chosen_mask[0]].tolist())
    assert scored == ("### Response:\nA, it is." if style == "alpaca" else "A, it is.")  # Alpaca: the book's mask

    out = tmp_path / "out"
    result = cli(
        "dpo", "--model-dir", model_dir, "--data", data, "--cache", cache, "--output", out, "--prompt-style", style,
        "--lr", "1e-3", "--batch-size", "4", "--epochs", "2", "--eval-freq", "2", "--eval-iter", "2",
        "--precision", "fp32", "--log-format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    history = json.loads((out / "losses.json").read_text())
    assert history[-1]["train_chosen_reward"] - history[-1]["train_rejected_reward"] > 0.1, history
    # The deciding token itself is learnt: how much more the trained model prefers the chosen first token to
    # the rejected one than the start did (about 2 here; 0.08 when a mask hid that token, with a larger margin
    # still, from the tokens after it).
    prefix = chosen[0, : differ[0]][None]
    gains = []
    for folder in (out / "model", model_dir):
        with torch.no_grad():
            logp = torch.log_softmax(load_model(folder).eval()(prefix)[0, -1], -1)
        gains.append((logp[chosen[0, differ[0]]] - logp[rejected[0, differ[0]]]).item())
    assert gains[0] - gains[1] > 0.5, gains


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dir, book_data, tmp_path_factory):
    """Every kind of tokenizer the tests build: GPT-2's tiktoken, the smoke's bytes, a trained tokenizer.json."""
    folder = tmp_path_factory.mktemp("layout-tokenizer")
    write_tokenizer(folder, book_data[:50])
    return {
        "gpt2": load_tokenizer(tokenizer_dir),
        "bytes": ByteTokenizer(),
        "tokenizer.json": load_hf_tokenizer(folder),
    }


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20) | st.sampled_from(
    ["", "\n", "\n\nYes", " ### Response:", END_OF_TEXT, "<|eot_id|>x", "é", "  two  "]
)
STYLES = [("alpaca", "gpt2"), ("alpaca", "bytes"), ("alpaca", "tokenizer.json"), ("phi3", "gpt2")]
STYLES += [("phi3", "bytes"), ("phi3", "tokenizer.json"), ("chat", "tokenizer.json")]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(STYLES), instruction=TEXT, entry_input=TEXT, chosen=TEXT, rejected=TEXT)
def test_masks_start_at_the_first_response_token(tokenizers, which, instruction, entry_input, chosen, rejected):
    tokenizer = tokenizers[which[1]]
    style = prompt_style(which[0], tokenizer)
    entry = {"instruction": instruction, "input": entry_input, "output": chosen, "chosen": chosen, "rejected": rejected}
    head = style.format_input(entry) + style.response_header

    [example] = tokenize([entry], tokenizer, style, 4096)
    _, targets = Collator(4096, mask_instruction=True, end_id=tokenizer.eot_token)([example])
    first = _first_response_token(tokenizer, example.token_ids, head)
    # SFT: target k is token k + 1; every target from the response's first token on, the end token included
    assert targets[0].tolist() == [IGNORE_INDEX] * (first - 1) + example.token_ids[first:] + [tokenizer.eot_token]

    pairs = tokenize_pairs([entry], tokenizer, style, 4096)
    if style.name == "alpaca":  # the book's: the prompt's own tokens + 2, whatever the tokenizer
        starts = [len(tokenizer.encode(style.format_input(entry), allowed_special={END_OF_TEXT})) + 2] * 2
    else:
        laid = [tokenizer.encode(head + entry[k], allowed_special={END_OF_TEXT}) for k in ("chosen", "rejected")]
        starts = [_first_response_token(tokenizer, ids, head) for ids in laid]
        if chosen == "" or rejected == "":
            assert pairs == []  # nothing of the response to score
            return
    [pair] = pairs
    _, _, chosen_mask, rejected_mask = collate_pairs([pair], 4096, tokenizer.eot_token)
    for mask, ids, start in ((chosen_mask, pair.chosen, starts[0]), (rejected_mask, pair.rejected, starts[1])):
        assert mask[0].tolist() == [start <= i < len(ids) for i in range(mask.shape[1])]


def _transformers_prompt(folder, content: str) -> str:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": content}]
    return AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_a_chat_template_jinja_is_read_as_transformers_reads_it(qwen3_dir, cache, tmp_path, book_data):
    """A folder saved by current transformers keeps its template in chat_template.jinja; where
    tokenizer_config.json has one too, the file's wins, as in transformers' loading."""
    from transformers import AutoTokenizer

    folder = tmp_path / "saved"
    shutil.copytree(qwen3_dir, folder)
    AutoTokenizer.from_pretrained(qwen3_dir).save_pretrained(folder)  # what transformers writes today
    assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    entry = book_data[3]
    content = entry["instruction"] + (f"\n\n{entry['input']}" if entry["input"] else "")
    assert prompt_style("chat", load_hf_tokenizer(folder)).format_input(entry) == _transformers_prompt(folder, content)

    both = tmp_path / "both"
    shutil.copytree(folder, both)
    (both / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace("<|assistant|>", "<|bot|>"))
    config = json.loads((both / "tokenizer_config.json").read_text()) | {"chat_template": CHAT_TEMPLATE}
    (both / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = _transformers_prompt(both, content)
    assert "<|bot|>" in theirs and prompt_style("chat", load_hf_tokenizer(both)).format_input(entry) == theirs

    out = tmp_path / "out"
    result = cli(
        "finetune", "--model-dir", folder, "--data", cache / "instruction-data.json", "--cache", cache,
        "--output", out, "--prompt-style", "chat", "--max-steps", "1", "--train-limit", "8", "--log-format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # The finetuned folder carries the file on, so the next stage reads the same template.
    assert (out / "model" / "chat_template.jinja").read_bytes() == (folder / "chat_template.jinja").read_bytes()
