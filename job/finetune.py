"""The finetune stage (book, 7.6) on accelerate: mixed precision, DDP, checkpoints that survive preemption."""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken
import torch
import torch.nn.functional as F
import yaml

from job.checkpoint import CheckpointManager
from job.checkpoint_files import read_key
from job.config import FinetuneConfig, lora_layers, redacted, resolve_precision
from job.data import (
    IGNORE_INDEX,
    PROMPT_STYLES,
    Collator,
    Example,
    load_entries,
    resolve_data,
    split_entries,
    tokenize,
)
from job.decoding import generate
from job.download import Downloader, model_files, tokenizer_files
from job.download import model_dir as cached_model_dir
from job.errors import STOP_SIGNALS, ConfigError, JobError, TransientError
from job.lora import add_adapters, merge_adapters, save_peft_adapter
from job.model import GPT2_SIZES, OPENAI_SIZE_NAMES, GPTModel, head_loss
from job.observability import Metrics, Progress, get_logger
from job.order import data_order
from job.storage import atomic_path, atomic_write_text, ensure_room
from job.tokenizer import END_OF_TEXT_ID, encode, load_tokenizer
from job.weights import book_state_dict, load_pretrained, save_hf

log = get_logger(__name__)


class Preempted(TransientError):
    """SIGTERM/SIGUSR1 arrived: a checkpoint was written and the job should be requeued (exit 75)."""


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
    (``input_batch.numel()``): the same however the batch is split into processes and micro-batches."""
    history: list[dict] = field(default_factory=list)


@dataclass
class Prepared:
    """Everything the loop needs, loaded and validated before any output is written."""

    model: GPTModel
    tokenizer: tiktoken.Encoding
    train: list[Example]
    val: list[Example]
    sample_prompt: str
    model_name: str
    max_length: int


def prepare(cfg: FinetuneConfig) -> Prepared:
    """Dataset first (a bad one fails before any model loads), then tokenizer and model."""
    cache = Path(cfg.cache)
    entries = load_entries(resolve_data(cfg.data, cache, cfg.base_url), cfg.skip_invalid)
    train, _test, val = split_entries(entries, cfg.shuffle_seed)
    train = train[: cfg.train_limit]
    if not train or not val:
        raise JobError(f"dataset of {len(entries)} entries is too small for the 85/10/5 split")
    Downloader(cache).fetch_all(tokenizer_files(cfg.base_url))
    tokenizer = load_tokenizer(cache / "gpt2")
    model, name = load_model(cfg)
    style = PROMPT_STYLES[cfg.prompt_style]
    max_length = min(cfg.allowed_max_length, model.cfg.context_length)
    return Prepared(
        model=model,
        tokenizer=tokenizer,
        train=tokenize(train, tokenizer, style, max_length),
        val=tokenize(val, tokenizer, style, max_length),
        sample_prompt=style.format_input(val[0]),
        model_name=name,
        max_length=max_length,
    )


def check_batches(cfg: FinetuneConfig, world: int, train_examples: int) -> None:
    """--batch-size splits evenly into processes x --grad-accum micro-batches, and the training split
    holds at least one batch (the run's preflight checks this before anything is written)."""
    parts = world * cfg.grad_accum
    if cfg.batch_size % parts:
        fitting = -(-cfg.batch_size // parts) * parts
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must divide by processes x --grad-accum ({world} x {cfg.grad_accum}): "
            f"use --batch-size {fitting}, or a --grad-accum that divides {cfg.batch_size // world or 1}"
        )
    if train_examples < cfg.batch_size:
        limited = " (--train-limit)" if cfg.train_limit is not None else ""
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the training split of {train_examples} entries{limited}: "
            "use a smaller --batch-size or more data"
        )


def load_model(cfg: FinetuneConfig) -> tuple[GPTModel, str]:
    """The starting model and the book-style name of its size (``gpt2-medium355M``)."""
    if cfg.model_dir:
        model = load_pretrained(cfg.model_dir)
        named = next((n for n, c in GPT2_SIZES.items() if c == model.cfg), None)
        return model, f"{named}{OPENAI_SIZE_NAMES[named]}" if named else "gpt2-custom"
    Downloader(Path(cfg.cache)).fetch_all(model_files(cfg.model, cfg.source, cfg.base_url))
    model = load_pretrained(cached_model_dir(cfg.cache, cfg.model, cfg.source))
    return model, f"{cfg.model}{OPENAI_SIZE_NAMES[cfg.model]}"


def compile_blocks(model: GPTModel) -> None:
    """torch.compile each transformer block in place (regional compilation).

    The blocks share one compiled graph (their parameters are graph inputs), so compile time is
    one block's, not the whole model's; shapes are dynamic from the start because every batch
    has its own length; and parameter names stay as they were, so checkpoints do not change.
    """
    for block in model.h:
        block.compile(dynamic=True)


class Trainer:
    """The book's ``train_model_simple`` on an ``Accelerator``, with checkpoints and preemption."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        prep: Prepared,
        metrics: Metrics,
        saved_config: dict | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
    ):
        from accelerate import Accelerator

        self.cfg, self.prep, self.metrics = cfg, prep, metrics
        self.saved_config = saved_config or redacted(cfg)
        self.accelerator = Accelerator(
            mixed_precision=_mixed_precision(cfg.precision), cpu=not torch.cuda.is_available()
        )
        world = self.accelerator.num_processes
        check_batches(cfg, world, len(prep.train))
        self.micro = cfg.batch_size // (world * cfg.grad_accum)
        self.output = Path(cfg.output)
        self.checkpoints = self.output / "checkpoints"
        self.collate = Collator(prep.max_length, cfg.mask_instruction, cfg.pad_to_multiple)
        # Targets each training example contributes (not -100): independent of what it is batched with.
        self.target_counts = [int((self.collate([e])[1] != IGNORE_INDEX).sum()) for e in prep.train]
        torch.manual_seed(cfg.seed)
        model = prep.model
        trainable = self._choose_trained(model)
        if cfg.compile:
            compile_blocks(model)
        # The fused kernel (CUDA and CPU) does the whole update in one pass over the parameters.
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.state = TrainState()
        self._saved_step: int | None = None
        self.loop_seconds = 0.0
        self.checkpointer = CheckpointManager(
            self.checkpoints,
            self.accelerator,
            self.model,
            self.optimizer,
            cfg.keep_checkpoints,
            metrics,
            on_checkpoint,
            key=read_key(cfg.checkpoint_key_file),
        )
        self._signalled = threading.Event()
        self.batches_per_epoch = len(prep.train) // cfg.batch_size
        self.order = data_order(
            cfg.data_order, len(prep.train), cfg.batch_size, cfg.epochs, cfg.eval_freq, cfg.eval_iter, cfg.seed
        )
        self.total_steps = cfg.epochs * self.batches_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _choose_trained(self, model: GPTModel) -> list[torch.nn.Parameter]:
        """What trains: every weight (the head untied, as the book's), or LoRA's adapters alone."""
        cfg = self.cfg
        if cfg.untie_head and not cfg.lora_rank:
            model.untie_head()
        if cfg.lora_rank:
            layers = lora_layers(cfg.lora_targets)
            add_adapters(model, cfg.lora_rank, cfg.lora_alpha, layers, cfg.lora_dropout, cfg.seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        total = sum(p.numel() for p in model.parameters())
        self.parameter_counts = {"total": total, "trainable": sum(p.numel() for p in trainable)}
        for kind, count in self.parameter_counts.items():
            self.metrics.parameters.labels(kind).set(count)
        return trainable

    # --- the loop --------------------------------------------------------------------------

    def fit(self) -> TrainState:
        self.resume()
        restore = _install_preemption_handlers(self.accelerator, self._signalled)
        self.progress = Progress(
            "train", self.total_steps, self.state.step, "step", self.metrics, terminal=None if self.is_main else False
        )
        started, checkpointing = time.perf_counter(), self.checkpointer.seconds
        try:
            self._loop()
        finally:
            # What the book times (its loop, evaluations and samples), without our checkpoints.
            self.loop_seconds = time.perf_counter() - started - (self.checkpointer.seconds - checkpointing)
            restore()
            self.progress.close()
        return self.state

    def _loop(self) -> None:
        cfg, st = self.cfg, self.state
        started, tokens_at_start = time.perf_counter(), st.tokens_seen
        while st.epoch < cfg.epochs and st.step < self.total_steps:
            batches = self.order.epoch_batches(st.epoch)
            while st.batch_in_epoch < len(batches) and st.step < self.total_steps:
                tokens = self._train_step(batches[st.batch_in_epoch])
                st.batch_in_epoch += 1
                st.step += 1
                st.tokens_seen += tokens
                self._observe(tokens, started, tokens_at_start)
                if (st.step - 1) % cfg.eval_freq == 0:
                    self._evaluate()
                if self._preemption_requested():
                    self.save_checkpoint()
                    raise Preempted(f"preempted at step {st.step}; checkpoint written, rerun to resume")
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
        if self.accelerator.num_processes == 1:
            return self._signalled.is_set()
        return self.accelerator.check_trigger()

    def _train_step(self, global_batch: list[int]) -> int:
        """One optimizer step over ``global_batch`` (--batch-size examples): this process's share, in
        --grad-accum micro-batches; returns the tokens trained on."""
        self.model.train()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        share = self.cfg.batch_size // world
        mine = global_batch[rank * share : (rank + 1) * share]
        micro_batches = [mine[i : i + self.micro] for i in range(0, share, self.micro)]
        # The book's loss is the mean over the batch's targets. Each micro-batch's sum divided by the
        # batch's count (every process knows it: each holds the data) gives that same mean whatever
        # the split into processes and --grad-accum; DDP averages gradients, hence x world.
        counted = sum(self.target_counts[j] for j in global_batch)
        for i, micro in enumerate(micro_batches):
            inputs, targets = self.collate([self.prep.train[j] for j in micro])
            inputs, targets = inputs.to(self.accelerator.device), targets.to(self.accelerator.device)
            last = i == len(micro_batches) - 1
            with self.accelerator.no_sync(self.model) if not last else nullcontext():
                with self.accelerator.autocast():
                    loss = self.model(inputs, targets=targets, reduction="sum")
                self.accelerator.backward(loss * (world / counted))
        if self.cfg.grad_clip is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The book's count: the global batch padded to its longest example (capped), whatever the split.
        longest = max(len(self.prep.train[j].token_ids) for j in global_batch)
        return len(global_batch) * min(longest, self.prep.max_length)

    @torch.no_grad()
    def _batch_losses(self, batches: list[list[Example]]) -> torch.Tensor:
        """Each batch's mean loss (the terms of the book's ``calc_loss_loader``), (n,) on the device:
        a forward per batch, or with --batched-eval one forward for all of them."""
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        device = self.accelerator.device
        collated = [self.collate(batch) for batch in batches]
        if not self.cfg.batched_eval:
            losses = []
            for inputs, targets in collated:
                with self.accelerator.autocast():
                    losses.append(model(inputs.to(device), targets=targets.to(device)).float())
            return torch.stack(losses)
        width = max(x.shape[1] for x, _ in collated)
        # Every batch padded to the longest, after its real tokens (targets ignored): one (R, T) forward.
        inputs = torch.cat([F.pad(x, (0, width - x.shape[1]), value=END_OF_TEXT_ID) for x, _ in collated])
        targets = torch.cat([F.pad(y, (0, width - y.shape[1]), value=IGNORE_INDEX) for _, y in collated])
        rows = torch.cat([torch.full((len(x),), i) for i, (x, _) in enumerate(collated)])  # (R,) batch of each row
        inputs, targets, rows = inputs.to(device), targets.to(device), rows.to(device)
        keep = targets != IGNORE_INDEX  # (R, T)
        with self.accelerator.autocast():  # the head only where a target counts: (N,) losses in keep's order
            per_target = head_loss(model.lm_head, model.hidden_states(inputs), targets, True, reduction="none")
        owner = rows[:, None].expand_as(targets)[keep]  # (N,) the batch of each target
        sums = torch.zeros(len(batches), device=device).index_add_(0, owner, per_target)
        counts = torch.zeros(len(batches), device=device).index_add_(0, owner, torch.ones_like(per_target))
        return sums / counts

    def _evaluate(self) -> None:
        st, n = self.state, self.cfg.batch_size
        estimate = [[self.prep.train[j] for j in batch] for batch in self.order.estimate_batches(st.step - 1)]
        val = [self.prep.val[i : i + n] for i in range(0, len(self.prep.val), n)][: self.cfg.eval_iter]
        losses = self._batch_losses(estimate + val).tolist()  # one device sync per evaluation
        train_loss = sum(losses[: len(estimate)]) / len(estimate)
        val_loss = sum(losses[len(estimate) :]) / len(val)
        st.history.append(
            {
                "step": st.step - 1,
                "epoch": st.epoch + 1,
                "tokens_seen": st.tokens_seen,
                "train_loss": train_loss,
                "val_loss": val_loss,
            }
        )
        self.metrics.train_loss.set(train_loss)
        self.metrics.val_loss.set(val_loss)
        if self.is_main:
            log.info(
                "eval",
                step=st.step - 1,
                epoch=st.epoch + 1,
                train_loss=train_loss,
                val_loss=val_loss,
                tokens_seen=st.tokens_seen,
            )

    def _observe(self, tokens: int, started: float, tokens_at_start: int) -> None:
        st, m = self.state, self.metrics
        m.train_step.set(st.step)
        m.epoch.set(st.epoch + 1)
        m.learning_rate.set(self.optimizer.param_groups[0]["lr"])
        m.train_tokens_total.inc(tokens)
        elapsed = time.perf_counter() - started
        rate = (st.tokens_seen - tokens_at_start) / elapsed if elapsed > 0 else 0.0
        m.train_tokens_per_second.set(rate)
        if self.is_main:
            loss = st.history[-1]["val_loss"] if st.history else None
            self.progress.update(1, epoch=st.epoch + 1, val_loss=loss and round(loss, 3), tokens_per_s=round(rate))
        if torch.cuda.is_available():
            m.gpu_memory_allocated_bytes.set(torch.cuda.memory_allocated())

    def _log_sample(self) -> None:
        """The book's sample after each epoch: 50 greedy tokens after the first validation prompt
        (``generated``, past any end-of-text as the book decodes; ``response``, up to it)."""
        if not self.is_main:
            return
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        prompt = encode(self.prep.tokenizer, self.prep.sample_prompt)
        # Decoding runs eagerly: its per-step shapes and cache writes would only make compiled blocks recompile.
        with self.accelerator.autocast(), torch.compiler.set_stance("force_eager"):
            [new] = generate(model, [prompt], max_new_tokens=50, eos_id=None)
        end = new.index(END_OF_TEXT_ID) if END_OF_TEXT_ID in new else len(new)
        log.info(
            "sample",
            epoch=self.state.epoch + 1,
            prompt=self.prep.sample_prompt,
            response=self.prep.tokenizer.decode(new[:end]),
            generated=self.prep.tokenizer.decode(new),
        )

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        path = self.checkpointer.save(self.state.step, dataclasses.asdict(self.state), self.saved_config)
        self._saved_step = self.state.step
        return path

    def resume(self) -> None:
        found = self.checkpointer.latest()
        if found is None:
            return
        path, files = found
        self.state = TrainState(**self.checkpointer.load(path, files))
        self._saved_step = self.state.step
        if self.is_main:
            log.info("resumed", step=self.state.step, epoch=self.state.epoch + 1, checkpoint=str(path))

    # --- outputs -----------------------------------------------------------------------------

    def write_outputs(self) -> dict[str, Path]:
        """The final model (safetensors + config, and the book's .pth), losses JSON and plot; with
        LoRA the adapter alone in PEFT's layout first, then the model with the adapters merged."""
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return {}
        model = self.accelerator.unwrap_model(self.model)
        out = self.output
        written = {}
        if self.cfg.lora_rank:
            written["adapter"] = save_peft_adapter(model, out / "adapter", self._base_name(), self.cfg.lora_dropout)
            merge_adapters(model)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        ensure_room(out, 2 * params, "the final model (safetensors and the book's .pth)")
        save_hf(model, out / "model", extra_config={"sft_job": {"prompt_style": self.cfg.prompt_style}})
        pth = out / f"{self.prep.model_name}-sft.pth"
        with atomic_path(pth) as tmp:
            torch.save(book_state_dict(model), tmp)
        losses = out / "losses.json"
        atomic_write_text(losses, json.dumps(self.state.history, indent=2) + "\n")
        plot = out / "loss-plot.png"
        plot_losses(self.state.history, self.state.step / self.batches_per_epoch, plot)
        return written | {"model": out / "model", "pth": pth, "losses": losses, "plot": plot}

    def _base_name(self) -> str:
        """The adapter's base model as PEFT records it: the folder, or Hugging Face's id for the size."""
        downloaded = cached_model_dir(self.cfg.cache, self.cfg.model, self.cfg.source)
        if self.cfg.model_dir and Path(self.cfg.model_dir) != Path(downloaded):
            return str(self.cfg.model_dir)
        return "openai-community/" + self.cfg.model.replace("gpt2-small", "gpt2")


def plot_losses(history: list[dict], epochs: float, path: Path) -> None:
    """The book's ``plot_losses``: losses against the epochs trained (a fraction where training
    stopped early), tokens seen on a second x-axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [h["train_loss"] for h in history]
    val = [h["val_loss"] for h in history]
    epochs_seen = torch.linspace(0, epochs, len(history)).tolist()
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train, label="Training loss")
    ax1.plot(epochs_seen, val, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=epochs >= 1))
    ax2 = ax1.twiny()
    ax2.plot([h["tokens_seen"] for h in history], train, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run_finetune(
    cfg: FinetuneConfig,
    metrics: Metrics | None = None,
    saved_config: dict | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> dict[str, Path]:
    """The stage: validate and load everything, then train (resuming if checkpoints exist), then save.

    ``saved_config`` is the resolved configuration written beside the outputs and into every
    checkpoint (the run command passes its own); ``on_checkpoint`` sees each checkpoint written.
    """
    metrics = metrics or Metrics()
    prep = prepare(cfg)  # may fail: nothing has been written yet
    trainer = Trainer(cfg, prep, metrics, saved_config, on_checkpoint)
    if trainer.is_main:
        trainer.output.mkdir(parents=True, exist_ok=True)
        if not (trainer.output / "config.yaml").is_file():  # a rerun keeps the record of how it started
            atomic_write_text(trainer.output / "config.yaml", yaml.safe_dump(trainer.saved_config, sort_keys=False))
        log.info(
            "finetune_start",
            model=prep.model_name,
            train_examples=len(prep.train),
            val_examples=len(prep.val),
            steps=trainer.total_steps,
            parameters=trainer.parameter_counts["total"],
            trainable_parameters=trainer.parameter_counts["trainable"],
            processes=trainer.accelerator.num_processes,
            precision=trainer.accelerator.mixed_precision,
            device=str(trainer.accelerator.device),
        )
    trainer.fit()
    outputs = trainer.write_outputs()
    if trainer.is_main:
        log.info(
            "finetune_done",
            steps=trainer.state.step,
            tokens_seen=trainer.state.tokens_seen,
            loop_seconds=round(trainer.loop_seconds, 2),
            final_val_loss=trainer.state.history[-1]["val_loss"] if trainer.state.history else None,
        )
    return outputs


def _mixed_precision(precision: str) -> str:
    """accelerate's name for ``precision``."""
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[resolve_precision(precision)]


def _install_preemption_handlers(accelerator, signalled: threading.Event):
    """SIGTERM/SIGUSR1/SIGINT set ``signalled`` and accelerate's trigger; the loop checkpoints and exits
    after the step."""

    def handler(signum, frame):
        signalled.set()
        accelerator.set_trigger()

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}

    def restore():
        for s, h in previous.items():
            signal.signal(s, h)

    return restore
