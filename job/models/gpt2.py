"""GPT-2 as in chapter 4 of the book, with a KV cache for batched incremental decoding.

Parameter names follow Hugging Face's GPT-2 (``wte``, ``h.{i}.attn.c_attn``, ...) so that
weight conversion is a transpose and nothing else. No I/O happens here.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from job.models.registry import MODELS


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2 model."""

    vocab_size: int = 50257
    """Number of token ids (GPT-2's BPE has 50257)."""
    context_length: int = 1024
    """Number of positions the model has embeddings for."""
    emb_dim: int = 768
    """Width of the residual stream."""
    n_heads: int = 12
    """Attention heads per layer; must divide ``emb_dim``."""
    n_layers: int = 12
    """Number of transformer blocks."""
    drop_rate: float = 0.0
    """Dropout after embeddings, attention and MLP (the book finetunes with 0.0)."""
    qkv_bias: bool = True
    """Bias on the query/key/value projection (OpenAI's weights have one)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        """Heads the KV cache holds: every one (GPT-2 has no grouped-query attention)."""
        return self.n_heads


def gpt2_config(name: str) -> GPTConfig:
    """The shape of a GPT-2 size the registry names (the book's four, section 7.5)."""
    shape = MODELS[name].shape
    return GPTConfig(
        context_length=shape.context_length, emb_dim=shape.emb_dim, n_layers=shape.n_layers, n_heads=shape.n_heads
    )


def gpt2_sizes() -> dict[str, GPTConfig]:
    """Every GPT-2 size of the registry and its shape."""
    return {name: gpt2_config(name) for name, entry in MODELS.items() if entry.shape is not None}


class KVCache:
    """Preallocated keys and values for every layer, for a batch of left-padded sequences.

    Rows may hold prompts of different lengths: ``key_mask`` marks which slots hold real
    tokens and ``seen`` counts each row's real tokens, which gives its next position id.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if max_len > cfg.context_length:
            raise ValueError(f"KV cache of {max_len} slots exceeds the context length {cfg.context_length}")
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots filled so far, the same for every row
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``layer``'s keys and values (B, heads, T, hd) after the filled slots; all of them so far back."""
        start, T = self.length, k.shape[2]
        self.keys[layer, :, :, start : start + T] = k
        self.values[layer, :, :, start : start + T] = v
        return self.keys[layer, :, :, : start + T], self.values[layer, :, :, : start + T]  # (B, heads, S, hd)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop the rows not in ``rows`` (finished sequences stop costing anything)."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]
        self.key_mask = self.key_mask[rows]
        self.seen = self.seen[rows]


def cache_positions_and_mask(cache: KVCache, T: int, valid):
    """Each row's position ids (B, T) and the attention mask (B, 1, T, S) for ``T`` new tokens continuing
    the cached rows, ``valid`` (B, T) marking real tokens (False: left padding); the cache's row counts move on."""
    B, start = cache.batch_size, cache.length
    if start + T > cache.max_len:
        raise ValueError(f"KV cache full: {start} + {T} tokens exceed its {cache.max_len} slots")
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=cache.key_mask.device)
    # Each row's position ids count only its real tokens, so left padding does not shift them.
    positions = (cache.seen[:, None] + valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    cache.seen += valid.sum(dim=1)
    cache.key_mask[:, start : start + T] = valid
    keys = cache.key_mask[:, None, : start + T]  # (B, 1, S)
    q_slot = torch.arange(start, start + T, device=valid.device)[:, None]  # (T, 1)
    k_slot = torch.arange(start + T, device=valid.device)[None, :]  # (1, S)
    causal = k_slot <= q_slot  # (T, S)
    # A padding query attends to itself, so no row of the mask is empty (that would give NaN).
    own = k_slot == q_slot
    mask = (causal & keys) | own  # (B, T, S)
    return positions, mask[:, None]  # (B, 1, T, S)


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """The block-diagonal causal mask (B, 1, T, T) of packed rows: a token attends to the earlier tokens of its own
    sequence, ``documents`` (B, T) giving each token's sequence. SDPA with this boolean mask measured fastest of
    the CPU's ways to attend within documents (BENCHMARKS.md, packing)."""
    T = documents.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()  # (T, T)
    return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]  # (B, 1, T, T)


# cuDNN's attention (torch's first choice on Hopper) builds a plan on the host for every new
# sequence length: 3.3 ms per backward call on an H100 (torch 2.11), most of a training step when
# every batch has its own length. Flash and memory-efficient attention have no such cost.
CUDA_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.drop_rate = cfg.drop_rate
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, layer: int = 0, cache: KVCache | None = None, attn_mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (B, H, S, hd)
        dropout = self.drop_rate if self.training else 0.0
        with sdpa_kernel(CUDA_ATTENTION_BACKENDS) if q.is_cuda else nullcontext():
            if attn_mask is None:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.c_proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x, layer: int = 0, cache: KVCache | None = None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), layer, cache, attn_mask)
        return x + self.mlp(self.ln_2(x))


def run_block(block: nn.Module, checkpointed: bool, x: torch.Tensor, *args) -> torch.Tensor:
    """``block(x, *args)``; ``checkpointed`` (activation checkpointing, while gradients are on) keeps only
    the block's input for the backward pass and runs the block again there: far less activation memory
    for about a third more compute. The dropout masks are replayed, so the gradients are the same."""
    if checkpointed and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, x, *args, use_reentrant=False)
    return block(x, *args)


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, pre-LayerNorm blocks, final LayerNorm, output head tied
    to the token embeddings (``untie_head`` gives it its own copy, as the book's weight loading does)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in OpenAI's release
        self.apply(_init_weights)
        self.checkpointing = False  # --gradient-checkpointing: see run_block

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ):
        """Logits (B, T, vocab) for token ids ``idx`` (B, T); with ``targets``, the loss instead (the
        mean over targets != -100, or their ``reduction="sum"``).

        Without ``cache`` this is the plain causal forward pass. With it, ``idx`` continues the
        cached sequences and ``valid`` (B, T, bool) marks real tokens (False for left padding).
        Packed rows (``--packing``) give each token's ``positions`` and ``documents`` (B, T): its position
        within its own sequence and which sequence it belongs to, which alone it attends to.
        """
        x = self.hidden_states(idx, cache, valid, positions, documents)  # (B, T, C)
        if targets is None:
            return self.lm_head(x)
        # The book's cross entropy over targets != -100. On CPUs the head (the costliest matmul)
        # runs only for those positions: the same mean, less work. On GPUs selecting them would
        # stop the host for the mask's count every step, which costs more than the skipped work.
        return head_loss(self.lm_head, x, targets, select_targets=not idx.is_cuda, reduction=reduction)

    def hidden_states(self, idx, cache: KVCache | None = None, valid=None, positions=None, documents=None):
        """Final-LayerNorm output (B, T, C): everything but the output head."""
        B, T = idx.shape
        if cache is None:
            if T > self.cfg.context_length:
                raise ValueError(f"sequence of {T} tokens exceeds the context length {self.cfg.context_length}")
            attn_mask = None if documents is None else document_mask(documents)
            if positions is None:
                positions = torch.arange(T, device=idx.device)  # (T,)
        else:
            positions, attn_mask = cache_positions_and_mask(cache, T, valid)
        x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, C)
        for layer, block in enumerate(self.h):
            x = run_block(block, self.checkpointing and cache is None, x, layer, cache, attn_mask)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    @property
    def head_tied(self) -> bool:
        return getattr(self.lm_head, "weight", None) is self.wte.weight

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, by the name every family answers to."""
        return self.h

    def untie_head(self) -> None:
        """Give the output head its own copy of the token embeddings, trained apart from them: the
        book's ``load_weights_into_gpt`` assigns OpenAI's ``wte`` to both as separate parameters."""
        if self.head_tied:
            self.lm_head.weight = nn.Parameter(self.wte.weight.detach().clone())

    def num_parameters(self, tied: bool = True) -> int:
        """Each parameter once (OpenAI's 124M); ``tied=False`` counts a tied head as a matrix of its own
        (the book's 163M for GPT-2 small), which an untied head already is."""
        total = sum(p.numel() for p in self.parameters())
        return total if tied or not self.head_tied else total + self.lm_head.weight.numel()


def _init_weights(module: nn.Module) -> None:
    # GPT-2's initialisation; only matters for random-weight (smoke and test) models.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def head_loss(
    head: nn.Module, x: torch.Tensor, targets: torch.Tensor, select_targets: bool, reduction: str = "mean"
) -> torch.Tensor:
    """Cross entropy of ``head(x)`` (B, T, C) against ``targets`` (B, T) where they are not -100:
    their mean, with ``reduction="sum"`` their sum, with ``"none"`` each (N,), in row-major order
    (``select_targets`` only).

    ``select_targets`` runs the head only at those positions (less work, a data-dependent shape);
    otherwise at every position, with the -100 ones ignored. Both give the same mean.
    """
    if select_targets:
        keep = targets != -100  # (B, T)
        return F.cross_entropy(head(x[keep]).float(), targets[keep], reduction=reduction)  # (N, vocab) -> ()
    # 50,257 rows leave the logits misaligned for the GPU's matrix units (cuBLAS fell back to
    # Turing-era kernels: 27 of 100 ms per step at batch 128 on an H100); rows padded to a
    # multiple of 64 cost one copy of the weight, and the padding's logits are sliced off.
    if isinstance(head, nn.Linear):
        vocab = head.weight.shape[0]
        weight = F.pad(head.weight, (0, 0, 0, -vocab % 64))  # (vocab + pad, C)
        logits = F.linear(x, weight)[..., :vocab]  # (B, T, vocab)
    else:  # a head with an adapter (job/models/lora.py)
        logits = head(x)  # (B, T, vocab)
    flat_logits, flat_targets = logits.flatten(0, 1).float(), targets.flatten()  # (B*T, vocab), (B*T,)
    return F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction=reduction)  # -> ()
