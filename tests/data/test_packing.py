from collections import Counter

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from job.data.instructions import IGNORE_INDEX, Collator, Example, collate
from job.data.packing import PADDING_DOCUMENT, Packer, best_fit_decreasing

lengths_and_capacity = st.integers(1, 64).flatmap(
    lambda capacity: st.tuples(st.lists(st.integers(1, capacity), min_size=1, max_size=60), st.just(capacity))
)


@settings(max_examples=60, deadline=None)
@given(lengths_and_capacity, st.integers(0, 2**31))
def test_rows_are_a_partition_within_the_capacity_and_the_seed_decides_them(case, seed):
    lengths, capacity = case
    rows = best_fit_decreasing(lengths, capacity, seed)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # none dropped, none twice
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    assert best_fit_decreasing(lengths, capacity, seed) == rows


@settings(max_examples=30, deadline=None)
@given(lengths_and_capacity, st.integers(0, 2**31))
def test_rows_fill_as_trls_best_fit_decreasing(case, seed):
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    lengths, capacity = case
    rows = best_fit_decreasing(lengths, capacity, seed)
    dataset = Dataset.from_dict({"input_ids": [[7] * n for n in lengths]})
    trl_rows = pack_dataset(dataset, capacity, strategy="bfd")["seq_lengths"]
    assert Counter(sum(lengths[i] for i in row) for row in rows) == Counter(sum(r) for r in trl_rows)


def test_a_sequence_longer_than_the_row_is_refused_by_its_index():
    import pytest

    with pytest.raises(ValueError, match="sequence 1 of 9 tokens does not fit a row of 8"):
        best_fit_decreasing([3, 9], 8, seed=0)


def test_the_seed_only_reorders_sequences_of_equal_length():
    lengths = [4, 4, 4, 4, 2, 2, 6]
    fills = {tuple(sorted(sum(lengths[i] for i in r) for r in best_fit_decreasing(lengths, 8, s))) for s in range(20)}
    orders = {tuple(map(tuple, best_fit_decreasing(lengths, 8, s))) for s in range(20)}
    assert fills == {(2, 8, 8, 8)} and len(orders) > 1


examples_strategy = st.lists(
    st.tuples(st.lists(st.integers(0, 99), min_size=1, max_size=20), st.integers(0, 20)), min_size=1, max_size=12
)


@settings(max_examples=40, deadline=None)
@given(examples_strategy, st.integers(4, 24), st.booleans(), st.integers(0, 1000))
def test_each_sequence_in_a_row_is_the_books_collate_of_it_alone(raw, max_length, mask, seed):
    examples = [Example(ids, min(p, len(ids))) for ids, p in raw]
    collator = Collator(max_length, mask, end_id=100)
    packer = Packer(examples, collator, max_length + 7, seed)
    batch = packer(list(range(len(packer.rows))))
    for r, members in enumerate(packer.rows):
        start = 0
        for d, i in enumerate(members):
            prompt = [examples[i].prompt_length] if mask else None
            x, y = collate([examples[i].token_ids], 100, allowed_max_length=max_length, prompt_lengths=prompt)
            end = start + x.shape[1]
            assert torch.equal(batch.inputs[r, start:end], x[0]) and torch.equal(batch.targets[r, start:end], y[0])
            assert batch.positions[r, start:end].tolist() == list(range(x.shape[1]))
            assert set(batch.documents[r, start:end].tolist()) == {d}
            start = end
        assert packer.row_tokens(r) == start
        assert set(batch.documents[r, start:].tolist()) <= {PADDING_DOCUMENT}
        assert set(batch.targets[r, start:].tolist()) <= {IGNORE_INDEX}
