"""Conversations rendered with a chat template and masked: the ids and the assistant mask equal ``transformers``'
``apply_chat_template(..., return_assistant_tokens_mask=True)`` on templates with ``{% generation %}`` blocks
(TRL's training templates, and the tiny folders' own template with the blocks added), on any conversation
Hypothesis draws, Jinja syntax in the content included, for a ``tokenizer.json`` and for GPT-2's tiktoken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from job.data.conversation import lay_out_conversation, turns_problem
from job.data.instructions import IGNORE_INDEX, Collator
from job.models.chat_template import ChatTemplate, ChatTemplateError
from job.models.tokenizer import load_hf_tokenizer, load_tokenizer
from tests.family_folders import CHAT_TEMPLATE, write_tokenizer

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
# The tiny folders' template (no blocks: we find the assistant's text ourselves) and the same with the blocks
# around what assistant-only loss must train: the turn's text and its end token.
MARKED = CHAT_TEMPLATE.replace(
    "{{- '<|' + m.role + '|>\\n' + m.content + '<|eot_id|>' }}",
    "{%- if m.role == 'assistant' %}{{- '<|assistant|>\\n' }}{% generation %}{{- m.content + '<|eot_id|>' }}"
    "{% endgeneration %}{%- else %}{{- '<|' + m.role + '|>\\n' + m.content + '<|eot_id|>' }}{%- endif %}",
)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30) | st.sampled_from(
    ["{{ bos_token }}", "{% if true %}x{% endif %}", "<|eot_id|>", " \n ", "", "Ω€😀", "{# c #}"]
)


@st.composite
def conversations(draw, text=TEXT):
    """1 to 8 turns: an optional system turn, then users and assistants, at least one assistant turn."""
    system = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    count = draw(st.integers(1, 8 - len(system)))
    roles = [draw(st.sampled_from(["user", "assistant"])) for _ in range(count)]
    roles[draw(st.integers(0, count - 1))] = "assistant"
    return system + [{"role": role, "content": draw(text)} for role in roles]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, book_data) -> Path:
    path = tmp_path_factory.mktemp("conv")
    write_tokenizer(path, book_data[:50])
    return path


@pytest.fixture(scope="module")
def ours(folder):
    return load_hf_tokenizer(folder)


@pytest.fixture(scope="module")
def theirs(folder):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


def reference(tokenizer, source: str, turns: list[dict]) -> tuple[list[int], list[bool]]:
    out = tokenizer.apply_chat_template(
        turns, chat_template=source, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


@pytest.mark.parametrize("name", ["llama3_training", "qwen2_5_training", "tiny"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=conversations())
def test_ids_and_assistant_mask_equal_transformers(ours, theirs, name, turns):
    source = MARKED if name == "tiny" else (TRL_TEMPLATES / f"{name}.jinja").read_text()
    template = ChatTemplate(source, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, name)
    assert lay_out_conversation(ours, template, turns, "assistant") == reference(theirs, source, turns)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=conversations())
def test_a_template_without_blocks_trains_each_assistant_turn_and_its_end_token(ours, theirs, turns):
    # What the marked template says (transformers' reading) is what we find in the plain one by ourselves.
    plain = ChatTemplate(CHAT_TEMPLATE, {"bos_token": "<|begin_of_text|>"}, "tiny")
    assert lay_out_conversation(ours, plain, turns, "assistant") == reference(theirs, MARKED, turns)


# ASCII only (the book's text): the offsets are read off the tokens' bytes directly (job/data/conversation.py).
ASCII_TEXT = st.text(st.characters(codec="ascii"), max_size=30) | st.sampled_from(["<|endoftext|>", " \n ", ""])


@settings(max_examples=40, deadline=None)
@given(turns=conversations() | conversations(ASCII_TEXT))
def test_gpt2_tiktoken_masks_as_transformers_gpt2_tokenizer(tokenizer_dir, turns):
    from transformers import GPT2TokenizerFast

    gpt2 = load_tokenizer(tokenizer_dir)
    merges = [tuple(line.split(" ")) for line in (tokenizer_dir / "vocab.bpe").read_text().splitlines()[1:] if line]
    vocab = json.loads((tokenizer_dir / "encoder.json").read_text())
    hf = GPT2TokenizerFast(vocab=vocab, merges=merges)
    source = MARKED.replace("<|eot_id|>", "<|endoftext|>")
    template = ChatTemplate(source, {"bos_token": "<|endoftext|>"}, "gpt2")
    assert lay_out_conversation(gpt2, template, turns, "assistant") == reference(hf, source, turns)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=conversations(), train_on=st.sampled_from(["assistant", "last", "all"]))
def test_the_collated_targets_are_exactly_the_trained_turns_tokens(ours, theirs, turns, train_on):
    from job.data.formats import _example

    ids, mask = lay_out_conversation(
        ours, ChatTemplate(MARKED, {"bos_token": "<|begin_of_text|>"}, "t"), turns, train_on
    )
    whole = reference(theirs, MARKED, turns)[1]
    if train_on == "last":  # the last assistant turn's tokens: those after the turn before it ends
        last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
        before = reference(theirs, MARKED, turns[:last])[0] if last else []
        whole = [m and i >= len(before) for i, m in enumerate(whole)]
    expected = [True] * len(ids) if train_on == "all" else whole
    assert mask == expected
    _inputs, targets = Collator(4096, False)([_example(ids, [*mask, False])])
    trained_targets = [int(t) for t in targets[0] if t != IGNORE_INDEX]
    assert trained_targets == [i for i, m in zip(ids[1:], mask[1:], strict=True) if m]


@pytest.mark.parametrize(
    ("turns", "problem"),
    [
        ([], "field 'messages' is an empty conversation"),
        ("hi", "field 'messages' must be a list of {role, content} turns, got str"),
        (
            [{"role": "bot", "content": "x"}],
            "field 'messages': turn 0: role 'bot' is not one of system, user, assistant",
        ),
        ([{"role": "user", "content": 3}], "field 'messages': turn 0: content must be a string, got int"),
        ([{"role": "user", "content": "x"}], "field 'messages' has no assistant turn to train on"),
        ([{"role": "user"}, {"role": "assistant", "content": "y"}], "turn 0: content must be a string, got NoneType"),
        (["user: hi"], "field 'messages': turn 0 is a str, not an object with role and content"),
    ],
)
def test_a_malformed_conversation_names_its_turn_and_field(turns, problem):
    assert problem in turns_problem(turns, "messages")


def test_a_template_that_rewrites_the_assistants_text_without_blocks_is_refused(ours):
    rewriting = CHAT_TEMPLATE.replace("m.content", "(m.content | upper)")
    with pytest.raises(ChatTemplateError, match="generation"):
        lay_out_conversation(
            ours, ChatTemplate(rewriting, {"bos_token": ""}, "t"), [{"role": "assistant", "content": "a"}], "assistant"
        )


@pytest.mark.parametrize("text", ["", "é", "plain ASCII <|endoftext|>", "naïve <|endoftext|> 😀"])
def test_token_spans_cover_the_text_an_empty_one_included(tokenizer_dir, text):
    from job.data.conversation import token_offsets

    ids, spans = token_offsets(load_tokenizer(tokenizer_dir), text)
    assert len(ids) == len(spans)
    if text.isascii():  # a token per run of characters, in order
        assert "".join(text[start:end] for start, end in spans) == text
    else:  # the tokens of one character's bytes each span that character
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(start <= end_before for (_, end_before), (start, _) in zip(spans, spans[1:], strict=False))
