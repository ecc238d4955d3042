"""Packing without padding (``--packing``): the training split's sequences laid end to end into rows of
``--pack-length`` tokens by best-fit decreasing (TRL's default ``bfd`` strategy), each keeping its own
positions (restarting at 0) and a document id per token, so the model's block-diagonal causal mask lets
it attend only to itself. Each sequence's inputs and targets are exactly those the book's collate gives it
alone, so a packed row's loss is that of the same sequences padded.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from job.core.errors import ConfigError
from job.data.instructions import IGNORE_INDEX, Collator, Example, collate

PADDING_DOCUMENT = -1
"""The document id of a row's padding (after its last sequence): it attends only to padding."""


def best_fit_decreasing(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """A partition of ``range(len(lengths))`` into rows whose lengths sum to at most ``capacity``: longest
    first, each into the fullest row it still fits (a new row where none does). Sequences of equal length
    are taken in an order drawn from ``seed``, so the rows depend on the seed and on nothing else."""
    too_long = [i for i, n in enumerate(lengths) if n > capacity or n <= 0]
    if too_long:
        i = too_long[0]
        raise ValueError(f"sequence {i} of {lengths[i]} tokens does not fit a row of {capacity}")
    drawn = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    order = sorted(drawn, key=lambda i: -lengths[i])  # stable: ties keep the seed's order
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the first with room >= n fits best
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            room, row = capacity - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= lengths[i]
        if room:
            bisect.insort(free, (room, row))
    return rows


def checked_pack_length(pack_length: int | None, examples: list[Example], max_length: int, context: int) -> int:
    """The rows' length (--pack-length, else the sequences' longest allowed ``max_length``): at most the model's
    ``context``, and room for the longest training sequence (cut to ``max_length``), else a ConfigError naming
    the value that works. The finetune stage and the run's preflight both ask it."""
    pack_length = pack_length or max_length
    if pack_length > context:
        raise ConfigError(f"--pack-length {pack_length} is more than the model's context of {context} tokens")
    lengths = [min(len(e.token_ids), max_length) for e in examples]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] > pack_length:
        raise ConfigError(
            f"--pack-length {pack_length} is shorter than training entry {longest} ({lengths[longest]} tokens): "
            f"use --pack-length {lengths[longest]} or more, or cut sequences with --allowed-max-length {pack_length}"
        )
    return pack_length


@dataclass(frozen=True)
class PackedBatch:
    """Rows of packed sequences, each (R, T): token ids, the book's targets (-100 where not counted), each
    token's position within its own sequence, and its sequence's index in the row (padding: -1)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    documents: torch.Tensor

    def to(self, device) -> PackedBatch:
        return PackedBatch(*(t.to(device) for t in (self.inputs, self.targets, self.positions, self.documents)))


class Packer:
    """The training split packed once (from the seed) into rows, and a batch of rows laid out as tensors
    with the run's collate settings (truncation, the prompt's mask, the end token, ``pad_to_multiple``)."""

    def __init__(self, examples: list[Example], collator: Collator, pack_length: int, seed: int):
        self.examples, self.collator, self.pack_length = examples, collator, pack_length
        self.lengths = [min(len(e.token_ids), collator.allowed_max_length) for e in examples]
        self.rows = best_fit_decreasing(self.lengths, pack_length, seed)

    def row_tokens(self, row: int) -> int:
        """The real (not padding) tokens of packed row ``row``."""
        return sum(self.lengths[i] for i in self.rows[row])

    def sequence(self, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of one example, each (L,): the book's collate of it alone."""
        c = self.collator
        prompts = [example.prompt_length] if c.mask_instruction else None
        x, y = collate([example.token_ids], c.end_id, allowed_max_length=c.allowed_max_length, prompt_lengths=prompts)
        return x[0], y[0]

    def __call__(self, rows: list[int]) -> PackedBatch:
        laid = [self.lay_row(self.rows[r]) for r in rows]
        width = max(len(x) for x, _, _, _ in laid)
        if self.collator.pad_to_multiple:  # rounded up, as the padded batches are, within the row's length
            width = max(width, min(width + -width % self.collator.pad_to_multiple, self.pack_length))
        pads = (self.collator.end_id, IGNORE_INDEX, 0, PADDING_DOCUMENT)
        columns = zip(*laid, strict=True)  # inputs, targets, positions, documents: a tuple of rows each
        padded = [
            torch.stack([F.pad(t, (0, width - len(t)), value=pad) for t in column])
            for column, pad in zip(columns, pads, strict=True)
        ]
        return PackedBatch(*padded)

    def lay_row(self, members: list[int]) -> tuple[torch.Tensor, ...]:
        """A row's (inputs, targets, positions, documents), each (L,), its sequences end to end."""
        pieces = [self.sequence(self.examples[i]) for i in members]
        inputs = torch.cat([x for x, _ in pieces])
        targets = torch.cat([y for _, y in pieces])
        positions = torch.cat([torch.arange(len(x)) for x, _ in pieces])
        documents = torch.cat([torch.full((len(x),), d) for d, (x, _) in enumerate(pieces)])
        return inputs, targets, positions, documents
