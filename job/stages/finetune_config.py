"""``sft-job finetune``'s settings: the training config and finetune's own options."""

from __future__ import annotations

from typing import ClassVar

from pydantic import model_validator

from job.core.errors import ConfigError
from job.core.settings import Settings, positive
from job.training.train_config import TrainConfig


class FinetuneSettings(Settings):
    """What finetuning adds to the training config (``finetune`` and ``run``)."""

    help_section: ClassVar[str] = "Finetune"
    mask_instruction: bool = False
    """Leave the prompt's tokens out of the loss (exercise 7.2)."""
    pad_to_multiple: int | None = None
    """Pad each batch's length up to a multiple of this (16 leaves the book's batches 3 shapes): the same
    loss, fewer shapes for a GPU's kernels and compiled graphs; off (the book's shapes) by default."""
    batched_eval: bool = False
    """Each evaluation's training and validation batches in one forward pass, their per-batch means taken
    from per-token losses (the book's numbers; fewer launches for a GPU, off until measured there)."""
    packing: bool = False
    """Pack the training split's sequences into rows of --pack-length tokens (best-fit decreasing, from --seed),
    each keeping its own positions and attending only to itself: no padding in training's forward passes, the
    same loss. --batch-size then counts packed rows, tokens_seen real tokens, and the training-loss estimate is
    taken on packed rows. Needs --data-order seeded; not with --dpo."""
    pack_length: int | None = None
    """Tokens per packed row with --packing (default: --allowed-max-length, capped at the model's context; more than
    the context is exit 2)."""

    @model_validator(mode="after")
    def _check_finetune(self):
        if self.pack_length is not None:
            positive(self, "pack_length")
            if not self.packing:
                raise ConfigError(f"--pack-length {self.pack_length} needs --packing")
        if self.packing and self.data_order == "book":  # TrainSettings': every class composing this one has it
            raise ConfigError(
                "--packing and --data-order book cannot go together: the book's draws are of padded batches; "
                "add --data-order seeded"
            )
        if self.pad_to_multiple is not None:
            positive(self, "pad_to_multiple")
            limit = self.allowed_max_length  # DataConfig's: every class that composes this one composes it
            if self.pad_to_multiple > limit:
                raise ConfigError(f"pad_to_multiple {self.pad_to_multiple} must be at most allowed_max_length {limit}")
        return self


class FinetuneConfig(FinetuneSettings, TrainConfig):
    """``sft-job finetune``: the book's recipe (section 7.6) on accelerate, resumable."""
