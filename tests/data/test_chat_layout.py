"""job/data/chat_layout.py: the Modelfile's TEMPLATE rendered by Go's own text/template, and the GGUF's Jinja
template rendered by Jinja (as transformers and llama.cpp's chat read it), each equal byte for byte to the
prompt the job trains on, per prompt style."""

from __future__ import annotations

from pathlib import Path

import pytest
import trl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from job.core.errors import ConfigError
from job.data.chat_layout import chat_layout, entry_message, turn_layout
from job.data.instructions import PROMPT_STYLES, ChatStyle
from job.models.chat_template import ChatTemplate, ChatTemplateError
from tests.family_folders import CHAT_TEMPLATE, write_tokenizer
from tests.go_template import build_renderer, go_outcomes, go_render

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


TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
# Templates with a system turn: the families' tiny one, ChatML with a default system prompt (Qwen 2.5's shape),
# Qwen3's own (as TRL ships it), and a --chat-template file for GPT-2.
CHATML_DEFAULT_SYSTEM = (
    "{%- if messages[0].role != 'system' %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GPT2_FILE = (
    "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
    "{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
SYSTEM_REFUSED = (
    "{%- for m in messages %}{%- if m.role == 'system' %}{{ raise_exception('no system turns') }}{%- endif %}"
    "{{- '<|' + m.role + '|>' + m.content + '<|end|>' }}{%- endfor %}{{- '<|assistant|>' }}"
)


def chat_templates() -> dict[str, str]:
    return {
        "family": CHAT_TEMPLATE,
        "chatml": CHATML_DEFAULT_SYSTEM,
        "qwen3": (TRL_TEMPLATES / "qwen3.jinja").read_text(),
        "gpt2-file": GPT2_FILE,
    }


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, book_data):
    """transformers' tokenizer of the families' tiny folder: what renders each template as the trainer saw it."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder, book_data[:50])
    return AutoTokenizer.from_pretrained(folder)


def hf_style(tokenizer, source: str) -> ChatStyle:
    variables = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    return ChatStyle("chat", "", "", render=ChatTemplate(source, variables, "test").prompt)


turn_texts = texts | st.sampled_from(["{{ .System }}", '"""', '{{ template "x" }}', "  padded  ", ""])
chats = st.tuples(
    st.none() | turn_texts,
    st.integers(1, 4).flatmap(lambda n: st.lists(turn_texts, min_size=2 * n - 1, max_size=2 * n - 1)),
).map(
    lambda drawn: (
        ([{"role": "system", "content": drawn[0]}] if drawn[0] is not None else [])
        + [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(drawn[1])]
    )
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversation=chats)
def test_go_renders_any_conversation_as_transformers_renders_the_trained_template(renderer, hf_tokenizer, conversation):
    """With and without a system prompt, 1 to 4 user turns: Go's text/template, run as Ollama runs a TEMPLATE
    (.Messages collated, .System set), renders each template's Modelfile TEMPLATE byte for byte as transformers'
    ``apply_chat_template(add_generation_prompt=True)`` renders the model's own template."""
    names, templates, expected = list(chat_templates()), [], []
    for source in chat_templates().values():
        templates.append(turn_layout(hf_style(hf_tokenizer, source), END).go_template())
        expected.append(
            hf_tokenizer.apply_chat_template(
                conversation, chat_template=source, tokenize=False, add_generation_prompt=True
            )
        )
    for name, template, theirs in zip(names, templates, expected, strict=True):
        assert go_render(renderer, template, [conversation]) == [theirs], name
    if conversation[0]["role"] == "system":
        assert "QX" not in expected[0] and conversation[0]["content"] in expected[0]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversation=chats)
def test_prompt_styles_put_a_system_message_before_the_trained_prompt(renderer, conversation):
    """Alpaca and Phi-3 trained on no system message: one comes first, a blank line, then the prompt exactly as
    trained; Go, the GGUF's Jinja and llama-cpp-python's chat formatter (which reads the GGUF's) agree."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    system = [m["content"] for m in conversation if m["role"] == "system"]
    turns = [m for m in conversation if m["role"] != "system"]
    for name in ("alpaca", "phi3"):
        layout = turn_layout(PROMPT_STYLES[name], END)
        trained = layout.render(turns)
        expected = system[0] + "\n\n" + trained if system else trained
        assert go_render(renderer, layout.go_template(), [conversation]) == [expected], name
        assert ChatTemplate(layout.jinja_template(), {}, "gguf").prompt(conversation) == expected, name
        llama_cpp_chat = Jinja2ChatFormatter(layout.jinja_template(), eos_token=END, bos_token="")
        assert llama_cpp_chat(messages=conversation).prompt == expected, name


def test_what_the_trained_template_refuses_the_modelfile_refuses(renderer, hf_tokenizer):
    """A template that raises on a system turn: the Modelfile renders the conversations it renders and fails,
    naming why, on a system message (not dropping it); a tool message, which no layout here trains, likewise,
    and Go's refusal is the GGUF Jinja's."""
    layout = turn_layout(hf_style(hf_tokenizer, SYSTEM_REFUSED), END)
    plain = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    system = [{"role": "system", "content": "Be brief."}, *plain]
    tool = [*plain, {"role": "tool", "content": "42"}]
    ok, *refused = go_outcomes(renderer, layout.go_template(), [plain, system, tool])
    assert ok == {"text": "<|user|>u<|end|><|assistant|>a<|end|><|user|>v<|end|><|assistant|>"}
    assert all("not trained on a conversation like this" in outcome["error"] for outcome in refused), refused
    alpaca = turn_layout(PROMPT_STYLES["alpaca"], END)
    [outcome] = go_outcomes(renderer, alpaca.go_template(), [tool])
    assert "not trained on a conversation like this" in outcome["error"]
    with pytest.raises(ChatTemplateError, match="not trained on a conversation like this"):
        ChatTemplate(alpaca.jinja_template(), {}, "gguf").prompt(tool)


def test_ollama_system_prompt_and_consecutive_turns_arrive_as_ollama_collates_them(renderer):
    """Ollama merges consecutive messages of a role (a blank line between) before the TEMPLATE sees them: two
    system messages render as the one Ollama hands over."""
    layout = turn_layout(PROMPT_STYLES["phi3"], END)
    two = [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "u"}]
    assert go_render(renderer, layout.go_template(), [two]) == [
        layout.render([{"role": "system", "content": "A\n\nB"}, two[2]])
    ]


SWEEP_WORDS = ["hi", "Be brief.", "  pad  ", "", "a\nb", '"""', "x</think>", "{{ .System }}"]


def sweep_conversations() -> list[list[dict]]:
    """Every system prompt (none, text, padded, empty) with 1 to 4 user turns of the words above in turn, each
    also with the assistant's answer last."""
    found = []
    for system in (None, "Be brief.", "  spaced  ", ""):
        for turns in range(1, 5):
            for shift in range(len(SWEEP_WORDS)):
                head = [] if system is None else [{"role": "system", "content": system}]
                words = [SWEEP_WORDS[(shift + i) % len(SWEEP_WORDS)] for i in range(2 * turns - 1)]
                turns_ = [{"role": ("user", "assistant")[i % 2], "content": w} for i, w in enumerate(words)]
                found += [head + turns_, [*head, *turns_, {"role": "assistant", "content": "an answer"}]]
    return found


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("qwen2_5", ()),
        ("phi3", ()),
        ("qwen3_instruct_2507", ()),
        ("llama3_2", ("whitespace",)),
        ("qwen3", ("</think>",)),
        ("qwen3_training", ("</think>",)),
        ("lfm2", ("empty system",)),
        ("glm4moe", ("whitespace", "</think>", "empty assistant")),
    ],
)
def test_a_template_the_modelfile_cannot_follow_is_said_never_silent(renderer, hf_tokenizer, name, said):
    """Real templates (as TRL ships them): the caveats name what each one does that Go cannot follow, and a
    template with none renders every sweep conversation through Go as transformers does (no silent difference);
    one with caveats differs somewhere (no needless ones)."""
    source = (TRL_TEMPLATES / f"{name}.jinja").read_text()
    layout = turn_layout(hf_style(hf_tokenizer, source), END)
    assert len(layout.caveats) == len(said) and all(w in c for w, c in zip(said, layout.caveats, strict=True))
    conversations = sweep_conversations()
    outcomes = go_outcomes(renderer, layout.go_template(), conversations)
    differ = 0
    for conversation, outcome in zip(conversations, outcomes, strict=True):
        theirs = hf_tokenizer.apply_chat_template(
            conversation, chat_template=source, tokenize=False, add_generation_prompt=True
        )
        differ += outcome.get("text") != theirs
    assert (differ == 0) == (not said), differ


def test_a_conversation_ending_in_an_answer_renders_where_the_template_keeps_its_pieces(renderer, hf_tokenizer):
    """Ending in the assistant's message: the families' template renders it with the pieces of the others, so the
    TEMPLATE does as transformers does; Qwen3's adds a thinking block to a last answer, so the TEMPLATE refuses
    it (naming why) rather than render it without."""
    answered = [
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
    ]
    family = turn_layout(hf_style(hf_tokenizer, CHAT_TEMPLATE), END)
    theirs = [
        hf_tokenizer.apply_chat_template(c, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
        for c in answered
    ]
    assert go_render(renderer, family.go_template(), answered) == theirs
    qwen3 = turn_layout(hf_style(hf_tokenizer, chat_templates()["qwen3"]), END)
    assert all(
        "not trained on a conversation like this" in o["error"]
        for o in go_outcomes(renderer, qwen3.go_template(), answered)
    )
