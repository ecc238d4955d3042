"""A model's tokenizer as GGUF's ``tokenizer.ggml.*`` metadata: llama.cpp's byte-level BPE (its ``gpt2`` tokenizer
model) with the token strings in GPT-2's byte alphabet, the merges, each token's type and the pre-tokenizer's
name. GPT-2's from ``encoder.json`` + ``vocab.bpe``; the smoke's bytes; a ``tokenizer.json`` (Llama 3, Qwen3)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from job.core.errors import ConfigError
from job.core.parsing import ParseError, load_json, read_bounded
from job.models.tokenizer import BYTE_OF_CHAR, END_OF_TEXT, MAX_TOKENIZER_BYTES, ByteTokenizer, HFTokenizer

# gguf's TokenType values (constants.TokenType), kept here so the vocabulary is built without importing gguf.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# The pre-tokenizers llama.cpp knows, by the regular expression a tokenizer.json's Split carries.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRE_BY_SPLIT = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
# A merge no word can use (its left side is longer than any symbol before a merge): llama.cpp's BPE needs
# merges, the smoke's byte vocabulary has none.
NO_MERGE = f"{END_OF_TEXT} {END_OF_TEXT}"


@dataclass(frozen=True)
class Vocabulary:
    """What GGUF's tokenizer metadata holds, id by id."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    """llama.cpp's name of the pre-tokenizer (``gpt-2``, ``llama-bpe``, ``qwen2``)."""
    end_id: int
    pad_id: int
    bos_id: int | None = None

    def padded(self, vocab_size: int, where: str) -> Vocabulary:
        """The vocabulary at the model's embedding count: the ids no token has are ``[PAD{i}]`` (unused), as
        llama.cpp's converter names them; a tokenizer with more ids than the model has rows cannot be used."""
        if len(self.tokens) > vocab_size:
            raise ConfigError(
                f"{where}: the tokenizer has {len(self.tokens)} tokens, more than the model's {vocab_size} "
                "embeddings: GGUF needs one embedding per token"
            )
        extra = range(len(self.tokens), vocab_size)
        return Vocabulary(
            self.tokens + [f"[PAD{i}]" for i in extra],
            self.types + [UNUSED] * len(extra),
            self.merges,
            self.pre,
            self.end_id,
            self.pad_id,
            self.bos_id,
        )


def char_of_byte() -> dict[int, str]:
    """GPT-2's printable stand-in of each byte (the inverse of the tokenizer module's table)."""
    return {byte: char for char, byte in BYTE_OF_CHAR.items()}


def byte_vocabulary() -> Vocabulary:
    """The smoke's tokenizer: a token per byte, ``<|endoftext|>`` last."""
    chars = char_of_byte()
    tokens = [chars[b] for b in range(256)] + [END_OF_TEXT]
    end = ByteTokenizer.eot_token
    return Vocabulary(tokens, [NORMAL] * 256 + [CONTROL], [NO_MERGE], "gpt-2", end, end, end)


def gpt2_vocabulary(directory: Path) -> Vocabulary:
    """GPT-2's from ``encoder.json`` (token -> id) and ``vocab.bpe`` (the merges, by rank) of ``directory``."""
    encoder = _json(directory / "encoder.json")
    tokens = [""] * len(encoder)
    for token, index in encoder.items():
        tokens[index] = token
    lines = (directory / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines[1:] if line]  # the first line is "#version: 0.2"
    types = [CONTROL if t == END_OF_TEXT else NORMAL for t in tokens]
    end = encoder[END_OF_TEXT]
    return Vocabulary(tokens, types, merges, "gpt-2", end, end, end)


def hf_vocabulary(directory: Path, tokenizer: HFTokenizer) -> Vocabulary:
    """A byte-level BPE ``tokenizer.json``: its vocabulary with the added tokens (special ones as control
    tokens), its merges and the pre-tokenizer llama.cpp calls by name; any other kind is named (exit 2)."""
    where = directory / "tokenizer.json"
    spec = _json(where)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(spec.get("decoder")):
        found = f"{model.get('type')} model, {(spec.get('decoder') or {}).get('type')} decoder"
        raise ConfigError(f"{where}: GGUF export needs a byte-level BPE tokenizer, this one is a {found}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    by_id = {index: token for token, index in tokenizer.tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for index in range(max(by_id) + 1):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif index in added:
            tokens.append(token)
            types.append(CONTROL if added[index].special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    bos = _json(directory / "tokenizer_config.json").get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    bos_id = tokenizer.tokenizer.token_to_id(bos) if isinstance(bos, str) else None
    pre = _pre(where, spec.get("pre_tokenizer"))
    return Vocabulary(tokens, types, merges, pre, tokenizer.end_id, tokenizer.pad_id, bos_id)


def _byte_level(decoder) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "Sequence":
        return any(_byte_level(d) for d in decoder.get("decoders", []))
    return decoder.get("type") == "ByteLevel"


def _pre(where: Path, pre_tokenizer) -> str:
    """llama.cpp's name of the pre-tokenizer: GPT-2's own regex (ByteLevel splitting), Llama 3's or Qwen2's
    Split before a ByteLevel that does not split; another is not one llama.cpp would split alike (exit 2)."""
    pre = pre_tokenizer if isinstance(pre_tokenizer, dict) else {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in PRE_BY_SPLIT and not steps[1].get("use_regex", True):
            return PRE_BY_SPLIT[regex]
    shown = str(pre_tokenizer)[:120]
    raise ConfigError(
        f"{where}: pre-tokenizer {shown} is none llama.cpp splits alike (GPT-2's ByteLevel, Llama 3's or Qwen2's "
        "Split): GGUF export would tokenize differently"
    )


def _json(path: Path) -> dict:
    from job.models.gpt2_weights import WeightsError

    try:
        value = load_json(read_bounded(path, MAX_TOKENIZER_BYTES, str(path)), str(path))
    except (OSError, ParseError) as exc:
        raise WeightsError(f"{path}: {exc}") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: not a JSON object")
    return value
