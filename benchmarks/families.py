"""Qwen3 against transformers at qwen3-0.6b's shape (random weights, the book's batches as GPT-2's ids): a
training step (forward, the loss over counted targets, backward, AdamW) and greedy batched decoding, ours
(``job.models.llama.LlamaModel``) beside ``Qwen3ForCausalLM`` with the same weights, batches and precision."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Setup
from job.models.llama import LlamaConfig, LlamaModel

# Qwen/Qwen3-0.6B's config.json (0.60 B parameters, the head tied to the embeddings)
QWEN3_06B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def build(impl: str, setup: Setup):
    """(model, loss of (inputs, targets)): transformers' model (``hf``) or ours with its weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(123)
    shape = QWEN3_06B | ({"num_hidden_layers": setup.n_layers} if setup.n_layers else {})
    with torch.device(setup.device):
        theirs = Qwen3ForCausalLM(Qwen3Config(**shape, attn_implementation="sdpa"))
    if impl == "hf":
        return theirs, _cross_entropy(theirs)
    if impl != "ours":
        raise ValueError(impl)
    # Made on "meta" and handed transformers' tensors: one copy of the weights, so the peak is the run's.
    with torch.device("meta"):
        ours = LlamaModel(LlamaConfig.from_hf(theirs.config.to_dict()))
    ours.load_state_dict({k.removeprefix("model."): v for k, v in theirs.state_dict().items()}, assign=True)
    if ours.cfg.tie_embeddings:
        ours.lm_head.weight = ours.embed_tokens.weight
    del theirs
    return ours, lambda x, y: ours(x, targets=y)  # the head only where targets count


def _cross_entropy(model):
    """The loss as transformers' users take it: the logits at every position, then cross entropy."""
    return lambda x, y: F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())


def measure_training(impl: str, setup: Setup) -> dict:
    return harness.measure_training(impl, setup, build)


def measure_generation(impl: str, setup: Setup) -> dict:
    return harness.measure_generation(impl, setup, build)
