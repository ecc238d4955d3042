"""Typed configuration: one dataclass per stage, a docstring per field, checks in ``__post_init__``.

The docstrings double as the flags' help text (``field_docs``), so each knob is described once.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import textwrap
from dataclasses import dataclass
from functools import cache
from typing import Literal

from job.errors import ConfigError
from job.model import GPT2_SIZES

MODEL_NAMES = tuple(GPT2_SIZES)
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sft-job")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal that follows each field in the class body (its docstring)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(obj, name)}")


@dataclass
class DownloadConfig:
    """What ``sft-job download`` fetches, and from where."""

    model: Literal["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"] = "gpt2-medium"
    """Named GPT-2 size to fetch (the book finetunes gpt2-medium, 355M)."""
    source: Literal["openai", "hf"] = "openai"
    """OpenAI's TensorFlow checkpoint (as in the book; reading it needs the tf extra) or Hugging Face's safetensors."""
    cache: str = DEFAULT_CACHE
    """Folder that holds downloaded weights, tokenizer files and the dataset."""
    base_url: str | None = None
    """Mirror to fetch from instead of the public hosts: an http(s):// URL or s3://bucket/prefix laid out like the cache."""
    dataset: bool = True
    """Also fetch the book's instruction dataset into the cache."""
    download_attempts: int = 5
    """Tries per file for transient errors (dropped connections, 5xx); each resumes the partial file."""

    def __post_init__(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ConfigError(f"model must be one of {', '.join(MODEL_NAMES)}, got {self.model!r}")
        if self.source not in ("openai", "hf"):
            raise ConfigError(f"source must be openai or hf, got {self.source!r}")
        _positive(self, "download_attempts")
