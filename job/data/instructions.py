"""The instruction dataset: load, validate, format as prompts, split, tokenize, collate (book, 7.2-7.4)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from job.core.errors import ConfigError, JobError
from job.core.observability import get_logger
from job.core.parsing import ParseError, RefusedValue, first_refused, load_json, read_bounded
from job.data.book_datasets import DATASETS, known_dataset
from job.models.tokenizer import END_OF_TEXT_ID, encode, encode_parts
from job.storage.fetch import Downloader, RemoteFile, mirror_urls

log = get_logger(__name__)
IGNORE_INDEX = -100
MAX_DATASET_BYTES = 1 << 30  # the book's is 0.8 MB, Alpaca's 52k entries 40 MB
MAX_FIELD_CHARS = 4 << 20
"""Characters of one field (any string in an entry): 32 a token of the longest context a model here reads (Llama
3.2's 131,072 tokens); the book's longest is 1.5k. A longer one is refused: it could not be trained on past the
context, and tokenizing it whole costs ~120 bytes a token (a 200 MB field took 12 GB)."""
RESPONSES_FILE = "instruction-data-with-response.json"  # the book's name for the test split with responses


class DataError(JobError):
    """A dataset that cannot be used; the message names the entry and field."""


# --- loading and validation -------------------------------------------------------------------


def resolve_data(source: str, cache: str | Path, base_url: str | None = None) -> Path:
    """A local path for ``source``: a path as is, an http(s)/s3 URL fetched into the cache."""
    if urlparse(source).scheme in ("http", "https", "s3"):
        return Downloader(Path(cache)).fetch(dataset_file(source, base_url))
    return Path(source)


def dataset_file(url: str = DATASETS["instructions"].url, base_url: str | None = None) -> RemoteFile:
    """A dataset by URL, with the sha256 the registry knows for it (``job/data/book_datasets.py``)."""
    name = Path(urlparse(url).path).name
    known = known_dataset(url)
    sha, way_in = (known.sha256, known.way_in) if known else (None, "--data FILE")
    return RemoteFile(name, mirror_urls(base_url, name, (url,)), sha, way_in=way_in)


def parse_entries(path: Path) -> list:
    """A JSON array, or JSON Lines (one object per line), parsed with bounds and strictly (job/core/parsing.py:
    no key twice in an entry, no NaN or Infinity)."""
    try:
        # utf-8-sig: a byte order mark at the start (Excel's, Notepad's) is dropped, as pandas and datasets do
        text = read_bounded(path, MAX_DATASET_BYTES, f"dataset {path}").decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"dataset {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"dataset {path} is not readable: {exc}") from None
    if not text.strip():
        raise DataError(f"dataset {path} is empty")
    try:
        data = load_json(text, f"dataset {path}", strict=True)
    except RefusedValue as exc:
        if text.lstrip().startswith("["):
            raise DataError(str(exc)) from None
        data = _json_lines(path, text, exc)  # JSON Lines: its own parse names the line
    except ParseError as whole:
        data = _json_lines(path, text, whole)
    if isinstance(data, dict):
        if "\n" in text.strip():  # one object over several lines, not JSON Lines of one entry
            raise DataError(f"dataset {path} holds one JSON object: expected a JSON array of entries (or JSON Lines)")
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"dataset {path} must be a JSON array of entries, got {type(data).__name__}")
    if not data:
        raise DataError(f"dataset {path} has no entries")
    if len(text) > MAX_FIELD_CHARS and text.lstrip().startswith("["):  # else no field can be that long
        check_field_lengths(path, data)  # (JSON Lines checks its long lines alone)
    return data


def _too_long(value) -> str | None:
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return (
            f"holds {len(value):,} characters, more than the {MAX_FIELD_CHARS:,} a field may hold (more than any "
            "model's context reads): shorten it or split the entry"
        )
    return None


def check_field_lengths(path: Path, entries: list) -> None:
    """No string in any entry longer than ``MAX_FIELD_CHARS``; the first one is a DataError naming entry and field."""
    for index, entry in enumerate(entries):
        for value in entry.values() if isinstance(entry, dict) else (entry,):
            if type(value) is not str or len(value) > MAX_FIELD_CHARS:  # else a flat entry's short string: no walk
                where = first_refused(entry, _too_long, (index,))
                if where is not None:
                    raise DataError(f"dataset {path}: {where}")
                break


def _json_lines(path: Path, text: str, whole: ParseError) -> list:
    """One object per line; a bad line is named by its line number in the file (1-based)."""
    data = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data.append(load_json(line, f"dataset {path}: line {number}", strict=True))
            where = first_refused(data[-1], _too_long) if len(line) > MAX_FIELD_CHARS else None
            if where is not None:  # (a shorter line holds no longer field)
                raise DataError(f"dataset {path}: line {number}: {where}")
        except RefusedValue as exc:
            raise DataError(str(exc)) from None
        except ParseError as exc:
            if not data:  # the first line already fails: not JSON Lines either
                reason = str(whole).removeprefix(f"dataset {path}")
                raise DataError(f"dataset {path} is neither JSON nor JSON Lines:{reason}") from None
            raise DataError(str(exc)) from None
    return data


def entry_problem(entry) -> str | None:
    """Why an entry is unusable (``"field 'output' ..."``), or None."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    for name in ("instruction", "output"):
        if name not in entry:
            return f"field {name!r} is missing"
        if not isinstance(entry[name], str):
            return f"field {name!r} must be a string, got {type(entry[name]).__name__}"
    if not isinstance(entry.get("input", ""), str):
        return f"field 'input' must be a string, got {type(entry['input']).__name__}"
    return None


def load_entries(path: Path, skip_invalid: bool = False, check=entry_problem) -> list[dict]:
    """Validated entries (``input`` filled in as "" where absent); a bad one is an error naming it.
    ``check`` says what is wrong with an entry (preference data asks for more fields)."""
    entries, skipped = [], 0
    for index, entry in enumerate(parse_entries(path)):
        problem = check(entry)
        if problem is None:
            entries.append({**entry, "input": entry.get("input", "")})
        elif skip_invalid:
            skipped += 1
        else:
            raise DataError(f"dataset {path}: entry {index}: {problem} (--skip-invalid drops such entries)")
    if skipped:
        log.warning("dataset_entries_skipped", count=skipped, path=str(path))
    if not entries:
        raise DataError(f"dataset {path} has no valid entries")
    return entries


# --- prompt styles ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Laid:
    """One entry and one response as a style lays them out, in tokens."""

    ids: list[int]
    """Prompt, response header and response, encoded as one text (as the book encodes it)."""
    response_start: int
    """The first token that holds response text (``len(ids)`` for an empty response): training scores from it."""


@dataclass(frozen=True)
class PromptStyle:
    """The one place that knows a style's layout: the prompt (what generation and the epoch's sample start
    from), the response header after it, and which token the response starts at, for every tokenizer."""

    name: str
    response_header: str
    """Text between the prompt and the response; ``marker`` is what extraction strips of it."""
    marker: str
    book_dpo_extra: int | None = None
    """The book's DPO (ch07/04) masks the prompt's own tokens and this many more (Alpaca's ``+ 2``, meant as
    the two newlines before ``### Response:``), scoring the rest of the header; None: from the response on."""

    def format_input(self, entry: dict) -> str:
        """The prompt as the book passes it to ``generate`` (no response header)."""
        if self.name == "alpaca":
            instruction = (
                "Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request."
                f"\n\n### Instruction:\n{entry['instruction']}"
            )
            return instruction + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")
        return f"<|user|>\n{entry['instruction']}" + (f"\n{entry['input']}" if entry["input"] else "")

    def format_example(self, entry: dict) -> str:
        """Prompt, response header and the expected output: one training text."""
        return self.format_input(entry) + self.response_header + entry["output"]

    def extract_response(self, generated: str, prompt: str) -> str:
        """The book's extraction: text after the prompt, the marker removed, whitespace stripped."""
        return generated[len(prompt) :].replace(self.marker, "").strip()

    def lay_out(self, tokenizer, entry: dict, response: str) -> Laid:
        """Prompt, header and ``response`` in tokens, and where the response starts (job/models/tokenizer.py's
        ``encode_parts``: a token merging the header's end with the response's start is the response's)."""
        ids, start = encode_parts(tokenizer, self.format_input(entry) + self.response_header, response)
        return Laid(ids, start)

    def preference_start(self, tokenizer, entry: dict, laid: Laid) -> int:
        """The first token DPO scores of ``laid``: its response's first, or where the style keeps the book's
        mask (Alpaca), the prompt's own tokens (encoded alone, as the book does) and ``book_dpo_extra`` more."""
        if self.book_dpo_extra is None:
            return laid.response_start
        return len(encode(tokenizer, self.format_input(entry))) + self.book_dpo_extra


PROMPT_STYLES = {
    "alpaca": PromptStyle("alpaca", "\n\n### Response:\n", "### Response:", book_dpo_extra=2),
    "phi3": PromptStyle("phi3", "\n<|assistant|>:\n", "<|assistant|>:"),
}
STYLE_NAMES = (*PROMPT_STYLES, "chat")


@dataclass(frozen=True)
class ChatStyle(PromptStyle):
    """``--prompt-style chat``: the tokenizer's own chat template (an instruct checkpoint's format). The entry is
    one user turn (instruction, a blank line, input) and the template's generation prompt follows it; the
    response comes right after and ends with the tokenizer's end token, as in the other styles."""

    render: Callable[[list[dict]], str] | None = field(default=None, compare=False)

    def format_input(self, entry: dict) -> str:
        content = entry["instruction"] + (f"\n\n{entry['input']}" if entry["input"] else "")
        return self.render([{"role": "user", "content": content}])


def prompt_style(name: str, tokenizer) -> PromptStyle:
    """The style ``--prompt-style`` names; ``chat`` is the tokenizer's template, which GPT-2's lacks."""
    if name != "chat":
        return PROMPT_STYLES[name]
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ConfigError(
            "--prompt-style chat needs the model's chat template (chat_template.jinja, or tokenizer_config.json's "
            "chat_template), "
            "which this model's tokenizer lacks: use --prompt-style alpaca or phi3"
        )
    return ChatStyle("chat", "", "", render=template.prompt)


# --- splitting, tokenizing, collating ---------------------------------------------------------


def split_entries(entries: list[dict], shuffle_seed: int | None = None):
    """(train, test, val): the first 85%, the next 10%, the rest, as the book does (935/110/55)."""
    if shuffle_seed is not None:
        entries = entries[:]
        random.Random(shuffle_seed).shuffle(entries)
    train_end = int(len(entries) * 0.85)
    test_end = train_end + int(len(entries) * 0.1)
    return entries[:train_end], entries[train_end:test_end], entries[test_end:]


@dataclass
class Example:
    token_ids: list[int]
    prompt_length: int
    """Tokens before the response's first (prompt and header): their targets are masked with
    ``--mask-instruction``, so the response's first token is the first target left."""
    trained: list[bool] | None = None
    """Formats other than the book's (job/data/formats.py): which tokens are trained targets, one more for the
    end token the collate appends; it holds whatever --mask-instruction says."""


def tokenize(entries: list[dict], tokenizer, style: PromptStyle, max_length: int) -> list[Example]:
    """Pre-tokenize once; sequences that will not fit ``max_length`` (with their end token) are cut."""
    examples, truncated = [], 0
    for entry in entries:
        laid = style.lay_out(tokenizer, entry, entry["output"])
        if len(laid.ids) + 1 > max_length:
            truncated += 1
        examples.append(Example(laid.ids, laid.response_start))
    if truncated:
        log.warning("sequences_truncated", count=truncated, max_length=max_length)
    return examples


def collate(
    batch: list[list[int]],
    pad_token_id: int = END_OF_TEXT_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    prompt_lengths: list[int] | None = None,
    trained: list[list[bool] | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's ``custom_collate_fn``: pad to the longest + 1, shift by one, mask all padding
    targets but the first end-of-text, truncate. ``prompt_lengths`` also masks prompt targets."""
    width = max(len(item) + 1 for item in batch)
    inputs, targets = [], []
    for row, item in enumerate(batch):
        padded = item + [pad_token_id] * (width - len(item))
        x, y = torch.tensor(padded[:-1]), torch.tensor(padded[1:])
        # The padding's targets but its first end-of-text, as the book masks them; told by position, not by id,
        # since a chat template's prompt may hold the end token itself (Llama 3's <|eot_id|> ends each turn).
        y[len(item) :] = ignore_index
        if prompt_lengths is not None:
            y[: prompt_lengths[row] - 1] = ignore_index  # targets that are still prompt tokens
        if trained is not None and trained[row] is not None:
            y[: len(item)][~torch.tensor(trained[row][1:], dtype=torch.bool)] = ignore_index
        if allowed_max_length is not None:
            x, y = x[:allowed_max_length], y[:allowed_max_length]
        inputs.append(x)
        targets.append(y)
    return torch.stack(inputs), torch.stack(targets)


class Collator:
    """The book's collate with the run's settings bound: a batch of examples in, (inputs, targets) out.

    ``pad_to_multiple`` rounds each batch's length up (within ``allowed_max_length``) with padding
    whose targets are ignored, after every real token: causal attention keeps the real positions
    as they were, so the loss is the same, and a GPU sees a few shapes instead of one per batch.
    """

    def __init__(
        self,
        allowed_max_length: int,
        mask_instruction: bool,
        pad_to_multiple: int | None = None,
        end_id: int = END_OF_TEXT_ID,
    ):
        self.allowed_max_length = allowed_max_length
        self.mask_instruction = mask_instruction
        self.pad_to_multiple = pad_to_multiple
        self.end_id = end_id  # the tokenizer's end-of-text: appended to each sequence, then padding

    def __call__(self, examples: list[Example]):
        prompt_lengths = [e.prompt_length for e in examples] if self.mask_instruction else None
        inputs, targets = collate(
            [e.token_ids for e in examples],
            self.end_id,
            allowed_max_length=self.allowed_max_length,
            prompt_lengths=prompt_lengths,
            trained=[e.trained for e in examples],
        )
        if self.pad_to_multiple:
            width = inputs.shape[1]
            extra = min(-width % self.pad_to_multiple, self.allowed_max_length - width)
            inputs = torch.nn.functional.pad(inputs, (0, extra), value=self.end_id)  # (B, T + extra)
            targets = torch.nn.functional.pad(targets, (0, extra), value=IGNORE_INDEX)
        return inputs, targets
