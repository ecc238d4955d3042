import json

import pytest

from job.data.instructions import (
    PROMPT_STYLES,
    DataError,
    collate,
    load_entries,
    split_entries,
    tokenize,
)
from job.models.tokenizer import encode, load_tokenizer


def test_the_books_collate_example_prints_the_books_tensors():
    inputs, targets = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert str(inputs) == (
        "tensor([[    0,     1,     2,     3,     4],\n"
        "        [    5,     6, 50256, 50256, 50256],\n"
        "        [    7,     8,     9, 50256, 50256]])"
    )
    assert str(targets) == (
        "tensor([[    1,     2,     3,     4, 50256],\n"
        "        [    6, 50256,  -100,  -100,  -100],\n"
        "        [    8,     9, 50256,  -100,  -100]])"
    )


def test_collate_truncates_and_masks_prompts():
    inputs, targets = collate([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3, prompt_lengths=[3, 1])
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 50256]]
    assert targets.tolist() == [[-100, -100, 3], [6, 50256, -100]]


def test_split_is_the_books_935_110_55(book_data):
    train, test, val = split_entries(book_data)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train[0] == book_data[0] and test[0] == book_data[935] and val[0] == book_data[1045]
    shuffled = split_entries(book_data, shuffle_seed=1)[0]
    assert len(shuffled) == 935 and shuffled != train


def test_alpaca_is_the_books_text_and_phi3_the_exercise(book_data):
    entry = book_data[50]
    alpaca = PROMPT_STYLES["alpaca"]
    assert alpaca.format_example(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}\n\n### Input:\n{entry['input']}"
        f"\n\n### Response:\n{entry['output']}"
    )
    phi3 = PROMPT_STYLES["phi3"]
    assert (
        phi3.format_example(entry)
        == f"<|user|>\n{entry['instruction']}\n{entry['input']}\n<|assistant|>:\n{entry['output']}"
    )
    no_input = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    assert phi3.format_input(no_input) == "<|user|>\nSay hi."
    prompt = alpaca.format_input(no_input)
    assert alpaca.extract_response(prompt + "\n\n### Response:\nHi there. ", prompt) == "Hi there."


def test_tokenized_entry_50_and_prompt_length(tokenizer_dir, book_data):
    # The ids themselves are the tokenizer's test (test_tokenizer.py); here: the whole formatted example,
    # and the prompt's length as the prompt's own encoding gives it.
    tok = load_tokenizer(tokenizer_dir)
    entry, alpaca = book_data[50], PROMPT_STYLES["alpaca"]
    [ex] = tokenize([entry], tok, alpaca, 1024)
    assert ex.token_ids == encode(tok, alpaca.format_example(entry))
    assert tok.decode(ex.token_ids[: ex.prompt_length]).endswith("### Response:\n")
    assert tok.decode(ex.token_ids[ex.prompt_length :]) == entry["output"]  # the targets left: the response


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"instruction": "a", "input": ""}]', r"entry 0: field 'output' is missing"),
        (
            '[{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}]',
            r"entry 1: field 'instruction' must be a string, got int",
        ),
        ('[{"instruction": "a", "output": "b", "input": null}]', r"entry 0: field 'input' must be a string"),
        ("not json at all", r"is neither JSON nor JSON Lines"),
        ("", r"is empty"),
        ("[]", r"has no entries"),
    ],
)
def test_bad_datasets_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_entries(path)
    assert "\n" not in str(info.value)


def test_json_lines_absent_input_and_skip_invalid(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        {"instruction": "a", "output": "b"},
        {"instruction": "c"},
        {"instruction": "d", "input": "e", "output": "f"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    with pytest.raises(DataError, match="entry 1"):
        load_entries(path)
    entries = load_entries(path, skip_invalid=True)
    assert entries == [{"instruction": "a", "input": "", "output": "b"}, lines[2]]


BOM = "\ufeff"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_byte_order_mark_at_the_start_is_read_as_hf_datasets_reads_it_and_nowhere_else(tmp_path, suffix):
    import datasets  # its json loader drops a leading BOM (pandas' read_json refuses the file without utf-8-sig)

    from job.data.instructions import parse_entries

    entries = [{"instruction": f"Say {i}{BOM}.", "output": "ok"} for i in range(3)]  # a BOM inside a value is text
    text = json.dumps(entries) if suffix == ".json" else "".join(json.dumps(e) + "\n" for e in entries)
    path = tmp_path / f"bom{suffix}"
    path.write_text(BOM + text, encoding="utf-8")
    expected = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    expected = expected.to_list()
    assert parse_entries(path) == entries == expected
    path.write_text(BOM + BOM + text, encoding="utf-8")  # a second one is not a byte order mark
    with pytest.raises(DataError, match="Unexpected UTF-8 BOM"):
        parse_entries(path)
    if suffix == ".jsonl":
        lines = text.splitlines()
        path.write_text(lines[0] + "\n" + BOM + lines[1] + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=r": line 2 is not JSON: Unexpected UTF-8 BOM"):
            parse_entries(path)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_a_field_past_the_bound_is_refused_naming_entry_and_field_and_one_at_it_is_read(tmp_path, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from job.data.instructions import MAX_FIELD_CHARS
    from job.data.sources import read_rows

    def write(entries: list[dict]):
        path = tmp_path / f"d{suffix}"
        if suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist(entries), path)
        else:
            path.write_text(
                json.dumps(entries) if suffix == ".json" else "".join(json.dumps(e) + "\n" for e in entries)
            )
        return path

    fits = [{"instruction": "a", "output": "b", "turns": [{"content": "x" * MAX_FIELD_CHARS}]} for _ in range(2)]
    assert read_rows(write(fits)) == fits
    fits[1]["turns"][0]["content"] += "é"  # one character more (two bytes)
    with pytest.raises(DataError) as info:
        read_rows(write(fits))
    assert str(info.value) == (
        f"dataset {tmp_path / f'd{suffix}'}: {'line 2' if suffix == '.jsonl' else 'entry 1'}: field 'turns.0.content': "
        "holds 4,194,305 characters, more than "
        "the 4,194,304 a field may hold (more than any model's context reads): shorten it or split the entry"
    )
