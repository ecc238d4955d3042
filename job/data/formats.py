"""A dataset's format: told from its entries' keys (every entry must agree) or named with ``--data-format``;
each format's check of an entry, and its entries made into training examples: ``alpaca`` (the book's, through
its prompt styles, unchanged), ``messages`` (conversations through a chat template, job/data/conversation.py),
``prompt-completion`` (the loss on the completion only, as TRL's ``completion_only_loss``) and ``text`` (every
token trained)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from job.core.errors import ConfigError
from job.core.observability import get_logger
from job.data.conversation import (
    assistant_spans,
    lay_out_conversation,
    load_template_file,
    special_tokens,
    split_last_answer,
    turns_problem,
)
from job.data.instructions import DataError, Example, Laid, PromptStyle, entry_problem, tokenize
from job.data.preference import preference_problem
from job.models.chat_template import ChatTemplate, ChatTemplateError, TemplateRefusal
from job.models.tokenizer import encode

log = get_logger(__name__)
FORMATS = ("alpaca", "messages", "prompt-completion", "text")
TRAINS = {
    "alpaca": "the book's: every token, or the response alone with --mask-instruction",
    "messages": "the turns --train-on names",
    "prompt-completion": "the completion trains",
    "text": "every token trains",
}
SHAPES = (
    "alpaca (instruction, output), messages (a list of role/content turns), prompt-completion (prompt, completion), "
    "text (text)"
)


def entry_format(entry) -> str | None:
    """The format an entry's keys say, or None."""
    if not isinstance(entry, dict):
        return None
    if "messages" in entry or isinstance(entry.get("chosen"), list):  # TRL's conversational preference pairs too
        return "messages"
    if "prompt" in entry and "chosen" in entry:  # TRL's text preference pairs: the book's pair path reads them
        return "alpaca"
    if "prompt" in entry and "completion" in entry:
        return "prompt-completion"
    if "instruction" in entry or "output" in entry:  # the book's, a field short: its check names the field
        return "alpaca"
    if "text" in entry:
        return "text"
    return None


def detect_format(entries: list, path: Path) -> str:
    """The one format all of ``entries`` have; a mixed file is a DataError naming the first entry that differs."""
    first = entry_format(entries[0])
    for index, entry in enumerate(entries):
        found = entry_format(entry)
        if found is None:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DataError(f"dataset {path}: entry {index} ({keys}) has none of the shapes accepted: {SHAPES}")
        if found != first:
            raise DataError(
                f"dataset {path}: entry {index} is {found}-shaped but entry 0 is {first}-shaped: a dataset holds one "
                "format (--data-format names it)"
            )
    return first


def pair_problem(entry: dict) -> str | None:
    """A prompt-completion entry's problem: both text, or the prompt turns and the completion assistant turns."""
    prompt, completion = entry["prompt"], entry["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return None
    if isinstance(prompt, str) or isinstance(completion, str):
        return "fields 'prompt' and 'completion' must both be text or both be lists of turns"
    problem = turns_problem(prompt, "prompt", needs_assistant=False) or turns_problem(completion, "completion")
    if problem is None and any(turn["role"] != "assistant" for turn in completion):
        return "field 'completion' must hold assistant turns only"
    return problem


def pair_turns_problem(entry: dict) -> str | None:
    """A conversational preference pair's problem (TRL's shapes): ``chosen`` and ``rejected`` conversations
    after an explicit ``prompt`` (turns) or sharing their first turns as the prompt; each with an answer."""
    for name in ("chosen", "rejected"):
        if name not in entry:
            return f"field {name!r} is missing (preference data needs chosen and rejected responses)"
    if "prompt" in entry:
        problem = turns_problem(entry["prompt"], "prompt", needs_assistant=False)
        if problem is not None:
            return problem
    for name in ("chosen", "rejected"):
        problem = turns_problem(entry[name], name)
        if problem is not None:
            return problem
    prompt, chosen, rejected = explicit_pair(entry)
    if not prompt:
        return "fields 'chosen' and 'rejected' share no prompt turn (give a 'prompt' field, or begin both with it)"
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not any(turn["role"] == "assistant" for turn in answer):
            return f"field {name!r} has no assistant turn after the prompt"
    return None


def explicit_pair(entry: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) turns: the entry's own prompt, else the turns chosen and rejected share from
    their start (TRL's ``extract_prompt``)."""
    if "prompt" in entry:
        return entry["prompt"], entry["chosen"], entry["rejected"]
    chosen, rejected = entry["chosen"], entry["rejected"]
    shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b), None)
    shared = min(len(chosen), len(rejected)) - 1 if shared is None else shared  # the same turns: last is the answer
    return chosen[:shared], chosen[shared:], rejected[shared:]


def format_problem(data_format: str, entry, alpaca_check=entry_problem) -> str | None:
    """Why ``entry`` is not a usable entry of ``data_format`` (naming the field), or None."""
    if data_format == "alpaca":
        return alpaca_check(entry)
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    if alpaca_check is preference_problem and data_format == "messages":  # DPO's pairs in TRL's shapes
        return pair_turns_problem(entry)
    needed = {"messages": ("messages",), "prompt-completion": ("prompt", "completion"), "text": ("text",)}
    for name in needed[data_format]:
        if name not in entry:
            return f"field {name!r} is missing ({data_format} entries have {', '.join(needed[data_format])})"
    if data_format == "messages":
        return turns_problem(entry["messages"], "messages")
    if data_format == "text":
        text = entry["text"]
        return None if isinstance(text, str) else f"field 'text' must be a string, got {type(text).__name__}"
    return pair_problem(entry)


def load_formatted(path: Path, data_format: str | None, skip_invalid: bool = False, alpaca_check=entry_problem):
    """The dataset's format and its entries, each checked (a bad one is a DataError naming it and its field);
    alpaca entries as ``load_entries`` gives them (``input`` filled in as ""). The sources' reading of one
    file, which every stage uses (``job/data/sources.py`` builds on this module, hence the late import)."""
    from job.data.sources import checked_entries, read_rows

    return checked_entries(path, read_rows(path), skip_invalid, alpaca_check, data_format=data_format)


@dataclass(frozen=True)
class Layout:
    """How a run's entries become examples: the format, the book's prompt style (alpaca), the chat template
    (messages, and prompt-completion's turns) and which turns train."""

    data_format: str
    style: PromptStyle
    template: ChatTemplate | None
    train_on: str = "assistant"
    system_prompt: str | None = None
    """The system prompt every conversation began with, where they all shared one (``shared_system_prompt``)."""
    refused: frozenset[int] = frozenset()
    """The entries (their ``id``) the template refused, which ``--skip-invalid`` drops: ``kept`` leaves them out."""

    def kept(self, entries: list[dict]) -> list[dict]:
        """``entries`` without those the template refused (all of them, unless ``--skip-invalid`` dropped some)."""
        return [e for e in entries if id(e) not in self.refused] if self.refused else entries

    def examples(self, entries: list[dict], tokenizer, max_length: int, split: str = "training", source="") -> list:
        """Every entry tokenized; one with nothing to train within ``max_length`` is left out (and counted, naming
        the ``split``); a split left with none is a DataError naming it and its file, ``source``."""
        entries = self.kept(entries)
        if self.data_format == "alpaca":
            return tokenize(entries, tokenizer, self.style, max_length)
        examples = [self.example(entry, tokenizer) for entry in entries]
        kept = [e for e in examples if any(e.trained[1 : max_length + 1])]
        if len(kept) < len(examples):
            left_out, of = len(examples) - len(kept), len(examples)
            log.warning("examples_without_trained_tokens", split=split, count=left_out, of=of, max_length=max_length)
        if not kept:
            raise DataError(
                f"dataset {source}: none of the {len(examples)} {self.data_format} entries of its {split} split has a "
                f"token to train on within --allowed-max-length {max_length}: raise it or shorten those entries"
            )
        return kept

    def example(self, entry: dict, tokenizer) -> Example:
        """One entry's ids and which of them train (the appended end token last: the book's collate adds it)."""
        if self.data_format == "messages":
            ids, mask = lay_out_conversation(tokenizer, self.template, entry["messages"], self.train_on)
            return _example(ids, [*mask, False])  # the template's own end token closed the turn
        if self.data_format == "text":
            ids = encode(tokenizer, entry["text"])
            return _example(ids, [True] * (len(ids) + 1))
        prompt, completion = entry["prompt"], entry["completion"]
        if isinstance(prompt, str):  # TRL appends the end token to a text completion, and trains it
            prompt_ids, ids = encode(tokenizer, prompt), encode(tokenizer, prompt + completion)
            start = _common_prefix(prompt_ids, ids)
            return _example(ids, [i >= start for i in range(len(ids))] + [True])
        prompt_ids = encode(tokenizer, self.template.prompt(prompt))
        ids = encode(tokenizer, self.template.render(prompt + completion)[0])
        start = _common_prefix(prompt_ids, ids)
        return _example(ids, [i >= start for i in range(len(ids))] + [False])

    def prompt(self, entry: dict) -> str:
        """What a model is asked (generation, the epoch's sample): the prompt, or the conversation up to its
        last assistant turn with the template's generation prompt after it."""
        if self.data_format == "alpaca":
            return self.style.format_input(entry)
        if self.data_format == "text":
            return entry["text"][: len(entry["text"]) // 2]
        if self.data_format == "messages":
            return self.template.prompt(split_last_answer(entry["messages"])[0])
        prompt = entry["prompt"]
        return prompt if isinstance(prompt, str) else self.template.prompt(prompt)


def transcript(turns: list[dict]) -> str:
    """Turns as text a reader (and the judge) reads: ``role: content``, a blank line between turns."""
    return "\n\n".join(f"{turn['role']}: {turn['content']}" for turn in turns)


def as_book_entry(data_format: str, entry: dict) -> dict:
    """The entry with the book's fields that generate, the judge and the report read: ``instruction`` what the
    model is asked (a conversation's turns before its last answer, shown as a transcript), ``output`` the
    expected answer (the last assistant turn, the completion, a text's second half); its own fields kept.
    A book entry is itself."""
    if data_format == "alpaca":
        return entry
    if data_format == "messages":
        asked, answer = split_last_answer(entry["messages"])
        asked = transcript(asked)
    elif data_format == "text":
        half = len(entry["text"]) // 2
        asked, answer = entry["text"][:half], entry["text"][half:]
    else:
        prompt, completion = entry["prompt"], entry["completion"]
        asked = prompt if isinstance(prompt, str) else transcript(prompt)
        answer = completion if isinstance(completion, str) else "\n\n".join(t["content"] for t in completion)
    return {"instruction": asked, "input": "", "output": answer, **entry}


def _common_prefix(a: list[int], b: list[int]) -> int:
    """TRL's ``common_prefix_length``: the completion starts where the two tokenizations part."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _example(ids: list[int], trained: list[bool]) -> Example:
    first = next((i for i, t in enumerate(trained) if t), len(ids))
    return Example(ids, max(first, 1), trained)


def needs_template(data_format: str, entries: list[dict]) -> bool:
    """Whether the entries are conversations, which only a chat template renders."""
    if data_format == "messages":
        return True
    return data_format == "prompt-completion" and any(not isinstance(e["prompt"], str) for e in entries)


def layout(
    cfg, data_format: str, entries: list[dict], tokenizer, style: PromptStyle, origin=None, pairs: bool = False
) -> Layout:
    """The run's layout: a conversation's template is ``--chat-template FILE``, else the model's own; neither
    is a ConfigError (exit 2). Every entry is rendered as the stages will render it, so an entry the template
    refuses is a DataError here, at preflight, named by ``origin(entry)`` (its file and row). Outside DPO's
    ``pairs`` (whose options are the run's, given for its finetune), an option this data does not use is a
    ConfigError."""
    template = None
    if needs_template(data_format, entries):
        if getattr(cfg, "chat_template", None):
            template = load_template_file(cfg.chat_template, tokenizer)
        else:
            template = getattr(tokenizer, "chat_template", None)
        if template is None:
            raise ConfigError(
                f"{data_format} data needs a chat template, which this model's tokenizer lacks (GPT-2's has none): "
                "give one with --chat-template FILE (a Jinja file)"
            )
    how = Layout(data_format, style, template, getattr(cfg, "train_on", "assistant"))
    if not pairs:
        check_unused_options(cfg, how)
    if template is not None:
        check_spans_readable(template, entries, special_tokens(tokenizer))
        skip = getattr(cfg, "skip_invalid", False)
        refused = check_renders(template, entries, special_tokens(tokenizer), origin, skip)
        how = replace(how, refused=frozenset(map(id, refused)))
        # of the entries that train: one --skip-invalid dropped has no say in the Modelfile's SYSTEM
        how = replace(how, system_prompt=shared_system_prompt(how.kept(entries)))
    return how


def check_spans_readable(template: ChatTemplate, entries: list[dict], specials: set[str]) -> None:
    """A template we cannot read the assistant's tokens from fails here, at preflight, naming the template: on the
    first conversation it does not refuse (those it refuses are ``check_renders``'s to name or drop)."""
    for entry in (e for e in entries if "messages" in e):
        try:
            assistant_spans(template, entry["messages"], specials)
        except TemplateRefusal:
            continue
        return


def check_unused_options(cfg, how: Layout, template_used_elsewhere: bool = False) -> None:
    """A ``--train-on`` other than the default on data that is not conversations, or a ``--chat-template`` that
    lays nothing out (alpaca, text, prompt-completion text: the flag would change nothing, silently), is a
    ConfigError (exit 2) naming the flag and the formats it applies to."""
    train_on = getattr(cfg, "train_on", "assistant")
    if train_on != "assistant" and how.data_format != "messages":
        raise ConfigError(
            f"--train-on {train_on} applies to messages data (conversations' turns); this dataset is "
            f"{how.data_format} data, which it would not change ({TRAINS[how.data_format]}): leave it out"
        )
    given = getattr(cfg, "chat_template", None)
    if given and how.template is None and not template_used_elsewhere:
        raise ConfigError(
            f"--chat-template {given} applies to conversations (messages data, prompt-completion and preference "
            f"pairs of turns); this dataset is {how.data_format} data, which it would not change"
            f"{' (--prompt-style lays out alpaca entries)' if how.data_format == 'alpaca' else ''}: leave it out"
        )


def renderings(entry: dict) -> list[tuple[list[dict], bool]]:
    """Each (turns, add_generation_prompt) a stage renders of a conversational entry: training's whole
    conversation, generation's prompt; a preference pair's prompt and both of its conversations."""
    if isinstance(entry.get("chosen"), list):
        prompt, chosen, rejected = explicit_pair(entry)
        return [(prompt, True), (prompt + chosen, False), (prompt + rejected, False)]
    if isinstance(entry.get("prompt"), list):
        return [(entry["prompt"], True), (entry["prompt"] + entry["completion"], False)]
    return []


def shared_system_prompt(entries: list[dict]) -> str | None:
    """The system prompt every conversation (its first turn: a preference pair's or prompt-completion's prompt)
    began with, where all began with the same one; None where any begins otherwise, is text, or they differ."""
    firsts = {_first_turn(entry) for entry in entries}
    if len(firsts) != 1:
        return None
    first = firsts.pop()
    return first[1] if first is not None and first[0] == "system" else None


def _first_turn(entry: dict) -> tuple[str, str] | None:
    turns = entry["messages"] if "messages" in entry else next(iter(renderings(entry)), ([], False))[0]
    return (turns[0]["role"], turns[0]["content"]) if turns else None


def check_renders(
    template: ChatTemplate, entries: list[dict], specials: set[str], origin=None, skip_invalid: bool = False
) -> list[dict]:
    """Every entry through the template (a template may refuse one: ``raise_exception``, e.g. on turns that do
    not alternate user/assistant); the first refused is a DataError naming its file, row and the template's
    message (``origin(entry)``; without it, the entry's place in ``entries``). With ``skip_invalid`` the refused
    are returned instead, counted in a warning as the entries the other checks drop are."""
    refused = []
    for index, entry in enumerate(entries):
        try:
            if "messages" in entry:
                assistant_spans(template, entry["messages"], specials)
                template.prompt(split_last_answer(entry["messages"])[0])
            for turns, ask in renderings(entry):
                template.render(turns, add_generation_prompt=ask)
        except ChatTemplateError as exc:
            where = origin(entry) if origin else f"entry {index}"
            if not skip_invalid:
                raise DataError(f"{where}: {exc} (--skip-invalid drops such entries)") from None
            if not refused:
                first = f"{where}: {exc}"
            refused.append(entry)
    if refused:
        log.warning("dataset_entries_skipped", count=len(refused), reason="the chat template refused them", first=first)
    return refused


@dataclass(frozen=True)
class ConversationPairs:
    """DPO's layout of conversational pairs, as TRL's ``DPOTrainer`` tokenizes them: the prompt rendered with
    the generation prompt, each of prompt + chosen and prompt + rejected rendered whole, and the scored tokens
    from where the prompt's tokens and either pair's first part ways (``preference_start``). It stands where
    the book's pairs have a prompt style (job/data/preference.py asks it the same)."""

    template: ChatTemplate
    name: str = "messages"

    def format_input(self, entry: dict) -> str:
        return self.template.prompt(explicit_pair(entry)[0])

    def _ids(self, tokenizer, entry: dict, response: list[dict]) -> tuple[list[int], list[int]]:
        """The prompt's ids and those of the prompt and ``response`` (the entry's chosen or rejected turns)."""
        prompt = explicit_pair(entry)[0]
        answer = response if "prompt" in entry else response[len(prompt) :]
        prompt_ids = encode(tokenizer, self.template.prompt(prompt))
        return prompt_ids, encode(tokenizer, self.template.render(prompt + answer)[0])

    def lay_out(self, tokenizer, entry: dict, response: list[dict]) -> Laid:
        prompt_ids, ids = self._ids(tokenizer, entry, response)
        return Laid(ids, _common_prefix(prompt_ids, ids))

    def preference_start(self, tokenizer, entry: dict, laid: Laid) -> int:
        """Where both of the pair's sequences still agree with the prompt's tokens (TRL's ``prompt_len``)."""
        return min(_common_prefix(*self._ids(tokenizer, entry, entry[key])) for key in ("chosen", "rejected"))


def pair_style(how: Layout):
    """What DPO lays its pairs out with: the book's prompt style, or the conversations' template."""
    return ConversationPairs(how.template) if how.data_format == "messages" else how.style
