"""Low-rank adapters (the book's appendix E and exercise 7.4), merging them, and PEFT's layout.

The book's ``LinearWithLoRA`` adds ``alpha * (x @ A @ B)`` to a frozen ``nn.Linear``, with ``A``
(in, rank) initialised ``kaiming_uniform_(a=sqrt(5))`` and ``B`` (rank, out) zeros, and replaces
every linear layer. Our attention has one fused query/key/value projection (``c_attn``) where the
book has three; it gets three adapters side by side (``splits=3``), so it trains exactly as the
book's three do. PEFT sees that as one adapter of rank 3 x rank whose ``B`` is block-diagonal.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from job.core.errors import ConfigError
from job.models.gpt2 import GPTModel
from job.storage.store import atomic_path

# Our module names (suffixes after ``h.{i}.`` or ``layers.{i}.``), Hugging Face's too, which PEFT matches on
# -> splits: GPT-2's, then Llama 3 / Qwen3's (their queries, keys and values are three layers already).
LAYERS = {"attn.c_attn": 3, "attn.c_proj": 1, "mlp.c_fc": 1, "mlp.c_proj": 1, "lm_head": 1} | {
    f"{part}.{name}": 1
    for part, names in (
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", ("gate_proj", "up_proj", "down_proj")),
    )
    for name in names
}
HF_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """``base(x) + alpha * dropout(x) @ A @ B`` per split of the output (the book's ``LinearWithLoRA``).

    A: (splits, in, rank), B: (splits, rank, out / splits); the base's parameters are left as they are.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, splits: int, generator=None):
        super().__init__()
        self.base, self.alpha, self.splits = base, alpha, splits
        self.disabled = False  # the base alone (DPO's reference: the model before its adapters trained)
        self.dropout = nn.Dropout(dropout)
        self.A = nn.Parameter(torch.empty(splits, base.in_features, rank, device=base.weight.device))
        self.B = nn.Parameter(torch.zeros(splits, rank, base.out_features // splits, device=base.weight.device))
        with torch.no_grad():
            for a in self.A:  # each (in, rank) as the book's LoRALayer initialises its own A
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)

    def forward(self, x):  # (..., in) -> (..., out)
        if self.disabled:
            return self.base(x)
        low = torch.einsum("...i,sir->...sr", self.dropout(x), self.A)  # (..., splits, rank)
        delta = torch.einsum("...sr,sro->...so", low, self.B).flatten(-2)  # (..., out)
        return self.base(x) + self.alpha * delta

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to the base's (out, in) weight."""
        blocks = [(a @ b).t() for a, b in zip(self.A, self.B, strict=True)]  # splits x (out / splits, in)
        return self.alpha * torch.cat(blocks, dim=0)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``model`` computes as its frozen base, without a second copy of the weights."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def _suffix(name: str) -> str:
    """``h.3.attn.c_attn`` -> ``attn.c_attn``, ``layers.3.mlp.up_proj`` -> ``mlp.up_proj``: a layer's name
    within its block."""
    return name.split(".", 2)[-1] if name.startswith(("h.", "layers.")) else name


def _named_targets(model: GPTModel, targets: set[str]) -> list[str]:
    """Our dotted names of the linear layers to adapt, in the order the book's replacement walks them."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _suffix(n) in targets]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_adapters(model: GPTModel, rank: int, alpha: float, targets: set[str], dropout: float, seed: int) -> list[str]:
    """Freeze every weight and wrap the ``targets`` layers (suffixes of ``LAYERS``) in adapters,
    initialised from ``seed`` in the book's order; returns the wrapped layers' names."""
    unknown = targets - set(LAYERS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}")
    names = _named_targets(model, targets)
    if not names:
        raise ConfigError(f"--lora-targets names no linear layer of this model ({', '.join(sorted(targets))})")
    model.requires_grad_(False)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name in names:
        splits = LAYERS[_suffix(name)]
        _set(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout, splits, generator))
    return names


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_adapters(model: GPTModel) -> None:
    """Fold every adapter into its base weight and put the plain layer back (in place). A merged
    output head no longer equals the token embeddings, so it is untied first."""
    for name, lora in adapters(model).items():
        _set(model, name, lora.base)
        if name == "lm_head":
            model.untie_head()  # gives lora.base its own weight
        lora.base.weight += lora.delta_weight().to(lora.base.weight.dtype)


def _hf_name(model: nn.Module, ours: str) -> str:
    """Hugging Face's name of one of our layers: GPT-2's blocks sit under ``transformer.``, Llama's under ``model.``."""
    return ours if ours == "lm_head" else f"{'transformer' if isinstance(model, GPTModel) else 'model'}.{ours}"


def peft_target_modules(suffixes: set[str]) -> list[str]:
    """PEFT's ``target_modules`` (matched as suffixes of Hugging Face's names) for exactly these
    layers: ``c_proj`` alone names both attention's and the MLP's, so one of them is named in full."""
    out = set()
    for suffix in suffixes:
        last = suffix.rpartition(".")[2]
        namesakes = {s for s in LAYERS if s.rpartition(".")[2] == last}
        out.add(last if namesakes <= suffixes else suffix)
    return sorted(out)


def save_peft_adapter(model: GPTModel, directory: str | Path, base_model: str, dropout: float) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT writes them for Hugging
    Face's ``GPT2LMHeadModel`` (Conv1D layers, hence ``fan_in_fan_out``), so ``PeftModel.from_pretrained``
    loads them onto the base model. PEFT scales by lora_alpha / r; ours by alpha alone."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    found = adapters(model)
    first = next(iter(found.values()))  # every adapter has the run's rank and alpha
    rank, alpha = first.A.shape[2], first.alpha
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, lora in found.items():
        splits, in_f, r = lora.A.shape
        out_split = lora.B.shape[2]
        a = lora.A.detach().float().cpu().permute(0, 2, 1).reshape(splits * r, in_f)  # (r_total, in)
        b = torch.zeros(splits * out_split, splits * r)  # (out, r_total), block-diagonal
        for s in range(splits):
            b[s * out_split : (s + 1) * out_split, s * r : (s + 1) * r] = lora.B[s].detach().float().cpu().t()
        key = HF_PREFIX + _hf_name(model, name)
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a.contiguous(), b.contiguous()
        if splits > 1:
            rank_pattern[name.rpartition(".")[2]] = splits * r
            alpha_pattern[name.rpartition(".")[2]] = lora.alpha * splits * r
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha * rank,
        "lora_dropout": dropout,
        "target_modules": peft_target_modules({_suffix(n) for n in found}),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": isinstance(model, GPTModel),  # GPT-2's Conv1D keeps its weights (in, out)
        "bias": "none",
        "inference_mode": True,
    }
    with atomic_path(directory / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(directory / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return directory
