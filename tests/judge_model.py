"""A tiny GPT-2 on the smoke's byte tokenizer whose weights are constructed so that greedy decoding answers any
Alpaca prompt with ``85`` and its end token: the judge's reply then parses, whichever server runs it. Each
block adds nothing (its output projections are zero) and positions are zero, so the next token depends on the
last one alone: a bigram table, ``\\n`` -> ``8`` -> ``5`` -> end, read off by the head. Under a server's JSON
grammar (end not allowed before the object closes) ``5`` is followed by ``}`` instead, the second choice, so a
structured reply is a JSON object whose score is ``85``."""

from __future__ import annotations

from pathlib import Path

import torch

from job.models.gpt2 import GPTConfig, GPTModel
from job.models.gpt2_weights import save_hf
from job.models.tokenizer import ByteTokenizer

SCORE = "85"


def write_judge_model(path: Path) -> Path:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=257, context_length=2048, emb_dim=64, n_heads=2, n_layers=1)).eval()
    model.untie_head()
    chain = {ord("\n"): ord(SCORE[0]), ord(SCORE[0]): ord(SCORE[1]), ord(SCORE[1]): ByteTokenizer.eot_token}
    with torch.no_grad():
        for block in model.h:
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                projection.weight.zero_()
                projection.bias.zero_()
        model.wpe.weight.zero_()
        model.lm_head.weight.zero_()
        for token, following in chain.items():
            hidden = model.ln_f(model.wte.weight[token])
            model.lm_head.weight[following] += 20 * hidden / hidden.square().sum()
        # Half the end token's logit: second after ``5`` in plain text, first where a grammar masks the end.
        hidden = model.ln_f(model.wte.weight[ord(SCORE[1])])
        model.lm_head.weight[ord("}")] += 10 * hidden / hidden.square().sum()
    save_hf(model, path, extra_config={"sft_job": {"tokenizer": ByteTokenizer.name, "prompt_style": "alpaca"}})
    return path
