"""Where a dataset's entries come from (job/data/sources.py): Parquet beside JSON and JSON Lines with the same
bounds and one-line errors, a folder of split files, other column names."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job.core.errors import ConfigError
from job.data import sources
from job.data.instructions import DataError, split_entries
from job.data.sources import (
    Source,
    load_splits,
    local_source,
    parse_fields,
    parse_hub_dataset,
    read_rows,
    source_digest,
    split_of,
)


def _parquet(path: Path, rows: list[dict] | pa.Table, **kw) -> Path:
    pq.write_table(rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows), path, **kw)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


# --- Parquet ------------------------------------------------------------------------------------


def test_the_books_data_as_parquet_reads_as_its_json_and_splits_935_110_55(book_data, tmp_path):
    path = _parquet(tmp_path / "book.parquet", book_data)
    splits = load_splits(local_source(path))
    assert (splits.train, splits.test, splits.val) == split_entries(book_data)
    assert (len(splits.train), len(splits.test), len(splits.val)) == (935, 110, 55)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"instruction": st.text(min_size=1), "input": st.text(), "output": st.text()},
        ),
        min_size=1,
        max_size=12,
    )
)
def test_any_entries_read_the_same_from_parquet_json_and_json_lines(tmp_path_factory, entries):
    folder = tmp_path_factory.mktemp("same")
    (folder / "d.json").write_text(json.dumps(entries))
    read = [read_rows(p) for p in (folder / "d.json", _jsonl(folder / "d.jsonl", entries))]
    read.append(read_rows(_parquet(folder / "d.parquet", entries)))
    assert read[0] == read[1] == read[2] == entries


def test_a_truncated_or_foreign_parquet_file_is_one_line_naming_it(book_data, tmp_path):
    whole = _parquet(tmp_path / "whole.parquet", book_data).read_bytes()
    cut = tmp_path / "cut.parquet"
    for body in (whole[: len(whole) // 2], whole[:-3], b"PAR1" + b"\0" * 40, json.dumps(book_data[:2]).encode()):
        cut.write_bytes(body)
        with pytest.raises(DataError) as info:
            read_rows(cut)
        assert _one_line(info).startswith(f"dataset {cut} is not a Parquet file we can read: "), info.value
    flipped = bytearray(whole)
    flipped[len(whole) // 3 : len(whole) // 3 + 64] = b"\xff" * 64  # a damaged page inside the file
    cut.write_bytes(bytes(flipped))
    with pytest.raises(DataError) as info:
        load_splits(local_source(cut))
    assert str(cut) in _one_line(info)


def test_a_parquet_column_of_another_type_or_a_null_is_exit_1_naming_the_entry_and_field(tmp_path):
    good = {"instruction": "a", "input": "", "output": "b"}
    ints = pa.table({"instruction": ["a", "b"], "input": ["", ""], "output": pa.array([1, 2], pa.int64())})
    nested_null = pa.table({"instruction": [["a", None]], "output": ["b"]})
    struct = pa.table({"instruction": ["a"], "input": [{"x": None}], "output": ["b"]})
    cases = [
        (
            pa.Table.from_pylist([good, {**good, "output": None}]),
            "entry 1: field 'output' must be a string, got NoneType",
        ),
        (ints, "entry 0: field 'output' must be a string, got int"),
        (nested_null, "entry 0: field 'instruction' must be a string, got list"),
        (struct, "entry 0: field 'input' must be a string, got dict"),
        (pa.table({"question": ["a"], "output": ["b"]}), "entry 0: field 'instruction' is missing"),
    ]
    for number, (table, message) in enumerate(cases):
        path = _parquet(tmp_path / f"t{number}.parquet", table)
        with pytest.raises(DataError) as info:
            load_splits(local_source(path))
        assert _one_line(info).startswith(f"dataset {path}: {message}"), info.value


def test_an_empty_parquet_file_and_one_past_the_bounds_are_named(tmp_path, monkeypatch):
    empty = _parquet(tmp_path / "empty.parquet", pa.table({"instruction": pa.array([], pa.string())}))
    with pytest.raises(DataError, match=f"dataset {empty} has no entries"):
        read_rows(empty)
    # Text that compresses 1000 to 1 must not expand past the bound in memory: the footer's sizes refuse it.
    rows = [{"instruction": "a" * 4000, "output": "b"}] * 300
    big = _parquet(tmp_path / "big.parquet", rows, compression="zstd", use_dictionary=False)
    monkeypatch.setattr(sources, "MAX_DATASET_BYTES", 100_000)
    assert big.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"MB of data uncompressed: more than we read"):
        read_rows(big)
    monkeypatch.setattr(sources, "MAX_DATASET_BYTES", big.stat().st_size - 1)
    with pytest.raises(DataError, match=f"dataset {big} is larger than"):
        read_rows(big)


# --- a folder of splits ---------------------------------------------------------------------------


def _folder(tmp_path: Path, book_data: list[dict]) -> Path:
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps(book_data[:40]))
    _jsonl(folder / "validation.jsonl", book_data[40:50])
    _parquet(folder / "test.parquet", book_data[50:58])
    (folder / "README.md").write_text("not data")
    return folder


def test_a_folder_of_three_split_files_of_three_types_gives_those_splits(book_data, tmp_path):
    folder = _folder(tmp_path, book_data)
    splits = load_splits(local_source(folder))
    assert (splits.train, splits.val, splits.test) == (book_data[:40], book_data[40:50], book_data[50:58])
    only = load_splits(local_source(folder, data_split="validation"))  # one split, cut as a file is
    assert (only.train, only.test, only.val) == split_entries(book_data[40:50])


def test_a_folder_without_train_with_two_train_files_or_without_a_needed_split_is_named(book_data, tmp_path):
    folder = _folder(tmp_path, book_data)
    _jsonl(folder / "train.jsonl", book_data[:3])
    with pytest.raises(DataError) as info:
        local_source(folder)
    assert _one_line(info) == f"dataset folder {folder} has two train files, train.json and train.jsonl: keep one"
    (folder / "train.json").unlink()
    (folder / "train.jsonl").rename(folder / "training.jsonl")
    with pytest.raises(DataError) as info:
        local_source(folder)
    assert _one_line(info).startswith(f"dataset folder {folder} has no train file (train.json, train.jsonl")
    (folder / "train.parquet").write_bytes(pq_bytes(book_data[:5], tmp_path))
    (folder / "test.parquet").unlink()
    source = local_source(folder)
    assert load_splits(source, need=("validation",)).test == []
    with pytest.raises(DataError, match=f"dataset {folder} has no test file: the stage needs its test split"):
        load_splits(source, need=("test",))
    with pytest.raises(DataError, match=f"dataset folder {folder} has no test file"):
        local_source(folder, data_split="test")
    with pytest.raises(ConfigError, match="--data-split test names a split of a folder or a hub dataset"):
        local_source(folder / "train.parquet", data_split="test")


def test_a_folder_and_a_hub_dataset_name_their_splits_alike():
    # one function for both: the hub's aliases and shards, files naming no split left out
    names = ["train-00001-of-00002.jsonl", "train-00000-of-00002.jsonl", "dev.jsonl", "test.parquet", "notes.json",
             "README.md", "data/valid-00000-of-00001.parquet"]  # fmt: skip
    with pytest.raises(DataError, match="^d has two validation files, dev.jsonl and data/valid-00000-of-00001.parquet"):
        sources.files_by_split(names, "d")
    by_split, unnamed = sources.files_by_split(names[:-1], "d")
    assert by_split == {
        "train": ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"],
        "validation": ["dev.jsonl"],
        "test": ["test.parquet"],
    }
    assert unnamed == ["notes.json"]
    assert sources.files_by_split(["data.jsonl", "README.md"], "d") == ({"train": ["data.jsonl"]}, [])
    for pair in (["train.json", "train.jsonl"], ["Validation.json", "val.jsonl"], ["train.json", "train-0-of-1.json"]):
        with pytest.raises(DataError, match=f"^d has two (train|validation) files, {pair[0]} and {pair[1]}: keep one"):
            sources.files_by_split(pair, "d")


def test_a_folder_reads_shards_in_order_and_aliases_below_it_and_leaves_hidden_files(book_data, tmp_path):
    folder = tmp_path / "clone"
    (folder / "data").mkdir(parents=True)
    (folder / ".cache").mkdir()
    _jsonl(folder / "data" / "train-00001-of-00002.jsonl", book_data[20:40])
    _parquet(folder / "data" / "train-00000-of-00002.parquet", book_data[:20])
    _jsonl(folder / "data" / "dev.jsonl", book_data[40:50])
    _jsonl(folder / ".cache" / "test.jsonl", book_data[50:52])  # hidden: not the test split
    (folder / "notes.json").write_text("[]")
    splits = load_splits(local_source(folder))
    assert (splits.train, splits.val, splits.test) == (book_data[:40], book_data[40:50], [])


def pq_bytes(rows: list[dict], tmp_path: Path) -> bytes:
    return _parquet(tmp_path / "scratch.parquet", rows).read_bytes()


def test_a_bad_entry_in_a_split_file_names_that_file(book_data, tmp_path):
    folder = _folder(tmp_path, book_data)
    _jsonl(folder / "validation.jsonl", [*book_data[40:42], {"instruction": "x", "output": 3}])
    with pytest.raises(DataError) as info:
        load_splits(local_source(folder))
    assert _one_line(info).startswith(f"dataset {folder / 'validation.jsonl'}: entry 2: field 'output' must be")


def test_a_folders_digest_changes_with_any_file_and_a_files_is_its_sha256(book_data, tmp_path):
    folder = _folder(tmp_path, book_data)
    before = source_digest(local_source(folder))
    assert before == source_digest(local_source(folder))
    (folder / "README.md").write_text("other words")  # not data: not read, not bound
    assert source_digest(local_source(folder)) == before
    _jsonl(folder / "validation.jsonl", book_data[41:50])
    changed = source_digest(local_source(folder))
    assert changed != before
    (folder / "validation.jsonl").rename(folder / "validation.json")  # same bytes, another file
    assert source_digest(local_source(folder)) not in (before, changed)
    import hashlib

    train = folder / "train.json"
    assert source_digest(Source(str(train), whole=(train,))) == hashlib.sha256(train.read_bytes()).hexdigest()


# --- other column names ---------------------------------------------------------------------------


def test_dollys_columns_read_as_instruction_input_output(tmp_path):
    dolly = [
        {"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "open_qa"},
        {"instruction": "Summarize.", "context": "Long text.", "response": "Short.", "category": "summarization"},
    ]
    path = _parquet(tmp_path / "dolly.parquet", dolly * 10)
    fields = parse_fields("input=context,output=response")
    splits = load_splits(local_source(path), fields=fields)
    expected = {"instruction": "Summarize.", "input": "Long text.", "output": "Short.", "category": "summarization"}
    assert splits.train[1] == expected
    renamed_all = parse_fields("instruction=q, input=c, output=a")
    assert renamed_all == {"instruction": "q", "input": "c", "output": "a"}


COLUMNS = ("instruction", "input", "output", "prompt", "context", "response", "q")


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(sources.FIELD_TARGETS), st.sampled_from(COLUMNS), max_size=6))
def test_each_named_field_reads_its_column_as_the_entry_was_and_the_others_their_own(fields):
    # any mapping: swaps, one column for several fields, a field onto another field's column
    entry = {column: f"value of {column}" for column in COLUMNS}
    out, problem = sources.renamed(entry, fields)
    assert problem is None
    for target in ("instruction", "input", "output", "prompt"):
        assert out[target] == entry[fields.get(target, target)]
    for column in ("context", "response", "q"):  # read under a field's name: not kept twice
        assert (column in out) == (column not in fields.values())


def test_a_named_column_missing_in_an_entry_is_exit_1_naming_the_entry_and_column(tmp_path):
    rows = [{"instruction": "a", "context": "", "response": "b"}, {"instruction": "c", "context": ""}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_splits(local_source(path), fields=parse_fields("input=context,output=response"))
    assert _one_line(info).startswith(
        f"dataset {path}: entry 1: column 'response' (--data-fields output=response) is missing"
    )
    _format, kept = sources.checked_entries(path, rows, True, fields=parse_fields("input=context,output=response"))
    assert kept == [{"instruction": "a", "input": "", "output": "b"}]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("output", "'output' is not FIELD=COLUMN"),
        ("output=", "'output=' is not FIELD=COLUMN"),
        ("=response", "'=response' is not FIELD=COLUMN"),
        ("", "'' is not FIELD=COLUMN"),
        ("answer=response", "'answer' is not one of instruction, input, output"),
        ("Output=response", "'Output' is not one of"),
        ("output=a,output=b", "'output' is named twice"),
        ("output=response,", "'' is not FIELD=COLUMN"),
    ],
)
def test_a_bad_data_fields_spec_is_a_config_error_naming_the_flag(spec, message):
    with pytest.raises(ConfigError) as info:
        parse_fields(spec)
    assert _one_line(info).startswith(f"--data-fields {spec!r}: {message}")


# --- hub names ------------------------------------------------------------------------------------


def test_hub_dataset_names_and_their_split_files():
    dolly = "databricks/databricks-dolly-15k"
    assert parse_hub_dataset(f"hf://datasets/{dolly}") == (dolly, "main")
    assert parse_hub_dataset("hf://datasets/tatsu-lab/alpaca@dce01c9") == ("tatsu-lab/alpaca", "dce01c9")
    assert parse_hub_dataset("data/train.json") is None
    for bad in ("hf://datasets/alpaca", "hf://datasets/a/b/c", "hf://datasets/a/b@", "hf://datasets/a/..@x",
                "hf://datasets/a/b@../../x", "hf://datasets/ a/b"):  # fmt: skip
        with pytest.raises(ConfigError, match="--data .*: a hub dataset is hf://datasets/ORG/NAME"):
            parse_hub_dataset(bad)
    names = {
        "data/train-00000-of-00002.parquet": "train",
        "train.jsonl": "train",
        "data/validation-00000-of-00001.parquet": "validation",
        "dev.json": "validation",
        "test/part-0.parquet": "test",
        "README.md": None,
        "alpaca_data.json": None,
        "trainer.json": None,
    }
    assert {name: split_of(name) for name in names} == names
