"""A training stage's inputs and outputs, the same for finetune and DPO: the dataset's splits (checked
before any model loads), then the tokenizer and the starting model from where the stage says they come
from; the resolved configuration beside the outputs; the trained model's files once every process is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from job.data.formats import Layout, layout
from job.data.instructions import (
    DataError,
    Example,
    PromptStyle,
    entry_problem,
    prompt_style,
)
from job.data.sources import Splits, dataset_splits, without_refused
from job.models.families import Model, family
from job.models.families import load_model as load_model_folder
from job.models.gpt2 import GPTModel, gpt2_sizes
from job.models.registry import model_entry
from job.models.tokenizer import HFTokenizer, Tokenizer
from job.storage.store import atomic_write_text
from job.training.outputs import Adapter, Trained, write_outputs
from job.training.train_config import TrainConfig
from job.training.trainer import Trainer


@dataclass(frozen=True)
class StartingModel:
    """Where a training stage's model comes from, as the stage resolved it (the stages know the downloads):
    nothing is fetched or loaded until the dataset has passed its checks."""

    folder: Path
    """The folder training starts from: --model-dir, else the named model's in the cache."""
    hub_id: str | None
    """Hugging Face's id of the named model where training starts from it as downloaded (the base a LoRA
    adapter names, as PEFT records it); None for a folder of one's own (the adapter names the folder)."""
    fetch: Callable[[], Path]
    """The folder, its files fetched into the cache where they are missing."""
    tokenizer: Callable[[], Tokenizer]
    """The model's tokenizer (GPT-2's fetched into the cache where missing)."""

    @property
    def adapter_base(self) -> str:
        return self.hub_id or str(self.folder)


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
    layout: Layout
    """How its entries become examples (their format; the chat template of conversations)."""
    splits: Splits
    """The splits as read, with the file each came from."""


def checked_splits(cfg: TrainConfig, check=entry_problem) -> Splits:
    """The dataset's splits, the training one cut to --train-limit, each entry checked (``check`` says what a
    bad book-shaped entry is): a file's 85/10/5 cut, or a folder's train and validation files; with its format
    (job/data/formats.py) and the file each split came from. A split left empty is a DataError."""
    splits = dataset_splits(cfg, check, need=("validation",))
    train, val = splits.train[: cfg.train_limit], splits.val
    if not train or not val:
        count = len(splits.train) + len(splits.test) + len(splits.val)
        raise DataError(f"dataset {splits.label} of {count} entries is too small for the 85/10/5 split")
    return dataclasses.replace(splits, train=train)


def split_examples(how: Layout, splits: Splits, tokenizer, max_length: int) -> tuple[list[Example], list[Example]]:
    """The training and validation splits' examples as finetune trains and evaluates on them: in both, an entry
    with no token to train within ``max_length`` is left out and counted (formats other than the book's); a
    split left with none is a DataError naming the split and its file (``run``'s preflight checks it so)."""
    splits = without_refused(splits, how)
    train = how.examples(splits.train, tokenizer, max_length, "training", splits.where["train"])
    return train, how.examples(splits.val, tokenizer, max_length, "validation", splits.where["validation"])


def load_inputs(cfg: TrainConfig, start: StartingModel, check=entry_problem, pairs: bool = False) -> Inputs:
    """The dataset first (a bad one fails before any model loads; ``check`` says what a bad entry is; ``pairs``:
    DPO's, which the data options of a run's finetune do not lay out), then the tokenizer and the model
    ``start`` names."""
    splits = checked_splits(cfg, check)
    tokenizer = start.tokenizer()
    style = prompt_style(cfg.prompt_style, tokenizer)
    how = layout(cfg, splits.data_format, splits.train + splits.val, tokenizer, style, splits.origin, pairs)
    splits = without_refused(splits, how)
    model, name = load_model(cfg.model, start)
    max_length = min(cfg.allowed_max_length, model.cfg.context_length)
    path = Path(splits.where["train"])
    return Inputs(splits.train, splits.val, tokenizer, model, name, style, max_length, path, how, splits)


def load_model(named: str, start: StartingModel) -> tuple[Model, str]:
    """The starting model and the book-style name of its size (``gpt2-medium355M``, ``qwen3-0.6b``; the
    family's name for a folder of another: ``qwen3-custom``); ``named``: the --model it was asked by."""
    folder = start.fetch()
    model = load_model_folder(folder)
    if start.hub_id is not None:  # the named model, as downloaded
        return model, f"{named}{model_entry(named).openai_folder or ''}"
    if not isinstance(model, GPTModel):
        return model, f"{family(folder)}-custom"
    size = next((n for n, c in gpt2_sizes().items() if c == model.cfg), None)
    return model, f"{size}{model_entry(size).openai_folder}" if size else "gpt2-custom"


def save_outputs(
    trainer: Trainer,
    cfg: TrainConfig,
    start: StartingModel,
    *,
    model_name: str,
    kind: str = "sft",
    how: Layout | None = None,
) -> dict[str, Path]:
    """The trained model's outputs, written by the main process once every process is done; ``how``: the
    layout it was trained on, which the model records (see ``trained_layout``)."""
    model = trainer.final_model()  # with fsdp, gathered from every process's shards
    trainer.roles.together()
    if not trainer.roles.keeps_run:
        return {}
    state = trainer.state
    epochs = state.step / trainer.batches_per_epoch  # a fraction where training stopped early
    return write_outputs(
        model,
        trainer.output,
        Trained(state.history, state.step, state.tokens_seen, epochs),
        book_name=model_name,
        kind=kind,
        tokenizer=getattr(trainer.task.tokenizer, "name", "gpt2"),
        source=start.folder,
        adapter=Adapter(start.adapter_base, cfg.lora_dropout) if cfg.lora_rank else None,
        **trained_layout(cfg, how or trainer.task.layout, trainer.task.tokenizer),
    )


def trained_layout(cfg: TrainConfig, how: Layout | None, tokenizer=None) -> dict:
    """What the model records of the layout it was trained on, so export and generate lay prompts out alike:
    the prompt style (alpaca data); ``chat`` for conversations, with the ``--chat-template FILE``'s source,
    which the model then carries (as a GPT-2 folder's carried template is carried on: a Llama 3 / Qwen3
    folder's files are copied whole); no style at all for text (nor prompt-completion text), which has none. The
    system prompt every conversation began with, where they shared one, is recorded too: the export's default
    (a Modelfile's SYSTEM) for a chat that sends none."""
    carried = getattr(tokenizer, "chat_template", None) if not isinstance(tokenizer, HFTokenizer) else None
    if how is None or how.data_format == "alpaca":
        return {"prompt_style": cfg.prompt_style, "chat_template": carried.source if carried else None}
    if how.template is None:
        return {"prompt_style": None, "trained_on": {"data_format": how.data_format}}
    given = getattr(cfg, "chat_template", None)
    system = {"system_prompt": how.system_prompt} if how.system_prompt is not None else {}
    return {
        "prompt_style": "chat",
        "trained_on": {"data_format": how.data_format} | system,
        "chat_template": how.template.source if given else carried.source if carried else None,
    }


def write_config_once(trainer: Trainer) -> None:
    """The resolved configuration beside the outputs; a rerun keeps the record of how the stage started."""
    trainer.output.mkdir(parents=True, exist_ok=True)
    if not (trainer.output / "config.yaml").is_file():
        atomic_write_text(trainer.output / "config.yaml", yaml.safe_dump(trainer.saved_config, sort_keys=False))
