"""The training loop on accelerate: mixed precision, DDP, checkpoints that survive preemption.

The loop is the book's ``train_model_simple`` whatever is trained: the order of batches, the split of
each into processes and micro-batches, clipping, the optimizer step, the evaluation and checkpoint
cadence, preemption. What is minimised and how an evaluation estimates it come from the ``Task``'s
objective and evaluator (``job/training/objectives.py``); checkpoints go to the ``CheckpointManager``.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from job.core.errors import STOP_SIGNALS, ConfigError, Preempted
from job.core.observability import Metrics, Progress, get_logger
from job.core.settings import redacted
from job.data.order import data_order
from job.models.decoding import generate
from job.models.families import Model
from job.models.gpt2 import GPTModel
from job.models.lora import add_adapters
from job.models.tokenizer import Tokenizer, encode
from job.training.checkpoint import CheckpointManager, remove_stale_tmp
from job.training.checkpoint_files import read_key
from job.training.objectives import Evaluator, Objective
from job.training.roles import Roles
from job.training.sharding import (
    clip_grad_norm,
    gathered_model,
    is_sharded,
    root_gathered,
    shard_model,
    skeleton,
    start_group,
)
from job.training.train_config import TrainConfig, lora_layers, resolve_precision

log = get_logger(__name__)


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint so a rerun continues exactly."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Current epoch, 0-based."""
    batch_in_epoch: int = 0
    """Global batches of the current epoch already consumed."""
    tokens_seen: int = 0
    """Input tokens of the global batches trained on, padding included, as the book counts them
    (``input_batch.numel()``): the same however the batch is split into processes and micro-batches.
    With --packing, the real tokens of the packed rows (their padding left out)."""
    history: list[dict] = field(default_factory=list)


@dataclass
class Task:
    """What is trained and on what: the model, the objective and evaluator over ``train_size`` examples,
    and the prompt of the book's sample after each epoch (None: no sample)."""

    model: Model
    objective: Objective
    evaluator: Evaluator
    train_size: int
    tokenizer: Tokenizer | None
    sample_prompt: str | None
    train_unit: str = "entries"
    """What ``train_size`` counts (``packed rows`` with --packing), for messages."""
    companions: tuple[torch.nn.Module, ...] = ()
    """Frozen models the objective runs beside the model (DPO's reference): sharded as it is."""
    layout: object | None = None
    """How the entries were laid out (job/data/formats.py's ``Layout``), which the trained model records."""


def check_batches(
    cfg: TrainConfig, world: int, train_examples: int, unit: str = "entries", dataset_entries: int | None = None
) -> None:
    """--batch-size splits evenly into processes x --grad-accum micro-batches, and the training split
    holds at least one batch (the run's preflight checks this before anything is written). Too small a split
    names --train-limit only where the limit cut it, else the dataset's ``dataset_entries`` where known."""
    parts = world * cfg.grad_accum
    if cfg.batch_size % parts:
        fitting = -(-cfg.batch_size // parts) * parts
        # another --grad-accum only helps where the processes alone divide the batch
        accum = f", or a --grad-accum that divides {cfg.batch_size // world}" if cfg.batch_size % world == 0 else ""
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must divide by processes x --grad-accum ({world} x {cfg.grad_accum}): "
            f"use --batch-size {fitting}{accum}"
        )
    if train_examples < cfg.batch_size:
        cut = cfg.train_limit is not None and (unit != "entries" or train_examples >= cfg.train_limit)
        limited = f" (--train-limit {cfg.train_limit})" if cut else ""
        if not cut and dataset_entries is not None:
            limited = f" (the dataset has {dataset_entries} {'entry' if dataset_entries == 1 else 'entries'})"
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the training split of {train_examples} {unit}{limited}: "
            "use a smaller --batch-size or more data"
        )


def choose_trained(model: Model, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """What trains: every weight (GPT-2's head untied, as the book's; a Llama 3 / Qwen3 head as its
    checkpoint has it), or LoRA's adapters alone."""
    if cfg.untie_head and not cfg.lora_rank and isinstance(model, GPTModel):
        model.untie_head()
    if cfg.lora_rank:
        layers = lora_layers(cfg.lora_targets)
        add_adapters(model, cfg.lora_rank, cfg.lora_alpha, layers, cfg.lora_dropout, cfg.seed)
    return [p for p in model.parameters() if p.requires_grad]


def compile_blocks(model: Model) -> None:
    """torch.compile each transformer block in place (regional compilation).

    The blocks share one compiled graph (their parameters are graph inputs), so compile time is
    one block's, not the whole model's; shapes are dynamic from the start because every batch
    has its own length; and parameter names stay as they were, so checkpoints do not change.
    """
    for block in model.blocks:
        block.compile(dynamic=True)


def place_model(cfg: TrainConfig, task: Task, accelerator, trainable: list[torch.nn.Parameter]):
    """The model and its AdamW ready for the loop, with what trains and (fsdp) the model's skeleton: with
    ddp accelerate wraps the model in DDP; with fsdp it is sharded here (the objective's companions too),
    since accelerate would wrap it in DDP on CPUs, and the optimizer holds the shards."""
    plain = None
    if cfg.sharding == "fsdp":
        plain = skeleton(task.model)
        start_group(accelerator.device)
        bf16 = accelerator.device.type == "cuda" and _mixed_precision(cfg.precision) == "bf16"
        for module in (*task.companions, task.model):
            shard_model(module, accelerator.device, bf16)
        trainable = [p for p in task.model.parameters() if p.requires_grad]  # the shards now
    if cfg.compile:
        compile_blocks(task.model)
    # The fused kernel (CUDA and CPU) does the whole update in one pass over the parameters.
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if plain is not None:
        return task.model, optimizer, trainable, plain
    model, optimizer = accelerator.prepare(task.model, optimizer)
    return model, optimizer, trainable, None


class Trainer:
    """The loop over a ``Task`` on an ``Accelerator``, with checkpoints and preemption; ``binding`` (the
    stage's run binding, ``job/training/binding.py``) goes into every checkpoint and must match on resume."""

    def __init__(
        self,
        cfg: TrainConfig,
        task: Task,
        metrics: Metrics,
        *,
        saved_config: dict | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
        binding: dict | None = None,
    ):
        from accelerate import Accelerator

        self.cfg, self.task, self.metrics = cfg, task, metrics
        self.saved_config = saved_config or redacted(cfg)
        self.accelerator = Accelerator(
            mixed_precision=_mixed_precision(cfg.precision), cpu=not torch.cuda.is_available()
        )
        self.roles = Roles(self.accelerator)
        check_batches(cfg, self.roles.world, task.train_size, task.train_unit)
        self.micro = cfg.batch_size // (self.roles.world * cfg.grad_accum)
        self.output = Path(cfg.output)
        torch.manual_seed(cfg.seed)
        trainable = choose_trained(task.model, cfg)
        self.parameter_counts = {
            "total": sum(p.numel() for p in task.model.parameters()),
            "trainable": sum(p.numel() for p in trainable),
        }
        for kind, count in self.parameter_counts.items():
            metrics.parameters.labels(kind).set(count)
        task.model.checkpointing = cfg.gradient_checkpointing
        # with fsdp, plain is the model's skeleton, which the trained weights are gathered into
        self.model, self.optimizer, self.trainable, self.plain = place_model(cfg, task, self.accelerator, trainable)
        self.state = TrainState()
        self._saved_step: int | None = None
        self.loop_seconds = 0.0
        self.checkpointer = CheckpointManager(
            self.output / "checkpoints",
            self.accelerator,
            self.model,
            self.optimizer,
            cfg.keep_checkpoints,
            metrics,
            on_checkpoint=on_checkpoint,
            key=read_key(cfg.checkpoint_key_file),
            binding=binding,
        )
        self._signalled = threading.Event()
        self._signals: list[str] = []  # the stop signals this process got, by name, for the message
        self.batches_per_epoch = task.train_size // cfg.batch_size
        self.order = data_order(
            cfg.data_order, task.train_size, cfg.batch_size, cfg.epochs, cfg.eval_freq, cfg.eval_iter, cfg.seed
        )
        self.total_steps = cfg.epochs * self.batches_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

    def trained_model(self) -> Model:
        """The model without its DDP wrapper (after ``fit``: as trained); with fsdp the sharded model."""
        return self.accelerator.unwrap_model(self.model)

    def final_model(self) -> Model | None:
        """The trained model whole, on the main process (a collective: every process calls it; with fsdp
        the shards are gathered into a plain model on the main process's CPU, None elsewhere)."""
        if self.plain is None:
            return self.trained_model()
        return gathered_model(self.model, self.plain, self.roles.keeps_run)

    # --- the loop --------------------------------------------------------------------------

    def fit(self) -> TrainState:
        self.resume()
        restore = _install_preemption_handlers(self.accelerator, self._signalled, self._signals)
        terminal = None if self.roles.keeps_run else False  # a bar on the main process's terminal alone
        progress = Progress("train", self.total_steps, self.state.step, "step", self.metrics, terminal=terminal)
        started, checkpointing = time.perf_counter(), self.checkpointer.seconds
        self.metrics.step_taken()  # the clock a stalled first step is measured against
        try:
            self._loop(progress)
        finally:
            # What the book times (its loop, evaluations and samples), without our checkpoints.
            self.loop_seconds = time.perf_counter() - started - (self.checkpointer.seconds - checkpointing)
            restore()
            progress.close()
        return self.state

    def _loop(self, progress: Progress) -> None:
        cfg, st = self.cfg, self.state
        started, tokens_at_start = time.perf_counter(), st.tokens_seen
        while st.epoch < cfg.epochs and st.step < self.total_steps:
            batches = self.order.epoch_batches(st.epoch)
            while st.batch_in_epoch < len(batches) and st.step < self.total_steps:
                tokens = self._train_step(batches[st.batch_in_epoch])
                st.batch_in_epoch += 1
                st.step += 1
                st.tokens_seen += tokens
                self._observe(progress, tokens, started, tokens_at_start)
                if (st.step - 1) % cfg.eval_freq == 0:
                    self._evaluate()
                if self._preemption_requested():
                    self.save_checkpoint()
                    by = self._signals[0] if self._signals else "a stop signal to another process"
                    raise Preempted(f"stopped by {by} at step {st.step}; checkpoint written, rerun to resume")
                if st.step % cfg.checkpoint_every == 0 and st.batch_in_epoch < len(batches):
                    self.save_checkpoint()  # (at an epoch's last step the epoch's own checkpoint follows)
            if st.batch_in_epoch == len(batches):  # the epoch is done
                self._log_sample()
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                self.save_checkpoint()
        if self._saved_step != st.step:  # stopped by --max-steps mid-epoch
            self.save_checkpoint()

    def _preemption_requested(self) -> bool:
        """Whether any process got SIGTERM/SIGUSR1. One process reads its handler's flag; several
        agree through accelerate's trigger, an all-reduce that costs a device sync each step."""
        if self.roles.world == 1:
            return self._signalled.is_set()
        return self.accelerator.check_trigger()

    def _train_step(self, batch: list[int]) -> int:
        """One optimizer step over ``batch`` (--batch-size examples): this process's share, in
        --grad-accum micro-batches; returns the tokens trained on."""
        self.model.train()
        objective, rank, world = self.task.objective, self.roles.rank, self.roles.world
        share = self.cfg.batch_size // world
        mine = batch[rank * share : (rank + 1) * share]
        micro_batches = [mine[i : i + self.micro] for i in range(0, share, self.micro)]
        # The loss is the mean over the batch's units: each micro-batch's sum divided by the batch's count
        # gives that mean whatever the split into processes and --grad-accum; DDP averages gradients, hence x world.
        scale = world / objective.units(batch)
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # FSDP reduce-scatters each micro-batch's gradients into the shards (no unsharded sum is held).
            skip_sync = not last and self.plain is None
            with self.accelerator.no_sync(self.model) if skip_sync else nullcontext():
                with self.accelerator.autocast():
                    loss = objective.loss_sum(self.model, micro, self.accelerator.device)
                self.accelerator.backward(loss * scale)
        if self.cfg.grad_clip is not None:  # the global norm: over every process's shards with fsdp
            clip = self.accelerator.clip_grad_norm_ if self.plain is None else clip_grad_norm
            clip(self.trainable, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return objective.tokens(batch)

    def _evaluate(self) -> None:
        st = self.state
        model = self.trained_model()
        model.eval()
        with self.accelerator.autocast(), root_gathered(model):
            figures = self.task.evaluator(model, self.order.estimate_batches(st.step - 1))
        st.history.append({"step": st.step - 1, "epoch": st.epoch + 1, "tokens_seen": st.tokens_seen, **figures})
        self.metrics.observe_evaluation(figures)
        if self.roles.keeps_run:
            log.info("eval", step=st.step - 1, epoch=st.epoch + 1, **figures, tokens_seen=st.tokens_seen)

    def _observe(self, progress: Progress, tokens: int, started: float, tokens_at_start: int) -> None:
        st, m = self.state, self.metrics
        m.train_step.set(st.step)
        m.step_taken()
        m.epoch.set(st.epoch + 1)
        m.learning_rate.set(self.optimizer.param_groups[0]["lr"])
        m.train_tokens_total.inc(tokens)
        elapsed = time.perf_counter() - started
        rate = (st.tokens_seen - tokens_at_start) / elapsed if elapsed > 0 else 0.0
        m.train_tokens_per_second.set(rate)
        if self.roles.keeps_run:
            loss = st.history[-1]["val_loss"] if st.history else None
            progress.update(1, epoch=st.epoch + 1, val_loss=loss and round(loss, 3), tokens_per_s=round(rate))
        if torch.cuda.is_available():
            m.gpu_memory_allocated_bytes.set(torch.cuda.memory_allocated())

    def _log_sample(self) -> None:
        if self.task.sample_prompt is not None:
            log_sample(self.trained_model(), self.task, self.accelerator, self.roles.keeps_run, self.state.epoch)

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        path = self.checkpointer.save(self.state.step, dataclasses.asdict(self.state), self.saved_config)
        self._saved_step = self.state.step
        return path

    def resume(self) -> None:
        if self.roles.keeps_run:
            remove_stale_tmp(self.checkpointer.folder)
        found = self.checkpointer.latest()
        if found is None:
            return
        path, files = found
        self.state = TrainState(**self.checkpointer.load(path, files))
        self._saved_step = self.state.step
        if self.roles.keeps_run:
            log.info("resumed", step=self.state.step, epoch=self.state.epoch + 1, checkpoint=str(path))


def log_sample(model: Model, task: Task, accelerator, keeps_run: bool, epoch: int) -> None:
    """The book's sample after each epoch: 50 greedy tokens after the sample prompt (``generated``, past any
    end-of-text as the book decodes; ``response``, up to it), logged by the main process. A sharded model
    decodes on every process: each forward gathers from all of them."""
    if not (keeps_run or is_sharded(model)):
        return
    tokenizer, prompt = task.tokenizer, task.sample_prompt
    model.eval()
    # Decoding runs eagerly: its per-step shapes and cache writes would only make compiled blocks recompile.
    with accelerator.autocast(), torch.compiler.set_stance("force_eager"), root_gathered(model):
        [new] = generate(model, [encode(tokenizer, prompt)], max_new_tokens=50, eos_id=None)
    if not keeps_run:
        return
    end_id = tokenizer.eot_token
    end = new.index(end_id) if end_id in new else len(new)
    response, generated = tokenizer.decode(new[:end]), tokenizer.decode(new)
    log.info("sample", epoch=epoch + 1, prompt=prompt, response=response, generated=generated)


def _mixed_precision(precision: str) -> str:
    """accelerate's name for ``precision``."""
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[resolve_precision(precision)]


def _install_preemption_handlers(accelerator, signalled: threading.Event, names: list[str]):
    """SIGTERM/SIGUSR1/SIGINT set ``signalled`` and accelerate's trigger; the loop checkpoints and exits
    after the step."""

    def handler(signum, frame):
        names.append(signal.Signals(signum).name)
        signalled.set()
        accelerator.set_trigger()

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}

    def restore():
        for s, h in previous.items():
            signal.signal(s, h)

    return restore
