"""The finetune stage (book, 7.6): the instruction dataset and the pretrained model made into a training
task (the book's cross entropy), trained by the ``Trainer``, its outputs written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from job.config import FinetuneConfig, TrainConfig
from job.core.observability import Metrics, get_logger
from job.data.instructions import (
    Collator,
    DataError,
    Example,
    PromptStyle,
    entry_problem,
    load_entries,
    prompt_style,
    resolve_data,
    split_entries,
    tokenize,
)
from job.models.families import Model, family
from job.models.families import load_model as load_model_folder
from job.models.gpt2 import GPT2_SIZES, OPENAI_SIZE_NAMES, GPTModel
from job.models.tokenizer import Tokenizer
from job.stages.download import (
    cached_model_dir,
    fetch_model,
    hf_repo_id,
    model_downloader,
    model_tokenizer,
    tokenizer_folder,
)
from job.storage.store import atomic_write_text
from job.training.binding import run_binding
from job.training.objectives import SFTEvaluator, SFTObjective
from job.training.outputs import write_outputs
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


@dataclass
class Inputs:
    """A training stage's inputs before tokenizing: its splits (the book's 85/10/5), tokenizer, model (and
    the book-style name of its size), prompt style and the longest sequence it trains on."""

    train: list[dict]
    val: list[dict]
    tokenizer: Tokenizer
    model: Model
    model_name: str
    style: PromptStyle
    max_length: int
    path: Path
    """The dataset's file."""


def training_splits(cfg: TrainConfig, check=entry_problem) -> tuple[Path, list[dict], list[dict]]:
    """The dataset's file and its training (cut to --train-limit) and validation splits, each entry checked
    (``check`` says what a bad entry is); a split left empty is a DataError."""
    path = resolve_data(cfg.data, Path(cfg.cache), cfg.base_url)
    entries = load_entries(path, cfg.skip_invalid, check)
    train, _test, val = split_entries(entries, cfg.shuffle_seed)
    train = train[: cfg.train_limit]
    if not train or not val:
        raise DataError(f"dataset {path} of {len(entries)} entries is too small for the 85/10/5 split")
    return path, train, val


def load_inputs(cfg: TrainConfig, check=entry_problem) -> Inputs:
    """The dataset first (a bad one fails before any model loads; ``check`` says what a bad entry is), then
    the tokenizer and the model."""
    cache = Path(cfg.cache)
    path, train, val = training_splits(cfg, check)
    tokenizer = model_tokenizer(tokenizer_folder(cfg), cache, cfg.base_url)
    style = prompt_style(cfg.prompt_style, tokenizer)
    model, name = load_model(cfg)
    max_length = min(cfg.allowed_max_length, model.cfg.context_length)
    return Inputs(train, val, tokenizer, model, name, style, max_length, path)


def prepare(cfg: FinetuneConfig) -> Prepared:
    """The stage's inputs, the examples tokenized."""
    inputs = load_inputs(cfg)
    tokenizer, style, max_length = inputs.tokenizer, inputs.style, inputs.max_length
    return Prepared(
        model=inputs.model,
        tokenizer=tokenizer,
        train=tokenize(inputs.train, tokenizer, style, max_length),
        val=tokenize(inputs.val, tokenizer, style, max_length),
        sample_prompt=style.format_input(inputs.val[0]),
        model_name=inputs.model_name,
        max_length=max_length,
    )


def load_model(cfg: TrainConfig) -> tuple[Model, str]:
    """The starting model and the book-style name of its size (``gpt2-medium355M``, ``qwen3-0.6b``; the
    family's name for a folder of another: ``qwen3-custom``)."""
    folder = Path(cfg.model_dir) if cfg.model_dir else fetch_model(cfg, model_downloader(cfg))
    model = load_model_folder(folder)
    if folder == cached_model_dir(cfg):  # the named model, as downloaded
        return model, f"{cfg.model}{OPENAI_SIZE_NAMES.get(cfg.model, '')}"
    if not isinstance(model, GPTModel):
        return model, f"{family(folder)}-custom"
    named = next((n for n, c in GPT2_SIZES.items() if c == model.cfg), None)
    return model, f"{named}{OPENAI_SIZE_NAMES[named]}" if named else "gpt2-custom"


def sft_task(cfg: FinetuneConfig, prep: Prepared) -> Task:
    """The book's supervised finetuning of ``prep``: its objective and evaluator on the collated batches."""
    collate = Collator(prep.max_length, cfg.mask_instruction, cfg.pad_to_multiple, prep.tokenizer.eot_token)
    return Task(
        model=prep.model,
        objective=SFTObjective(prep.train, collate, prep.max_length),
        evaluator=SFTEvaluator(prep.train, prep.val, collate, cfg.batch_size, cfg),
        train_size=len(prep.train),
        tokenizer=prep.tokenizer,
        sample_prompt=prep.sample_prompt,
    )


def adapter_base(cfg: TrainConfig) -> str:
    """The adapter's base model as PEFT records it: the folder, or Hugging Face's id for the size."""
    downloaded = cached_model_dir(cfg)
    if cfg.model_dir and Path(cfg.model_dir) != Path(downloaded):
        return str(cfg.model_dir)
    return hf_repo_id(cfg.model)


def save_outputs(trainer: Trainer, cfg: TrainConfig, model_name: str, kind: str = "sft") -> dict[str, Path]:
    """The trained model's outputs, written by the main process once every process is done."""
    model = trainer.final_model()  # with fsdp, gathered from every process's shards
    trainer.roles.together()
    if not trainer.roles.keeps_run:
        return {}
    epochs = trainer.state.step / trainer.batches_per_epoch  # a fraction where training stopped early
    return write_outputs(
        model,
        trainer.output,
        trainer.state.history,
        epochs,
        model_name,
        cfg.prompt_style,
        adapter_base(cfg) if cfg.lora_rank else None,
        cfg.lora_dropout,
        kind,
        getattr(trainer.task.tokenizer, "name", "gpt2"),
        trained={"steps": trainer.state.step, "tokens_seen": trainer.state.tokens_seen, "epochs": round(epochs, 4)},
        source=cfg.model_dir or cached_model_dir(cfg),
    )


def write_config_once(trainer: Trainer) -> None:
    """The resolved configuration beside the outputs; a rerun keeps the record of how the stage started."""
    trainer.output.mkdir(parents=True, exist_ok=True)
    if not (trainer.output / "config.yaml").is_file():
        atomic_write_text(trainer.output / "config.yaml", yaml.safe_dump(trainer.saved_config, sort_keys=False))


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
    trainer = Trainer(cfg, sft_task(cfg, prep), metrics, saved_config, on_checkpoint, binding)
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
    outputs = save_outputs(trainer, cfg, prep.model_name)
    if trainer.roles.keeps_run:
        log.info(
            "finetune_done",
            steps=trainer.state.step,
            tokens_seen=trainer.state.tokens_seen,
            loop_seconds=round(trainer.loop_seconds, 2),
            final_val_loss=trainer.state.history[-1]["val_loss"] if trainer.state.history else None,
        )
    return outputs
