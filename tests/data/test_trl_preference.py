"""TRL's text preference shape (prompt/chosen/rejected strings) tokenized as TRL's ``DPOTrainer`` tokenizes and
collates it, on GPT-2's tokenizer: the same chosen and rejected ids and the same masks of scored tokens."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from job.data.instructions import PROMPT_STYLES, DataError
from job.data.preference import collate_pairs, preference_problem, tokenize_split
from job.data.sources import checked_entries
from job.models.tokenizer import load_tokenizer

END = "<|endoftext|>"


def _entries(shared_data) -> list[dict]:
    """The book's pairs as TRL's text shape (its Alpaca prompt with the response header as the prompt), and
    pairs at the edges: a response that merges with the prompt's last characters, an empty one, one that
    already ends with the end token, text beyond ASCII, a prompt ending in a space."""
    book = json.loads((shared_data / "instruction-data-with-preference.json").read_text())[:6]
    alpaca = PROMPT_STYLES["alpaca"]
    entries = [
        {"prompt": alpaca.format_input({**e, "input": e["input"]}) + alpaca.response_header,
         "chosen": e["chosen"], "rejected": e["rejected"]}
        for e in book
    ]  # fmt: skip
    entries += [
        {"prompt": "The capital of France is Par", "chosen": "is.", "rejected": "ma."},
        {"prompt": "Say nothing.", "chosen": "", "rejected": "Something."},
        {"prompt": "Stop.", "chosen": "Done." + END, "rejected": "Not done"},
        {"prompt": "Grüße auf Deutsch: ", "chosen": " Hallo, schön! 日本", "rejected": "hello"},
        {"prompt": "Answer with a space ", "chosen": " yes", "rejected": "no"},
    ]
    return entries


@pytest.fixture(scope="module")
def trl_batch(shared_data, tmp_path_factory):
    """TRL's DPOTrainer's tokenized rows and its collated batch of every entry, on GPT-2's tokenizer read from
    the same encoder.json and vocab.bpe as ours."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    from trl import DPOConfig, DPOTrainer

    gpt2 = shared_data / "gpt2"
    merges = [tuple(line.split(" ")) for line in (gpt2 / "vocab.bpe").read_text().split("\n")[1:] if line]
    tokenizer = GPT2TokenizerFast(vocab=json.loads((gpt2 / "encoder.json").read_text()), merges=merges)
    tokenizer.pad_token = tokenizer.eos_token
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=1024))
    entries = _entries(shared_data)
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True, bf16=False)
    data = Dataset.from_list(entries)
    trainer = DPOTrainer(model, copy.deepcopy(model), args=args, train_dataset=data, processing_class=tokenizer)
    rows = list(trainer.train_dataset)
    return entries, rows, trainer.data_collator(rows)


def test_trl_shaped_pairs_tokenize_and_mask_as_trls_dpo_trainer(trl_batch, shared_data):
    entries, rows, batch = trl_batch
    tokenizer = load_tokenizer(shared_data / "gpt2")
    _format, checked = checked_entries(shared_data, entries, False, preference_problem)
    tokenized = tokenize_split(checked, tokenizer, PROMPT_STYLES["alpaca"], 1024)
    assert len(tokenized.pairs) == len(rows) == len(entries) and tokenized.empty == 0
    for pair, row in zip(tokenized.pairs, rows, strict=True):
        assert pair.chosen == row["prompt_ids"] + row["chosen_ids"]
        assert pair.rejected == row["prompt_ids"] + row["rejected_ids"]
        assert pair.chosen_start == pair.rejected_start == len(row["prompt_ids"])
    chosen, rejected, chosen_mask, rejected_mask = collate_pairs(tokenized.pairs, 1024, tokenizer.eot_token)
    count = len(rows)
    for i, pair in enumerate(tokenized.pairs):  # TRL stacks the chosen rows, then the rejected ones
        for ours, mask, sequence, j in (
            (chosen, chosen_mask, pair.chosen, i),
            (rejected, rejected_mask, pair.rejected, count + i),
        ):  # noqa: E501
            n = len(sequence)
            assert ours[i, :n].tolist() == batch["input_ids"][j, :n].tolist()
            assert mask[i, :n].tolist() == batch["completion_mask"][j, :n].bool().tolist()
            assert not mask[i, n:].any() and not batch["completion_mask"][j, n:].any()
    assert int(torch.stack([chosen_mask, rejected_mask]).sum()) == int(batch["completion_mask"].sum())


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"prompt": "p", "chosen": "a"}, "field 'rejected' is missing (TRL's preference shape: prompt, chosen"),
        ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, "is messages-shaped but entry 0 is alpaca-shaped"),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string, got NoneType"),
        ({"instruction": "p", "output": "o", "chosen": "a"}, "field 'rejected' is missing (preference data needs"),
    ],
)
def test_a_malformed_trl_pair_is_one_line_naming_the_entry_and_field(tmp_path, entry, message):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError) as info:
        checked_entries(tmp_path / "pairs.jsonl", [good, entry], False, preference_problem)
    assert str(info.value).startswith(f"dataset {tmp_path / 'pairs.jsonl'}: entry 1"), info.value
    assert message in str(info.value)
    assert "\n" not in str(info.value)
