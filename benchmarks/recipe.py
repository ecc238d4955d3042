"""The book's full recipe, timed through the real finetune stage (GPU), and model FLOPs utilization."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import Setup, reference_model
from job.config import FinetuneConfig
from job.finetune import run_finetune
from job.weights import save_hf

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense, per card


def full_recipe(setup: Setup, compile_model: bool = True) -> dict:
    """2 epochs of the 935 training entries, batch 8, evaluation every 5 steps on 5 batches."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        save_hf(reference_model(setup), model_dir)
        cfg = FinetuneConfig(model_dir=str(model_dir), data=str(Path(setup.data_dir) / "instruction-data.json"),
                             cache=setup.data_dir, output=str(Path(tmp) / "out"), precision="bf16",
                             compile=compile_model, checkpoint_every=10_000, keep_checkpoints=1)  # fmt: skip
        started = time.perf_counter()
        run_finetune(cfg)
        wall = time.perf_counter() - started
    return {"wall_seconds": round(wall, 2), "note": "whole stage: loading, 2 epochs, evaluations, epoch checkpoints, saving"}


def mfu(tokens_per_second: float, setup: Setup, seq_len: int) -> float | None:
    """Model FLOPs utilization: (6 N + 12 L T d) FLOPs per token against the card's bf16 peak."""
    if not setup.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is None:
        return None
    c = setup.model_config
    n_params = sum(p.numel() for p in reference_model(setup).parameters())
    flops_per_token = 6 * n_params + 12 * c.n_layers * seq_len * c.emb_dim
    return tokens_per_second * flops_per_token / peak
