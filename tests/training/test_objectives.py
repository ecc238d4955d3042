"""``--packing``'s objective against the book's padded one: the same sequences give the same step, loss and
gradients within 1e-5 (fp32 on the CPU, tiny random GPT-2, Llama 3 and Qwen3, GPT-2 with LoRA adapters), the
packed rows split into --grad-accum micro-batches or not, the prompt's targets masked or not."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from job.data.instructions import Collator, Example
from job.data.packing import Packer
from job.models.gpt2 import GPTConfig, GPTModel
from job.models.lora import LAYERS, add_adapters
from job.training.objectives import PackedSFTObjective, SFTObjective
from tests.models.test_packed_rows import small_vocab_family

VOCAB, END = 640, 639


def _gpt2() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=VOCAB, context_length=128, emb_dim=64, n_heads=4, n_layers=2))


def _with_lora() -> GPTModel:
    model = _gpt2()
    add_adapters(model, 4, 8.0, set(LAYERS), dropout=0.0, seed=1)
    with torch.no_grad():  # B starts at zero: give the adapters an output, so every adapter gradient counts
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.fixture(scope="module", params=["gpt2", "gpt2-lora", "llama", "qwen3"])
def model(request):
    if request.param == "gpt2":
        return _gpt2().train()
    if request.param == "gpt2-lora":
        return _with_lora().train()
    return small_vocab_family(request.param).train()


def step(model, objective, batch: list[int], parts: int) -> tuple[float, dict[str, torch.Tensor]]:
    """The trainer's step without the optimizer: ``batch`` in ``parts`` micro-batches, each micro-batch's summed
    loss over the whole batch's counted targets; the step's loss and the trained parameters' gradients."""
    model.zero_grad(set_to_none=True)
    size = -(-len(batch) // parts)
    scale, total = 1 / objective.units(batch), 0.0
    for i in range(0, len(batch), size):
        loss = objective.loss_sum(model, batch[i : i + size], torch.device("cpu")) * scale
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# Prompts of at least one token, as every style's: the book's collate masks all but the last target of a row with a
# prompt of 0 tokens (``y[:-1]``), which then differs between a sequence alone and padded beside a longer one.
sequences = st.lists(
    st.tuples(st.lists(st.integers(0, VOCAB - 2), min_size=1, max_size=30), st.integers(1, 30)), min_size=1, max_size=8
)


@settings(max_examples=12, deadline=None)
@given(sequences, st.integers(0, 30), st.booleans(), st.integers(1, 3), st.integers(0, 2**31))
def test_a_packed_step_has_the_padded_steps_loss_and_gradients(model, raw, room, mask, parts, seed):
    examples = [Example(ids, min(p, len(ids))) for ids, p in raw]
    collate = Collator(24, mask, end_id=END)  # sequences over 24 tokens are cut, as the padded batch cuts them
    padded = SFTObjective(examples, collate, 24)
    packed = PackedSFTObjective(Packer(examples, collate, 24 + room, seed))
    rows = list(range(len(packed.packer.rows)))
    everything = list(range(len(examples)))
    assert packed.units(rows) == padded.units(everything)
    assert packed.tokens(rows) == sum(min(len(ids), 24) for ids, _ in raw)
    if packed.units(rows) == 0:  # every target masked: no loss in either
        return
    loss, grads = step(model, padded, everything, 1)
    packed_loss, packed_grads = step(model, packed, rows, parts)
    assert packed_loss == pytest.approx(loss, rel=1e-5, abs=1e-5)
    assert grads.keys() == packed_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_a_copy_trains_the_same_parameters():
    # The LoRA model's trained parameters are the adapters alone (the padded and packed steps compare them).
    model = copy.deepcopy(_with_lora())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".A", ".B")) for n in trained)


def test_the_packed_training_estimate_is_the_padded_mean_over_the_same_sequences():
    from types import SimpleNamespace

    from job.training.objectives import PackedSFTEvaluator, SFTEvaluator

    g = torch.Generator().manual_seed(4)
    examples = [Example(torch.randint(0, END, (n,), generator=g).tolist(), 3) for n in (5, 17, 9, 22, 11, 30, 4)]
    collate, cfg = Collator(24, True, end_id=END), SimpleNamespace(batched_eval=False, eval_iter=5)
    packer = Packer(examples, collate, 40, seed=9)
    model = _gpt2().eval()
    packed = PackedSFTEvaluator(packer, examples[:3], collate, len(examples), cfg)(
        model, [list(range(len(packer.rows)))]
    )
    padded = SFTEvaluator(examples, examples[:3], collate, len(examples), cfg)(model, [list(range(len(examples)))])
    assert len(packer.rows) < len(examples)
    assert packed == pytest.approx(padded, abs=1e-5)
