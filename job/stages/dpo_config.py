"""``sft-job dpo``'s settings, and ``sft-job run --dpo``'s (the same options, named dpo_*)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from job.core.errors import ConfigError
from job.core.settings import Settings, check_s3_key, option, positive
from job.data.book_datasets import DATASETS
from job.training.train_config import TrainConfig

PREFERENCE_DATA = DATASETS["preferences"].url  # the book's preference data (ch07/04)


class DPOConfig(TrainConfig):
    """``sft-job dpo``: preference tuning with DPO as the book's ch07/04, from the finetuned model."""

    help_section: ClassVar[str] = "DPO"
    stage: ClassVar[str] = "dpo"
    data: str = PREFERENCE_DATA
    """Preference dataset (entries with chosen and rejected responses): a local JSON/JSON Lines file, an
    http(s):// URL (fetched into the cache) or s3://bucket/key; the book's by default."""
    prompt_style: Literal["alpaca", "phi3", "chat"] | None = None
    """Prompt template: the book's Alpaca text, Phi-3's (exercise 7.1), or chat: the model's own chat template
    (chat_template.jinja, else tokenizer_config.json's); by default the one the model was finetuned with (saved
    in its config.json), else alpaca. One that differs from the recorded one is used, with a warning."""
    output: str = option("runs/dpo", operational=True)
    """Folder the model, losses, plots, checkpoints and resolved config are written to."""
    epochs: int = 1
    """Passes over the training split (the book's 1: DPO is prone to collapse)."""
    lr: float = 5e-6
    """AdamW learning rate (the book's 5e-6)."""
    weight_decay: float = 0.01
    """AdamW weight decay (the book's 0.01)."""
    beta: float = 0.1
    """How far the policy may move from the reference (the book's 0.1; larger keeps it closer)."""
    logprob_reduction: Literal["mean", "sum"] = "mean"
    """A response's log-probability: the mean over its tokens (the book's) or their sum (TRL's and the DPO
    paper's)."""

    @model_validator(mode="after")
    def _check_dpo(self):
        positive(self, "beta")
        if self.train_on != "assistant":  # a pair trains on its responses whatever its shape: never silent
            raise ConfigError(
                f"--train-on {self.train_on} applies to finetune's messages data; DPO trains on each pair's "
                "chosen and rejected responses, which it would not change: leave it out"
            )
        return self


class DPOSettings(Settings):
    """The DPO stage of ``sft-job run --dpo``: the options whose names finetune already uses, for DPO
    (every other training option is the same for both stages)."""

    help_section: ClassVar[str] = "DPO"
    dpo: bool = False
    """Preference-tune the finetuned model with DPO (the book's ch07/04) before generating; generate and judge
    then read the DPO model."""
    dpo_data: str = option(PREFERENCE_DATA, feeds=("dpo", "data"))
    """Preference dataset for --dpo (chosen and rejected responses): a local file, an http(s):// URL or
    s3://bucket/key; the book's by default."""
    dpo_epochs: int = option(1, feeds=("dpo", "epochs"))
    """Passes over the preference data (the book's 1)."""
    dpo_lr: float = option(5e-6, feeds=("dpo", "lr"))
    """DPO's AdamW learning rate (the book's 5e-6)."""
    dpo_weight_decay: float = option(0.01, feeds=("dpo", "weight_decay"))
    """DPO's AdamW weight decay (the book's 0.01)."""
    dpo_beta: float = option(0.1, feeds=("dpo", "beta"))
    """DPO's beta (the book's 0.1)."""
    dpo_logprob_reduction: Literal["mean", "sum"] = option("mean", feeds=("dpo", "logprob_reduction"))
    """A response's log-probability for DPO: the mean over its tokens (the book's) or their sum (TRL's)."""

    @model_validator(mode="after")
    def _check_run_dpo(self):
        positive(self, "dpo_epochs", "dpo_lr", "dpo_beta")
        if self.dpo_weight_decay < 0:
            raise ConfigError(f"dpo_weight_decay must be >= 0, got {self.dpo_weight_decay}")
        check_s3_key("dpo_data", self.dpo_data)
        return self
