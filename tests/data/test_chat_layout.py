"""job/data/chat_layout.py: the Modelfile's TEMPLATE rendered by Go's own text/template, and the GGUF's Jinja
template rendered by Jinja (as transformers and llama.cpp's chat read it), each equal byte for byte to the
prompt the job trains on, per prompt style."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job.core.errors import ConfigError
from job.data.chat_layout import TurnLayout, chat_layout, entry_message, turn_layout
from job.data.instructions import PROMPT_STYLES, ChatStyle
from job.models.chat_template import ChatTemplate
from tests.family_folders import CHAT_TEMPLATE
from tests.go_template import build_renderer, go_render

END = "<|endoftext|>"


@pytest.fixture(scope="module")
def renderer(tmp_path_factory):
    return build_renderer(tmp_path_factory.mktemp("go"))


def family_chat_style(source: str = CHAT_TEMPLATE) -> ChatStyle:
    template = ChatTemplate(source, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "test")
    return ChatStyle("chat", "", "", render=template.prompt)


def styles():
    return {"alpaca": PROMPT_STYLES["alpaca"], "phi3": PROMPT_STYLES["phi3"], "chat": family_chat_style()}


def test_prompt_styles_pieces():
    alpaca = turn_layout(PROMPT_STYLES["alpaca"], END)
    assert alpaca.first.endswith("### Instruction:\n") and alpaca.generation == "\n\n### Response:\n"
    assert alpaca.next == END + alpaca.first
    phi3 = turn_layout(PROMPT_STYLES["phi3"], END)
    assert (phi3.first, phi3.generation) == ("<|user|>\n", "\n<|assistant|>:\n")


@pytest.mark.parametrize("name", ["alpaca", "phi3", "chat"])
def test_go_renders_the_training_prompt(renderer, book_data, name):
    """Go's text/template renders the TEMPLATE of each style equal to the job's prompt, byte for byte, for the
    book's first 60 entries (those with an input and those without)."""
    style = styles()[name]
    layout = turn_layout(style, END)
    entries = book_data[:60]
    assert {bool(e["input"]) for e in entries} == {True, False}
    conversations = [[{"role": "user", "content": entry_message(style, e)}] for e in entries]
    rendered = go_render(renderer, layout.go_template(), conversations)
    assert rendered == [style.format_input(e) + style.response_header for e in entries]


@pytest.mark.parametrize("name", ["alpaca", "phi3", "chat"])
def test_jinja_template_renders_the_layout(book_data, name):
    """The GGUF's chat template (the style's, as Jinja in transformers' sandbox) renders what Go renders."""
    style = styles()[name]
    layout = turn_layout(style, END)
    template = ChatTemplate(layout.jinja_template(), {}, "gguf")
    for entry in book_data[:20]:
        assert template.prompt([{"role": "user", "content": entry_message(style, entry)}]) == (
            style.format_input(entry) + style.response_header
        )


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
odd_lists = st.integers(0, 2).flatmap(lambda turns: st.lists(texts, min_size=2 * turns + 1, max_size=2 * turns + 1))
conversations = odd_lists.map(
    lambda contents: [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]
)


@settings(max_examples=25, deadline=None)
@given(conversation=conversations)
def test_go_and_jinja_agree_on_any_conversation(renderer, conversation):
    """Any text (template syntax, triple quotes, backslashes, any script) as any turn renders the same through
    Go, through the GGUF's Jinja and through the model's own template (chat)."""
    for name, style in styles().items():
        layout = turn_layout(style, END)
        expected = layout.render(conversation)
        assert go_render(renderer, layout.go_template(), [conversation]) == [expected], name
        assert ChatTemplate(layout.jinja_template(), {}, "gguf").prompt(conversation) == expected, name
        if name == "chat":
            assert style.render(conversation) == expected


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("{% for m in messages %}{{ m.content | lower }}{% endfor %}", "changes"),  # a message's text changed
        ("{% for m in messages %}{{ loop.index }}{{ m.content }}{% endfor %}", "place"),  # counts turns
        ("{{ messages[-1].content }}", "changes"),  # only the last message
    ],
)
def test_chat_template_that_is_not_a_fixed_layout_is_refused(source, why):
    with pytest.raises(ConfigError, match=why):
        chat_layout(family_chat_style(source))


def test_layout_render_skips_system_messages():
    layout = TurnLayout("<", "|", "/", ">")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]
    assert layout.render(messages) == "<u>"
