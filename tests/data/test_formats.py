"""Dataset formats: told from the entries' keys (a file holds one) or named, each entry checked and named when
bad, and each format's examples trained as TRL's ``SFTTrainer`` trains them: conversations with
``assistant_only_loss``, prompt/completion pairs with ``completion_only_loss``, plain text on every token."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job.data.formats import Layout, detect_format, load_formatted, shared_system_prompt
from job.data.instructions import PROMPT_STYLES, Collator, DataError, load_entries
from job.models.chat_template import ChatTemplate
from job.models.tokenizer import load_hf_tokenizer
from tests.helpers import cli

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief; {{ not jinja }}."},
            {"role": "user", "content": "Two plus two?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And three more?"},
            {"role": "assistant", "content": "Seven."},
        ]
    },
]
PAIRS = [{"prompt": "Say hi.", "completion": " Hi there."}, {"prompt": "Two plus two is", "completion": "four"}]
CONVERSATIONAL_PAIRS = [
    {
        "prompt": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Capital of France?"}],
        "completion": [{"role": "assistant", "content": "Paris."}],
    },
    {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]},
]
TEXTS = [{"text": "The cat sat on the mat."}, {"text": "Rain falls in spring, and rivers rise."}]


def _write(path: Path, entries) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (CONVERSATIONS, "messages"),
        (PAIRS, "prompt-completion"),
        (CONVERSATIONAL_PAIRS, "prompt-completion"),
        (TEXTS, "text"),
    ],
)
def test_each_format_is_told_from_its_keys(tmp_path, entries, expected):
    assert load_formatted(_write(tmp_path / "d.jsonl", entries), None) == (expected, entries)


def test_the_books_entries_load_as_they_always_have(shared_data):
    path = shared_data / "instruction-data.json"
    assert load_formatted(path, None) == ("alpaca", load_entries(path))
    assert load_formatted(path, "alpaca") == ("alpaca", load_entries(path))


def test_a_mixed_file_names_its_first_entry_of_another_format(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [*CONVERSATIONS, PAIRS[0], TEXTS[0]])
    with pytest.raises(DataError, match=r"entry 2 is prompt-completion-shaped but entry 0 is messages-shaped"):
        detect_format(json.loads(f"[{','.join(path.read_text().splitlines())}]"), path)


USER, ASSISTANT = {"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}


@pytest.mark.parametrize(
    ("data_format", "entries", "problem"),
    [
        (None, [PAIRS[0], {"question": "q", "answer": "a"}], "entry 1 (['answer', 'question']) has none of the shapes"),
        (None, [TEXTS[0], ["user", "hi"]], "entry 1 (list) has none of the shapes accepted: alpaca (instruction"),
        ("messages", [CONVERSATIONS[0], TEXTS[0]], "entry 1: field 'messages' is missing (messages entries have"),
        ("text", [TEXTS[0], {"text": 3}], "entry 1: field 'text' must be a string, got int"),
        (None, [PAIRS[0], {"prompt": "p", "completion": [ASSISTANT]}], "entry 1: fields 'prompt' and 'completion'"),
        (None, [PAIRS[0], {"prompt": [], "completion": []}], "entry 1: field 'prompt' is an empty conversation"),
        (None, [PAIRS[0], {"prompt": [USER], "completion": [USER]}], "entry 1: field 'completion' has no assistant"),
        (None, [PAIRS[0], {"prompt": [USER], "completion": [USER, ASSISTANT]}], "must hold assistant turns only"),
        ("prompt-completion", [PAIRS[0], {"prompt": "p"}], "entry 1: field 'completion' is missing"),
        ("alpaca", CONVERSATIONS, "entry 0: field 'instruction' is missing"),
        (None, [CONVERSATIONS[0], {"messages": [USER]}], "entry 1: field 'messages' has no assistant turn to train on"),
    ],
)
def test_a_bad_entry_is_named_with_its_field(tmp_path, data_format, entries, problem):
    path = _write(tmp_path / "bad.jsonl", entries)
    with pytest.raises(DataError) as raised:
        load_formatted(path, data_format)
    assert problem in str(raised.value) and str(path) in str(raised.value)


def test_the_cli_refuses_a_mixed_file_in_one_line_and_writes_nothing(qwen3_dir, cache, tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [*CONVERSATIONS * 10, PAIRS[0]])
    result = cli("finetune", "--model-dir", qwen3_dir, "--data", path, "--cache", cache, "--output", tmp_path / "out")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "entry 20 is prompt-completion-shaped" in result.stderr
    assert not (tmp_path / "out").exists()


def test_conversations_without_a_template_are_a_usage_error_before_anything_is_written(tiny_model_dir, cache, tmp_path):
    path = _write(tmp_path / "conv.jsonl", CONVERSATIONS * 10)
    result = cli(
        "finetune", "--model-dir", tiny_model_dir, "--data", path, "--cache", cache, "--output", tmp_path / "out"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "--chat-template FILE" in result.stderr
    assert not (tmp_path / "out").exists()


# --- parity with TRL's SFTTrainer ------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_trainer(qwen3_dir, tmp_path_factory):
    """TRL's trainer on the tiny Qwen3 folder: its tokenizer and collated labels for a dataset and options."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    output = tmp_path_factory.mktemp("trl")

    def collated(entries, template=None, **options):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(qwen3_dir)
        tokenizer.chat_template = template or tokenizer.chat_template
        args = SFTConfig(output_dir=str(output), report_to=[], use_cpu=True, bf16=False, **options)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(entries), processing_class=tokenizer
        )
        rows = [trainer.train_dataset[i] for i in range(len(entries))]
        return [(row["input_ids"], row["labels"][1:]) for row in rows]  # the first token is no one's target

    return collated


def _ours(layout: Layout, entries, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Our examples as TRL's rows: the ids (with the end token the collate appends, where it is trained) and
    the targets of tokens 1 on (a token's own id where it is trained, else -100)."""
    rows = []
    for entry in entries:
        example = layout.example(entry, tokenizer)
        _inputs, targets = Collator(4096, False, end_id=tokenizer.end_id)([example])
        ids = example.token_ids + ([tokenizer.end_id] if example.trained[-1] else [])
        rows.append((ids, targets[0][: len(ids) - 1].tolist()))
    return rows


def test_messages_train_as_trls_assistant_only_loss(qwen3_dir, trl_trainer):
    source = (TRL_TEMPLATES / "llama3_training.jinja").read_text()
    tokenizer = load_hf_tokenizer(qwen3_dir)
    template = ChatTemplate(source, tokenizer.chat_template.variables, "llama3_training")
    layout = Layout("messages", PROMPT_STYLES["alpaca"], template, "assistant")
    assert _ours(layout, CONVERSATIONS, tokenizer) == trl_trainer(CONVERSATIONS, source, assistant_only_loss=True)


@pytest.mark.parametrize("entries", [PAIRS, CONVERSATIONAL_PAIRS], ids=["text", "conversational"])
def test_prompt_completion_trains_as_trls_completion_only_loss(qwen3_dir, trl_trainer, entries):
    tokenizer = load_hf_tokenizer(qwen3_dir)
    layout = Layout("prompt-completion", PROMPT_STYLES["alpaca"], tokenizer.chat_template)
    assert _ours(layout, entries, tokenizer) == trl_trainer(entries, completion_only_loss=True)


def test_text_trains_every_token_as_trl_does(qwen3_dir, trl_trainer):
    tokenizer = load_hf_tokenizer(qwen3_dir)
    assert _ours(Layout("text", PROMPT_STYLES["alpaca"], None), TEXTS, tokenizer) == trl_trainer(TEXTS)


PREFERENCES = [
    {  # an explicit prompt of turns
        "prompt": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Sky color?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green, {{ surely }}."}],
    },
    {  # the prompt implicit: the turns both conversations begin with
        "chosen": [
            {"role": "user", "content": "Where is the sun?"},
            {"role": "assistant", "content": "In the sky."},
            {"role": "user", "content": "And at night?"},
            {"role": "assistant", "content": "Below the horizon."},
        ],
        "rejected": [
            {"role": "user", "content": "Where is the sun?"},
            {"role": "assistant", "content": "In the sky."},
            {"role": "user", "content": "And at night?"},
            {"role": "assistant", "content": "In the sea."},
        ],
    },
]


def test_conversational_preference_pairs_tokenize_as_trls_dpo_trainer(qwen3_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from job.data.formats import ConversationPairs
    from job.data.preference import preference_problem, tokenize_pairs

    path = _write(tmp_path / "pairs.jsonl", PREFERENCES)
    assert load_formatted(path, None, alpaca_check=preference_problem) == ("messages", PREFERENCES)
    tokenizer = load_hf_tokenizer(qwen3_dir)
    ours = tokenize_pairs(PREFERENCES, tokenizer, ConversationPairs(tokenizer.chat_template), 4096)

    model = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False)
    hf = PreTrainedTokenizerFast.from_pretrained(qwen3_dir)
    for pair, entry in zip(ours, PREFERENCES, strict=True):  # one at a time: TRL reads a dataset's shape off its first
        dataset = Dataset.from_list([entry])
        row = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=hf).train_dataset[0]
        prompt = row["prompt_ids"]
        assert (pair.chosen, pair.chosen_start) == (prompt + row["chosen_ids"], len(prompt))
        assert (pair.rejected, pair.rejected_start) == (prompt + row["rejected_ids"], len(prompt))


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"chosen": [USER, ASSISTANT]}, "entry 1: field 'rejected' is missing"),
        ({"prompt": "p", "chosen": [ASSISTANT], "rejected": [ASSISTANT]}, "entry 1: field 'prompt' must be a list"),
        ({"chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "d"}]}, "share no prompt turn"),
        ({"prompt": [USER], "chosen": [ASSISTANT], "rejected": [USER]}, "field 'rejected' has no assistant turn"),
        ({"chosen": [USER, ASSISTANT], "rejected": [USER, USER]}, "field 'rejected' has no assistant turn"),
        ({"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "x", "content": ""}]}, "role 'x' is not"),
    ],
)
def test_a_bad_conversational_pair_is_named_with_its_field(tmp_path, entry, problem):
    from job.data.preference import preference_problem

    path = _write(tmp_path / "pairs.jsonl", [PREFERENCES[0], entry])
    with pytest.raises(DataError, match=re.escape(problem)):
        load_formatted(path, None, alpaca_check=preference_problem)


CORRUPTIONS = {  # a way to spoil a conversation entry, and the words its error must hold
    "role": (lambda e: {"messages": [{"role": "bot", "content": "x"}, *e["messages"]]}, "turn 0: role 'bot'"),
    "empty": (lambda e: {"messages": []}, "field 'messages' is an empty conversation"),
    "no answer": (lambda e: {"messages": [t for t in e["messages"] if t["role"] != "assistant"]}, "no assistant turn"),
    "content": (lambda e: {"messages": [{**e["messages"][0], "content": [1]}]}, "turn 0: content must be a string"),
    "not a list": (lambda e: {"messages": {"role": "user"}}, "field 'messages' must be a list"),
    "other shape": (lambda e: {"text": "plain"}, "is text-shaped but entry 0 is messages-shaped"),
    "no shape": (lambda e: {"conversation": e["messages"]}, "has none of the shapes accepted"),
}


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(1, 30),
    where=st.floats(0, 1, exclude_max=True),
    how=st.sampled_from(sorted(CORRUPTIONS)),
)
def test_any_malformed_entry_is_one_error_naming_it(tmp_path_factory, count, where, how):
    entries = [CONVERSATIONS[i % 2] for i in range(count)]
    bad = max(1, int(where * count)) if how == "other shape" else int(where * count)  # entry 0 sets the shape
    entries.insert(bad, CORRUPTIONS[how][0](CONVERSATIONS[1]))
    path = _write(tmp_path_factory.mktemp("bad") / "d.jsonl", entries)
    with pytest.raises(DataError) as raised:
        load_formatted(path, None)
    message = str(raised.value)
    assert f"entry {bad}" in message and CORRUPTIONS[how][1] in message and "\n" not in message


def test_gpt2_trains_conversations_through_a_chat_template_file(tiny_model_dir, cache, tmp_path, book_data):
    template = tmp_path / "chat.jinja"  # GPT-2 has no template: the user's, its one special token ending turns
    template.write_text(
        "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
        "{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    pairs = [(e["instruction"], e["output"]) for e in book_data[:40]]
    turns = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]
    path = _write(tmp_path / "conv.jsonl", [{"messages": t} for t in turns])
    result = cli(
        "finetune", "--model-dir", tiny_model_dir, "--output", tmp_path / "out", "--chat-template", template,
        "--data", path, "--cache", cache, "--max-steps", "2", "--log-format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    done = [e for e in map(json.loads, result.stdout.splitlines()) if e.get("event") == "finetune_done"]
    assert done and done[0]["steps"] == 2 and done[0]["final_val_loss"] > 0


def test_run_without_a_template_for_conversations_stops_at_preflight(tiny_model_dir, cache, tmp_path):
    path = _write(tmp_path / "conv.jsonl", CONVERSATIONS * 20)
    result = cli(
        "run", "--model-dir", tiny_model_dir, "--data", path, "--cache", cache, "--output", tmp_path / "runs",
        "--run-id", "r", "--skip-judge", "--metrics-port", "0", "--log-format", "json",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and "--chat-template FILE" in result.stderr
    assert not (tmp_path / "runs" / "r").exists()


def test_layout_reads_the_template_before_any_training(qwen3_dir, tmp_path):
    # A template that rewrites the assistant's text, without blocks, is refused when the layout is made (the
    # preflight), not at the first batch; a file mixing text and conversational pairs gets its template.
    from types import SimpleNamespace

    from job.data.formats import layout
    from job.models.chat_template import ChatTemplateError

    tokenizer = load_hf_tokenizer(qwen3_dir)
    rewriting = tmp_path / "upper.jinja"
    rewriting.write_text("{% for m in messages %}{{ m.content | upper }}<|eot_id|>{% endfor %}")
    cfg = SimpleNamespace(chat_template=str(rewriting), train_on="assistant")
    with pytest.raises(ChatTemplateError, match=r"upper.jinja: the chat template changes the assistant turns' text"):
        layout(cfg, "messages", CONVERSATIONS, tokenizer, PROMPT_STYLES["alpaca"])
    mixed = [PAIRS[0], CONVERSATIONAL_PAIRS[0]]
    how = layout(SimpleNamespace(chat_template=None), "prompt-completion", mixed, tokenizer, PROMPT_STYLES["alpaca"])
    assert len(how.examples(mixed, tokenizer, 1024)) == 2


def test_a_chat_template_edited_under_a_checkpoint_is_refused_as_changed_data(
    tiny_model_dir, cache, tmp_path, book_data
):
    """The template decides the tokens and the loss mask: the same path with other bytes is not resumed."""
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
        "{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    turns = [
        [{"role": "user", "content": e["instruction"]}, {"role": "assistant", "content": e["output"]}]
        for e in book_data[:40]
    ]
    path = _write(tmp_path / "conv.jsonl", [{"messages": t} for t in turns])
    args = (
        "finetune", "--model-dir", tiny_model_dir, "--output", tmp_path / "out", "--chat-template", template,
        "--data", path, "--cache", cache, "--checkpoint-every", "1", "--batch-size", "2",
    )  # fmt: skip
    assert cli(*args, "--max-steps", "1").returncode == 0
    template.write_text(template.read_text().replace("{{ m.role }}: ", "{{ m.role }} says: "))
    again = cli(*args, "--max-steps", "2")
    assert again.returncode == 2, again.stderr[-2000:]
    assert "--chat-template" in again.stderr and "changed since" in again.stderr
    assert again.stderr.strip().count("\n") == 0


def _asked(system: dict | None, text: str = "Hi") -> list[dict]:
    return ([system] if system else []) + [{"role": "user", "content": text}]


BRIEF = {"role": "system", "content": "Be brief."}
ANSWER = {"role": "assistant", "content": "Ok."}


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([{"messages": [*_asked(BRIEF, t), ANSWER]} for t in "abc"], "Be brief."),
        ([{"prompt": _asked(BRIEF, t), "chosen": [ANSWER], "rejected": [ANSWER]} for t in "ab"], "Be brief."),
        ([{"chosen": [*_asked(BRIEF), ANSWER], "rejected": [*_asked(BRIEF), USER, ANSWER]}], "Be brief."),
        ([{"prompt": _asked(BRIEF, t), "completion": [ANSWER]} for t in "ab"], "Be brief."),
        ([{"messages": [*_asked(s), ANSWER]} for s in (BRIEF, BRIEF | {"content": "be brief."})], None),
        ([{"messages": [*_asked(s), ANSWER]} for s in (BRIEF, None)], None),
        ([{"messages": [*_asked(None), BRIEF, ANSWER]}], None),
        ([{"messages": [*_asked(s), ANSWER]} for s in (BRIEF | {"content": ""},) * 2], ""),
        (CONVERSATIONS, None),
        (CONVERSATIONAL_PAIRS, None),
        (PAIRS, None),
        (TEXTS, None),
        ([{"instruction": "Say hi.", "input": "", "output": "Hi."}], None),
        ([], None),
    ],
)
def test_the_system_prompt_every_conversation_began_with(entries, expected):
    """The one system prompt all conversations (a pair's or prompt-completion's prompt too) began with; none
    where one begins otherwise, they differ (by a letter's case too), or the entries are not conversations."""
    assert shared_system_prompt(entries) == expected


def test_the_shared_system_prompt_is_read_off_the_entries_that_train(qwen3_dir, tmp_path):
    """An entry the template refuses and ``--skip-invalid`` drops trains nothing: its system prompt has no say in
    the one recorded for the Modelfile's SYSTEM."""
    from types import SimpleNamespace

    from job.data.formats import layout
    from tests.family_folders import CHAT_TEMPLATE

    refusing = tmp_path / "refusing.jinja"
    refusing.write_text(
        "{%- for m in messages %}{%- if 'REFUSE' in m.content %}{{ raise_exception('refused') }}{%- endif %}"
        "{%- endfor %}" + CHAT_TEMPLATE
    )

    def chat(system: str, question: str) -> dict:
        turns = [("system", system), ("user", question), ("assistant", "An answer.")]
        return {"messages": [{"role": role, "content": content} for role, content in turns]}

    entries = [chat("Be brief.", "One?"), chat("Be brief.", "Two?"), chat("Be long.", "REFUSE this")]
    tokenizer = load_hf_tokenizer(qwen3_dir)
    cfg = SimpleNamespace(chat_template=str(refusing), train_on="assistant", skip_invalid=True)
    how = layout(cfg, "messages", entries, tokenizer, PROMPT_STYLES["alpaca"])
    assert how.kept(entries) == entries[:2] and how.system_prompt == "Be brief."
    # the refused one first: dropped as well (the template's assistant turns are read off one it renders)
    first_refused = [entries[2], *entries[:2]]
    assert layout(cfg, "messages", first_refused, tokenizer, PROMPT_STYLES["alpaca"]).kept(first_refused) == entries[:2]
    cfg.skip_invalid = False
    with pytest.raises(DataError, match=r"^entry 0: .*refused.*\(--skip-invalid drops such entries\)$"):
        layout(cfg, "messages", first_refused, tokenizer, PROMPT_STYLES["alpaca"])
    refusing.write_text(CHAT_TEMPLATE)  # nothing refused: the prompts differ, so none is shared
    assert layout(cfg, "messages", entries, tokenizer, PROMPT_STYLES["alpaca"]).system_prompt is None
