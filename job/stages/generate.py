"""The generate stage (book, 7.7): responses for the test split, decoded in batches with the KV cache."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from job.core.errors import ConfigError
from job.core.observability import Metrics, Progress, get_logger
from job.data.formats import Layout, as_book_entry, layout
from job.data.instructions import (
    RESPONSES_FILE,
    STYLE_NAMES,
    DataError,
    prompt_style,
)
from job.data.sources import Splits, dataset_splits, without_refused
from job.models.decoding import generate, generate_fixed_batch
from job.models.families import load_model, model_tokenizer
from job.models.gpt2_weights import recorded_settings
from job.models.tokenizer import decode_response, encode
from job.stages.generate_config import GenerateConfig
from job.storage.store import atomic_write_text, read_progress
from job.training.train_config import resolve_precision

log = get_logger(__name__)
PROGRESS_FILE = "instruction-data-with-response.progress.jsonl"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def saved_prompt_style(model_dir: str | Path) -> str | None:
    """The prompt style the finetune stage recorded in the model's config.json, if a known one."""
    style = recorded_settings(model_dir).get("prompt_style")
    return style if style in STYLE_NAMES else None


WRITTEN_FIELDS = {"model_response": "generate", "score": "the judge", "judge_reply": "the judge"}
"""The fields generate and the judge add to each test entry's record (the responses and scores files)."""
BOOK_FIELDS = ("instruction", "input", "output")
"""What an entry of another format gets as the book's fields in those records (job/data/formats.py's
``as_book_entry``): what the model is asked and the expected answer."""


def check_written_fields(splits: Splits) -> None:
    """A test entry with a column named like a field the job writes into its record would be overwritten there,
    or (the report reading a string ``score``) fail the run after every stage; refused before anything runs."""
    written = dict(WRITTEN_FIELDS)
    if splits.data_format != "alpaca":
        written |= dict.fromkeys(BOOK_FIELDS, "generate")
    for index, entry in enumerate(splits.test):
        column = next((name for name in entry if name in written), None)
        if column is not None:
            raise DataError(
                f"dataset {splits.where['test']}: test entry {index}: column {column!r} has the name of a field "
                f"{written[column]} writes into each test entry's record ({', '.join(written)}): rename or drop "
                "the column"
            )


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by prompt length, so each batch pads little; fixed for a given input."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def check_room(max_new_tokens: int, longest_prompt: int, context_length: int, entry: int | None = None) -> None:
    """Every prompt and its new tokens must fit the model's context (else prompts would be cut); the
    hint is a value that works, or where none does, the entry to shorten."""
    if longest_prompt + max_new_tokens <= context_length:
        return
    which = f" (test entry {entry})" if entry is not None else ""
    if longest_prompt >= context_length:
        raise DataError(
            f"the longest test prompt{which} has {longest_prompt} tokens, more than the model's context of "
            f"{context_length} leaves for a response: shorten or drop that entry"
        )
    raise ConfigError(
        f"--max-new-tokens {max_new_tokens} plus the longest test prompt{which} ({longest_prompt} tokens) exceeds "
        f"the model's context of {context_length} tokens: use --max-new-tokens {context_length - longest_prompt} "
        "or fewer"
    )


def longest_prompt(prompt_ids: list[list[int]]) -> tuple[int, int | None]:
    """(tokens, index) of the longest of the test split's prompts."""
    if not prompt_ids:
        return 0, None
    index = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    return len(prompt_ids[index]), index


def _response(record: dict, entries: int) -> bool:
    return 0 <= record["index"] < entries and isinstance(record.get("model_response"), str)


def _decode(model, batch_ids: list[list[int]], cfg: GenerateConfig, end_id: int, seed: int) -> list[list[int]]:
    """One batch's new tokens up to the tokenizer's ``end_id``: greedy with a fixed shape (--eos-check-every),
    or the book's sampling, seeded per batch so a restart samples the same."""
    if cfg.eos_check_every:
        return generate_fixed_batch(model, batch_ids, cfg.max_new_tokens, end_id, check_every=cfg.eos_check_every)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return generate(
        model, batch_ids, cfg.max_new_tokens, end_id, temperature=cfg.temperature, top_k=cfg.top_k, generator=generator
    )


def _load(cfg: GenerateConfig):
    """The test split (the dataset first: a bad one fails before the model loads), its layout (the format,
    the prompt style, a conversation's template), the tokenizer and the model on the device."""
    cache = Path(cfg.cache)
    splits = dataset_splits(cfg, need=("test",))
    check_written_fields(splits)
    data_format, entries = splits.data_format, splits.train + splits.val + splits.test
    tokenizer = model_tokenizer(cfg.model_dir, cache, cfg.base_url)
    style = prompt_style(cfg.prompt_style or saved_prompt_style(cfg.model_dir) or "alpaca", tokenizer)
    how = layout(cfg, data_format, entries, tokenizer, style, splits.origin)
    test = without_refused(splits, how, ("test",)).test[: cfg.limit]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return test, how, tokenizer, load_model(cfg.model_dir).to(device).eval(), device


def _write_responses(final: Path, test: list[dict], responses: dict[int, str], data_format: str) -> Path:
    """The test entries with their responses, as the book's instruction-data-with-response.json (an entry of
    another format with the book's fields the judge reads: job/data/formats.py's ``as_book_entry``)."""
    rows = [{**as_book_entry(data_format, e), "model_response": responses[i]} for i, e in enumerate(test)]
    atomic_write_text(final, json.dumps(rows, indent=4, allow_nan=False) + "\n")  # always JSON: no bare NaN
    return final


def _response_text(how: Layout, prompt: str, generated: str) -> str:
    """The book's extraction for its format; another format's response is the generated text, stripped."""
    if how.data_format == "alpaca":
        return how.style.extract_response(prompt + generated, prompt)
    return generated.strip()


def run_generate(cfg: GenerateConfig, metrics: Metrics | None = None) -> Path:
    metrics, output = metrics or Metrics(), Path(cfg.output)
    test, how, tokenizer, model, device = _load(cfg)
    precision = resolve_precision(cfg.precision)
    autocast = torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]) if precision != "fp32" else nullcontext()

    prompts = [how.prompt(e) for e in test]
    prompt_ids = [encode(tokenizer, p) for p in prompts]
    longest, which = longest_prompt(prompt_ids)
    check_room(cfg.max_new_tokens, longest, model.cfg.context_length, which)
    output.mkdir(parents=True, exist_ok=True)
    progress_path = output / PROGRESS_FILE
    done = {i: r["model_response"] for i, r in read_progress(progress_path).items() if _response(r, len(test))}
    batches = length_sorted_batches([len(p) for p in prompt_ids], cfg.batch_size)
    todo = [(b, batch) for b, batch in enumerate(batches) if not all(i in done for i in batch)]
    log.info(
        "generate_start",
        model_dir=cfg.model_dir,
        entries=len(test),
        already_done=len(done),
        to_decode=sum(len(x) for _, x in todo),
        prompt_style=how.style.name,
        device=str(device),
        max_new_tokens=cfg.max_new_tokens,
        precision=precision,
    )

    started, new_tokens, decoded = time.perf_counter(), 0, 0
    # every 0 s: one event per batch off a terminal (a batch takes seconds), which restarts rely on
    bar = Progress("generate", len(test), len(done), "response", metrics, every_s=0.0)
    with open(progress_path, "a") as progress, autocast:
        for b, batch in todo:
            outputs = _decode(model, [prompt_ids[i] for i in batch], cfg, tokenizer.eot_token, seed=cfg.seed + b)
            for i, ids in zip(batch, outputs, strict=True):
                response = _response_text(how, prompts[i], decode_response(tokenizer, ids))
                progress.write(json.dumps({"index": i, "model_response": response}) + "\n")
                done[i] = response
            progress.flush()
            batch_tokens = sum(len(ids) for ids in outputs)
            new_tokens += batch_tokens
            decoded += len(batch)
            metrics.generate_tokens_total.inc(batch_tokens)
            bar.update(len(batch))

    elapsed = time.perf_counter() - started
    tokens_per_second = new_tokens / elapsed if elapsed > 0 else 0.0
    metrics.generate_tokens_per_second.set(tokens_per_second)
    final = _write_responses(output / RESPONSES_FILE, test, done, how.data_format)
    progress_path.unlink()
    bar.close()
    rate, seconds = round(tokens_per_second, 1), round(elapsed, 3)
    log.info(
        "generate_done",
        decoded=decoded,
        new_tokens=new_tokens,
        seconds=seconds,
        tokens_per_second=rate,
        path=str(final),
    )
    return final
