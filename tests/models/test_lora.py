"""LoRA (the book's exercise 7.4): against the book's appendix E code, merged, loaded by PEFT, and
through the finetune stage with resume and small checkpoints."""

from __future__ import annotations

import copy
import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from job.core.errors import ExitCode
from job.core.observability import Metrics
from job.models.gpt2 import GPTConfig, GPTModel, gpt2_config
from job.models.gpt2_weights import book_state_dict, load_pretrained
from job.models.lora import adapters, add_adapters, merge_adapters, peft_target_modules, save_peft_adapter
from job.storage.store import tree_bytes
from job.training.checkpoint import CheckpointManager
from job.training.train_config import lora_layers
from tests.helpers import cli, events, finetune_run, smoke_run, start_cli, wait_for_event

SMALL = GPTConfig(vocab_size=96, context_length=32, emb_dim=32, n_heads=4, n_layers=2)


def _book_model(ours: GPTModel):
    from llms_from_scratch.ch04 import GPTModel as BookGPT

    c = ours.cfg
    cfg = dict(vocab_size=c.vocab_size, context_length=c.context_length, emb_dim=c.emb_dim, n_heads=c.n_heads)
    book = BookGPT(cfg | dict(n_layers=c.n_layers, drop_rate=0.0, qkv_bias=True))
    book.load_state_dict(book_state_dict(ours))
    return book


def _adapted_pair(rank=4, alpha=2.0, seed=123):
    """Our model with adapters on every linear layer and the book's, adapted as exercise 7.4 does."""
    from llms_from_scratch.appendix_e import replace_linear_with_lora

    torch.manual_seed(0)
    ours = GPTModel(SMALL)
    ours.untie_head()  # the book's head is its own parameter; frozen, it computes the same either way
    book = _book_model(ours)
    for p in book.parameters():
        p.requires_grad = False
    torch.manual_seed(seed)
    replace_linear_with_lora(book, rank=rank, alpha=alpha)
    add_adapters(ours, rank, alpha, lora_layers("all"), dropout=0.0, seed=seed)
    return ours, book


def test_adapters_start_as_the_books_and_train_to_its_losses_touching_only_themselves():
    ours, book = _adapted_pair()
    # the same initial A, in the book's order of replacement (query, key, value, out, ff, ..., head)
    for i, block in enumerate(book.trf_blocks):
        for s, part in enumerate((block.att.W_query, block.att.W_key, block.att.W_value)):
            assert torch.equal(ours.h[i].attn.c_attn.A[s], part.lora.A)
        assert torch.equal(ours.h[i].mlp.c_proj.A[0], block.ff.layers[2].lora.A)
    assert torch.equal(ours.lm_head.A[0], book.out_head.lora.A)
    base = {k: v.clone() for k, v in ours.state_dict().items() if not k.endswith((".A", ".B"))}

    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for m in adapters(ours).values() for p in (m.A, m.B)}
    opt_ours = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    opt_book = torch.optim.AdamW(book.parameters(), lr=1e-2, weight_decay=0.1)
    data = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randint(SMALL.vocab_size, (4, 16), generator=data)
        y = torch.randint(SMALL.vocab_size, (4, 16), generator=data)
        loss_ours = ours(x, targets=y)
        loss_book = torch.nn.functional.cross_entropy(book(x).flatten(0, 1), y.flatten())  # ch05.calc_loss_batch
        assert loss_ours.item() == pytest.approx(loss_book.item(), abs=1e-5)
        for opt, loss in ((opt_ours, loss_ours), (opt_book, loss_book)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert ours.h[0].attn.c_attn.B.abs().sum() > 0  # the adapters moved
    after = ours.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the base did not

    x = torch.randint(SMALL.vocab_size, (2, 16), generator=data)
    with torch.no_grad():
        adapted = ours(x)
        merge_adapters(ours)
        assert not adapters(ours) and not ours.head_tied
        assert torch.allclose(ours(x), adapted, atol=1e-5)


def _hf(tiny_model_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()


@pytest.mark.parametrize("targets", ["all", "attn,head", "mlp.c_proj"])
def test_peft_loads_the_adapter_onto_hugging_faces_model_with_the_same_logits(tiny_model_dir, tmp_path, targets):
    from peft import PeftModel

    ours = load_pretrained(tiny_model_dir)
    add_adapters(ours, 4, 3.0, lora_layers(targets), dropout=0.0, seed=5)
    with torch.no_grad():  # B starts at zero: give it values so the adapter changes the logits
        for m in adapters(ours).values():
            m.B.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    save_peft_adapter(ours, tmp_path / "adapter", str(tiny_model_dir), dropout=0.0)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == peft_target_modules(lora_layers(targets) & GPT2_LAYERS)

    peft = PeftModel.from_pretrained(_hf(tiny_model_dir), tmp_path / "adapter").eval()
    x = torch.randint(50257, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours.eval()
        expected, base = ours(x), _hf(tiny_model_dir)(x).logits
        got = peft(input_ids=x).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter matters
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


GPT2_LAYERS = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head"}


def test_target_names_are_hugging_faces_and_exact():
    assert peft_target_modules(lora_layers("all") & GPT2_LAYERS) == ["c_attn", "c_fc", "c_proj", "lm_head"]
    assert peft_target_modules(lora_layers("attn") & GPT2_LAYERS) == ["attn.c_proj", "c_attn"]
    assert peft_target_modules(lora_layers("c_proj,c_fc")) == ["c_fc", "c_proj"]
    llama = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert peft_target_modules(lora_layers("all") - GPT2_LAYERS | {"lm_head"}) == llama
    assert peft_target_modules(lora_layers("attn") - GPT2_LAYERS) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert peft_target_modules(lora_layers("q_proj,v_proj")) == ["q_proj", "v_proj"]


def _checkpoint_bytes(model: GPTModel, folder) -> int:
    from accelerate import Accelerator

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's moments exist, as in any checkpoint after the first step
    manager = CheckpointManager(folder, Accelerator(cpu=True), model, optimizer, 1, Metrics())
    return tree_bytes(manager.save(1, {"step": 1}, {}))


def test_a_lora_checkpoint_of_gpt2_small_holds_only_the_adapters_and_their_moments(tmp_path):
    with torch.device("meta"):
        full = sum(p.numel() for p in GPTModel(gpt2_config("gpt2-small")).parameters())
    torch.manual_seed(0)
    model = GPTModel(gpt2_config("gpt2-small"))
    full_bytes = 3 * 4 * full  # the model and AdamW's two moments in fp32, as a full checkpoint writes them
    ratios = {}
    for rank, targets in ((16, "all"), (16, "attn,mlp"), (8, "all")):
        adapted = copy.deepcopy(model)
        add_adapters(adapted, rank, 16.0, lora_layers(targets), dropout=0.0, seed=1)
        trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        size = _checkpoint_bytes(adapted, tmp_path / f"{rank}-{targets}")
        assert size < 3 * 4 * trained * 1.01 + 64_000  # the adapters, two moments, the small JSON files
        ratios[(rank, targets)] = full_bytes / size
    print({k: round(v, 1) for k, v in ratios.items()})
    # The book's exercise (rank 16, every linear layer) adapts the 50,257-row head too: its adapters
    # alone are 1/36 of the model. Without the head, or at rank 8, the checkpoint is 45-72x smaller.
    assert ratios[(16, "all")] > 35 and ratios[(16, "attn,mlp")] > 45 and ratios[(8, "all")] > 50


@pytest.mark.slow
def test_finetune_with_lora_writes_the_adapter_and_merged_model_and_resumes_bitwise(tiny_model_dir, cache, tmp_path):
    flags = ["--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-3", "--max-steps", "12", "--eval-freq", "2"]
    args = lambda out: finetune_run(tiny_model_dir, cache, out, *flags, "--checkpoint-every", "1000")  # noqa: E731
    straight = cli(*args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    start = next(e for e in events(straight.stdout) if e["event"] == "finetune_start")
    assert 0 < start["trainable_parameters"] < start["parameters"] / 10

    proc = start_cli(*args(tmp_path / "cut"))
    wait_for_event(proc, lambda e: e.get("event") == "eval" and e["step"] >= 4)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == ExitCode.RETRY
    [ckpt] = (tmp_path / "cut" / "checkpoints").iterdir()
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and all(k.endswith((".A", ".B")) for k in saved)  # the adapters only, no base weights
    resumed = cli(*args(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr

    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for d in ("straight", "cut"):
        assert (tmp_path / d / "adapter" / "adapter_config.json").is_file()
    pa, pb = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("straight", "cut"))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)

    # the merged model: frozen tensors as they were, adapted ones moved, the head now its own
    base, merged = load_pretrained(tiny_model_dir).state_dict(), load_pretrained(tmp_path / "straight" / "model")
    after = merged.state_dict()
    assert torch.equal(after["wpe.weight"], base["wpe.weight"]) and torch.equal(
        after["h.0.ln_1.weight"], base["h.0.ln_1.weight"]
    )
    assert torch.equal(after["h.0.attn.c_attn.bias"], base["h.0.attn.c_attn.bias"])
    assert not torch.equal(after["h.0.attn.c_attn.weight"], base["h.0.attn.c_attn.weight"])
    assert not merged.head_tied and not torch.equal(after["lm_head.weight"], base["wte.weight"])


def test_a_smoke_run_with_lora_in_bf16_and_grad_accum_records_the_adapter(cache, tmp_path):
    extra = ["--skip-judge", "--lora-rank", "4", "--precision", "bf16", "--grad-accum", "2"]
    result = cli(*smoke_run(cache, tmp_path, "lora", *extra))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "lora"
    manifest = json.loads((run / "manifest.json").read_text())
    artifacts = manifest["stages"]["finetune"]["artifacts"]
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(artifacts)
    assert (run / "report.html").is_file() and (run / "instruction-data-with-response.json").is_file()
    start = next(e for e in events(result.stdout) if e["event"] == "finetune_start")
    assert start["precision"] == "bf16" and start["trainable_parameters"] < start["parameters"]
