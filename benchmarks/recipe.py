"""The book's full recipe (section 7.6), ours through the real finetune stage and the book's own
``train_model_simple``, and model FLOPs utilization."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import Setup, _sync, build, reference_model
from job.core.observability import Metrics
from job.data.instructions import load_entries, split_entries
from job.models.gpt2 import GPTModel
from job.models.gpt2_weights import save_hf
from job.models.tokenizer import load_tokenizer
from job.stages.finetune import prepare, sft_task
from job.stages.finetune_config import FinetuneConfig
from job.training.stage_io import save_outputs
from job.training.trainer import Trainer

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense, per card
RECIPE = dict(epochs=2, batch_size=8, lr=5e-5, weight_decay=0.1, eval_freq=5, eval_iter=5)  # the book's


def _entries(setup: Setup) -> list[dict]:
    entries = load_entries(Path(setup.data_dir) / "instruction-data.json")
    return entries[: setup.recipe_entries] if setup.recipe_entries else entries


def _curve(train: list[float], val: list[float]) -> dict:
    return {
        "evaluations": len(val),
        "first_train_loss": round(train[0], 4),
        "first_val_loss": round(val[0], 4),
        "last_train_loss": round(train[-1], 4),
        "last_val_loss": round(val[-1], 4),
    }


def measure_recipe(impl: str, setup: Setup) -> dict:
    """The book's recipe through ``impl``: our finetune stage, or the book's own code."""
    return book_recipe(setup) if impl == "book" else full_recipe(setup)


def full_recipe(setup: Setup) -> dict:
    """Ours: the finetune stage (bf16 on CUDA, fused AdamW) on the book's settings, its parts timed.

    ``loop_seconds`` is what the book times (training and its evaluations, the per-epoch sample);
    our epoch-end checkpoints (model, optimizer and RNG state, for preemption) are timed apart.
    """
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = Path(tmp) / "model", Path(tmp) / "data.json"
        save_hf(reference_model(setup).cpu(), model_dir)
        data.write_text(json.dumps(_entries(setup)))
        cfg = FinetuneConfig(
            model_dir=str(model_dir),
            data=str(data),
            cache=setup.data_dir,
            output=str(Path(tmp) / "out"),
            precision=setup.precision,
            compile=setup.compile,
            checkpoint_every=10_000,
            data_order="book",
            untie_head=True,  # the book's batches and its untied head: the book's loss curve
            pad_to_multiple=16 if setup.levers else None,
            batched_eval=setup.levers,
            keep_checkpoints=1,
            **RECIPE,
        )
        started = time.perf_counter()
        prep = prepare(cfg)
        trainer = Trainer(cfg, sft_task(cfg, prep), Metrics())
        ready = time.perf_counter()
        trainer.fit()
        _sync(setup.device)
        fitted = time.perf_counter()
        save_outputs(trainer, cfg, prep.start, model_name=prep.model_name)
        done = time.perf_counter()
        history = trainer.state.history
    return {
        "loop_seconds": round(fitted - ready - trainer.checkpointer.seconds, 2),
        "checkpoint_seconds": round(trainer.checkpointer.seconds, 2),
        "load_seconds": round(ready - started, 2),
        "save_outputs_seconds": round(done - fitted, 2),
        "stage_seconds": round(done - started, 2),
        "steps": trainer.state.step,
        "tokens_seen": trainer.state.tokens_seen,
        "compile": setup.compile,
        "levers": setup.levers,
        **_curve([h["train_loss"] for h in history], [h["val_loss"] for h in history]),
    }


def book_recipe(setup: Setup) -> dict:
    """The book's code as chapter 7 runs it: its dataset, collate and ``train_model_simple``, timed as it times."""
    from functools import partial

    from llms_from_scratch.ch05 import train_model_simple
    from llms_from_scratch.ch07 import InstructionDataset, custom_collate_fn, format_input
    from torch.utils.data import DataLoader

    tokenizer = load_tokenizer(Path(setup.data_dir) / "gpt2")
    train, _test, val = split_entries(_entries(setup))
    model, _ = build("book", setup)
    collate = partial(custom_collate_fn, device=setup.device, allowed_max_length=1024)
    torch.manual_seed(123)
    train_loader = DataLoader(
        InstructionDataset(train, tokenizer),
        batch_size=RECIPE["batch_size"],
        collate_fn=collate,
        shuffle=True,
        drop_last=True,
        num_workers=0,
    )
    val_loader = DataLoader(
        InstructionDataset(val, tokenizer),
        batch_size=RECIPE["batch_size"],
        collate_fn=collate,
        shuffle=False,
        drop_last=False,
        num_workers=0,
    )
    _sync(setup.device)
    started = time.perf_counter()
    torch.manual_seed(123)
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    train_losses, val_losses, _ = train_model_simple(
        model,
        train_loader,
        val_loader,
        optimizer,
        setup.device,
        num_epochs=RECIPE["epochs"],
        eval_freq=RECIPE["eval_freq"],
        eval_iter=RECIPE["eval_iter"],
        start_context=format_input(val[0]),
        tokenizer=tokenizer,
    )
    _sync(setup.device)
    return {
        "loop_seconds": round(time.perf_counter() - started, 2),
        "precision": "fp32 (the book's code has no autocast)",
        "steps": RECIPE["epochs"] * len(train_loader),
        **_curve(train_losses, val_losses),
    }


def mfu(result: dict, setup: Setup) -> float | None:
    """Model FLOPs utilization of a training measurement against the card's dense bf16 peak.

    FLOPs per position: 6 x (parameters of the blocks and final norm) + 12 x layers x T x d for
    attention (nanoGPT's count) + 6 x vocab x d for the output head (on CUDA ours runs the head at
    every position). Embedding lookups count nothing; padding positions count as the GPU does them.
    """
    if not setup.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is None:
        return None
    c = setup.model_config
    with torch.device("meta"):  # the parameter count without initializing 355M weights
        model = GPTModel(c)
    body = sum(p.numel() for p in model.parameters()) - model.wte.weight.numel() - model.wpe.weight.numel()
    per_position = 6 * body + 12 * c.n_layers * result["mean_seq_len"] * c.emb_dim
    per_position += 6 * c.vocab_size * c.emb_dim
    return round(result["tokens_per_second"] * per_position / peak, 4)
