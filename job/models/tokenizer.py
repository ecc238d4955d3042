"""GPT-2's byte-pair encoding through tiktoken, built from local files only; the smoke's bytes; and a Hugging
Face ``tokenizer.json`` (Llama 3, Qwen3) through the ``tokenizers`` library."""

from __future__ import annotations

import contextlib
import hashlib
import os
from itertools import accumulate
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from job.core.errors import JobError

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
    """The smoke's tokenizer, made in memory (no file, no network): each UTF-8 byte is its own token (ids
    0-255), and ``<|endoftext|>`` is id 256, the vocabulary's last, as 50256 is GPT-2's. The smoke's model
    has these 257 ids only: GPT-2's 50,257 cost its output head nearly all of the smoke's time and bytes."""

    name = "bytes"
    n_vocab = 257
    eot_token = 256

    def encode(self, text: str, allowed_special=frozenset()) -> list[int]:
        parts = text.split(END_OF_TEXT) if END_OF_TEXT in allowed_special else [text]
        ids: list[int] = []
        for i, part in enumerate(parts):
            ids += ([self.eot_token] if i else []) + list(part.encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        """The text of the tokens: runs of bytes as UTF-8 (a character cut short is dropped), the end token as
        ``<|endoftext|>`` (as tiktoken writes it), and an id past the vocabulary (a model of a larger one
        samples them) as U+FFFD, so it still shows as text."""
        parts, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="ignore"))
            parts.append(END_OF_TEXT if i == self.eot_token else "\ufffd")
            run = bytearray()
        return "".join(parts) + run.decode("utf-8", errors="ignore")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (Llama 3's, Qwen3's) through the ``tokenizers`` library, with its
    end and padding tokens from ``tokenizer_config.json``. Text in, ids out, no special tokens added (the
    prompt styles write their own); ids back to text, or to bytes for a byte-level vocabulary, so a
    response cut inside a character loses that character only (``decode_response``)."""

    name = "tokenizer.json"

    def __init__(self, tokenizer, end_token: str, pad_token: str | None = None, chat_template=None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template  # a ChatTemplate where the folder has one
        self.n_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        self.end_id = self._id(end_token, "end")
        self.pad_id = self._id(pad_token, "padding") if pad_token else self.end_id
        self.eot_token = self.end_id  # tiktoken's name for it, so every tokenizer says its end id alike
        self.special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}

    def _id(self, token: str, what: str) -> int:
        found = self.tokenizer.token_to_id(token)
        if found is None:
            raise TokenizerError(f"tokenizer_config.json's {what} token {token!r} is not in tokenizer.json")
        return found

    def encode(self, text: str, allowed_special=frozenset()) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes of the ids: byte-level tokens through GPT-2's byte alphabet, special tokens as their text."""
        out = bytearray()
        for token in map(self.tokenizer.id_to_token, ids):
            if token is None:
                continue
            if token in self.special or any(c not in BYTE_OF_CHAR for c in token):
                out += token.encode("utf-8")
            else:
                out += bytes(BYTE_OF_CHAR[c] for c in token)
        return bytes(out)


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes (the ByteLevel pre-tokenizer's), character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


BYTE_OF_CHAR = _byte_alphabet()
MAX_TOKENIZER_BYTES = 64 << 20  # Llama 3's tokenizer.json is 9 MB, Qwen3's 11 MB
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where current transformers saves a model's chat template


def load_hf_tokenizer(directory: str | Path) -> HFTokenizer:
    """``tokenizer.json`` and ``tokenizer_config.json`` of a Hugging Face model folder."""
    from tokenizers import Tokenizer as RustTokenizer

    from job.core.parsing import ParseError, load_json

    directory = Path(directory)
    files = {name: directory / name for name in ("tokenizer.json", "tokenizer_config.json")}
    for path in files.values():
        if not path.is_file():  # a folder from another tool may carry tokenizer.json alone
            raise TokenizerError(
                f"{path} is missing: a Llama 3 / Qwen3 folder needs tokenizer.json and tokenizer_config.json "
                "(its end and padding tokens, its chat template)"
            )
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise TokenizerError(f"{path} is larger than {MAX_TOKENIZER_BYTES >> 20} MB")
    try:
        config = load_json(files["tokenizer_config.json"].read_bytes(), str(files["tokenizer_config.json"]))
    except ParseError as exc:
        raise TokenizerError(str(exc)) from None
    try:
        tokenizer = RustTokenizer.from_str(files["tokenizer.json"].read_text())
    except Exception as exc:  # noqa: BLE001  (the Rust parser's own errors, and text that is not UTF-8)
        raise TokenizerError(f"{files['tokenizer.json']} is not a tokenizer we can read: {str(exc)[:200]}") from None

    def content(key: str) -> str | None:
        token = config.get(key) if isinstance(config, dict) else None
        return token.get("content") if isinstance(token, dict) else token

    end = content("eos_token")
    if not isinstance(end, str):
        raise TokenizerError(f"{files['tokenizer_config.json']} names no eos_token")
    pad = content("pad_token")
    return HFTokenizer(tokenizer, end, pad if isinstance(pad, str) else None, _chat_template(config, content, files))


def _chat_template(config, content, files):
    """The folder's chat template, where transformers' loading finds it: ``chat_template.jinja`` (what current
    transformers saves) before tokenizer_config.json's (one string, or the one named ``default`` of a list);
    with the special tokens it may name, as transformers passes them."""
    from job.core.parsing import ParseError, read_bounded
    from job.models.chat_template import MAX_TEMPLATE_CHARS, ChatTemplate

    jinja = files["tokenizer_config.json"].with_name(CHAT_TEMPLATE_FILE)
    source, where = config.get("chat_template") if isinstance(config, dict) else None, files["tokenizer_config.json"]
    if jinja.is_file():
        try:
            text = read_bounded(jinja, 4 * MAX_TEMPLATE_CHARS, str(jinja)).decode("utf-8")
            # transformers opens it as text: universal newlines, as Python's open() reads them
            source, where = text.replace("\r\n", "\n").replace("\r", "\n"), jinja
        except (OSError, ParseError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{jinja} is not readable as UTF-8 text: {str(exc)[:200]}") from None
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is None:
        return None
    tokens = {key: content(key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    variables = {k: v for k, v in tokens.items() if isinstance(v, str)}
    return ChatTemplate(source, variables, str(where))


Tokenizer = tiktoken.Encoding | ByteTokenizer | HFTokenizer


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


def encode_parts(tokenizer: Tokenizer, head: str, tail: str) -> tuple[list[int], int]:
    """The ids of ``head + tail`` encoded as one text (as the book encodes a prompt and its response), and the
    index of the first token that holds any of ``tail`` (``len(ids)`` for an empty tail): a token that merges
    head's last characters with tail's first is tail's, so none of tail's text lies before the index."""
    text = head + tail
    if isinstance(tokenizer, HFTokenizer):
        # The library's own map of each token to the characters it came from (a normalizer may change them).
        encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
        ids, ends, boundary = encoding.ids, [end for _, end in encoding.offsets], len(head)
    else:
        ids = encode(tokenizer, text)
        ends, boundary = list(accumulate(map(len, token_bytes(tokenizer, ids)))), len(head.encode("utf-8"))
    return ids, next((k for k, end in enumerate(ends) if end > boundary), len(ids))


def token_bytes(tokenizer: tiktoken.Encoding | ByteTokenizer, ids: list[int]) -> list[bytes]:
    """Each token's bytes, which together are the encoded text's (tiktoken's and the byte tokenizer's are lossless)."""
    if isinstance(tokenizer, ByteTokenizer):
        return [bytes([i]) if i < 256 else END_OF_TEXT.encode() for i in ids]
    return tokenizer.decode_tokens_bytes(ids)
