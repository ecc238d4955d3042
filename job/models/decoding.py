"""Batched autoregressive decoding with the KV cache (the book's ``generate``, many prompts at once)."""

from __future__ import annotations

import torch

from job.models.gpt2 import GPTModel, KVCache
from job.models.tokenizer import END_OF_TEXT_ID


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """The book's choice of the next token from (B, vocab) logits: top-k filter, then greedy or sampled."""
    if top_k is not None:
        top_logits, _ = torch.topk(logits, min(top_k, logits.shape[-1]))  # k past the vocabulary keeps all
        logits = torch.where(logits < top_logits[:, -1:], torch.tensor(float("-inf"), device=logits.device), logits)
    if temperature > 0.0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    return torch.argmax(logits, dim=-1)


def _prefill(model: GPTModel, prompts: list[list[int]], max_new_tokens: int) -> tuple[torch.Tensor, KVCache, int]:
    """The prompts left-padded into one batch and run through the model once: (the last position's
    logits (B, vocab), the filled cache, the new tokens the context leaves room for). Prompts longer
    than the room the context leaves are cropped from the left, as the book crops its context."""
    cfg = model.cfg
    device = next(model.parameters()).device
    room = max(cfg.context_length - max_new_tokens, 1)
    prompts = [p[-room:] for p in prompts]
    max_new_tokens = min(max_new_tokens, cfg.context_length - max(len(p) for p in prompts))
    width = max(len(p) for p in prompts)
    idx = torch.zeros((len(prompts), width), dtype=torch.long)  # masked: any id of every vocabulary
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        idx[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        valid[row, width - len(p) :] = True
    # Under autocast the keys and values come out in the autocast dtype: keep the cache in it too.
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else next(model.parameters()).dtype
    cache = KVCache(cfg, len(prompts), width + max_new_tokens, device=device, dtype=dtype)
    hidden = model.hidden_states(idx.to(device), cache, valid.to(device))  # (B, T, C)
    return model.lm_head(hidden[:, -1]), cache, max_new_tokens  # only the last position is needed


@torch.no_grad()
def generate(
    model: GPTModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int | None = END_OF_TEXT_ID,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (end-of-text not included), decoded together.

    Prompts are left-padded into one batch; each row stops at ``eos_id`` and is dropped from
    the cache, so finished rows cost nothing. Prompts longer than the room the context leaves
    are cropped from the left, as the book crops its context.
    """
    logits, cache, max_new_tokens = _prefill(model, prompts, max_new_tokens)
    device = logits.device
    outputs: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # original index of each row still in the batch
    for step in range(max_new_tokens):
        chosen = next_tokens(logits.float(), temperature, top_k, generator)  # (b,)
        ids = chosen.tolist()
        keep = [i for i, token in enumerate(ids) if token != eos_id]
        for i in keep:
            outputs[rows[i]].append(ids[i])
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):
            keep_t = torch.tensor(keep, device=device)
            cache.keep_rows(keep_t)
            chosen = chosen[keep_t]
            rows = [rows[i] for i in keep]
        logits = model(chosen[:, None], cache=cache)[:, -1]
    return outputs


@torch.no_grad()
def generate_fixed_batch(
    model: GPTModel, prompts: list[list[int]], max_new_tokens: int, eos_id: int = END_OF_TEXT_ID, check_every: int = 16
) -> list[list[int]]:
    """Greedy decoding with the batch's shape fixed (issue 18's graph-ready decoder): finished rows
    stay in the batch, masked, instead of being dropped, and whether all are done is read from the
    device every ``check_every`` steps instead of after each one. Token for token what ``generate``
    returns greedily: a row's tokens depend on its own row alone.
    """
    logits, cache, max_new_tokens = _prefill(model, prompts, max_new_tokens)
    device = logits.device
    tokens = torch.full((len(prompts), max_new_tokens), eos_id, dtype=torch.long, device=device)  # (B, N)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # (B,)
    for step in range(max_new_tokens):
        chosen = torch.argmax(logits.float(), dim=-1)  # (B,)
        chosen = torch.where(finished, eos_id, chosen)  # a finished row only repeats the end token
        tokens[:, step] = chosen
        finished |= chosen == eos_id
        if step == max_new_tokens - 1 or ((step + 1) % check_every == 0 and bool(finished.all())):
            break
        logits = model(chosen[:, None], cache=cache)[:, -1]
    rows = tokens.tolist()  # one copy to the host for the whole batch
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]
