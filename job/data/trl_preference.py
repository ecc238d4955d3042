"""Preference pairs in TRL's standard text shape (``prompt``/``chosen``/``rejected`` strings), beside the book's
(an instruction entry with ``chosen`` and ``rejected``), tokenized as TRL's ``DPOTrainer`` tokenizes them: the
end token's text appended to each response (unless it ends with it), ``prompt + response`` encoded as one text,
and the response scored from where that text's tokens part from the prompt's alone (TRL's
``common_prefix_length``, the smaller of the two), so no token is scored that holds prompt text. The prompt is
used as it is: no prompt style wraps it (TRL's text shape has none)."""

from __future__ import annotations

from job.models.tokenizer import encode

TRL_KEYS = ("prompt", "chosen", "rejected")


def is_trl_text(entry) -> bool:
    """Whether ``entry`` is in TRL's text shape (a ``prompt``, no ``instruction``) rather than the book's; one
    whose ``chosen`` is a list of turns is TRL's conversational shape (job/data/formats.py)."""
    return (
        isinstance(entry, dict)
        and "prompt" in entry
        and "instruction" not in entry
        and not isinstance(entry.get("chosen"), list)
    )


def trl_text_problem(entry: dict) -> str | None:
    """Why a TRL-shaped entry cannot be a preference pair, or None."""
    for name in TRL_KEYS:
        if name not in entry:
            return f"field {name!r} is missing (TRL's preference shape: prompt, chosen and rejected strings)"
        if not isinstance(entry[name], str):
            return f"field {name!r} must be a string, got {type(entry[name]).__name__}"
    return None


def _common_prefix(ids: list[int], other: list[int]) -> int:
    length = 0
    for token, other_token in zip(ids, other, strict=False):
        if token != other_token:
            break
        length += 1
    return length


def trl_pair_ids(tokenizer, entry: dict) -> tuple[list[int], list[int], int]:
    """(prompt + chosen, prompt + rejected, the first scored token of both), each response ending with the
    tokenizer's end token, as TRL's DPOTrainer makes them."""
    end_text = tokenizer.decode([tokenizer.eot_token])
    prompt = encode(tokenizer, entry["prompt"])
    full = []
    for name in ("chosen", "rejected"):
        response = entry[name] if entry[name].endswith(end_text) else entry[name] + end_text
        full.append(encode(tokenizer, entry["prompt"] + response))
    start = min(_common_prefix(prompt, ids) for ids in full)
    return full[0], full[1], start


def prompt_text(style, entry: dict) -> str:
    """What generation would start from for ``entry``: a TRL-shaped entry's prompt as it is, else the style's."""
    return entry["prompt"] if is_trl_text(entry) else style.format_input(entry)
