"""The training loop on its own: the split of each batch into micro-batches and optimizer steps, clipping
of the accumulated gradient, the evaluation and checkpoint cadence, preemption, and the batch checks; on a
tiny GPT-2 and a synthetic task, no CLI (the stage's end-to-end tests are in tests/stages/)."""

from __future__ import annotations

import os
import re
import signal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from job.config import FinetuneConfig
from job.core.errors import ConfigError, Preempted
from job.core.observability import Metrics
from job.data.instructions import Collator, Example
from job.models.gpt2 import GPTConfig, GPTModel
from job.stages.finetune import run_finetune
from job.training.checkpoint_files import checkpoint_dirs
from job.training.objectives import SFTEvaluator, SFTObjective
from job.training.trainer import Task, Trainer, check_batches

TINY = GPTConfig(vocab_size=64, context_length=32, emb_dim=16, n_heads=2, n_layers=1)


class RecordingObjective(SFTObjective):
    """The book's objective, recording the examples of each micro-batch and each batch's units."""

    def __init__(self, *args, on_loss=None):
        super().__init__(*args)
        self.micro_batches: list[list[int]] = []
        self.unit_batches: list[list[int]] = []
        self.on_loss = on_loss

    def units(self, batch):
        self.unit_batches.append(list(batch))
        return super().units(batch)

    def loss_sum(self, model, micro, device):
        self.micro_batches.append(list(micro))
        if self.on_loss is not None:
            self.on_loss(len(self.micro_batches))
        return super().loss_sum(model, micro, device)


def _trainer(tmp_path, train_size=24, on_loss=None, **options) -> Trainer:
    """A trainer of a tiny GPT-2 on ``train_size`` synthetic examples of different lengths (fp32, CPU)."""
    generator = torch.Generator().manual_seed(0)
    examples = [
        Example(torch.randint(1, 63, (4 + (7 * i) % 13,), generator=generator).tolist(), 2) for i in range(train_size)
    ]
    cfg = FinetuneConfig(output=str(tmp_path / "out"), precision="fp32", lr=1e-3, **options)
    collate = Collator(TINY.context_length, False, end_id=63)  # the tiny vocabulary's last token ends each
    torch.manual_seed(0)
    task = Task(
        model=GPTModel(TINY),
        objective=RecordingObjective(examples, collate, TINY.context_length, on_loss=on_loss),
        evaluator=SFTEvaluator(examples, examples[:8], collate, cfg.batch_size, cfg),
        train_size=train_size,
        tokenizer=None,
        sample_prompt=None,
    )
    return Trainer(cfg, task, Metrics())


def _count_calls(obj, name: str) -> list:
    """Wraps ``obj.name`` to record what each call returns."""
    calls, original = [], getattr(obj, name)

    def recorded(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    setattr(obj, name, recorded)
    return calls


def test_each_step_trains_its_batch_in_grad_accum_micro_batches_and_steps_the_optimizer_once(tmp_path):
    trainer = _trainer(tmp_path, batch_size=8, grad_accum=4, max_steps=3, eval_freq=100)
    steps = _count_calls(trainer.optimizer, "step")
    trainer.fit()
    objective = trainer.task.objective
    assert len(steps) == 3 and trainer.state.step == 3
    assert [len(m) for m in objective.micro_batches] == [2] * 12
    batches = [b for b in objective.unit_batches if len(b) == 8]  # (evaluations ask for none)
    for step, batch in enumerate(batches):
        assert sum(objective.micro_batches[4 * step : 4 * step + 4], []) == batch  # the batch, in order, once
    assert len(batches) == 3


def test_clipping_sees_the_whole_batchs_gradient_once_a_step_whatever_the_accumulation(tmp_path):
    norms = {}
    for accum in (1, 4):
        trainer = _trainer(tmp_path / f"a{accum}", batch_size=8, grad_accum=accum, max_steps=2, grad_clip=0.05)
        seen = _count_calls(trainer.accelerator, "clip_grad_norm_")
        after = _probe_before(trainer.optimizer, "step", lambda trainer=trainer: _grad_norm(trainer))
        trainer.fit()
        assert len(seen) == 2  # once per optimizer step, not per micro-batch
        assert all(float(n) > 0.05 for n in seen)  # the clip is active...
        assert all(n == pytest.approx(0.05, rel=1e-4) for n in after)  # ...and what the optimizer steps on is clipped
        norms[accum] = float(seen[0])
    assert norms[4] == pytest.approx(norms[1], rel=1e-5)  # the accumulated gradient is the whole batch's


def _probe_before(obj, name: str, probe) -> list:
    """Wraps ``obj.name`` to record what ``probe()`` sees before each call."""
    seen, original = [], getattr(obj, name)

    def probed(*args, **kwargs):
        seen.append(probe())
        return original(*args, **kwargs)

    setattr(obj, name, probed)
    return seen


def _grad_norm(trainer: Trainer) -> float:
    grads = [p.grad.norm() for p in trainer.model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads)))


def test_without_grad_clip_nothing_is_clipped(tmp_path):
    trainer = _trainer(tmp_path, batch_size=8, max_steps=2)
    assert trainer.cfg.grad_clip is None
    seen = _count_calls(trainer.accelerator, "clip_grad_norm_")
    trainer.fit()
    assert seen == []


def test_evaluations_and_checkpoints_come_at_their_cadence_and_each_epochs_end(tmp_path):
    # 24 examples in batches of 8: 3 steps an epoch, 6 in two.
    trainer = _trainer(tmp_path, batch_size=8, epochs=2, eval_freq=3, checkpoint_every=4, keep_checkpoints=10)
    trainer.fit()
    assert [h["step"] for h in trainer.state.history] == [0, 3]  # after steps 1 and 4
    checkpoints = [p.name for p in checkpoint_dirs(tmp_path / "out" / "checkpoints")]
    assert checkpoints == ["step-00000003", "step-00000004", "step-00000006"]  # epoch ends, and step 4


def test_training_starts_by_removing_the_tmp_folder_a_crash_left_while_writing_a_checkpoint(tmp_path):
    stale = tmp_path / "out" / "checkpoints" / ".step-00000099.tmp"  # past any step this run writes
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    trainer = _trainer(tmp_path, batch_size=8, epochs=1, eval_freq=100)
    trainer.fit()
    assert not stale.exists()
    assert [p.name for p in checkpoint_dirs(tmp_path / "out" / "checkpoints")] == ["step-00000003"]


def test_a_stop_signal_during_a_step_ends_it_then_checkpoints_and_raises_preempted(tmp_path):
    def stop_at_third_micro_batch(count):
        if count == 3:  # step 2's first micro-batch (2 a step)
            os.kill(os.getpid(), signal.SIGUSR1)

    before = signal.getsignal(signal.SIGUSR1)
    trainer = _trainer(tmp_path, batch_size=8, grad_accum=2, eval_freq=100, on_loss=stop_at_third_micro_batch)
    with pytest.raises(Preempted, match="stopped by SIGUSR1 at step 2; checkpoint written"):
        trainer.fit()
    assert [p.name for p in checkpoint_dirs(tmp_path / "out" / "checkpoints")] == ["step-00000002"]
    assert len(trainer.task.objective.micro_batches) == 4  # step 2 was finished, not cut short
    assert signal.getsignal(signal.SIGUSR1) == before  # the handlers are the caller's again


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 128), st.integers(1, 8), st.integers(1, 8))
def test_a_batch_size_that_does_not_split_evenly_is_refused_with_one_that_does(batch_size, world, accum):
    cfg = FinetuneConfig(batch_size=batch_size, grad_accum=accum)
    if batch_size % (world * accum) == 0:
        check_batches(cfg, world, train_examples=batch_size)
        return
    with pytest.raises(ConfigError) as refused:
        check_batches(cfg, world, train_examples=batch_size)
    suggested = int(re.search(r"use --batch-size (\d+)", str(refused.value)).group(1))
    assert suggested % (world * accum) == 0 and batch_size < suggested < batch_size + world * accum
    # a --grad-accum is suggested only where one can fix the batch: the processes alone divide it
    hint = re.search(r"or a --grad-accum that divides (\d+)$", str(refused.value))
    assert bool(hint) == (batch_size % world == 0)
    if hint:
        assert int(hint.group(1)) * world == batch_size


def test_a_training_split_smaller_than_a_batch_is_refused_naming_the_limit_only_where_it_cut():
    with pytest.raises(ConfigError, match=r"larger than the training split of 7 entries \(--train-limit 7\):"):
        check_batches(FinetuneConfig(batch_size=8, train_limit=7), 1, train_examples=7, dataset_entries=100)
    check_batches(FinetuneConfig(batch_size=8), 1, train_examples=8)
    # a limit (the smoke's 40) above a split it did not cut is not why: the dataset's size is
    with pytest.raises(ConfigError, match=r"training split of 0 entries \(the dataset has 1 entry\): use a"):
        check_batches(FinetuneConfig(batch_size=2, train_limit=40), 1, train_examples=0, dataset_entries=1)
    with pytest.raises(ConfigError, match=r"training split of 5 entries: use a"):
        check_batches(FinetuneConfig(batch_size=8, train_limit=40), 1, train_examples=5)


def _finetune_cfg(tiny_model_dir, cache, output, **kw) -> FinetuneConfig:
    base = dict(
        model_dir=str(tiny_model_dir),
        data=str(cache / "instruction-data.json"),
        cache=str(cache),
        output=str(output),
        lr=1e-3,
    )
    return FinetuneConfig(**(base | kw))


def test_grad_accum_splits_give_the_same_step_as_one_batch(tiny_model_dir, cache, tmp_path):
    """The loss is a sum over targets divided by the step's count, so micro-batches whose target
    counts differ (the book's batches do) add up to the whole batch's mean, as the book computes it.
    (At the book's learning rate: at 1e-3 Adam turns summation-order rounding into ~4e-6.)"""
    weights = {}
    for accum in (1, 4):
        out = tmp_path / f"accum{accum}"
        cfg = _finetune_cfg(tiny_model_dir, cache, out, max_steps=6, eval_freq=100, grad_accum=accum, lr=5e-5)
        run_finetune(cfg)
        weights[accum] = load_file(str(out / "model" / "model.safetensors"))
    differences = {k: (weights[1][k] - weights[4][k]).abs().max().item() for k in weights[1]}
    assert max(differences.values()) < 1e-6, max(differences.items(), key=lambda kv: kv[1])
