"""Preference data for DPO, as the book's ch07/04 makes it: entries with a ``chosen`` and a ``rejected``
response, tokenized as its ``PreferenceDataset``, batched as its ``custom_collate_fn``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from job.core.errors import ConfigError
from job.core.observability import get_logger
from job.data.instructions import DataError, Laid, PromptStyle, entry_problem
from job.data.trl_preference import is_trl_text, trl_pair_ids, trl_text_problem
from job.models.tokenizer import END_OF_TEXT_ID

log = get_logger(__name__)
RESPONSE_KEYS = ("chosen", "rejected")


def preference_problem(entry) -> str | None:
    """Why an entry cannot be a preference pair (an instruction entry with both responses as text, or TRL's
    prompt, chosen and rejected), or None."""
    if is_trl_text(entry):
        return trl_text_problem(entry)
    problem = entry_problem(entry)
    if problem is not None:
        return problem
    for name in RESPONSE_KEYS:
        if name not in entry:
            return f"field {name!r} is missing (preference data needs chosen and rejected responses)"
        if not isinstance(entry[name], str):
            return f"field {name!r} must be a string, got {type(entry[name]).__name__}"
    return None


@dataclass
class Pair:
    """One entry's token ids, prompt + response header + each response, and the first token of each that
    DPO scores (the style's ``preference_start``: the response's first; Alpaca's, the book's)."""

    chosen: list[int]
    rejected: list[int]
    chosen_start: int
    rejected_start: int


@dataclass
class Tokenized:
    """A split's pairs and those it left out: an empty chosen or rejected response (a style that scores from
    the response's first token has nothing to score), or no response token within the length limit; and how
    many kept pairs have chosen identical to rejected (nothing for DPO to prefer)."""

    pairs: list[Pair]
    empty: int = 0
    too_long: int = 0
    identical: int = 0


def tokenize_split(entries: list[dict], tokenizer, style: PromptStyle, max_length: int) -> Tokenized:
    """``tokenize_pairs`` with what it left out counted (each count logged once, where not 0)."""
    out, truncated = Tokenized([]), 0
    for entry in entries:
        if is_trl_text(entry):  # TRL's own tokenization: no prompt style, an end token after each response
            chosen, rejected, start = trl_pair_ids(tokenizer, entry)
            laid, starts = [Laid(chosen, start), Laid(rejected, start)], [start, start]
        else:
            laid = [style.lay_out(tokenizer, entry, entry[k]) for k in RESPONSE_KEYS]
            starts = [style.preference_start(tokenizer, entry, one) for one in laid]
        truncated += max(len(one.ids) for one in laid) + 1 > max_length
        if any(len(one.ids) <= start for one, start in zip(laid, starts, strict=True)):
            out.empty += 1
        elif any(max_length <= start for start in starts):
            out.too_long += 1
        else:
            out.pairs.append(Pair(laid[0].ids, laid[1].ids, *starts))
            out.identical += laid[0].ids[:max_length] == laid[1].ids[:max_length]
    if truncated:
        log.warning("sequences_truncated", count=truncated, max_length=max_length)
    if out.empty or out.too_long:
        left_out = {"empty_response": out.empty, "too_long": out.too_long}
        log.warning(
            "pairs_without_response_left_out", count=out.empty + out.too_long, **left_out, max_length=max_length
        )
    if out.identical:
        log.warning("identical_pairs", count=out.identical, pairs=len(out.pairs))
    return out


def tokenize_pairs(entries: list[dict], tokenizer, style: PromptStyle, max_length: int) -> list[Pair]:
    """The book's ``PreferenceDataset``: ``f"{prompt}\n\n### Response:\n{response}"`` for each response
    (Alpaca's; the style's layout for others), no end token appended; longer than ``max_length``: cut. A pair
    with no scored token left within ``max_length`` has nothing to compare and is left out (counted)."""
    return tokenize_split(entries, tokenizer, style, max_length).pairs


def fitting_pairs(
    train: list[dict], val: list[dict], tokenizer, style: PromptStyle, limits: tuple[int, int], batch_size: int, source
) -> tuple[list[Pair], list[Pair]]:
    """Each split's pairs that keep a response token within ``limits`` (--allowed-max-length, the model's
    context); a split with none, fewer training pairs than --batch-size, or only training pairs whose chosen
    is their rejected, is one line naming the file, the limit and the counts (DPO would stop at its first
    evaluation, train no step, or learn nothing)."""
    allowed, context = limits
    max_length = min(allowed, context)
    tokenized = [tokenize_split(split, tokenizer, style, max_length) for split in (train, val)]
    pairs, val_pairs = (t.pairs for t in tokenized)
    limit = f"--allowed-max-length {allowed}" + (f" (the model's context: {context})" if context < allowed else "")
    counts = f"{len(pairs)} of {len(train)} training pairs, {len(val_pairs)} of {len(val)} validation pairs fit"
    if not pairs or not val_pairs:
        split, left = ("training", tokenized[0]) if not pairs else ("validation", tokenized[1])
        raise DataError(f"preference dataset {source}: {_none_left(split, left, style.name, limit, counts)}")
    longer = " or a larger --allowed-max-length" if tokenized[0].too_long else ""
    if len(pairs) < batch_size:
        raise ConfigError(
            f"preference dataset {source}: fewer training pairs than --batch-size {batch_size} within {limit} "
            f"({counts}): use a smaller --batch-size, more data{longer}"
        )
    if tokenized[0].identical == len(pairs):
        raise DataError(
            f"preference dataset {source}: every one of its {len(pairs)} training pairs has the same chosen and "
            "rejected response: DPO has nothing to prefer (the loss stays ln 2); give each pair two different responses"
        )
    return pairs, val_pairs


def _none_left(split: str, left: Tokenized, style: str, limit: str, counts: str) -> str:
    """Why no pair of ``split`` is left, each cause with its count, and only the fixes that help."""
    if not left.empty:
        fix = "raise --allowed-max-length or shorten the entries"
        return f"no {split} pair keeps a response token within {limit} ({counts}): {fix}"
    causes = (
        f"{left.empty} with an empty chosen or rejected response (--prompt-style {style} scores the response alone)"
    )
    fixes = "give every pair a non-empty chosen and rejected response"
    if left.too_long:
        causes += f", {left.too_long} with no response token within {limit}"
        fixes += ", and raise --allowed-max-length or shorten the entries"
    return f"no {split} pair has a response token to score ({counts}; left out: {causes}): {fixes}"


def collate_pairs(
    pairs: list[Pair], max_length: int, end_id: int = END_OF_TEXT_ID
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected, chosen_mask, rejected_mask), each (B, T): both padded with end-of-text to the
    batch's longest chosen-or-rejected + 1; a mask is False on padding and before the pair's scored start
    (Alpaca's: the prompt's tokens + 2, the book's); all cut to ``max_length``."""
    width = max(max(len(p.chosen), len(p.rejected)) + 1 for p in pairs)
    out: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": [], "chosen_mask": [], "rejected_mask": []}
    for pair in pairs:
        for key in RESPONSE_KEYS:
            sequence = getattr(pair, key)
            mask = torch.ones(width, dtype=torch.bool)
            mask[len(sequence) :] = False
            mask[: getattr(pair, f"{key}_start")] = False
            out[key].append(torch.tensor(sequence + [end_id] * (width - len(sequence))))
            out[f"{key}_mask"].append(mask)
    chosen, rejected, chosen_mask, rejected_mask = (torch.stack(out[k])[:, :max_length] for k in out)
    return chosen, rejected, chosen_mask, rejected_mask
