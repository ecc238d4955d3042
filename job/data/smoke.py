"""What ``sft-job run --smoke`` needs with no network at all, made by the job itself: a small instruction
dataset whose entries also carry a chosen and a rejected response (so ``--smoke --dpo`` has preference
data too). The smoke's model is a random 2-layer GPT-2 the run writes, its tokenizer the in-memory byte
tokenizer (job/models/tokenizer.py): nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

from job.storage.store import atomic_write_text

WORDS = ("apple", "river", "stone", "cloud", "garden", "window", "pencil", "candle", "forest", "bridge")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SMOKE_ENTRIES = 120  # 102 / 12 / 6 in the 85/10/5 split


def smoke_entries(count: int = SMOKE_ENTRIES) -> list[dict]:
    """Short, deterministic tasks (repeat, reverse, spell a digit): short sequences, so the smoke is quick."""
    entries = []
    for i in range(count):
        word, digit = WORDS[i % len(WORDS)], i % len(NUMBERS)
        task = (
            {"instruction": "Repeat the word.", "input": word, "output": word},
            {"instruction": "Write the word backwards.", "input": word, "output": word[::-1]},
            {"instruction": f"Write the digit {digit} as a word.", "input": "", "output": NUMBERS[digit]},
        )[i % 3]
        entries.append(task | {"chosen": task["output"], "rejected": f"{task['output']}, obviously."})
    return entries


def write_smoke_data(path: str | Path) -> Path:
    """The smoke's dataset at ``path`` (the cache's ``smoke/instruction-data.json``), written once."""
    path = Path(path)
    if not path.is_file():
        atomic_write_text(path, json.dumps(smoke_entries(), indent=1) + "\n")
    return path
