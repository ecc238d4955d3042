"""Llama 3 (3.2: 1B, 3B) and Qwen3 (dense: 0.6B to 8B) as the book's `llms_from_scratch.llama3` and
`.qwen3` build them: RMSNorm, rotary positions (Llama 3's frequency scaling; Qwen3's base), grouped-query
attention (Qwen3 with RMSNorm on each head's queries and keys), a SwiGLU feed-forward.

The same small interface as `job/models/gpt2.py`'s GPT-2: ``forward`` (logits, or the loss over counted
targets through ``head_loss``), ``hidden_states``, ``lm_head``, and the batched left-padded ``KVCache``.
Parameter names are Hugging Face's (``embed_tokens``, ``layers.{i}.self_attn.q_proj``, ...), so its
checkpoints load without renaming. No I/O happens here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from job.models.gpt2 import KVCache, cache_positions_and_mask, document_mask, head_loss, run_block


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3's stretch of the rotary frequencies for long contexts (``rope_scaling`` in its config.json)."""

    factor: float = 32.0
    """Long wavelengths are divided by this (Llama 3.2: 32)."""
    low_freq_factor: float = 1.0
    """Wavelengths above ``original_context_length / low_freq_factor`` are fully scaled."""
    high_freq_factor: float = 4.0
    """Wavelengths below ``original_context_length / high_freq_factor`` are left alone."""
    original_context_length: int = 8192
    """The context the model was pretrained on before the stretch."""


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama 3 or Qwen3 dense model."""

    vocab_size: int
    """Number of token ids."""
    context_length: int
    """Longest sequence the rotary positions are meant for (``max_position_embeddings``)."""
    emb_dim: int
    """Width of the residual stream (``hidden_size``)."""
    n_heads: int
    """Query heads per layer."""
    n_kv_heads: int
    """Key/value heads per layer (grouped-query attention: each serves n_heads / n_kv_heads query heads)."""
    head_dim: int
    """Width of one head (Qwen3's is not emb_dim / n_heads)."""
    hidden_dim: int
    """Width of the SwiGLU feed-forward (``intermediate_size``)."""
    n_layers: int
    """Number of transformer blocks."""
    rope_base: float = 500_000.0
    """Base of the rotary frequencies (``rope_theta``)."""
    rope_scaling: Llama3RopeScaling | None = None
    """Llama 3's frequency stretch; None for plain rotary positions (Qwen3)."""
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys before the rotation (Qwen3)."""
    rms_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = True
    """The output head is the token embeddings (Llama 3.2, Qwen3 0.6B-4B) or a matrix of its own."""

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for rotary positions, got {self.head_dim}")

    @classmethod
    def from_hf(cls, config: dict) -> LlamaConfig:
        """The shape from a Hugging Face ``config.json`` of ``model_type`` llama or qwen3."""
        scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
        llama3 = scaling.get("rope_type", scaling.get("type")) == "llama3"
        return cls(
            vocab_size=config["vocab_size"],
            context_length=config["max_position_embeddings"],
            emb_dim=config["hidden_size"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            hidden_dim=config["intermediate_size"],
            n_layers=config["num_hidden_layers"],
            rope_base=config.get("rope_theta", scaling.get("rope_theta", 10_000.0)),
            rope_scaling=Llama3RopeScaling(
                scaling["factor"],
                scaling["low_freq_factor"],
                scaling["high_freq_factor"],
                scaling["original_max_position_embeddings"],
            )
            if llama3
            else None,
            qk_norm=config["model_type"] == "qwen3",
            rms_eps=config.get("rms_norm_eps", 1e-6),
            tie_embeddings=config.get("tie_word_embeddings", False),
        )


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """The rotary inverse frequencies (head_dim / 2,), with Llama 3's stretch where it has one."""
    inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    low_wavelength = s.original_context_length / s.low_freq_factor  # longer than this: fully stretched
    high_wavelength = s.original_context_length / s.high_freq_factor  # shorter: untouched
    stretched = torch.where(wavelength > low_wavelength, inv_freq / s.factor, inv_freq)
    smooth = (s.original_context_length / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * stretched / s.factor + smooth * stretched
    between = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return torch.where(between, blended, stretched)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on (B, H, T, hd): the halves of each head rotated (Hugging Face's and the book's layout)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # in fp32
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.emb_dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.emb_dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)

    def forward(self, x, cos, sin, layer: int = 0, cache: KVCache | None = None, attn_mask=None):
        cfg, (B, T, _) = self.cfg, x.shape
        q = self.q_proj(x).view(B, T, cfg.n_heads, cfg.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim)  # (B, T, KV, hd)
        v = self.v_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)  # (B, H|KV, T, hd)
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (B, KV, S, hd)
        # each key/value head serves n_heads / n_kv_heads query heads, without copies (enable_gqa)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, H, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim))  # (B, T, C)


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, layer: int = 0, cache: KVCache | None = None, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Token embeddings, pre-RMSNorm decoder layers, a final RMSNorm, the output head (tied or not)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.emb_dim, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Not a buffer: a model cast to bf16 would round it; the angles stay fp32 whatever the weights' dtype.
        self.inv_freq: dict[torch.device, torch.Tensor] = {}
        self.checkpointing = False  # --gradient-checkpointing: see job.models.gpt2.run_block

    def forward(
        self,
        idx,
        cache: KVCache | None = None,
        valid=None,
        targets=None,
        reduction="mean",
        positions=None,
        documents=None,
    ):
        """Logits (B, T, vocab), or with ``targets`` the loss over those != -100; ``cache`` and ``valid``
        as GPT-2's (left-padded rows continuing cached sequences), ``positions`` and ``documents`` as its
        packed rows' (the rotary angles from each token's position within its own sequence)."""
        x = self.hidden_states(idx, cache, valid, positions, documents)  # (B, T, C)
        if targets is None:
            return self.lm_head(x)
        return head_loss(self.lm_head, x, targets, select_targets=not idx.is_cuda, reduction=reduction)

    def hidden_states(self, idx, cache: KVCache | None = None, valid=None, positions=None, documents=None):
        """Final-RMSNorm output (B, T, C): everything but the output head."""
        B, T = idx.shape
        if cache is None:
            attn_mask = None if documents is None else document_mask(documents)
            if positions is None:
                positions = torch.arange(T, device=idx.device)[None].expand(B, T)  # (B, T)
        else:
            positions, attn_mask = cache_positions_and_mask(cache, T, valid)
        x = self.embed_tokens(idx)  # (B, T, C)
        if idx.device not in self.inv_freq:
            self.inv_freq[idx.device] = rope_frequencies(self.cfg).to(idx.device)
        angles = positions[..., None].float() * self.inv_freq[idx.device]  # (B, T, hd / 2), in fp32
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, hd)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer, block in enumerate(self.layers):
            x = run_block(block, self.checkpointing and cache is None, x, cos, sin, layer, cache, attn_mask)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    @property
    def head_tied(self) -> bool:
        return getattr(self.lm_head, "weight", None) is self.embed_tokens.weight

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    def untie_head(self) -> None:
        """Give the output head its own copy of the token embeddings (a merged LoRA head differs from them)."""
        if self.head_tied:
            self.lm_head.weight = nn.Parameter(self.embed_tokens.weight.detach().clone())
