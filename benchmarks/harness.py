"""Measurements, one implementation at a time, each in a fresh process (so peak memory is its own).

Every implementation gets the same random weights, the same batches from the book's data and the
same settings; each figure is the median over repeats after a warm-up.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from job.data.instructions import PROMPT_STYLES, Collator, load_entries, split_entries, tokenize
from job.data.order import SeededOrder
from job.models.gpt2 import GPTConfig, GPTModel, gpt2_config
from job.models.gpt2_weights import book_state_dict, hf_state_dict
from job.models.lora import LAYERS, add_adapters
from job.models.tokenizer import encode, load_tokenizer


@dataclass
class Setup:
    """What every implementation is measured on."""

    size: str
    device: str
    data_dir: str
    batch_size: int = 8
    train_steps: int = 8
    warmup_steps: int = 2
    repeats: int = 3
    max_new_tokens: int = 32
    generate_batch_size: int = 16
    book_prompts: int = 110
    n_layers: int | None = None  # a shallower model of the same width (quick checks)
    precision: str = "fp32"  # or bf16 (autocast)
    recipe_entries: int | None = None  # the full recipe on the dataset's first N entries (quick checks)
    compile: bool = False  # the full recipe with torch.compile'd blocks
    levers: bool = False  # issue 18's: batches padded to multiples of 16, batched evaluations, fixed-batch decoding

    @property
    def model_config(self) -> GPTConfig:
        cfg = gpt2_config(self.size)
        if self.n_layers:
            cfg = GPTConfig(**{**cfg.__dict__, "n_layers": self.n_layers})
        return cfg


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(setup: Setup):
    if setup.precision == "bf16":
        return torch.autocast(setup.device.split(":")[0], dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def reference_model(setup: Setup) -> GPTModel:
    """The weights every implementation gets: seeded, made on the measured device (fast on GPUs)."""
    torch.manual_seed(123)
    with torch.device(setup.device):
        return GPTModel(setup.model_config).eval()


def data(setup: Setup):
    tokenizer = load_tokenizer(Path(setup.data_dir) / "gpt2")
    entries = load_entries(Path(setup.data_dir) / "instruction-data.json")
    train, test, _ = split_entries(entries)
    style = PROMPT_STYLES["alpaca"]
    examples = tokenize(train, tokenizer, style, setup.model_config.context_length)
    prompts = [encode(tokenizer, style.format_input(e)) for e in test]
    return examples, prompts


def book_batches(setup: Setup, examples):
    """Batches of 8 like the book's loader (drop_last, the book's collate), shuffled by the seeded
    order with seed 123: the same batches every round, so speed figures stay comparable."""
    collate = Collator(1024, mask_instruction=False)
    needed = setup.warmup_steps + setup.train_steps * setup.repeats
    batches = []
    epoch = 0
    while len(batches) < needed:
        order = SeededOrder(len(examples), setup.batch_size, eval_iter=1, seed=123)
        batches += [collate([examples[i] for i in b]) for b in order.epoch_batches(epoch)]
        epoch += 1
    return batches[:needed]


Builder = Callable[[str, Setup], tuple]  # (model, loss of (inputs, targets)) for an implementation


# --- the three implementations --------------------------------------------------------------


def build(impl: str, setup: Setup):
    """(model, loss function of (inputs, targets)) for ``impl``, all with the reference weights."""
    ours = reference_model(setup)
    if impl in ("ours", "lora"):
        model = ours
        loss = lambda x, y: model(x, targets=y)  # noqa: E731  (the head only where targets count)
        if impl == "lora":  # the book's exercise 7.4: rank 16, alpha 16, every linear layer
            add_adapters(model, 16, 16.0, set(LAYERS), dropout=0.0, seed=123)
    elif impl == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        c = setup.model_config
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=c.vocab_size,
                n_positions=c.context_length,
                n_embd=c.emb_dim,
                n_layer=c.n_layers,
                n_head=c.n_heads,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        )
        model.load_state_dict(hf_state_dict(ours), strict=False)
        model.tie_weights()

        def loss(x, y):
            logits = model(x).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    elif impl == "book":
        from llms_from_scratch.ch04 import GPTModel as BookGPT

        c = setup.model_config
        model = BookGPT(
            {
                "vocab_size": c.vocab_size,
                "context_length": c.context_length,
                "emb_dim": c.emb_dim,
                "n_heads": c.n_heads,
                "n_layers": c.n_layers,
                "drop_rate": 0.0,
                "qkv_bias": True,
            }
        )
        model.load_state_dict(book_state_dict(ours))

        def loss(x, y):  # ch05.calc_loss_batch
            logits = model(x)
            return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    else:
        raise ValueError(impl)
    return model.to(setup.device), loss


def _warm_training(impl: str, setup: Setup, builder: Builder | None = None):
    """The book's batches and a training step for ``impl`` (forward, loss, backward, AdamW), warmed up."""
    examples, _ = data(setup)
    batches = book_batches(setup, examples)
    model, loss_fn = (builder or build)(impl, setup)
    model.train()
    # Ours as the finetune stage runs it (fused AdamW); the baselines as their code does (torch's default).
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = True if impl in ("ours", "lora") else None
    optimizer = torch.optim.AdamW(trainable, lr=5e-5, weight_decay=0.1, fused=fused)
    _reset_peak(setup)

    def step(x, y) -> int:
        x, y = x.to(setup.device), y.to(setup.device)
        with _autocast(setup):
            loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return x.numel()

    for x, y in batches[: setup.warmup_steps]:
        step(x, y)
    return batches, step


def measure_training(impl: str, setup: Setup, builder: Builder | None = None) -> dict:
    """Training tokens per second (AdamW step included) and peak memory; ``builder`` makes the model and its
    loss (GPT-2's three implementations by default)."""
    batches, step = _warm_training(impl, setup, builder)
    # Positions whose target counts (not -100): the output head's share of the FLOPs scales with these.
    target_fraction = sum(int((y != -100).sum()) for _, y in batches) / sum(y.numel() for _, y in batches)
    rates, lengths = [], [x.shape[1] for x, _ in batches]
    for r in range(setup.repeats):
        chunk = batches[setup.warmup_steps + r * setup.train_steps : setup.warmup_steps + (r + 1) * setup.train_steps]
        _sync(setup.device)
        start = time.perf_counter()
        tokens = sum(step(x, y) for x, y in chunk)
        _sync(setup.device)
        rates.append(tokens / (time.perf_counter() - start))
    return {
        "tokens_per_second": statistics.median(rates),
        "repeats": rates,
        "peak_memory_bytes": _peak(setup),
        "mean_seq_len": statistics.fmean(lengths),
        "target_fraction": target_fraction,
    }


def profile_training(impl: str, setup: Setup) -> dict:
    """torch.profiler over a few training steps: where the time goes, and how busy the device is."""
    from torch.profiler import ProfilerActivity, profile

    batches, step = _warm_training(impl, setup)
    on_cuda = setup.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    profiled = batches[setup.warmup_steps : setup.warmup_steps + 5]
    _sync(setup.device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for x, y in profiled:
            step(x, y)
        _sync(setup.device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA" and not e.is_user_annotation] if on_cuda else []
    return {
        "steps": len(profiled),
        "wall_seconds": wall,
        "step_ms": 1000 * wall / len(profiled),
        "device_busy_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1000 / len(profiled),
        "kernels_per_step": sum(e.count for e in kernels) / len(profiled),
        "table": events.table(
            sort_by="self_device_time_total" if on_cuda else "self_cpu_time_total",
            row_limit=25,
            max_name_column_width=60,
        ),
    }


@torch.no_grad()
def measure_generation(impl: str, setup: Setup, builder: Builder | None = None) -> dict:
    """Greedy decoding of the test prompts, every response forced to max_new_tokens."""
    _, prompts = data(setup)
    if impl == "book":
        prompts = prompts[: setup.book_prompts]
    model, _ = (builder or build)(impl, setup)
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [
        [prompts[i] for i in order[j : j + setup.generate_batch_size]]
        for j in range(0, len(order), setup.generate_batch_size)
    ]
    run = {"ours": _generate_ours, "hf": _generate_hf, "book": _generate_book}[impl]
    run(model, batches[:1], setup, warmup=True)
    _reset_peak(setup)
    walls, tokens = [], 0
    for _ in range(setup.repeats if impl != "book" else 1):
        _sync(setup.device)
        start = time.perf_counter()
        tokens = run(model, batches, setup)
        _sync(setup.device)
        walls.append(time.perf_counter() - start)
    wall = statistics.median(walls)
    return {
        "tokens_per_second": tokens / wall,
        "wall_seconds": wall,
        "prompts": len(prompts),
        "new_tokens": tokens,
        "peak_memory_bytes": _peak(setup),
    }


def _generate_ours(model, batches, setup, warmup=False):
    from job.models.decoding import generate, generate_fixed_batch

    n = 2 if warmup else setup.max_new_tokens
    with _autocast(setup):
        if setup.levers:  # no token is -1: every row runs to full length, as eos_id=None does
            return sum(len(o) for b in batches for o in generate_fixed_batch(model, b, n, eos_id=-1, check_every=16))
        return sum(len(o) for b in batches for o in generate(model, b, n, eos_id=None))


def _generate_hf(model, batches, setup, warmup=False):
    n = 2 if warmup else setup.max_new_tokens
    total = 0
    for batch in batches:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[50256] * (width - len(p)) + p for p in batch], device=setup.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=setup.device)
        with _autocast(setup):
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=50256,
                use_cache=True,
            )
        total += (out.shape[1] - width) * len(batch)
    return total


def _generate_book(model, batches, setup, warmup=False):
    from llms_from_scratch.ch05 import generate

    n = 2 if warmup else setup.max_new_tokens
    total = 0
    for batch in batches:
        for p in batch:  # the book decodes one prompt at a time, recomputing the whole sequence
            with _autocast(setup):
                out = generate(model, torch.tensor([p], device=setup.device), n, setup.model_config.context_length)
            total += out.shape[1] - len(p)
    return total


def _reset_peak(setup: Setup) -> None:
    if setup.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak(setup: Setup) -> int:
    if setup.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the whole process: its own


Measurement = Callable[[str, Setup], dict]


def run_isolated(measure: Measurement, impl: str, setup: Setup) -> dict:
    """``measure(impl, setup)`` in a fresh process (spawned), so its peak memory and warm caches are
    its own. ``measure`` is a module-level function (the child imports it by name).

    A measurement that fails returns {"error": ...} so the others still run and are reported.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1, initializer=_end_with, initargs=(os.getpid(),)) as pool:
        return pool.apply(_task, (measure, impl, setup.__dict__))


def _end_with(parent: int) -> None:
    """The measuring process ends when the benchmark does, however it ends: a timeout's SIGKILL leaves
    no orphan training on at full CPU (Linux's parent-death signal; elsewhere the pool's own cleanup)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the benchmark ended before the signal was set
        os._exit(1)


def _task(measure: Measurement, impl: str, setup_fields: dict) -> dict:
    import contextlib
    import traceback

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    setup = Setup(**setup_fields)
    try:
        with (
            open(os.devnull, "w") as devnull,
            contextlib.redirect_stdout(devnull),
        ):  # the book's loop prints every evaluation
            return json.loads(json.dumps(measure(impl, setup)))
    except Exception as exc:  # noqa: BLE001  (reported in the results; the run goes on)
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
