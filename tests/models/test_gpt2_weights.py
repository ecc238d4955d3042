import pytest
import torch
from safetensors.torch import load_file, save_file

from job.models.gpt2_weights import WeightsError, book_state_dict, load_pretrained, save_hf


def _hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(idx).logits


def _ids(n_ctx=128, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (batch, n_ctx), generator=g)


def test_safetensors_parity_with_transformers(hf_tiny):
    hf_model, path = hf_tiny
    model = load_pretrained(path).eval()
    assert model.cfg.n_layers == 2 and model.cfg.emb_dim == 64 and model.cfg.context_length == 128
    idx = _ids()
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (3, 128, 50257)
    torch.testing.assert_close(logits, _hf_logits(hf_model, idx), rtol=0, atol=1e-5)


def test_openai_tf_checkpoint_parity_with_transformers(openai_tiny):
    hf_model, path = openai_tiny
    assert {p.name for p in path.iterdir()} >= {
        "checkpoint",
        "hparams.json",
        "model.ckpt.index",
        "model.ckpt.meta",
        "model.ckpt.data-00000-of-00001",
    }
    model = load_pretrained(path).eval()
    idx = _ids(seed=2)
    with torch.no_grad():
        logits = model(idx)
    torch.testing.assert_close(logits, _hf_logits(hf_model, idx), rtol=0, atol=1e-5)


def test_saved_model_round_trips_and_transformers_reads_it(hf_tiny, tmp_path):
    from transformers import GPT2LMHeadModel

    hf_model, path = hf_tiny
    model = load_pretrained(path).eval()
    save_hf(model, tmp_path)
    again = load_pretrained(tmp_path).eval()
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = _ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), theirs(idx).logits, rtol=0, atol=1e-5)


def test_book_state_dict_uses_the_books_names_and_values(hf_tiny):
    model = load_pretrained(hf_tiny[1])
    sd = book_state_dict(model)
    assert torch.equal(sd["tok_emb.weight"], model.wte.weight) and torch.equal(sd["out_head.weight"], model.wte.weight)
    q, k, v = model.h[1].attn.c_attn.weight.chunk(3)
    assert torch.equal(sd["trf_blocks.1.att.W_key.weight"], k)
    assert torch.equal(sd["trf_blocks.1.ff.layers.2.bias"], model.h[1].mlp.c_proj.bias)
    assert torch.equal(sd["trf_blocks.0.norm2.scale"], model.h[0].ln_2.weight)
    # The book's attention saves its causal mask as a buffer, so a strict load needs it too.
    assert torch.equal(sd["trf_blocks.1.att.mask"], torch.triu(torch.ones(128, 128), diagonal=1))
    # Everything the book's GPTModel holds for a 2-layer model: 5 top-level + 17 per block.
    assert len(sd) == 5 + 17 * 2


def test_wrong_shape_names_the_tensor_and_both_shapes(hf_tiny, tmp_path):
    _, path = hf_tiny
    tensors = load_file(str(path / "model.safetensors"))
    tensors["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 200)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(
        WeightsError, match=r"h\.1\.mlp\.c_fc\.weight has shape \(200, 64\), config expects \(256, 64\)"
    ):
        load_pretrained(tmp_path)


def test_missing_tensor_and_unknown_layout_are_clear_errors(hf_tiny, tmp_path):
    _, path = hf_tiny
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["transformer.ln_f.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(WeightsError, match="missing tensor ln_f.bias"):
        load_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="neither config.json"):
        load_pretrained(tmp_path / "..")


def test_config_comes_from_the_files_not_a_named_size(tmp_path):
    # A shape no named size has (3 layers, 96 wide, 6 heads, 48 positions): every figure must come from config.json.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4)
    theirs = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=96, n_head=6, n_positions=48, vocab_size=50257)).eval()
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    model = load_pretrained(tmp_path)
    cfg = model.cfg
    assert (cfg.n_layers, cfg.emb_dim, cfg.n_heads, cfg.context_length, cfg.vocab_size) == (3, 96, 6, 48, 50257)
    # By hand: embeddings 50257*96 + 48*96, per block 2 norms (2*192) + qkv 96*288+288 + proj 96*96+96 + MLP
    # 96*384+384 + 384*96+96 = 111,840, the last norm 192; transformers counts the tied head once, as we do.
    assert model.num_parameters() == theirs.num_parameters() == 50257 * 96 + 48 * 96 + 3 * 111_840 + 192
    assert model.num_parameters(tied=False) == theirs.num_parameters() + 96 * 50257


def test_openai_layout_without_tensorflow_says_how_to_install(openai_tiny, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tf(name, *args, **kwargs):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("No module named 'tensorflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tf)
    with pytest.raises(WeightsError, match=r"pip install 'sft-job\[tf\]'"):
        load_pretrained(openai_tiny[1])
