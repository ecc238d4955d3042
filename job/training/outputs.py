"""What training leaves behind: the model (safetensors + config, and the book's ``.pth``), with LoRA the
adapter in PEFT's layout, the losses as JSON and the book's loss plot. Each file is written under a
temporary name and renamed, so a reader never sees half of one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from job.models.families import Model, save_model, writes_book_pth
from job.models.gpt2_weights import book_state_dict
from job.models.lora import merge_adapters, save_peft_adapter
from job.models.tokenizer import CHAT_TEMPLATE_FILE
from job.storage.store import atomic_path, atomic_write_text, ensure_room

PLOT_TITLES = {"sft": "Finetune loss", "dpo": "DPO loss"}  # the report shows both: each says which it is


@dataclass(frozen=True)
class Trained:
    """What training did: its evaluations, and the totals the run's report shows."""

    history: list[dict]
    steps: int
    tokens_seen: int
    epochs: float
    """How many were trained: a fraction where training stopped early (the plots' x-axis)."""

    def totals(self) -> dict:
        return {"steps": self.steps, "tokens_seen": self.tokens_seen, "epochs": round(self.epochs, 4)}


@dataclass(frozen=True)
class Adapter:
    """With LoRA: the adapter is written alone first, naming its ``base`` model as PEFT records it."""

    base: str
    dropout: float = 0.0


def write_outputs(
    model: Model,
    out: Path,
    trained: Trained,
    *,
    book_name: str,
    prompt_style: str | None,
    kind: str = "sft",
    tokenizer: str = "gpt2",
    source: str | Path | None = None,
    adapter: Adapter | None = None,
    trained_on: dict | None = None,
    chat_template: str | None = None,
) -> dict[str, Path]:
    """The outputs of a trained ``model`` into ``out``; with an ``adapter`` (LoRA) the adapter alone first,
    then the model with the adapters merged. ``kind`` names the ``.pth`` (``gpt2-medium355M-sft.pth``,
    ``-dpo.pth``) and titles the loss plot; a ``tokenizer`` other than GPT-2's (the smoke's bytes) is
    recorded in config.json, where the next stage reads it, as are the prompt style and the ``trained``
    totals (steps, tokens seen) that the run's report shows. ``source``: the folder training started from
    (a Llama 3 / Qwen3 model/ keeps its config and tokenizer files; such a model has no book ``.pth``).
    ``trained_on``: more of the data's layout to record (its format); ``chat_template``: the Jinja source of a
    ``--chat-template FILE`` trained with, which model/ carries as ``chat_template.jinja`` (as transformers
    saves one), so the later stages use it."""
    written = {}
    if adapter is not None:
        written["adapter"] = save_peft_adapter(model, out / "adapter", adapter.base, adapter.dropout)
        merge_adapters(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    pth = out / f"{book_name}-{kind}.pth" if writes_book_pth(model) else None
    ensure_room(out, (2 if pth else 1) * params, "the final model" + (" (safetensors and the book's .pth)" * bool(pth)))
    recorded = {"prompt_style": prompt_style} | ({"tokenizer": tokenizer} if tokenizer != "gpt2" else {})
    recorded |= (trained_on or {}) | {"trained": trained.totals()}
    save_model(model, out / "model", source, recorded)
    if chat_template is not None:
        with atomic_path(out / "model" / CHAT_TEMPLATE_FILE) as tmp:
            tmp.write_bytes(chat_template.encode("utf-8"))
    if pth:
        with atomic_path(pth) as tmp:
            torch.save(book_state_dict(model), tmp)
        written["pth"] = pth
    losses = out / "losses.json"
    atomic_write_text(losses, json.dumps(trained.history, indent=2) + "\n")
    plot = out / "loss-plot.png"
    plot_losses(trained.history, trained.epochs, plot, PLOT_TITLES[kind])
    return written | {"model": out / "model", "losses": losses, "plot": plot}


def plot_losses(history: list[dict], epochs: float, path: Path, title: str = "Finetune loss") -> None:
    """The book's ``plot_losses`` as a PNG at ``path`` (see ``loss_figure``)."""
    _save(loss_figure(history, epochs, title), path, _drawn_with(title, epochs, history))


def loss_figure(history: list[dict], epochs: float, title: str):
    """The book's ``plot_losses``: losses against the epochs trained (a fraction where training
    stopped early), tokens seen on a second x-axis; titled, since a DPO run has two."""
    from matplotlib.ticker import MaxNLocator

    train = [h["train_loss"] for h in history]
    val = [h["val_loss"] for h in history]
    epochs_seen = torch.linspace(0, epochs, len(history)).tolist()
    fig, ax1 = _pyplot().subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train, marker="o", markersize=3, label="Training loss")
    ax1.plot(epochs_seen, val, linestyle="-.", marker="o", markersize=3, label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="best")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=epochs >= 1))
    _span_epochs(ax1, epochs)
    ax2 = ax1.twiny()
    ax2.plot([h["tokens_seen"] for h in history], train, alpha=0)
    ax2.set_xlabel("Tokens seen (at each evaluation)")
    return _plain(fig, title)


def plot_reward_margins(history: list[dict], epochs: float, path: Path) -> None:
    """The book's DPO reward-margin plot as a PNG at ``path`` (see ``reward_margin_figure``)."""
    title = "DPO reward margins"
    _save(reward_margin_figure(history, epochs, title), path, _drawn_with(title, epochs, history))


def reward_margin_figure(history: list[dict], epochs: float, title: str):
    """The book's DPO plot: the training and validation reward margins (chosen minus rejected reward)
    against the epochs trained."""
    epochs_seen = torch.linspace(0, epochs, len(history)).tolist()
    fig, ax = _pyplot().subplots(figsize=(5, 3))
    for split, style in (("train", "-"), ("val", "-.")):
        margins = [h[f"{split}_chosen_reward"] - h[f"{split}_rejected_reward"] for h in history]
        name = "Training" if split == "train" else "Validation"
        ax.plot(epochs_seen, margins, linestyle=style, marker="o", markersize=3, label=f"{name} reward margin")
    ax.set_xlabel("Epochs")
    _span_epochs(ax, epochs)
    ax.set_ylabel("Reward margin")
    ax.legend(loc="best")
    return _plain(fig, title)


def _plain(fig, title: str):
    """``fig`` titled, with plain tick labels: one evaluation's axis spans a few thousandths, where an
    offset label ("1e-6+6.93e-1") would cover the ticks."""
    fig.suptitle(title)
    for ax in fig.axes:
        ax.ticklabel_format(axis="both", useOffset=False)
    return fig


def _span_epochs(ax, epochs: float) -> None:
    """The x-axis spans the epochs trained, so a single evaluation is seen where it fell in the training."""
    from matplotlib.ticker import MaxNLocator

    if epochs > 0:
        ax.set_xlim(-0.05 * epochs, 1.05 * epochs)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=epochs >= 1))


def _drawn_with(title: str, epochs: float, history: list[dict]) -> dict[str, str]:
    """The PNG's text chunks: its title, and the epochs and evaluations it was drawn over (so what a
    plot shows can be read back and checked against what was trained)."""
    return {"Title": title, "Description": json.dumps({"epochs": epochs, "evaluations": len(history)})}


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, metadata: dict[str, str]) -> None:
    """``fig`` as a PNG at ``path`` with ``metadata`` in its text chunks, written under a temporary name
    and renamed."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata=metadata)
    _pyplot().close(fig)
