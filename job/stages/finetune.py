"""The finetune stage (book, 7.6): the instruction dataset and the pretrained model made into a training
task (the book's cross entropy), trained by the ``Trainer``, its outputs written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from job.core.observability import Metrics, get_logger
from job.data.formats import Layout
from job.data.instructions import Collator, Example
from job.data.packing import Packer, checked_pack_length
from job.models.families import Model
from job.models.tokenizer import Tokenizer
from job.stages.finetune_config import FinetuneConfig
from job.training.binding import run_binding
from job.training.objectives import PackedSFTEvaluator, PackedSFTObjective, SFTEvaluator, SFTObjective
from job.training.stage_io import StartingModel, load_inputs, save_outputs, split_examples, write_config_once
from job.training.starting_model import starting_model
from job.training.trainer import Task, Trainer

log = get_logger(__name__)


@dataclass
class Prepared:
    """The stage's inputs, loaded and validated before any output is written."""

    model: Model
    tokenizer: Tokenizer
    train: list[Example]
    val: list[Example]
    sample_prompt: str
    model_name: str
    max_length: int
    start: StartingModel
    """Where the model came from (the outputs name it)."""
    layout: Layout | None = None
    """How the entries were laid out (the model records it)."""


def prepare(cfg: FinetuneConfig) -> Prepared:
    """The stage's inputs, the examples tokenized."""
    start = starting_model(cfg)
    inputs = load_inputs(cfg, start)
    tokenizer, how, max_length = inputs.tokenizer, inputs.layout, inputs.max_length
    train, val = split_examples(how, inputs.splits, tokenizer, max_length)
    return Prepared(
        model=inputs.model,
        tokenizer=tokenizer,
        train=train,
        val=val,
        sample_prompt=how.prompt(inputs.val[0]),
        model_name=inputs.model_name,
        max_length=max_length,
        start=start,
        layout=how,
    )


def sft_task(cfg: FinetuneConfig, prep: Prepared) -> Task:
    """The book's supervised finetuning of ``prep``: its objective and evaluator on the collated batches."""
    collate = Collator(prep.max_length, cfg.mask_instruction, cfg.pad_to_multiple, prep.tokenizer.eot_token)
    if cfg.packing:
        return packed_task(cfg, prep, collate)
    return Task(
        model=prep.model,
        objective=SFTObjective(prep.train, collate, prep.max_length),
        evaluator=SFTEvaluator(prep.train, prep.val, collate, cfg.batch_size, cfg),
        train_size=len(prep.train),
        tokenizer=prep.tokenizer,
        sample_prompt=prep.sample_prompt,
    )


def packed_task(cfg: FinetuneConfig, prep: Prepared, collate: Collator) -> Task:
    """``--packing``: the training split packed into rows of --pack-length tokens, a batch a number of rows."""
    pack_length = checked_pack_length(cfg.pack_length, prep.train, prep.max_length, prep.model.cfg.context_length)
    lengths = [min(len(e.token_ids), prep.max_length) for e in prep.train]
    packer = Packer(prep.train, collate, pack_length, cfg.seed)
    log.info(
        "packed",
        sequences=len(prep.train),
        rows=len(packer.rows),
        pack_length=pack_length,
        padding_fraction=round(1 - sum(lengths) / (len(packer.rows) * pack_length), 4),
    )
    return Task(
        model=prep.model,
        objective=PackedSFTObjective(packer),
        evaluator=PackedSFTEvaluator(packer, prep.val, collate, cfg.batch_size, cfg),
        train_size=len(packer.rows),
        tokenizer=prep.tokenizer,
        sample_prompt=prep.sample_prompt,
        train_unit="packed rows",
    )


def run_finetune(
    cfg: FinetuneConfig,
    metrics: Metrics | None = None,
    saved_config: dict | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    binding: dict | None = None,
) -> dict[str, Path]:
    """The stage: validate and load everything, then train (resuming if checkpoints exist), then save.

    ``saved_config`` is the resolved configuration written beside the outputs and into every
    checkpoint (the run command passes its own); ``on_checkpoint`` sees each checkpoint written;
    ``binding`` is the stage's run binding (computed here where not given: the run is the output folder).
    """
    metrics = metrics or Metrics()
    prep = prepare(cfg)  # may fail: nothing has been written yet
    binding = binding or run_binding(cfg, (saved_config or {}).get("run_id"))
    trainer = Trainer(
        cfg, sft_task(cfg, prep), metrics, saved_config=saved_config, on_checkpoint=on_checkpoint, binding=binding
    )
    if trainer.roles.keeps_run:
        write_config_once(trainer)
        log.info(
            "finetune_start",
            model=prep.model_name,
            train_examples=len(prep.train),
            val_examples=len(prep.val),
            steps=trainer.total_steps,
            parameters=trainer.parameter_counts["total"],
            trainable_parameters=trainer.parameter_counts["trainable"],
            processes=trainer.roles.world,
            precision=trainer.accelerator.mixed_precision,
            device=str(trainer.accelerator.device),
        )
    trainer.fit()
    outputs = save_outputs(trainer, cfg, prep.start, model_name=prep.model_name, how=prep.layout)
    if trainer.roles.keeps_run:
        log.info(
            "finetune_done",
            steps=trainer.state.step,
            tokens_seen=trainer.state.tokens_seen,
            loop_seconds=round(trainer.loop_seconds, 2),
            final_val_loss=trainer.state.history[-1]["val_loss"] if trainer.state.history else None,
        )
    return outputs
