"""Every model ``--model`` names, in one place: its family, where it comes from, its shape and its tokenizer.

GPT-2's four sizes (book, 7.5) and the base models of the two families the book implements next (7.9:
Llama 3.2 and Qwen3), by their Hugging Face repositories. A new size of a known family is one entry of
``MODELS``; the CLI's choices, the downloads, the shapes and the help text read it. No heavy imports: the
CLI's choices come from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class GPT2Shape:
    """A GPT-2 size's shape (``GPTConfig``'s fields; the rest are every size's)."""

    emb_dim: int
    n_layers: int
    n_heads: int
    context_length: int = 1024


@dataclass(frozen=True)
class ModelEntry:
    """One named model."""

    family: Literal["gpt2", "llama", "qwen3"]
    repo: str
    """Its Hugging Face repository: where a hub model comes from, where a GPT-2 size's safetensors come from
    (--source hf), and the base model a PEFT adapter names."""
    openai_folder: str | None = None
    """OpenAI's folder of a GPT-2 size (``355M``): the model comes from OpenAI's files (or Hugging Face's
    copy, --source hf). None: from the hub repository at --hub-revision, with the tokenizer it carries."""
    shape: GPT2Shape | None = None
    """A GPT-2 size's shape, context length included; None: the repository's config.json states it."""

    def __post_init__(self) -> None:
        # A GPT-2 size is built from its shape and comes from OpenAI's folder; the other families from the hub.
        if (self.family == "gpt2") != (self.openai_folder is not None) or (self.shape is None) != self.from_hub:
            raise ValueError(f"a {self.family} entry ({self.repo}) has GPT-2's OpenAI folder and shape, or neither")

    @property
    def from_hub(self) -> bool:
        """Whether the model comes from the hub at --hub-revision (else from OpenAI's files)."""
        return self.openai_folder is None

    @property
    def tokenizer(self) -> Literal["gpt2", "carried"]:
        """``gpt2``: tiktoken's GPT-2 encoding, fetched into the cache; ``carried``: the ``tokenizer.json``
        the model's folder carries."""
        return "gpt2" if self.family == "gpt2" else "carried"


def _gpt2(repo: str, openai_folder: str, emb_dim: int, n_layers: int, n_heads: int) -> ModelEntry:
    return ModelEntry("gpt2", repo, openai_folder, GPT2Shape(emb_dim, n_layers, n_heads))


# OpenAI's TensorFlow checkpoint of a GPT-2 size: the same seven files in each size's folder.
OPENAI_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
# The pretrained (base) checkpoints, as GPT-2 is one: instruction finetuning starts from a base model.
MODELS: dict[str, ModelEntry] = {
    "gpt2-small": _gpt2("openai-community/gpt2", "124M", 768, 12, 12),
    "gpt2-medium": _gpt2("openai-community/gpt2-medium", "355M", 1024, 24, 16),
    "gpt2-large": _gpt2("openai-community/gpt2-large", "774M", 1280, 36, 20),
    "gpt2-xl": _gpt2("openai-community/gpt2-xl", "1558M", 1600, 48, 25),
    "qwen3-0.6b": ModelEntry("qwen3", "Qwen/Qwen3-0.6B-Base"),
    "qwen3-1.7b": ModelEntry("qwen3", "Qwen/Qwen3-1.7B-Base"),
    "qwen3-4b": ModelEntry("qwen3", "Qwen/Qwen3-4B-Base"),
    "qwen3-8b": ModelEntry("qwen3", "Qwen/Qwen3-8B-Base"),
    "llama3.2-1b": ModelEntry("llama", "meta-llama/Llama-3.2-1B"),  # gated: its license accepted, then HF_TOKEN
    "llama3.2-3b": ModelEntry("llama", "meta-llama/Llama-3.2-3B"),
}

ModelName = Literal[tuple(MODELS)]  # the names as a type: click's choices and a config file's check


def model_names() -> tuple[str, ...]:
    """Every name ``--model`` takes, in the registry's order (read when asked: a test may add one)."""
    return tuple(MODELS)


def model_entry(name: str) -> ModelEntry:
    return MODELS[name]


def gpt2_names() -> tuple[str, ...]:
    return tuple(name for name, entry in MODELS.items() if entry.family == "gpt2")


def hub_names() -> tuple[str, ...]:
    """The models that come from the hub at --hub-revision."""
    return tuple(name for name, entry in MODELS.items() if entry.from_hub)
