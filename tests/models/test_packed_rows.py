"""Packed rows (``--packing``) through job/models' GPT-2, Llama 3 and Qwen3: each sequence of a row, with its own
positions and the block-diagonal causal mask, gets the logits it gets alone (fp32 on the CPU, tiny random
weights), whatever the sequences, their lengths and the row's length."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from job.data.instructions import Collator, Example
from job.data.packing import Packer
from job.models.gpt2 import GPTConfig, GPTModel, document_mask
from tests.models.test_llama import LLAMA, QWEN3, _ours

VOCAB = 640


def small_vocab_family(family: str):
    """tests/models/test_llama.py's tiny Llama 3 or Qwen3 (transformers' random weights, ours loaded from them)
    with a vocabulary of VOCAB ids, where the head's cost is small."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(11)
    if family == "llama":
        return _ours(LlamaForCausalLM(LlamaConfig(**LLAMA | {"vocab_size": VOCAB})))
    return _ours(Qwen3ForCausalLM(Qwen3Config(**QWEN3 | {"vocab_size": VOCAB})))


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen3"])
def model(request):
    if request.param == "gpt2":
        torch.manual_seed(0)
        return GPTModel(GPTConfig(vocab_size=VOCAB, context_length=128, emb_dim=64, n_heads=4, n_layers=2)).eval()
    return small_vocab_family(request.param).eval()


sequences = st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24), min_size=1, max_size=8)


@settings(max_examples=15, deadline=None)
@given(sequences, st.integers(0, 40), st.integers(0, 2**31))
def test_each_sequence_of_a_packed_row_has_the_logits_it_has_alone(model, raw, room, seed):
    examples = [Example(ids, 0) for ids in raw]
    packer = Packer(examples, Collator(128, False, end_id=VOCAB - 1), max(map(len, raw)) + room, seed)
    batch = packer(list(range(len(packer.rows))))
    with torch.no_grad():
        packed = model(batch.inputs, positions=batch.positions, documents=batch.documents)  # (R, T, vocab)
        for r, members in enumerate(packer.rows):
            start = 0
            for i in members:
                alone = model(torch.tensor([raw[i]]))[0]  # (L, vocab)
                torch.testing.assert_close(packed[r, start : start + len(raw[i])], alone, rtol=0, atol=1e-5)
                start += len(raw[i])


def test_the_mask_lets_a_token_see_only_the_earlier_tokens_of_its_own_sequence():
    mask = document_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))[0, 0]
    assert mask.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
