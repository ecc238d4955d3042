"""A user's own data files through the real CLI: what a JSON or JSON Lines file may hold and how what it may
not is refused (one line naming the file, the entry or line, and the field or key; nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.helpers import cli, events


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


def test_nan_or_an_overflowing_number_in_a_test_entry_is_refused_at_preflight_naming_entry_and_field(
    cache, tmp_path, tiny_model_dir
):
    book = json.loads((cache / "instruction-data.json").read_text())
    book[1050]["extra"] = {"scores": [1, float("nan")]}  # a test entry: its columns reach the responses file
    data = tmp_path / "nan.json"
    data.write_text(json.dumps(book))  # json writes NaN bare, as pandas' to_json(...) of a NaN does not
    runs = tmp_path / "runs"
    args = ["run", "--smoke", "--data", data, "--cache", cache, "--output", runs, "--run-id", "n"]
    line = _refused(cli(*args, "--metrics-port", "0", "--skip-judge"), runs / "n")  # no run folder
    assert line == (
        f"Error: dataset {data}: entry 1050: field 'extra.scores.1': NaN is not JSON (NaN and Infinity are not "
        "numbers JSON holds): give a finite number or null"
    )
    book[1050]["extra"] = 1
    parquet = tmp_path / "inf.parquet"
    pq.write_table(
        pa.Table.from_pylist([{**e, "extra": 1e308 * 10 if i == 3 else 0.5} for i, e in enumerate(book)]), parquet
    )
    line = _refused(_finetune(tiny_model_dir, cache, parquet, tmp_path / "out", "--max-steps", "1"), tmp_path / "out")
    assert line == (
        f"Error: dataset {parquet}: entry 3: field 'extra': inf is not a finite number (JSON holds no NaN or "
        "Infinity): give a finite number or null"
    )


def test_a_test_entrys_score_column_is_refused_at_preflight_not_after_every_stage(cache, tmp_path):
    book = json.loads((cache / "instruction-data.json").read_text())
    for entry in book[1000:]:
        entry["score"] = "high"  # a data column named like the judge's field, as in the report
    data = tmp_path / "scored.json"
    data.write_text(json.dumps(book))
    runs = tmp_path / "runs"
    args = ["run", "--smoke", "--data", data, "--cache", cache, "--output", runs, "--run-id", "s"]
    line = _refused(cli(*args, "--metrics-port", "0", "--skip-judge"), runs / "s")
    assert line == (
        f"Error: dataset {data}: test entry 65: column 'score' has the name of a field the judge writes into each test "
        "entry's record (model_response, score, judge_reply): rename or drop the column"
    )


def test_one_top_level_object_is_refused_unless_it_is_one_line_of_json_lines(cache, tmp_path):
    entry = json.loads((cache / "instruction-data.json").read_text())[0]
    runs = tmp_path / "runs"
    args = ["run", "--smoke", "--cache", cache, "--output", runs, "--metrics-port", "0", "--skip-judge"]
    pretty = tmp_path / "object.json"
    pretty.write_text(json.dumps(entry, indent=2))
    line = _refused(cli(*args, "--data", pretty, "--run-id", "o"), runs / "o")
    assert line == f"Error: dataset {pretty} holds one JSON object: expected a JSON array of entries (or JSON Lines)"
    one_line = tmp_path / "one.json"
    one_line.write_text(json.dumps(entry) + "\n\n")  # JSON Lines of one entry: read, then too few to split
    done = cli(*args, "--data", one_line, "--run-id", "l", "--batch-size", "2")
    assert done.returncode == 2 and not (runs / "l").exists(), done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        "Error: --batch-size 2 is larger than the training split of 0 entries (the dataset has 1 entry): "
        "use a smaller --batch-size or more data"
    ]


def test_a_json_lines_file_with_a_byte_order_mark_trains(tiny_model_dir, cache, tmp_path):
    book = json.loads((cache / "instruction-data.json").read_text())[:60]
    data = tmp_path / "excel.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(e) + "\n" for e in book).encode())  # as Notepad saves it
    done = _finetune(tiny_model_dir, cache, data, tmp_path / "out", "--max-steps", "1", "--batch-size", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    start = next(e for e in events(done.stdout) if e["event"] == "finetune_start")
    assert start["train_examples"] == 51


def test_a_field_longer_than_any_context_is_refused_before_it_is_tokenized(tiny_model_dir, cache, tmp_path):
    book = json.loads((cache / "instruction-data.json").read_text())[:60]
    book[3]["output"] = "lorem ipsum " * 400_000  # 4.8M characters: tokenized whole it cost ~120 bytes a token
    data = tmp_path / "long.json"
    data.write_text(json.dumps(book))
    line = _refused(_finetune(tiny_model_dir, cache, data, tmp_path / "out", "--max-steps", "1"), tmp_path / "out")
    assert line == (
        f"Error: dataset {data}: entry 3: field 'output': holds 4,800,000 characters, more than the 4,194,304 a field "
        "may hold (more than any model's context reads): shorten it or split the entry"
    )
