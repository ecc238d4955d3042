"""job/models/llama.py against transformers' LlamaForCausalLM and Qwen3ForCausalLM and the book's Llama3Model and
Qwen3Model, on tiny random weights written by transformers (fp32 on the CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from job.models.decoding import generate
from job.models.llama import LlamaConfig, LlamaModel

VOCAB = 50304  # above GPT-2's end-of-text id, which the decoder pads prompts with
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
# Llama 3.2's shape in small: tied embeddings, rope_theta 500000 and Llama 3's stretch (every wavelength
# regime of it occurs at head_dim 16: untouched, blended and divided by the factor)
LLAMA = COMMON | dict(
    intermediate_size=128,
    max_position_embeddings=256,
    rope_theta=500_000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
# Qwen3's: a head wider than hidden / heads, RMSNorm on queries and keys, rope_theta 1e6
QWEN3 = COMMON | dict(
    intermediate_size=96,
    head_dim=32,
    max_position_embeddings=256,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def _theirs(family: str):
    from transformers import LlamaConfig as HFLlama
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM
    from transformers import Qwen3Config as HFQwen3

    torch.manual_seed(11)
    if family == "llama":
        return LlamaForCausalLM(HFLlama(**LLAMA)).eval()
    return Qwen3ForCausalLM(HFQwen3(**QWEN3)).eval()


def _ours(hf) -> LlamaModel:
    model = LlamaModel(LlamaConfig.from_hf(hf.config.to_dict())).eval()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def pair(request):
    hf = _theirs(request.param)
    return request.param, hf, _ours(hf)


def _ids(batch=3, length=40, seed=2):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_config_is_read_from_hugging_faces(pair):
    family, hf, ours = pair
    cfg = ours.cfg
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.tie_embeddings) == (4, 2, 2, True)
    assert cfg.head_dim == (16 if family == "llama" else 32) and cfg.qk_norm == (family == "qwen3")
    assert (cfg.rope_scaling is not None) == (family == "llama")
    assert ours.head_tied and sum(p.numel() for p in ours.parameters()) == hf.num_parameters()


def test_logits_equal_transformers_within_1e_5(pair):
    _, hf, ours = pair
    idx = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=0, atol=1e-5)


def test_the_loss_over_counted_targets_is_transformers_cross_entropy(pair):
    _, hf, ours = pair
    idx = _ids(seed=3)
    targets = idx.roll(-1, dims=1)
    targets[:, :15] = -100  # a prompt's targets, not counted
    with torch.no_grad():
        expected = F.cross_entropy(hf(idx).logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        torch.testing.assert_close(ours(idx, targets=targets), expected, rtol=0, atol=1e-5)


def test_logits_equal_the_books_model_with_the_same_weights(pair):
    family, hf, ours = pair
    if family == "llama":
        from llms_from_scratch.llama3 import Llama3Model as Book
        from llms_from_scratch.llama3 import load_weights_into_llama as load

        stretch = {k: v for k, v in LLAMA["rope_scaling"].items() if k != "rope_type"}
        stretch["original_context_length"] = stretch.pop("original_max_position_embeddings")
        book_cfg = {"n_kv_groups": 2, "rope_base": 500_000.0, "rope_freq": stretch}
    else:
        from llms_from_scratch.qwen3 import Qwen3Model as Book
        from llms_from_scratch.qwen3 import load_weights_into_qwen as load

        book_cfg = {"n_kv_groups": 2, "rope_base": 1_000_000.0, "head_dim": 32, "qk_norm": True}
    book_cfg |= {"vocab_size": VOCAB, "context_length": 256, "emb_dim": 64, "n_heads": 4, "n_layers": 2}
    book_cfg |= {"hidden_dim": hf.config.intermediate_size, "dtype": torch.float32}
    book = Book(book_cfg).eval()
    params = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied: the book reuses the embeddings
    load(book, book_cfg, params)
    idx = _ids(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), book(idx), rtol=0, atol=1e-5)


def test_batched_kv_cache_greedy_decoding_is_transformers_generate_token_for_token(pair):
    """10 prompts of different lengths, left-padded into one batch on both sides."""
    _, hf, ours = pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 17, 9, 1, 30, 12, 5, 22, 8, 14)]
    steps = 12
    got = generate(ours, prompts, max_new_tokens=steps, eos_id=None)
    width = max(map(len, prompts))
    idx = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        theirs = hf.generate(
            idx, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
        )
    assert got == theirs[:, width:].tolist()


# --- Hugging Face's folders: read shard by shard, written back for transformers -------------------


def test_a_sharded_folder_loads_and_the_saved_one_is_read_by_transformers_with_the_same_logits(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from job.models.llama_weights import INDEX, load_llama, save_llama

    _, hf, ours = pair
    hf.save_pretrained(tmp_path / "hub", max_shard_size="1MB")  # shards and an index, as the hub serves them
    assert (tmp_path / "hub" / INDEX).is_file() and len(list((tmp_path / "hub").glob("model-*.safetensors"))) > 1
    idx = _ids(seed=6)
    with torch.no_grad():
        expected = hf(idx).logits
        torch.testing.assert_close(load_llama(tmp_path / "hub").eval()(idx), expected, rtol=0, atol=1e-5)
        save_llama(ours, tmp_path / "ours", hf.config.to_dict())
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert type(theirs) is type(hf)
        torch.testing.assert_close(theirs(idx).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(load_llama(tmp_path / "ours").eval()(idx), expected, rtol=0, atol=1e-5)


def test_a_model_folder_that_is_not_one_is_a_one_line_error(pair, tmp_path):
    import json

    from job.models.gpt2_weights import WeightsError
    from job.models.llama_weights import INDEX, load_llama

    _, hf, _ = pair
    tmp_path = tmp_path / "model"
    hf.save_pretrained(tmp_path, max_shard_size="1MB")
    index = json.loads((tmp_path / INDEX).read_text())
    first = next(iter(index["weight_map"]))
    # a real shard outside the folder: only the name's check keeps the index from reaching it
    (tmp_path.parent / "elsewhere.safetensors").write_bytes((tmp_path / index["weight_map"][first]).read_bytes())
    escaping = index | {"weight_map": index["weight_map"] | {first: "../elsewhere.safetensors"}}
    (tmp_path / INDEX).write_text(json.dumps(escaping))
    with pytest.raises(WeightsError, match=r"shard '\.\./elsewhere\.safetensors' is not a \.safetensors file name"):
        load_llama(tmp_path)
    missing = index | {"weight_map": {k: v for k, v in index["weight_map"].items() if k != "model.norm.weight"}}
    (tmp_path / INDEX).write_text(json.dumps(missing))
    with pytest.raises(WeightsError, match=r"missing tensor model\.norm\.weight \(1 missing in all\)"):
        load_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict() | {"model_type": "gpt2"}))
    with pytest.raises(WeightsError, match=r"model_type 'gpt2' is not one of llama, qwen3"):
        load_llama(tmp_path)
