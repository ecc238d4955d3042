"""Conversations (``messages``: ``{role, content}`` turns) rendered with a chat template, tokenized, and masked so
that training counts the turns ``--train-on`` names, as ``transformers``' ``apply_chat_template(...,
return_assistant_tokens_mask=True)`` and TRL's ``assistant_only_loss`` count them."""

from __future__ import annotations

import secrets
from bisect import bisect_right
from itertools import accumulate
from pathlib import Path

from job.core.errors import ConfigError
from job.core.parsing import ParseError, read_bounded
from job.models.chat_template import MAX_TEMPLATE_CHARS, ChatTemplate, ChatTemplateError
from job.models.tokenizer import END_OF_TEXT, HFTokenizer, encode, token_bytes

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("assistant", "last", "all")


def turns_problem(turns, name: str, needs_assistant: bool = True) -> str | None:
    """Why ``turns`` (field ``name`` of an entry) is not a conversation we can train on, or None: a non-empty
    list of objects whose ``role`` is system, user or assistant and whose ``content`` is a string."""
    if not isinstance(turns, list):
        return f"field {name!r} must be a list of {{role, content}} turns, got {type(turns).__name__}"
    if not turns:
        return f"field {name!r} is an empty conversation"
    for index, turn in enumerate(turns):
        where = f"field {name!r}: turn {index}"
        if not isinstance(turn, dict):
            return f"{where} is a {type(turn).__name__}, not an object with role and content"
        if turn.get("role") not in ROLES:
            return f"{where}: role {turn.get('role')!r} is not one of {', '.join(ROLES)}"
        if not isinstance(turn.get("content"), str):
            return f"{where}: content must be a string, got {type(turn.get('content')).__name__}"
    if needs_assistant and not any(turn["role"] == "assistant" for turn in turns):
        return f"field {name!r} has no assistant turn to train on"
    return None


def split_last_answer(turns: list[dict]) -> tuple[list[dict], str]:
    """The turns before the last assistant turn (what a model is asked) and that turn's text (the answer)."""
    last = max(i for i, turn in enumerate(turns) if turn["role"] == "assistant")
    return turns[:last], turns[last]["content"]


def load_template_file(path: str | Path, tokenizer) -> ChatTemplate:
    """``--chat-template FILE``: a Jinja chat template, with the tokenizer's end token as ``eos_token`` (and
    ``bos_token`` where the tokenizer names none: GPT-2's one special token is both)."""
    try:
        source = read_bounded(Path(path), 4 * MAX_TEMPLATE_CHARS, f"--chat-template {path}").decode("utf-8")
    except (OSError, ParseError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--chat-template {path} is not a readable UTF-8 Jinja file: {str(exc)[:200]}") from None
    variables = dict(getattr(getattr(tokenizer, "chat_template", None), "variables", None) or {})
    end = END_OF_TEXT if not isinstance(tokenizer, HFTokenizer) else tokenizer.tokenizer.id_to_token(tokenizer.end_id)
    variables = {"bos_token": end, "eos_token": end} | variables
    return ChatTemplate(source.replace("\r\n", "\n").replace("\r", "\n"), variables, f"--chat-template {path}")


def special_tokens(tokenizer) -> set[str]:
    """The special tokens' texts, which a turn's end may be."""
    return set(tokenizer.special) if isinstance(tokenizer, HFTokenizer) else {END_OF_TEXT}


def assistant_spans(template: ChatTemplate, turns: list[dict], specials: set[str]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text and each assistant turn's character span, in order. A template with
    ``{% generation %}`` blocks says them (as transformers reads them); any other, the turn's text as the
    template wrote it and the special token right after it (the turn's end, which the model must learn to say)."""
    if template.marks_generation:
        text, spans = template.render(turns)
        return text, spans
    text, _ = template.render(turns)
    forbidden = "".join(turn["content"] for turn in turns)
    mark = next(m for m in (f"\ue000{secrets.token_hex(8)}\ue001" for _ in iter(int, 1)) if m not in forbidden)
    marked = [
        {**turn, "content": f"{mark}{turn['content']}{mark}"} if turn["role"] == "assistant" else turn for turn in turns
    ]
    pieces = template.render(marked)[0].split(mark)
    if "".join(pieces) != text or len(pieces) != 2 * sum(turn["role"] == "assistant" for turn in turns) + 1:
        raise ChatTemplateError(
            f"{template.where}: the chat template changes the assistant turns' text, so which tokens are the "
            "assistant's cannot be told: give a template that marks them with {% generation %} blocks "
            "(--chat-template FILE; TRL ships such training templates)"
        )
    spans, at = [], 0
    for index, piece in enumerate(pieces[:-1]):
        end = at + len(piece)
        if index % 2:  # an assistant turn's text; its end token after it
            after = pieces[index + 1]
            end += max((len(s) for s in specials if after.startswith(s)), default=0)
            spans.append((at, end))
        at += len(piece)
    return text, spans


def token_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of ``text`` and each token's character span in it (a token of a character's first bytes only
    spans that character)."""
    if isinstance(tokenizer, HFTokenizer):
        encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, list(encoding.offsets)
    ids = encode(tokenizer, text)
    byte_ends = list(accumulate(map(len, token_bytes(tokenizer, ids))))
    if text.isascii():  # a byte per character: the byte spans are the spans (the count below is slow in Python)
        return ids, list(zip([0, *byte_ends][:-1], byte_ends, strict=True))
    char_byte_ends = list(accumulate(len(c.encode("utf-8")) for c in text))  # byte end of each character
    # a token ending inside a character ends at that character's end; one starting inside it starts at its start
    char_end = [min(bisect_right(char_byte_ends, end - 1) + 1, len(text)) for end in byte_ends]
    starts = [0, *byte_ends][:-1]  # none for an empty text
    char_start = [bisect_right(char_byte_ends, start) for start in starts]
    return ids, list(zip(char_start, char_end, strict=True))


def tokens_in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Which tokens overlap any span (transformers' rule for ``assistant_masks``)."""
    mask, span = [False] * len(offsets), 0
    for index, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        mask[index] = end > spans[span][0]
    return mask


def lay_out_conversation(tokenizer, template: ChatTemplate, turns: list[dict], train_on: str):
    """The conversation's ids and which of them training counts (``train_on``: every assistant turn, the
    last one, or every token)."""
    text, spans = assistant_spans(template, turns, special_tokens(tokenizer))
    ids, offsets = token_offsets(tokenizer, text)
    if train_on == "all":
        return ids, [True] * len(ids)
    return ids, tokens_in_spans(offsets, spans[-1:] if train_on == "last" else spans)
