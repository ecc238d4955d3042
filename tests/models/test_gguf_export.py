"""job/models/gguf_export.py against llama.cpp itself (llama-cpp-python, on the CPU): tiny random GPT-2, Llama 3.2
and Qwen3 folders as the job writes them, exported by the export stage, loaded by llama.cpp with an f32 KV cache;
its logits, greedy continuations and tokenizer against ours on prompts of the book's data."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from job.data.instructions import PROMPT_STYLES
from job.models.families import load_model, model_tokenizer
from job.models.gpt2 import GPTConfig, GPTModel
from job.models.gpt2_weights import save_hf
from job.models.tokenizer import encode
from job.stages.export import GGUF_FILE, run_export
from job.stages.export_config import ExportConfig
from tests.family_folders import write_family_folder

# llama.cpp's logits against ours on the f32 file (f32 KV cache): Llama and Qwen3 to float rounding (measured
# 6.0e-7 and 3.6e-7); GPT-2's GELU is ggml's table of f16 values of the tanh approximation (measured 2.8e-4).
LOGIT_BOUND = {"llama": 1e-4, "qwen3": 1e-4, "gpt2": 1e-3}
NEW_TOKENS = 16
# Measured 2026-12-05 (greedy tokens equal, largest logit difference): f16 160/160 for each family, 5.4e-4 (GPT-2),
# 3.3e-4 (Llama), 4.4e-4 (Qwen3); q8_0 126/160 and 1.3e-2 (GPT-2), 160/160 and 8.5e-3 (Llama), 160/160 and 1.1e-2
# (Qwen3). The bounds are a few times those.
QUANTIZED_BOUND = {"f16": 5e-3, "q8_0": 5e-2}


def gpt2_folder(path):
    """A tiny random GPT-2 with GPT-2's full vocabulary (its tokenizer is the cache's), saved as the job saves."""
    torch.manual_seed(5)
    save_hf(GPTModel(GPTConfig(vocab_size=50257, context_length=256, emb_dim=64, n_heads=4, n_layers=2)), path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, book_data, tokenizer_dir):
    """Per family: (our model, our tokenizer, the folder the f32 GGUF is in, the cache)."""
    cache = tmp_path_factory.mktemp("cache")
    (cache / "gpt2").mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        (cache / "gpt2" / name).write_bytes((tokenizer_dir / name).read_bytes())
    out = {}
    for family in ("gpt2", "llama", "qwen3"):
        folder = tmp_path_factory.mktemp(family)
        folder = gpt2_folder(folder) if family == "gpt2" else write_family_folder(folder, family, book_data)
        export = tmp_path_factory.mktemp(f"{family}-gguf")
        run_export(ExportConfig(model_dir=str(folder), output=str(export), dtype="f32", cache=str(cache)))
        out[family] = (load_model(folder).eval(), model_tokenizer(folder, cache), folder, export)
    return out, cache


@pytest.fixture(scope="module")
def llms(exported):
    """llama.cpp on each family's f32 GGUF."""
    return {family: llama_cpp(export / GGUF_FILE) for family, (_, _, _, export) in exported[0].items()}


def llama_cpp(path, n_ctx: int = 256):
    from llama_cpp import Llama

    # type_k/type_v 0: an f32 KV cache (the default f16 one rounds keys and values)
    return Llama(
        model_path=str(path), n_ctx=n_ctx, logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False, seed=0
    )


def prompts(book_data, tokenizer) -> list[list[int]]:
    """Ten Alpaca prompts of the book's test entries, with and without an input, in our token ids."""
    style = PROMPT_STYLES["alpaca"]
    return [encode(tokenizer, style.format_input(e) + style.response_header) for e in book_data[935:945]]


def their_logits(llm, ids: list[int]):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(llm.scores[: len(ids)].copy())


def their_greedy(llm, ids: list[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    new = []
    for _ in range(NEW_TOKENS):
        new.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([new[-1]])
    return new


@torch.no_grad()
def our_greedy(model, ids: list[int]) -> list[int]:
    tokens = list(ids)
    for _ in range(NEW_TOKENS):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(ids) :]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_logits_and_greedy_tokens_match_llama_cpp(exported, llms, book_data, family):
    model, tokenizer, _, _ = exported[0][family]
    llm = llms[family]
    worst = 0.0
    for ids in prompts(book_data, tokenizer):
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0]
        worst = max(worst, (their_logits(llm, ids) - ours).abs().max().item())
        assert their_greedy(llm, ids) == our_greedy(model, ids)
    print(f"{family}: largest logit difference {worst:.2e}")
    assert worst < LOGIT_BOUND[family]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_llama_cpp_tokenizes_as_we_do(exported, llms, book_data, family):
    _, tokenizer, _, _ = exported[0][family]
    llm = llms[family]
    style = PROMPT_STYLES["alpaca"]
    for entry in book_data[935:945]:
        text = style.format_input(entry) + style.response_header + entry["output"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == encode(tokenizer, text)


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_llama_cpp_tokenizes_any_text_as_we_do(exported, llms, text):
    for family, (_, tokenizer, _, _) in exported[0].items():
        assert llms[family].tokenize(text.encode(), add_bos=False, special=True) == encode(tokenizer, text), family


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_smaller_types_agree_with_ours(exported, book_data, tmp_path, dtype):
    """The f16 and q8_0 files: the share of greedy tokens equal to ours and the largest logit difference,
    printed for the README (measured on these tiny models) and held below a few times what was measured."""
    _, cache = exported
    for family, (model, tokenizer, folder, _) in exported[0].items():
        out = tmp_path / family
        run_export(ExportConfig(model_dir=str(folder), output=str(out), dtype=dtype, cache=str(cache)))
        llm, worst, same, total = llama_cpp(out / GGUF_FILE), 0.0, 0, 0
        for ids in prompts(book_data, tokenizer):
            with torch.no_grad():
                worst = max(worst, (their_logits(llm, ids) - model(torch.tensor([ids]))[0]).abs().max().item())
            theirs, ours = their_greedy(llm, ids), our_greedy(model, ids)
            same, total = same + sum(a == b for a, b in zip(theirs, ours, strict=True)), total + len(ours)
        print(f"{family} {dtype}: greedy tokens equal {same}/{total}, largest logit difference {worst:.2e}")
        assert worst < QUANTIZED_BOUND[dtype] and same / total >= 0.5
