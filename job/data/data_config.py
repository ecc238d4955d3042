"""The instruction dataset's settings: which file, and how its entries become training text."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from job.core.settings import Settings, check_s3_key, positive, seed
from job.data.book_datasets import DATASETS

BOOK_DATA = DATASETS["instructions"].url


class DataConfig(Settings):
    """The instruction dataset and how its entries become training text."""

    help_section: ClassVar[str] = "Data"
    data: str = BOOK_DATA
    """Dataset: a local JSON/JSON Lines/Parquet file, a folder of train/validation/test files, an http(s):// URL
    (fetched into the cache), s3://bucket/key or hf://datasets/ORG/NAME[@REVISION] (the hub's, at a commit)."""
    prompt_style: Literal["alpaca", "phi3", "chat"] = "alpaca"
    """Prompt template: the book's Alpaca text, Phi-3's (exercise 7.1), or chat: the model's own chat template
    (chat_template.jinja, else tokenizer_config.json's; Llama 3 and Qwen3 checkpoints carry one, GPT-2 none)."""
    shuffle_seed: int | None = None
    """Shuffle entries with this seed before the 85/10/5 split (the book splits in file order)."""
    skip_invalid: bool = False
    """Drop entries with a missing or non-string field, or that the chat template refuses (and log how many),
    instead of failing."""
    allowed_max_length: int = 1024
    """Longest training sequence in tokens; longer ones are truncated (and counted in the log)."""
    data_format: Literal["alpaca", "messages", "prompt-completion", "text"] | None = None
    """The dataset's format; by default told from its entries' keys (all must agree): alpaca (instruction,
    input, output: the book's), messages (role/content turns through the chat template), prompt-completion
    (prompt, completion: text or turns), text (plain documents, every token trained)."""
    chat_template: str | None = None
    """A Jinja chat template file for messages data (and prompt-completion turns), instead of the model's own;
    GPT-2 has none. One with {% generation %} blocks marks the assistant's tokens as transformers reads them."""
    train_on: Literal["assistant", "last", "all"] = "assistant"
    """Which tokens of messages data train: every assistant turn (each with its end token), the last one, or
    all tokens. Another format with last or all is refused (it would change nothing)."""
    data_fields: str | None = None
    """Other column names: FIELD=COLUMN,... for instruction, input, output, prompt, chosen, rejected (Dolly's:
    input=context,output=response); every entry must have each column named."""
    data_split: Literal["train", "validation", "test"] | None = None
    """With a --data folder or hf://datasets/ORG/NAME: read only this split's files, cut 85/10/5; without it
    the train, validation and test files are the splits."""

    @model_validator(mode="after")
    def _check_data(self):
        from job.data.sources import parse_fields, parse_hub_dataset  # kept out of --help: it loads the data code

        positive(self, "allowed_max_length")
        seed(self, "shuffle_seed")
        check_s3_key("data", self.data)
        parse_fields(self.data_fields)
        parse_hub_dataset(self.data)
        return self
