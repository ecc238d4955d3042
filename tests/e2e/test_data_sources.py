"""Datasets from other places through the real CLI: a Parquet file, a folder of split files, other column
names, each with its one-line errors and its run binding (job/data/sources.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.helpers import cli, events, finetune_run

SHORT = ("--max-steps", "2", "--eval-freq", "2", "--eval-iter", "1", "--batch-size", "4")


def _start(stdout: str) -> dict:
    return next(e for e in events(stdout) if e["event"] == "finetune_start")


def _listing(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_the_books_data_as_parquet_trains_as_its_json(tiny_model_dir, cache, tmp_path):
    book = json.loads((cache / "instruction-data.json").read_text())
    parquet = tmp_path / "book.parquet"
    pq.write_table(pa.Table.from_pylist(book), parquet)
    from_json = cli(*finetune_run(tiny_model_dir, cache, tmp_path / "json", *SHORT))
    from_parquet = cli("finetune", "--model-dir", tiny_model_dir, "--data", parquet, "--cache", cache,
                       "--output", tmp_path / "parquet", "--log-format", "json", *SHORT)  # fmt: skip
    assert from_json.returncode == 0 and from_parquet.returncode == 0, from_parquet.stderr[-2000:]
    assert _start(from_parquet.stdout)["train_examples"] == 935
    losses = [json.loads((tmp_path / name / "losses.json").read_text()) for name in ("json", "parquet")]
    assert losses[0] == losses[1] and len(losses[0]) == 1


def test_a_truncated_parquet_file_is_exit_1_naming_it_and_writes_nothing(tiny_model_dir, cache, tmp_path):
    book = json.loads((cache / "instruction-data.json").read_text())
    parquet = tmp_path / "book.parquet"
    pq.write_table(pa.Table.from_pylist(book), parquet)
    parquet.write_bytes(parquet.read_bytes()[:-100])
    done = cli("finetune", "--model-dir", tiny_model_dir, "--data", parquet, "--cache", cache,
               "--output", tmp_path / "out", "--log-format", "json")  # fmt: skip
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"Error: dataset {parquet} is not a Parquet file we can read: "), line
    assert not (tmp_path / "out").exists()


def test_a_folder_of_three_split_files_is_the_splits_and_a_changed_one_refuses_the_rerun(
    tiny_model_dir, cache, tmp_path
):
    book = json.loads((cache / "instruction-data.json").read_text())
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps(book[:40]))
    (folder / "validation.jsonl").write_text("".join(json.dumps(e) + "\n" for e in book[40:52]))
    pq.write_table(pa.Table.from_pylist(book[52:60]), folder / "test.parquet")
    args = ("finetune", "--model-dir", tiny_model_dir, "--data", folder, "--cache", cache, "--log-format", "json")
    out = tmp_path / "ft"
    done = cli(*args, "--output", out, *SHORT)
    assert done.returncode == 0, done.stderr[-2000:]
    start = _start(done.stdout)
    assert (start["train_examples"], start["val_examples"]) == (40, 12)

    before = _listing(out)
    (folder / "validation.jsonl").write_text("".join(json.dumps(e) + "\n" for e in book[40:51]))
    rerun = cli(*args, "--output", out, "--max-steps", "4", *SHORT[2:])
    assert rerun.returncode == 2, rerun.stderr[-2000:]
    [line] = rerun.stderr.splitlines()
    assert line.startswith(f"Error: --data {folder} changed since checkpoint {out / 'checkpoints'}"), line
    assert _listing(out) == before

    (folder / "train.json").unlink()
    missing = cli(*args, "--output", tmp_path / "none")
    assert missing.returncode == 1 and missing.stderr.splitlines() == [
        f"Error: dataset folder {folder} has no train file (train.json, train.jsonl, train.parquet); "
        "validation and test files are optional"
    ]
    assert not (tmp_path / "none").exists()


def test_dolly_columns_train_with_data_fields_and_a_bad_spec_or_missing_column_is_named(
    tiny_model_dir, cache, tmp_path
):
    book = json.loads((cache / "instruction-data.json").read_text())
    dolly = [{"instruction": e["instruction"], "context": e["input"], "response": e["output"]} for e in book[:60]]
    data = tmp_path / "dolly.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in dolly))
    args = ("finetune", "--model-dir", tiny_model_dir, "--data", data, "--cache", cache, "--log-format", "json")
    done = cli(*args, "--output", tmp_path / "ft", "--data-fields", "input=context,output=response", *SHORT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _start(done.stdout)["train_examples"] == 51

    bad = cli(*args, "--output", tmp_path / "bad", "--data-fields", "output:response")
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1] == (
        "Error: --data-fields 'output:response': 'output:response' is not FIELD=COLUMN"
    )
    unnamed = cli(*args, "--output", tmp_path / "unnamed")
    assert unnamed.returncode == 1 and f"dataset {data}: entry 0: field 'output' is missing" in unnamed.stderr
    del dolly[7]["response"]
    data.write_text("".join(json.dumps(e) + "\n" for e in dolly))
    lost = cli(*args, "--output", tmp_path / "lost", "--data-fields", "input=context,output=response")
    assert lost.returncode == 1 and lost.stderr.splitlines() == [
        f"Error: dataset {data}: entry 7: column 'response' (--data-fields output=response) is missing "
        "(--skip-invalid drops such entries)"
    ]
    assert not any((tmp_path / name).exists() for name in ("bad", "unnamed", "lost"))


def test_dpo_trains_on_trls_text_pairs_in_parquet_and_names_a_malformed_one(tiny_model_dir, cache, tmp_path):
    book = json.loads((cache / "instruction-data-with-preference.json").read_text())[:40]
    pairs = [{"prompt": f"Q: {e['instruction']}\nA:", "chosen": " " + e["chosen"], "rejected": " " + e["rejected"]}
             for e in book]  # fmt: skip
    data = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(pairs), data)
    args = ("dpo", "--model-dir", tiny_model_dir, "--data", data, "--cache", cache, "--log-format", "json")
    small = ("--batch-size", "4", "--max-steps", "2", "--precision", "fp32")
    done = cli(*args, "--output", tmp_path / "dpo", *small)
    assert done.returncode == 0, done.stderr[-2000:]
    start = next(e for e in events(done.stdout) if e["event"] == "dpo_start")
    assert start["train_pairs"] == 34
    assert (tmp_path / "dpo" / "model" / "model.safetensors").is_file()

    pairs[5] = {"prompt": "Q", "chosen": "A"}
    pq.write_table(pa.Table.from_pylist(pairs), data)
    bad = cli(*args, "--output", tmp_path / "bad", *small)
    assert bad.returncode == 1 and bad.stderr.splitlines() == [
        f"Error: dataset {data}: entry 5: field 'rejected' must be a string, got NoneType "
        "(--skip-invalid drops such entries)"
    ]
    assert not (tmp_path / "bad").exists()


def test_data_fields_may_swap_fields_or_read_another_fields_column(tiny_model_dir, cache, tmp_path):
    book = json.loads((cache / "instruction-data.json").read_text())[:40]
    data = tmp_path / "book.json"
    data.write_text(json.dumps(book))
    test = book[34:36]  # the 85/10/5 cut's first test entries
    args = ("generate", "--model-dir", tiny_model_dir, "--data", data, "--cache", cache, "--limit", "2",
            "--max-new-tokens", "2", "--log-format", "json")  # fmt: skip
    for spec, expect in (
        ("instruction=output,output=instruction", lambda e: (e["output"], e["input"], e["instruction"])),
        ("output=instruction", lambda e: (e["instruction"], e["input"], e["instruction"])),
        ("input=output, output=output", lambda e: (e["instruction"], e["output"], e["output"])),
    ):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        done = cli(*args, "--output", out, "--data-fields", spec)
        assert done.returncode == 0, (spec, done.stderr[-2000:])
        written = json.loads((out / "instruction-data-with-response.json").read_text())
        assert [(r["instruction"], r["input"], r["output"]) for r in written] == [expect(e) for e in test], spec
    wrong_case = cli(*args, "--output", tmp_path / "case", "--data-fields", "output=Instruction")
    assert wrong_case.returncode == 1 and wrong_case.stderr.splitlines() == [
        f"Error: dataset {data}: entry 0: column 'Instruction' (--data-fields output=Instruction) is missing "
        "(--skip-invalid drops such entries)"
    ]


def test_a_folder_of_shards_and_the_hubs_split_names_trains_and_two_whole_train_files_are_named(
    tiny_model_dir, cache, tmp_path
):
    book = json.loads((cache / "instruction-data.json").read_text())
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train-00000-of-00002.jsonl").write_text("".join(json.dumps(e) + "\n" for e in book[:20]))
    (folder / "train-00001-of-00002.jsonl").write_text("".join(json.dumps(e) + "\n" for e in book[20:44]))
    (folder / "dev.jsonl").write_text("".join(json.dumps(e) + "\n" for e in book[44:54]))
    pq.write_table(pa.Table.from_pylist(book[54:60]), folder / "test.parquet")
    (folder / "notes.json").write_text('{"about": "not a split: left out, as the hub leaves it"}')
    (folder / "README.md").write_text("# splits\n")
    args = ("finetune", "--model-dir", tiny_model_dir, "--data", folder, "--cache", cache, "--log-format", "json")
    done = cli(*args, "--output", tmp_path / "ft", *SHORT)
    assert done.returncode == 0, done.stderr[-2000:]
    start = _start(done.stdout)
    assert (start["train_examples"], start["val_examples"]) == (44, 10)
    left_out = [e["files"] for e in events(done.stdout) if e["event"] == "dataset_files_without_a_split"]
    assert left_out and all(files == ["notes.json"] for files in left_out)

    (folder / "train.json").write_text(json.dumps(book[:40]))
    (folder / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in book[:40]))
    for name in ("train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"):
        (folder / name).unlink()
    two = cli(*args, "--output", tmp_path / "two")
    assert two.returncode == 1 and two.stderr.splitlines() == [
        f"Error: dataset folder {folder} has two train files, train.json and train.jsonl: keep one"
    ]
    assert not (tmp_path / "two").exists()


def test_preference_pairs_given_for_instruction_data_are_named_as_such_and_pointed_at_dpo(
    tiny_model_dir, cache, tmp_path
):
    # TRL's three preference shapes where the finetune's data belongs: not "field 'instruction' is missing"
    # in every entry, but what the file is and where it goes, before anything is written
    book = json.loads((cache / "instruction-data-with-preference.json").read_text())[:40]
    ask = [[{"role": "user", "content": e["instruction"]}] for e in book]
    said = [[{"role": "assistant", "content": e[k]} for k in ("chosen", "rejected")] for e in book]
    shapes = {
        "text": ([{"prompt": e["instruction"], "chosen": e["chosen"], "rejected": e["rejected"]} for e in book],
                 "prompt, chosen, rejected: TRL's text shape"),
        "turns": ([{"prompt": a, "chosen": [c], "rejected": [r]} for a, (c, r) in zip(ask, said, strict=True)],
                  "prompt, chosen, rejected: TRL's conversational shape"),
        "implicit": ([{"chosen": a + [c], "rejected": a + [r]} for a, (c, r) in zip(ask, said, strict=True)],
                     "chosen, rejected with an implicit prompt: TRL's conversational shape"),
    }  # fmt: skip
    for name, (rows, shape) in shapes.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        told = (
            f"Error: dataset {data} is preference data ({shape}), which DPO trains on, not the finetune or generate: "
            "give it as --dpo-data with sft-job run --dpo, or as --data to sft-job dpo"
        )
        common = ("--model-dir", tiny_model_dir, "--data", data, "--cache", cache, "--log-format", "json")
        for argv in (
            ("finetune", *common, "--output", tmp_path / name),
            ("finetune", *common, "--output", tmp_path / name, "--skip-invalid"),
            ("run", *common, "--output", tmp_path / "runs", "--run-id", name, "--metrics-port", "0", "--skip-judge"),
        ):
            done = cli(*argv)
            assert done.returncode == 1 and done.stderr.splitlines() == [told], (argv, done.stderr[-2000:])
        assert not (tmp_path / name).exists() and not (tmp_path / "runs" / name).exists()
    # the same pairs as Parquet, and given to run --dpo as its --data (the finetune's) rather than --dpo-data
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(shapes["text"][0]), parquet)
    dpo = cli("run", "--model-dir", tiny_model_dir, "--data", parquet, "--dpo", "--dpo-data", tmp_path / "text.jsonl",
              "--cache", cache, "--output", tmp_path / "runs", "--run-id", "pq", "--metrics-port", "0")  # fmt: skip
    assert dpo.returncode == 1 and dpo.stderr.startswith(f"Error: dataset {parquet} is preference data (prompt, ")
