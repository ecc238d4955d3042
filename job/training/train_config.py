"""The training loop's settings (``finetune`` and ``dpo`` share them), and the training config every training
stage composes: the model it starts from, its data, the loop."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from job.core.errors import ConfigError
from job.core.settings import Settings, option, positive, positive_if_set, seed
from job.data.data_config import DataConfig
from job.models.origin import HubAccess, ModelOrigin, ModelSourceConfig


class TrainSettings(Settings):
    """What every training stage shares: the loop, its checkpoints, LoRA (``finetune`` and ``dpo``)."""

    help_section: ClassVar[str] = "Finetune"
    output: str = option("runs/finetune", operational=True)
    """Folder the model, losses, plot, checkpoints and resolved config are written to."""
    epochs: int = 2
    """Passes over the training split."""
    batch_size: int = 8
    """Examples per optimizer step across all processes (each of N processes takes batch_size / N); with
    --packing, packed rows of --pack-length tokens."""
    lr: float = 5e-5
    """AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    eval_freq: int = 5
    """Evaluate train and validation loss every this many steps."""
    eval_iter: int = 5
    """Batches of each split an evaluation averages over."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (smoke runs); the epochs still bound it."""
    seed: int = 123
    """Seed of model-independent randomness: data order, dropout, sampling."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision: auto is bf16 on CUDA devices that support it, fp32 elsewhere."""
    grad_accum: int = 1
    """Micro-batches each process splits its share of a --batch-size batch into (less memory, the same step)."""
    grad_clip: float | None = None
    """Clip the gradient norm to this value (off by default, as in the book)."""
    compile: bool = False
    """torch.compile the transformer blocks (pays on GPUs for long runs; adds compile time at the start)."""
    gradient_checkpointing: bool = option(False, operational=True)
    """Keep only each block's input for the backward pass and recompute the rest there: far less activation
    memory (long sequences, large models) for about a third more compute; the same gradients, so a run that
    ran out of memory may be resumed with it."""
    sharding: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every process holds the whole model, its gradients and AdamW's state; fsdp: each holds 1/N of
    them (torch's FSDP2, each transformer block sharded over all processes) and checkpoints are written as
    each process's shards: models too big for one GPU, on the same loop and with the same losses."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many steps (and at each epoch's end and on SIGTERM/SIGUSR1)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep."""
    train_limit: int | None = None
    """Train on only the first N entries of the training split (smoke runs); validation and test are unchanged."""
    data_order: Literal["book", "seeded"] = "book"
    """book: exactly the batches and training-loss estimates of the book's train_model_simple after
    torch.manual_seed(seed) (its DataLoaders' draws replayed); seeded: one shuffle per epoch from the seed."""
    untie_head: bool = True
    """Train the output head as its own copy of the token embeddings, as the book's load_weights_into_gpt
    leaves it (with --data-order book, the book's numbers exactly; the saved model then has both);
    --no-untie-head keeps GPT-2's tied head, as Hugging Face trains it (smaller checkpoints). With LoRA
    the frozen head stays tied: it computes the same either way. GPT-2's only: a Llama 3.2 / Qwen3 head
    trains as its checkpoint has it (tied for the small sizes)."""
    lora_rank: int | None = None
    """Train low-rank adapters of this rank instead of every weight (the book's exercise 7.4 uses 16); the
    base stays frozen, checkpoints hold only the adapters, and the outputs are the merged model plus adapter/."""
    lora_alpha: float = 16.0
    """Scale of the adapters' output, as the book's appendix E applies it (alpha * x @ A @ B; PEFT's
    lora_alpha is this times the rank)."""
    lora_targets: str = "all"
    """Layers that get adapters: all (every linear layer, as the book), or a comma list of attn, mlp, head,
    or Hugging Face's names: GPT-2's c_attn, c_proj (both), attn.c_proj, mlp.c_proj, c_fc, Llama 3 /
    Qwen3's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, and lm_head."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (PEFT's lora_dropout; the book has none)."""
    checkpoint_key_file: str | None = option(None, operational=True)
    """File holding a key (16 bytes or more; a mounted Secret) that signs each checkpoint's index
    (HMAC-SHA256): with it, a checkpoint without a valid signature is never resumed from, so a bucket
    writer without the key cannot forge one."""

    @model_validator(mode="after")
    def _check_training(self):
        positive(self, "epochs", "batch_size", "lr", "eval_freq", "eval_iter", "grad_accum", "checkpoint_every")
        positive(self, "keep_checkpoints")
        positive_if_set(self, "max_steps", "train_limit", "grad_clip")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        seed(self, "seed")
        if self.lora_rank is not None:
            positive(self, "lora_rank", "lora_alpha")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        lora_layers(self.lora_targets)  # refuses an unknown name before anything loads
        if self.sharding == "fsdp" and self.precision == "fp16":  # FSDP2 would need a sharded gradient scaler
            raise ConfigError("--precision fp16 does not combine with --sharding fsdp: use --precision bf16 or fp32")
        return self


class TrainConfig(TrainSettings, ModelSourceConfig, ModelOrigin, HubAccess, DataConfig):
    """A training stage's config: the model it starts from, its data and the loop (composed, nothing added)."""

    stage: ClassVar[str] = "finetune"  # the stage a checkpoint's binding names


# --lora-targets' words -> the layers' names within a block (and the head), as job/models/lora.py names them.
# GPT-2's and Llama 3 / Qwen3's layers (names within a block): a model has one family's, so a group names both.
_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LORA_GROUPS = {
    "all": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", *_LLAMA_ATTN, *_LLAMA_MLP, "lm_head"),
    "attn": ("attn.c_attn", "attn.c_proj", *_LLAMA_ATTN),
    "mlp": ("mlp.c_fc", "mlp.c_proj", *_LLAMA_MLP),
    "head": ("lm_head",),
    "c_attn": ("attn.c_attn",),
    "c_proj": ("attn.c_proj", "mlp.c_proj"),
    "attn.c_proj": ("attn.c_proj",),
    "mlp.c_proj": ("mlp.c_proj",),
    "c_fc": ("mlp.c_fc",),
    "lm_head": ("lm_head",),
} | {layer.rpartition(".")[2]: (layer,) for layer in (*_LLAMA_ATTN, *_LLAMA_MLP)}


def lora_layers(targets: str) -> set[str]:
    """The layers ``--lora-targets`` names."""
    words = [w.strip() for w in targets.split(",") if w.strip()]
    unknown = [w for w in words if w not in LORA_GROUPS]
    if unknown or not words:
        raise ConfigError(
            f"lora_targets: unknown {unknown[0] if unknown else 'empty'} (one of {', '.join(LORA_GROUPS)})"
        )
    return {layer for w in words for layer in LORA_GROUPS[w]}


def resolve_precision(precision: str) -> str:
    """``precision`` with auto made concrete: bf16 on a CUDA device that supports it, else fp32."""
    if precision != "auto":
        return precision
    import torch  # here, not at the top: `sft-job --help` must not wait for torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
