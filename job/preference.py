"""Preference data for DPO, as the book's ch07/04 makes it: entries with a ``chosen`` and a ``rejected``
response, tokenized as its ``PreferenceDataset``, batched as its ``custom_collate_fn``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from job.data import DataError, PromptStyle, entry_problem
from job.errors import ConfigError
from job.observability import get_logger
from job.tokenizer import END_OF_TEXT_ID

log = get_logger(__name__)
RESPONSE_KEYS = ("chosen", "rejected")


def preference_problem(entry) -> str | None:
    """Why an entry cannot be a preference pair (an instruction entry with both responses as text), or None."""
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


def tokenize_pairs(entries: list[dict], tokenizer, style: PromptStyle, max_length: int) -> list[Pair]:
    """The book's ``PreferenceDataset``: ``f"{prompt}\n\n### Response:\n{response}"`` for each response
    (Alpaca's; the style's layout for others), no end token appended; longer than ``max_length``: cut. A pair
    with no scored token left within ``max_length`` has nothing to compare and is left out (counted)."""
    pairs, truncated, empty = [], 0, 0
    for entry in entries:
        laid = [style.lay_out(tokenizer, entry, entry[k]) for k in RESPONSE_KEYS]
        starts = [style.preference_start(tokenizer, entry, one) for one in laid]
        truncated += max(len(one.ids) for one in laid) + 1 > max_length
        if any(min(len(one.ids), max_length) <= start for one, start in zip(laid, starts, strict=True)):
            empty += 1
            continue
        pairs.append(Pair(laid[0].ids, laid[1].ids, *starts))
    if truncated:
        log.warning("sequences_truncated", count=truncated, max_length=max_length)
    if empty:
        log.warning("pairs_without_response_left_out", count=empty, max_length=max_length)
    return pairs


def fitting_pairs(
    train: list[dict], val: list[dict], tokenizer, style: PromptStyle, limits: tuple[int, int], batch_size: int, source
) -> tuple[list[Pair], list[Pair]]:
    """Each split's pairs that keep a response token within ``limits`` (--allowed-max-length, the model's
    context); a split with none, or fewer training pairs than --batch-size, is one line naming the file, the
    limit and the counts (DPO would stop at its first evaluation, or train no step)."""
    allowed, context = limits
    max_length = min(allowed, context)
    pairs, val_pairs = (tokenize_pairs(split, tokenizer, style, max_length) for split in (train, val))
    limit = f"--allowed-max-length {allowed}" + (f" (the model's context: {context})" if context < allowed else "")
    counts = f"{len(pairs)} of {len(train)} training pairs, {len(val_pairs)} of {len(val)} validation pairs fit"
    if not pairs or not val_pairs:
        split = "training" if not pairs else "validation"
        raise DataError(
            f"preference dataset {source}: no {split} pair keeps a response token within {limit} ({counts}): "
            "raise --allowed-max-length or shorten the entries"
        )
    if len(pairs) < batch_size:
        raise ConfigError(
            f"preference dataset {source}: fewer training pairs than --batch-size {batch_size} within {limit} "
            f"({counts}): use a smaller --batch-size, more data or a larger --allowed-max-length"
        )
    return pairs, val_pairs


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
