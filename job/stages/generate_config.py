"""``sft-job generate``'s settings: the test split's data, decoding, and where the model and responses are."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from job.core.settings import option, positive, seed
from job.data.data_config import DataConfig
from job.models.decoding_config import DecodingSettings
from job.models.origin import DEFAULT_CACHE, HubAccess


class GenerateConfig(DataConfig, DecodingSettings, HubAccess):
    """``sft-job generate``: responses for the test split (book, 7.7), batched with the KV cache."""

    help_section: ClassVar[str] = "Generate"
    model_dir: str = "runs/finetune/model"
    """The finetuned model: the finetune stage's model/ folder or any folder load_pretrained reads."""
    prompt_style: Literal["alpaca", "phi3", "chat"] | None = None
    """Prompt template: the book's Alpaca text, Phi-3's (exercise 7.1), or chat: the model's own chat template
    (chat_template.jinja, else tokenizer_config.json's); by default the one the model was finetuned with (saved
    in its config.json), else alpaca."""
    cache: str = option(DEFAULT_CACHE, operational=True, section="Storage")
    """Folder that holds the tokenizer files and a downloaded dataset."""
    base_url: str | None = option(None, operational=True, section="Storage")
    """Mirror to fetch the tokenizer and dataset from: an http(s):// URL or s3://bucket/prefix laid out like
    the cache."""
    output: str = option("runs/generate", operational=True)
    """Folder instruction-data-with-response.json (and its progress file) is written to."""
    batch_size: int = 16
    """Prompts decoded together."""
    seed: int = 123
    """Seed of sampling (each batch is seeded from it, so restarts sample the same)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast dtype: auto is bf16 on CUDA devices that support it, fp32 elsewhere (bf16 on a CPU with
    AVX-512 BF16 is ~2.5x faster)."""

    @model_validator(mode="after")
    def _check_generate(self):
        positive(self, "batch_size")
        seed(self, "seed")
        return self
