"""GPT-2's byte-pair encoding through tiktoken, built from local files only."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from job.errors import JobError

ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
# tiktoken's own pattern for GPT-2 (r50k), so splitting matches OpenAI's exactly.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerError(JobError):
    """Tokenizer files missing or not the real GPT-2 ones."""


def load_tokenizer(directory: str | Path) -> tiktoken.Encoding:
    """GPT-2's encoding from ``encoder.json`` and ``vocab.bpe`` in ``directory`` (hashes checked)."""
    directory = Path(directory)
    files = {"encoder.json": ENCODER_JSON_SHA256, "vocab.bpe": VOCAB_BPE_SHA256}
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} is missing: run `sft-job download` first")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise TokenizerError(f"tokenizer file {path} has sha256 {actual}, expected {expected}")
    with _tiktoken_cache_disabled():
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(directory / "vocab.bpe"), encoder_json_file=str(directory / "encoder.json")
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
        explicit_n_vocab=50257,
    )


@contextlib.contextmanager
def _tiktoken_cache_disabled():
    # tiktoken copies every file it reads into a temp cache unless TIKTOKEN_CACHE_DIR is "".
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous


class ByteTokenizer:
    """The smoke's tokenizer, made in memory (no file, no network): each UTF-8 byte is its own token, and
    ``<|endoftext|>`` is GPT-2's end token, so every model of GPT-2's vocabulary takes its ids."""

    name = "bytes"
    n_vocab = 50257

    def encode(self, text: str, allowed_special=frozenset()) -> list[int]:
        parts = text.split(END_OF_TEXT) if END_OF_TEXT in allowed_special else [text]
        ids: list[int] = []
        for i, part in enumerate(parts):
            ids += ([END_OF_TEXT_ID] if i else []) + list(part.encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        """The text of the tokens: runs of bytes as UTF-8 (a character cut short is dropped), the end token as
        ``<|endoftext|>`` (as tiktoken writes it), and an id of the vocabulary that is no byte (a random model
        samples them) as U+FFFD, so it still shows as text."""
        parts, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="ignore"))
            parts.append(END_OF_TEXT if i == END_OF_TEXT_ID else "\ufffd")
            run = bytearray()
        return "".join(parts) + run.decode("utf-8", errors="ignore")


Tokenizer = tiktoken.Encoding | ByteTokenizer


def utf8_lead_length(byte: int) -> int:
    """How many bytes the UTF-8 character that starts with ``byte`` has (1 for a byte no character starts with)."""
    return 4 if byte >= 0xF0 else 3 if byte >= 0xE0 else 2 if byte >= 0xC0 else 1


def without_cut_character(data: bytes) -> bytes:
    """``data`` less a UTF-8 character cut short at its end: a response stopped by --max-new-tokens may end
    in the first bytes of one, which would show as U+FFFD."""
    for back in range(1, min(4, len(data)) + 1):
        if data[-back] & 0xC0 != 0x80:  # the last character's first byte (not a continuation byte)
            return data[:-back] if utf8_lead_length(data[-back]) > back else data
    return data


def decode_response(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text of generated ids, a character cut short at the end dropped; an invalid byte sequence inside
    the text still shows as U+FFFD, as tiktoken decodes it."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.decode(ids)
    return without_cut_character(tokenizer.decode_bytes(ids)).decode("utf-8", errors="replace")


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``; ``<|endoftext|>`` in the text is the special token, as in the book."""
    return tokenizer.encode(text, allowed_special={END_OF_TEXT})
