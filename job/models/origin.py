"""Where a stage's pretrained model comes from: a named model fetched into the cache, or a local folder."""

from __future__ import annotations

import os
import re
from typing import ClassVar, Literal

from pydantic import ValidatorFunctionWrapHandler, field_validator, model_validator

from job.core.errors import ConfigError
from job.core.parsing import short
from job.core.settings import MIRROR_SCHEMES, Settings, check_url, option
from job.models.registry import ModelName, model_names

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sft-job")
# A hub revision: a branch, tag or commit (letters, digits, '.', '_', '-', '/'; no '..').
REVISION_RE = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


class HubAccess(Settings):
    """Which Hugging Face hub the hub's models and datasets (``hf://datasets/...``) come from, and the token
    it is asked with."""

    hub_url: str | None = option(None, operational=True, section="Storage")
    """The Hugging Face hub, or a server laid out like it ({hub}/{repo}/resolve/{revision}/{file}), that the
    Llama 3.2 and Qwen3 models, GPT-2's Hugging Face weights and hf://datasets/ come from; defaults to
    HF_ENDPOINT, else https://huggingface.co."""
    hf_token: str | None = option(None, secret=True, section="Storage")
    """Hugging Face access token for gated repositories (Llama 3.2: accept its license on the hub first);
    defaults to HF_TOKEN. Sent to the hub's host only, never logged."""

    @model_validator(mode="after")
    def _check_hub(self):
        check_url("hub_url", self.hub_url, ("http", "https"))
        return self


class ModelOrigin(Settings):
    """Where a named model comes from: GPT-2's sizes from OpenAI or Hugging Face, the Llama 3.2 and Qwen3
    base models from the Hugging Face hub, each into the cache."""

    help_section: ClassVar[str] = "Finetune"
    OTHER_MODELS: ClassVar[tuple[str, ...]] = ()  # names ``model`` takes beside the registry's (run's smoke)
    model: ModelName = "gpt2-medium"
    """Named model, fetched into the cache: a GPT-2 size (the book finetunes gpt2-medium, 355M) or a base model
    on the Hugging Face hub (the choices: job/models/registry.py)."""
    source: Literal["openai", "hf"] = option("openai", section="Storage")
    """Where a GPT-2 size comes from: OpenAI's TensorFlow checkpoint (as in the book; reading it needs the tf
    extra) or Hugging Face's safetensors. The hub's models always come from the hub."""
    cache: str = option(DEFAULT_CACHE, operational=True, section="Storage")
    """Folder that holds downloaded weights, tokenizer files and the dataset."""
    base_url: str | None = option(None, operational=True, section="Storage")
    """Mirror to fetch from instead of the public hosts: an http(s):// URL or s3://bucket/prefix laid out
    like the cache."""
    hub_revision: str = option("main", section="Storage")
    """Branch, tag or commit of the hub repository to fetch; a commit pins the weights."""

    @field_validator("model", mode="wrap")
    @classmethod
    def _registered(cls, value, handler: ValidatorFunctionWrapHandler):
        """A name the registry holds now (a test may register a size after the type was made), else one line
        naming the choices; a value of another type gets the type's own check."""
        names = (*model_names(), *cls.OTHER_MODELS)
        if isinstance(value, str) and value not in names:
            raise ConfigError(f"model must be one of {', '.join(names)}, got {short(value)}")
        return value if isinstance(value, str) else handler(value)

    @model_validator(mode="after")
    def _check_origin(self):
        check_url("base_url", self.base_url, MIRROR_SCHEMES)
        if not REVISION_RE.fullmatch(self.hub_revision):
            raise ConfigError(
                f"hub_revision must be a branch, tag or commit (letters, digits, '.', '_', '-', '/'), "
                f"got {short(self.hub_revision)}"
            )
        return self


class ModelSourceConfig(Settings):
    """Which pretrained model a stage starts from, where it is not a named one (composed with ModelOrigin)."""

    help_section: ClassVar[str] = "Finetune"
    model_dir: str | None = None
    """A local folder to start from instead of --model: GPT-2's (OpenAI's checkpoint or config.json +
    model.safetensors) or a Llama 3 / Qwen3 one in Hugging Face's layout."""
