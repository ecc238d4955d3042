import pytest
import torch

from job.models.gpt2 import GPTConfig, GPTModel, KVCache, gpt2_config, gpt2_sizes, head_loss
from job.models.registry import MODELS, hub_names, model_names

TINY = GPTConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(TINY).eval()


def test_the_books_four_sizes():
    shapes = {name: (c.emb_dim, c.n_layers, c.n_heads) for name, c in gpt2_sizes().items()}
    assert shapes == {
        "gpt2-small": (768, 12, 12),
        "gpt2-medium": (1024, 24, 16),
        "gpt2-large": (1280, 36, 20),
        "gpt2-xl": (1600, 48, 25),
    }
    for c in gpt2_sizes().values():
        assert (c.vocab_size, c.context_length, c.qkv_bias, c.drop_rate) == (50257, 1024, True, 0.0)
    # One list of names: the flags' choices are GPT-2's shapes (OpenAI's folder names) and the hub's models.
    assert [MODELS[name].openai_folder for name in gpt2_sizes()] == ["124M", "355M", "774M", "1558M"]
    assert model_names() == (*gpt2_sizes(), *hub_names())


def test_parameter_count_of_gpt2_small_matches_124m():
    with torch.device("meta"):
        model = GPTModel(gpt2_config("gpt2-small"))
    assert model.num_parameters() == 124_439_808  # tied head, as OpenAI's release


def test_the_head_shares_the_token_embeddings_until_untied():
    torch.manual_seed(0)
    model = GPTModel(TINY)
    idx = torch.tensor([[5, 7, 9]])
    before = model(idx).detach()
    with torch.no_grad():  # one change to the embeddings moves the head's logit for that token too
        model.wte.weight[42] += 1.0
    assert model.head_tied and torch.equal(model.lm_head.weight[42], model.wte.weight[42])
    assert not torch.allclose(model(idx)[..., 42], before[..., 42])
    assert model.num_parameters(tied=False) == model.num_parameters() + 50257 * 64
    model.untie_head()  # the book's way: two matrices, equal at first, trained apart
    assert not model.head_tied and torch.equal(model.lm_head.weight, model.wte.weight)
    with torch.no_grad():
        model.wte.weight[42] += 1.0
    assert not torch.equal(model.lm_head.weight[42], model.wte.weight[42])
    assert model.num_parameters() == model.num_parameters(tied=False) == GPTModel(TINY).num_parameters(tied=False)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(emb_dim=65, n_heads=4)


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 50257, (n,), generator=g) for n in (7, 3, 12, 1)]


def test_batched_kv_cache_matches_full_recompute_for_prompts_of_different_lengths(model):
    prompts, steps = _prompts(), 6
    g = torch.Generator().manual_seed(6)
    continuations = torch.randint(0, 50257, (len(prompts), steps), generator=g)
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), 50256)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, p in enumerate(prompts):  # left padding
        idx[row, width - len(p) :] = p
        valid[row, width - len(p) :] = True
    cache = KVCache(TINY, len(prompts), width + steps)
    with torch.no_grad():
        cached = [model(idx, cache=cache, valid=valid)[:, -1]]
        for t in range(steps):
            cached.append(model(continuations[:, t : t + 1], cache=cache)[:, -1])
        cached = torch.stack(cached, dim=1)  # (B, steps + 1, V)
        for row, p in enumerate(prompts):
            full = model(torch.cat([p, continuations[row]])[None])[0, len(p) - 1 :]  # (steps + 1, V)
            torch.testing.assert_close(cached[row], full, rtol=1e-5, atol=1e-5)


def test_cache_rows_can_be_dropped_mid_decode(model):
    prompts = _prompts()[:2]
    width = max(len(p) for p in prompts)
    idx = torch.full((2, width), 50256)
    valid = torch.zeros(2, width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        idx[row, width - len(p) :] = p
        valid[row, width - len(p) :] = True
    cache = KVCache(TINY, 2, width + 2)
    nxt = torch.tensor([[11], [22]])
    with torch.no_grad():
        model(idx, cache=cache, valid=valid)
        cache.keep_rows(torch.tensor([1]))
        logits = model(nxt[1:], cache=cache)[0, -1]
        full = model(torch.cat([prompts[1], nxt[1]])[None])[0, -1]
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def test_sequence_longer_than_context_is_an_error(model):
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_loss_is_the_books_cross_entropy_whether_or_not_the_head_skips_ignored_positions(model):
    torch.manual_seed(1)
    idx = torch.randint(0, model.cfg.vocab_size, (3, 10))
    targets = torch.randint(0, model.cfg.vocab_size, (3, 10))
    targets[0, 6:] = -100  # padding after the end-of-text, as the book's collate writes it
    targets[2, 3:] = -100
    logits = model(idx)  # (B, T, vocab)
    book = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())  # ch05.calc_loss_batch
    x = model.hidden_states(idx)
    selected = head_loss(model.lm_head, x, targets, select_targets=True)  # the CPU path
    full = head_loss(model.lm_head, x, targets, select_targets=False)  # the CUDA path
    torch.testing.assert_close(selected, book, atol=1e-5, rtol=0)
    torch.testing.assert_close(full, book, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(idx, targets=targets), book, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(family):
    """Each block keeps only its input for the backward pass and runs again there, dropout's masks included."""
    from job.models.llama import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    if family == "gpt2":
        model = GPTModel(GPTConfig(vocab_size=300, context_length=64, emb_dim=64, n_heads=4, n_layers=3, drop_rate=0.1))
    else:
        shape = dict(vocab_size=300, context_length=64, emb_dim=64, n_heads=4, n_kv_heads=2, n_layers=3)
        model = LlamaModel(LlamaConfig(**shape, hidden_dim=96, head_dim=16, qk_norm=True))
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    targets = idx.roll(-1, dims=1)

    def step(checkpointing: bool):
        model.checkpointing, saved = checkpointing, []
        model.zero_grad()
        torch.manual_seed(5)  # the same dropout masks for both
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model.train()(idx, targets=targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)

    loss, grads, kept = step(False)
    loss_cp, grads_cp, kept_cp = step(True)
    assert torch.equal(loss, loss_cp) and all(torch.equal(grads[n], grads_cp[n]) for n in grads)
    assert kept_cp < kept / 4, (kept_cp, kept)  # measured: 0.16 of it (GPT-2), 0.19 (Qwen3)
