"""Tiny random Llama 3.2 and Qwen3 folders in Hugging Face's layout (weights written by transformers, a
tokenizer trained here with `tokenizers`), shared by the tests that run the stages on them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.models.test_llama import LLAMA, QWEN3

VOCAB = 640  # the trained tokenizer's 600 ids and room: far below GPT-2's end-of-text id, which must not be used
END, PAD = "<|eot_id|>", "<|end_of_text|>"
# An instruct checkpoint's kind of template, on the trained tokenizer's own special tokens.
CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{{- '<|' + m.role + '|>\\n' + m.content + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


def write_tokenizer(path: Path, book_data: list[dict]) -> None:
    """A byte-level BPE of 600 ids trained on the entries, with Llama 3's special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", PAD, END]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([e["instruction"] + " " + e["input"] + " " + e["output"] for e in book_data], trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"eos_token": END, "pad_token": PAD, "bos_token": "<|begin_of_text|>", "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def write_family_folder(path: Path, family: str, book_data: list[dict]) -> Path:
    """``family`` ("llama" or "qwen3") at the tests' tiny shape, seeded, saved into ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(3)
    shape = dict(vocab_size=VOCAB, max_position_embeddings=1024)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**LLAMA | shape))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**QWEN3 | shape))
    model.save_pretrained(path)
    write_tokenizer(path, book_data)
    return path
