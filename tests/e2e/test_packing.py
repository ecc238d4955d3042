"""``sft-job finetune --packing`` through the CLI on the tiny GPT-2 folder: the rows the packer makes are what
trains (steps per epoch, real tokens seen), --grad-accum splits rows into the same step, and the combinations
that cannot hold are exit 2 naming the options, with nothing written."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from job.data.instructions import PROMPT_STYLES, Collator, load_entries, split_entries, tokenize
from job.data.order import SeededOrder
from job.data.packing import Packer
from job.models.tokenizer import load_tokenizer
from tests.helpers import cli, events, finetune_run, smoke_run

PACKED = ("--packing", "--data-order", "seeded", "--pack-length", "128", "--precision", "fp32", "--lr", "5e-5")


def test_packed_finetune_trains_the_packers_rows_and_grad_accum_gives_the_same_step(tiny_model_dir, cache, tmp_path):
    runs = {}
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        extra = ("--batch-size", "4", "--grad-accum", accum, "--max-steps", "6", "--eval-freq", "3", *PACKED)
        result = cli(*finetune_run(tiny_model_dir, cache, out, *extra))
        assert result.returncode == 0, result.stderr[-2000:]
        runs[accum] = (events(result.stdout), json.loads((out / "losses.json").read_text()), out)
    logged, losses, out = runs[1]
    train = split_entries(load_entries(cache / "instruction-data.json"))[0]
    examples = tokenize(train, load_tokenizer(cache / "gpt2"), PROMPT_STYLES["alpaca"], 1024)
    packer = Packer(examples, Collator(128, False), 128, seed=123)  # the tiny model's context: 128
    [packed] = [e for e in logged if e["event"] == "packed"]
    assert (packed["sequences"], packed["rows"]) == (935, len(packer.rows)) and packed["rows"] < 935 * 2 // 3
    [start] = [e for e in logged if e["event"] == "finetune_start"]
    assert start["steps"] == 6
    batches = SeededOrder(len(packer.rows), 4, 5, seed=123).epoch_batches(0)
    real = list(itertools.accumulate(sum(packer.row_tokens(r) for r in b) for b in batches[:6]))
    assert [h["tokens_seen"] for h in losses] == [real[0], real[3]]  # evaluations after steps 1 and 4
    trained = json.loads((out / "model" / "config.json").read_text())["sft_job"]
    assert trained["trained"]["tokens_seen"] == real[5]
    _, accum_losses, accum_out = runs[2]
    for key in ("train_loss", "val_loss"):
        assert [h[key] for h in accum_losses] == pytest.approx([h[key] for h in losses], abs=1e-5)
    one, two = (load_file(str(o / "model" / "model.safetensors")) for o in (out, accum_out))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5


def test_an_epoch_of_packed_rows_is_rows_over_batch_size_steps(tiny_model_dir, cache, tmp_path):
    out = tmp_path / "epoch"
    extra = ("--train-limit", "60", "--batch-size", "2", "--epochs", "1", "--eval-freq", "100", *PACKED)
    result = cli(*finetune_run(tiny_model_dir, cache, out, *extra))
    assert result.returncode == 0, result.stderr[-2000:]
    logged = events(result.stdout)
    [packed] = [e for e in logged if e["event"] == "packed"]
    [done] = [e for e in logged if e["event"] == "finetune_done"]
    assert done["steps"] == packed["rows"] // 2 and packed["sequences"] == 60
    assert 0 <= packed["padding_fraction"] < 0.5


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("finetune", "--packing"), ("--packing", "--data-order book")),
        (("finetune", "--pack-length", "256"), ("--pack-length 256", "--packing")),
        (("run", "--packing", "--data-order", "seeded", "--dpo"), ("--packing", "--dpo")),
        (("dpo", "--packing"), ("--packing",)),
        (
            ("finetune", "--packing", "--data-order", "seeded", "--pack-length", "0"),
            ("--pack-length must be positive",),
        ),
    ],
)
def test_packing_where_it_cannot_hold_is_exit_2_naming_the_options(args, named, tmp_path):
    result = cli(*args, "--output", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert all(name in result.stderr for name in named), result.stderr
    assert not (tmp_path / "out").exists()


def test_a_row_shorter_than_an_entry_is_exit_2_naming_the_entry(tiny_model_dir, cache, tmp_path):
    out = tmp_path / "short"
    result = cli(
        *finetune_run(tiny_model_dir, cache, out, "--packing", "--data-order", "seeded", "--pack-length", "64")
    )
    assert result.returncode == 2
    [line] = [x for x in result.stderr.splitlines() if x.startswith("Error:")]
    assert "--pack-length 64 is shorter than training entry" in line and "--allowed-max-length 64" in line
    assert not (out / "model").exists() and not (out / "checkpoints").exists()


def test_packed_rows_of_the_book_data_hold_every_training_entry_once(cache):
    train = split_entries(load_entries(cache / "instruction-data.json"))[0]
    examples = tokenize(train, load_tokenizer(cache / "gpt2"), PROMPT_STYLES["alpaca"], 1024)
    packer = Packer(examples, Collator(1024, False), 256, seed=123)
    assert sorted(i for row in packer.rows for i in row) == list(range(935))
    batch = packer([0])
    assert batch.inputs.shape[1] <= 256 and torch.equal(batch.positions[0, :1], torch.tensor([0]))


@pytest.mark.parametrize(
    ("wrong", "named"),
    [
        (("--pack-length", "512", "--batch-size", "24"), "packed rows (--train-limit 40)"),
        (("--pack-length", "40", "--batch-size", "4"), "--pack-length 40 is shorter than training entry"),
        (("--pack-length", "4096", "--batch-size", "4"), "more than the model's context"),
    ],
)
def test_run_refuses_a_packing_that_cannot_hold_at_preflight_and_the_fixed_rerun_takes_the_id(
    cache, tmp_path, wrong, named
):
    """Before anything is written: one line, no run folder, so the corrected command with the same --run-id runs."""
    common = ("--packing", "--data-order", "seeded", "--train-limit", "40", "--skip-judge")
    refused = cli(*smoke_run(cache, tmp_path / "runs", "p", *common, *wrong))
    assert refused.returncode == 2, refused.stderr[-2000:]
    [line] = refused.stderr.splitlines()
    assert line.startswith("Error: ") and named in line, line
    assert "preflight_ok" not in [e["event"] for e in events(refused.stdout)]
    assert not (tmp_path / "runs" / "p").exists()
    rerun = cli(*smoke_run(cache, tmp_path / "runs", "p", *common, "--pack-length", "512", "--batch-size", "4"))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((tmp_path / "runs" / "p" / "manifest.json").read_text())["status"] == "complete"
