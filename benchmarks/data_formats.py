"""python -m benchmarks.data_formats [--sizes 1000,52000,500000] [--out FILE]: how a dataset's cost grows with
its size in each format (alpaca, messages, prompt-completion, text): reading and checking every entry and
tokenizing the training split as ``finetune`` lays that format out, each size and format in a fresh process
for its own time and peak memory (benchmarks/data_sources.py's measurement), as ratios against alpaca in the
same call; and the start-up of ``sft-job finetune --max-steps 1`` to its first training step for alpaca and
messages at each size (a tiny GPT-2, so the data is what grows).

Every format's entries are made from the book's 1,100, repeated to the size: messages a system turn, the
user's instruction (and input) and the assistant's output, every fifth conversation a second exchange (the
next entry's); prompt-completion the book's Alpaca prompt and response header, then the output, as text;
text the instruction, input and output joined. Messages go through GPT-2's tokenizer with a ``--chat-template``
file whose ``{% generation %}`` blocks mark the assistant's turns (GPT-2 has no template of its own), so every
format has the same tokenizer. JSON Lines, and messages in Parquet too (list<struct> columns)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.__main__ import default_data_dir, machine
from benchmarks.arguments import positive_int, writable_out
from benchmarks.data_sources import finetune_startup, isolated_load, job_cache, tiny_model

FORMATS = ("alpaca", "messages", "prompt-completion", "text")
STARTUP_FORMATS = ("alpaca", "messages")
SYSTEM = "You are a careful assistant. Answer the request in as few words as it needs."
# GPT-2's one special token ends each assistant turn; the generation blocks say which characters train.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
    "{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def as_format(data_format: str, book: list[dict], index: int) -> dict:
    """Entry ``index`` (of the book's, repeated) in ``data_format``."""
    entry = book[index % len(book)]
    if data_format == "alpaca":
        return entry
    asked = entry["instruction"] + (f"\n\n{entry['input']}" if entry["input"] else "")
    if data_format == "messages":
        turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": asked}]
        turns.append({"role": "assistant", "content": entry["output"]})
        if index % 5 == 4:
            following = book[(index + 1) % len(book)]
            turns.append({"role": "user", "content": following["instruction"]})
            turns.append({"role": "assistant", "content": following["output"]})
        return {"messages": turns}
    if data_format == "prompt-completion":
        from job.data.instructions import PROMPT_STYLES

        style = PROMPT_STYLES["alpaca"]
        return {
            "prompt": style.format_input({"input": "", **entry}) + style.response_header,
            "completion": entry["output"],
        }
    return {"text": "\n\n".join(part for part in (entry["instruction"], entry["input"], entry["output"]) if part)}


def write_format(book: list[dict], data_format: str, size: int, folder: Path, parquet: bool = False) -> Path:
    """``size`` entries of ``data_format`` as JSON Lines (or Parquet)."""
    entries = [as_format(data_format, book, i) for i in range(size)]
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / f"{data_format}-{size}.parquet"
        pq.write_table(pa.Table.from_pylist(entries), path)
        return path
    path = folder / f"{data_format}-{size}.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def run(sizes: list[int], data_dir: str, startup: bool, startups=STARTUP_FORMATS, loads: bool = True) -> dict:
    book = [{"input": "", **e} for e in json.loads((Path(data_dir) / "instruction-data.json").read_text())]
    tokenizer_dir = str(Path(data_dir) / "gpt2")
    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        template = folder / "chat.jinja"
        template.write_text(CHAT_TEMPLATE)
        cache = job_cache(folder, tokenizer_dir)
        model = tiny_model(folder / "model") if startup else None
        for size in sizes:
            files = {kind: write_format(book, kind, size, folder) for kind in FORMATS}
            files["messages/parquet"] = write_format(book, "messages", size, folder, parquet=True)
            for kind, path in files.items() if loads else ():
                results[f"{size}/{kind}"] = isolated_load(path, tokenizer_dir, template)
                print(f"{size} {kind}: {results[f'{size}/{kind}']}", file=sys.stderr, flush=True)
            for kind in startups if model is not None else ():
                extra = ("--chat-template", str(template)) if kind == "messages" else ()
                out = folder / f"ft-{size}-{kind}"
                results[f"{size}/{kind}/finetune"] = finetune_startup(files[kind], model, cache, out, *extra)
                print(f"{size} {kind} finetune: {results[f'{size}/{kind}/finetune']}", file=sys.stderr, flush=True)
            for path in files.values():
                path.unlink()
    return results


def ratios(results: dict, sizes: list[int]) -> dict:
    """Each format's figures over alpaca's at the same size, and the start-ups' over alpaca's."""
    out = {}
    for size in sizes:
        base = results[f"{size}/alpaca"]
        for kind in (*FORMATS[1:], "messages/parquet"):
            for figure in ("load_check_seconds", "tokenize_seconds", "peak_rss_bytes", "tokens"):
                if base[figure] and f"{size}/{kind}" in results:
                    out[f"{size}/{kind}_vs_alpaca:{figure}"] = round(
                        results[f"{size}/{kind}"][figure] / base[figure], 2
                    )
        if f"{size}/messages/finetune" in results:
            for figure in ("to_first_step_seconds", "wall_seconds"):
                base_startup = results[f"{size}/alpaca/finetune"][figure]
                out[f"{size}/messages_vs_alpaca:finetune_{figure}"] = round(
                    results[f"{size}/messages/finetune"][figure] / base_startup, 2
                )
    return out


def measure_offsets(size: int, data_dir: str, repeats: int = 3) -> dict:
    """A conversation's token spans (job/data/conversation.py's ``token_offsets``, what the messages format
    tokenizes with) on the rendered text of ``size`` * 0.85 conversations, ASCII as the book's, against the
    same texts with one non-ASCII character at their end, which takes the character-by-character path every
    text took before; the fastest of ``repeats`` each and their ratio."""
    from job.data.conversation import token_offsets
    from job.models.chat_template import ChatTemplate
    from job.models.tokenizer import END_OF_TEXT, load_tokenizer

    book = [{"input": "", **e} for e in json.loads((Path(data_dir) / "instruction-data.json").read_text())]
    template = ChatTemplate(CHAT_TEMPLATE, {"eos_token": END_OF_TEXT}, "benchmark")
    texts = [template.render(as_format("messages", book, i)["messages"])[0] for i in range(int(size * 0.85))]
    tokenizer = load_tokenizer(Path(data_dir) / "gpt2")
    seconds: dict[str, list[float]] = {"character_by_character": [], "ascii": []}
    for _ in range(repeats):
        for name, suffix in (("character_by_character", "\u00e9"), ("ascii", "")):
            started = time.perf_counter()
            for text in texts:
                token_offsets(tokenizer, text + suffix)
            seconds[name].append(time.perf_counter() - started)
    best = {name: round(min(times), 3) for name, times in seconds.items()}
    ratio = round(best["ascii"] / best["character_by_character"], 3)
    return {"texts": len(texts), "seconds": seconds, "best_seconds": best, "ascii_vs_character_by_character": ratio}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_formats", description=__doc__)
    parser.add_argument("--sizes", default="1000,52000,500000")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--no-startup", action="store_true", help="leave out the finetune start-ups")
    parser.add_argument("--startups", default=",".join(STARTUP_FORMATS), help="formats whose start-up is timed")
    parser.add_argument("--no-loads", action="store_true", help="only the start-ups (--startups)")
    parser.add_argument("--offsets", action="store_true", help="only a conversation's token spans, before/after")
    parser.add_argument("--repeats", type=positive_int, default=3, help="--offsets: times each way is timed")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results-cpu-data-formats.json")
    args = parser.parse_args(argv)
    writable_out(parser, args.out)
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.time()
    load_at_start = os.getloadavg()
    data_dir = args.data_dir or default_data_dir()
    if args.offsets:
        offsets = {size: measure_offsets(size, data_dir, args.repeats) for size in sizes}
        report = {"machine": machine("cpu"), "offsets": offsets}
    else:
        startups = tuple(args.startups.split(","))
        results = run(sizes, data_dir, not args.no_startup, startups, not args.no_loads)
        figures = {} if args.no_loads else ratios(results, sizes)
        report = {"machine": machine("cpu"), "sizes": sizes, "results": results, "ratios": figures}
    report["seconds"] = round(time.time() - started, 1)
    report["load_average_at_start"], report["load_average_at_end"] = load_at_start, os.getloadavg()
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
