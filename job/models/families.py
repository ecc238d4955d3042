"""Which family a model folder holds, and each family's way in and out, so the stages never ask.

GPT-2 (OpenAI's TensorFlow checkpoint or Hugging Face's safetensors; tiktoken's tokenizer, fetched into the
cache) and Llama 3 / Qwen3 (Hugging Face's layout with its ``tokenizer.json``, which the folder carries:
the finetuned model/ folder is written with the tokenizer beside it, so the next stage reads it alone).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from job.core.parsing import ParseError, load_json, read_bounded
from job.models.chat_template import MAX_TEMPLATE_CHARS, ChatTemplate
from job.models.gpt2 import GPTConfig, GPTModel
from job.models.gpt2_weights import load_pretrained, read_config, recorded_settings, save_hf
from job.models.hub import tokenizer_files
from job.models.llama import LlamaConfig, LlamaModel
from job.models.llama_weights import FAMILIES, load_llama, read_hf_config, save_llama
from job.models.tokenizer import (
    CHAT_TEMPLATE_FILE,
    END_OF_TEXT,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    TokenizerError,
    load_hf_tokenizer,
    load_tokenizer,
)
from job.storage.fetch import Downloader
from job.storage.store import atomic_path

Model = GPTModel | LlamaModel
# What a Llama 3 / Qwen3 folder carries besides its weights and config.json (the last three where present).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    CHAT_TEMPLATE_FILE,
)
MAX_CONFIG_BYTES = 1 << 20


def family(path: str | Path) -> str:
    """``llama`` or ``qwen3`` where the folder's config.json says so, else ``gpt2`` (whose loader names
    whatever else is wrong with the folder)."""
    config = Path(path) / "config.json"
    try:
        model_type = load_json(config.read_bytes()[: MAX_CONFIG_BYTES + 1], str(config)).get("model_type")
    except (OSError, ParseError, AttributeError):
        return "gpt2"
    return model_type if model_type in FAMILIES else "gpt2"


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> Model:
    """The folder's model with its weights, whichever family it is."""
    return load_pretrained(path, dtype) if family(path) == "gpt2" else load_llama(path, dtype)


def read_shape(path: str | Path) -> GPTConfig | LlamaConfig:
    """The folder's model shape (context length, width, ...) without reading its weights."""
    if family(path) == "gpt2":
        return read_config(path)
    return LlamaConfig.from_hf(read_hf_config(Path(path)))


def folder_tokenizer(path: str | Path) -> HFTokenizer | None:
    """The tokenizer a Llama 3 / Qwen3 folder carries; None for GPT-2 (tiktoken's, from the cache)."""
    return None if family(path) == "gpt2" else load_hf_tokenizer(path)


def model_tokenizer(model_dir: str | Path | None, cache: str | Path, base_url: str | None = None) -> Tokenizer:
    """The tokenizer a model was trained with: the smoke's byte tokenizer where its config.json says so
    (nothing to fetch), the one a Llama 3 / Qwen3 folder carries, else GPT-2's, fetched into the cache
    where it is missing. A GPT-2 (or the smoke's) folder trained with ``--chat-template FILE`` carries that
    template as ``chat_template.jinja``: the tokenizer returned has it, as a Llama 3 / Qwen3 folder's has."""
    if model_dir and recorded_settings(model_dir).get("tokenizer") == ByteTokenizer.name:
        return with_carried_template(ByteTokenizer(), model_dir)
    if model_dir and (carried := folder_tokenizer(model_dir)) is not None:
        return carried
    Downloader(Path(cache)).fetch_all(tokenizer_files(base_url))
    return with_carried_template(load_tokenizer(Path(cache) / "gpt2"), model_dir)


def with_carried_template(tokenizer: Tokenizer, model_dir: str | Path | None) -> Tokenizer:
    """``tokenizer`` with the folder's ``chat_template.jinja`` where it has one (its one special token as both
    ``bos_token`` and ``eos_token``, as ``--chat-template FILE`` was read for training)."""
    path = Path(model_dir) / CHAT_TEMPLATE_FILE if model_dir else None
    if path is None or not path.is_file():
        return tokenizer
    try:
        source = read_bounded(path, 4 * MAX_TEMPLATE_CHARS, str(path)).decode("utf-8")
    except (OSError, ParseError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path} is not readable as UTF-8 text: {str(exc)[:200]}") from None
    tokenizer.chat_template = ChatTemplate(source, {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT}, str(path))
    return tokenizer


def save_model(model: Model, directory: Path, source: str | Path | None, recorded: dict) -> None:
    """``model`` into ``directory`` in Hugging Face's layout, sft-job's ``recorded`` settings in its
    config.json; a Llama 3 / Qwen3 model keeps the config and tokenizer files of the folder it started
    from (``source``), so ``transformers`` and the next stage read the folder as it is."""
    if isinstance(model, GPTModel):
        save_hf(model, directory, extra_config={"sft_job": recorded})
        return
    source = Path(source)
    save_llama(model, directory, read_hf_config(source) | {"sft_job": recorded})
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            with atomic_path(directory / name) as tmp:
                shutil.copyfile(source / name, tmp)


def writes_book_pth(model: Model) -> bool:
    """The book's ``.pth`` is GPT-2's (its ``GPTModel``'s names); the other families have only the safetensors."""
    return isinstance(model, GPTModel)
