"""A DPO step as the dpo stage takes it (policy forward and backward on chosen and rejected, the reference's
forward, fused AdamW), full (a frozen copy as reference) or LoRA (the base under the adapters): tokens per
second and peak memory, beside the SFT step of ``harness.measure_training`` at the same shapes."""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import Setup, _autocast, _peak, _reset_peak, _sync, reference_model
from job.data.instructions import PROMPT_STYLES, load_entries, split_entries
from job.data.order import SeededOrder
from job.data.preference import preference_problem, tokenize_pairs
from job.models.lora import LAYERS, add_adapters
from job.models.tokenizer import load_tokenizer
from job.training.objectives import DPOObjective, Reference


def measure_dpo(impl: str, setup: Setup) -> dict:
    """Tokens (chosen and rejected, padding included) per second of DPO steps, and peak memory."""
    tokenizer = load_tokenizer(Path(setup.data_dir) / "gpt2")
    entries = load_entries(Path(setup.data_dir) / "instruction-data-with-preference.json", check=preference_problem)
    train = split_entries(entries)[0]
    pairs = tokenize_pairs(train, tokenizer, PROMPT_STYLES["alpaca"], setup.model_config.context_length)
    model = reference_model(setup)
    if impl == "lora":  # the book's exercise 7.4 settings: rank 16, alpha 16, every linear layer
        reference = Reference(None)
        add_adapters(model, 16, 16.0, set(LAYERS), dropout=0.0, seed=123)
    else:
        reference = Reference(copy.deepcopy(model))
    objective = DPOObjective(pairs, setup.model_config.context_length, 0.1, "mean", reference)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-6, weight_decay=0.01, fused=True)
    device = torch.device(setup.device)
    model.train()
    _reset_peak(setup)

    def step(batch: list[int]) -> int:
        with _autocast(setup):
            loss = objective.loss_sum(model, batch, device) / len(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return 2 * objective.tokens(batch)  # chosen and rejected

    order = SeededOrder(len(pairs), setup.batch_size, eval_iter=1, seed=123)
    batches = order.epoch_batches(0)[: setup.warmup_steps + setup.train_steps * setup.repeats]
    for batch in batches[: setup.warmup_steps]:
        step(batch)
    rates = []
    for r in range(setup.repeats):
        chunk = batches[setup.warmup_steps + r * setup.train_steps : setup.warmup_steps + (r + 1) * setup.train_steps]
        _sync(setup.device)
        started = time.perf_counter()
        tokens = sum(step(b) for b in chunk)
        _sync(setup.device)
        rates.append(tokens / (time.perf_counter() - started))
    return {"tokens_per_second": statistics.median(rates), "repeats": rates, "peak_memory_bytes": _peak(setup)}
