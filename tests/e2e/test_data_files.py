"""A user's own data files through the real CLI: what a JSON or JSON Lines file may hold and how what it may
not is refused (one line naming the file, the entry or line, and the field or key; nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import cli


def _finetune(model_dir: Path, cache: Path, data: Path, output: Path, *extra):
    return cli("finetune", "--model-dir", model_dir, "--data", data, "--cache", cache, "--output", output,
               "--log-format", "json", *extra)  # fmt: skip


def _refused(done, output: Path) -> str:
    assert done.returncode == 1, done.stderr[-2000:]
    [line] = done.stderr.splitlines()
    assert not output.exists()
    return line


def test_an_entry_naming_a_key_twice_is_exit_1_naming_the_file_the_line_or_entry_and_the_key(
    tiny_model_dir, cache, tmp_path
):
    book = json.loads((cache / "instruction-data.json").read_text())[:60]
    lines = [json.dumps(e) for e in book]
    lines[7] = lines[7][:-1] + ', "output": "DUP"}'
    jsonl = tmp_path / "dup.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    line = _refused(_finetune(tiny_model_dir, cache, jsonl, tmp_path / "out"), tmp_path / "out")
    assert line == f"Error: dataset {jsonl}: line 8: key 'output' appears twice: keep one"

    array = tmp_path / "dup.json"
    array.write_text("[\n" + ",\n".join(lines) + "\n]")
    line = _refused(_finetune(tiny_model_dir, cache, array, tmp_path / "out"), tmp_path / "out")
    assert line == f"Error: dataset {array}: entry 7: key 'output' appears twice: keep one"
