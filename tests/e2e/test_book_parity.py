"""The book, point for point: ``sft-job finetune --data-order book`` against the book's own code
(``llms-from-scratch``: chapter 7's dataset, loaders and collate, chapter 5's ``train_model_simple``)
on the same tiny random weights and data, fp32 on the CPU."""

from __future__ import annotations

import json
import re
import signal
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from job.core.errors import ExitCode
from job.data.instructions import split_entries
from job.data.order import BookOrder
from job.models.gpt2_weights import book_state_dict, load_pretrained
from job.models.tokenizer import load_tokenizer
from tests.helpers import cli, events, finetune_run, start_cli, wait_for_event

BOOK_LINE = re.compile(r"Ep (\d+) \(Step (\d{6})\): Train loss ([\d.]+), Val loss ([\d.]+)")  # the chapter's output
SETTINGS = dict(epochs=2, batch_size=8, lr=5e-4, eval_freq=3, eval_iter=5)  # evaluations on both sides of an epoch end
ENTRIES = 120  # 102 training entries: 12 steps an epoch


@pytest.fixture(scope="module")
def data_file(book_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("book-parity") / "data.json"
    path.write_text(json.dumps(book_data[:ENTRIES]))
    return path


@pytest.fixture(scope="module")
def book_run(tiny_model_dir, book_data, tokenizer_dir):
    """The chapter's code, as the chapter runs it, on the tiny model; its printed lines kept."""
    import contextlib
    import io

    from llms_from_scratch.ch04 import GPTModel as BookGPT
    from llms_from_scratch.ch05 import train_model_simple
    from llms_from_scratch.ch07 import InstructionDataset, custom_collate_fn, format_input
    from torch.utils.data import DataLoader

    ours = load_pretrained(tiny_model_dir)
    c = ours.cfg
    book_cfg = dict(vocab_size=c.vocab_size, context_length=c.context_length, emb_dim=c.emb_dim)
    model = BookGPT(book_cfg | dict(n_heads=c.n_heads, n_layers=c.n_layers, drop_rate=0.0, qkv_bias=True))
    model.load_state_dict(book_state_dict(ours))
    tokenizer = load_tokenizer(tokenizer_dir)
    train, _test, val = split_entries(book_data[:ENTRIES])
    collate = partial(custom_collate_fn, device="cpu", allowed_max_length=c.context_length)
    batch = SETTINGS["batch_size"]
    torch.manual_seed(123)
    loader = partial(DataLoader, batch_size=batch, collate_fn=collate, num_workers=0)
    train_loader = loader(InstructionDataset(train, tokenizer), shuffle=True, drop_last=True)
    val_loader = loader(InstructionDataset(val, tokenizer), shuffle=False, drop_last=False)
    torch.manual_seed(123)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SETTINGS["lr"], weight_decay=0.1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_losses, val_losses, tokens_seen = train_model_simple(
            model,
            train_loader,
            val_loader,
            optimizer,
            "cpu",
            num_epochs=SETTINGS["epochs"],
            eval_freq=SETTINGS["eval_freq"],
            eval_iter=SETTINGS["eval_iter"],
            start_context=format_input(val[0]),
            tokenizer=tokenizer,
        )
    return {
        "train_loss": train_losses,
        "val_loss": val_losses,
        "tokens_seen": tokens_seen,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "printed": printed.getvalue().splitlines(),
    }


def _args(tiny_model_dir, cache, data_file, output, *extra):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    args = finetune_run(tiny_model_dir, cache, output, *flags, "--precision", "fp32", "--untie-head", *extra)
    args[args.index("--data") + 1] = data_file
    return [*args, "--data-order", "book", "--checkpoint-every", "1000"]


def _assert_same_as_book(history: list[dict], output, book: dict) -> float:
    """Same tokens at every evaluation, losses within 1e-5, final weights within 2e-5; returns the weights' drift."""
    assert [h["step"] for h in history] == list(range(0, 24, SETTINGS["eval_freq"]))
    assert [h["tokens_seen"] for h in history] == book["tokens_seen"]  # the sharpest sign of the same batches
    loss_gap = max(
        abs(h[key] - b) for key in ("train_loss", "val_loss") for h, b in zip(history, book[key], strict=True)
    )
    assert loss_gap < 1e-5, loss_gap  # measured 1.9e-6 (CPU, fp32, torch 2.13)
    trained = load_pretrained(output / "model")
    assert not trained.head_tied  # the head trained apart from the embeddings, as the book's
    ours = book_state_dict(trained)
    assert ours.keys() == book["state"].keys()
    drift = max((ours[k] - book["state"][k]).abs().max().item() for k in ours)
    assert drift < 2e-5, drift  # measured 5.1e-6: SDPA and the fused AdamW round differently
    return drift


def test_book_order_replays_the_dataloaders_global_rng_draws():
    """Ours against torch's own DataLoader iterations, in the order train_model_simple makes them."""
    from torch.utils.data import DataLoader

    n, batch, epochs, eval_freq, eval_iter = 37, 4, 3, 2, 3
    order = BookOrder(n, batch, epochs, eval_freq, eval_iter, seed=7)
    torch.manual_seed(7)
    train = DataLoader(list(range(n)), batch_size=batch, shuffle=True, drop_last=True, collate_fn=list)
    val = DataLoader(list(range(9)), batch_size=batch, collate_fn=list)
    step = -1
    for epoch in range(epochs):
        seen = []
        for b in train:
            seen.append(b)
            step += 1
            if step % eval_freq == 0:
                assert [b for _, b in zip(range(eval_iter), train, strict=False)] == order.estimate_batches(step)
                next(iter(val))
        assert seen == order.epoch_batches(epoch)


def test_finetune_with_book_order_gives_the_books_tokens_losses_weights_and_printed_lines(
    tiny_model_dir, cache, data_file, book_run, tmp_path
):
    out = tmp_path / "ours"
    result = cli(*_args(tiny_model_dir, cache, data_file, out, "--log-format", "book", "--log-file", out / "e"))
    assert result.returncode == 0, result.stderr
    history = json.loads((out / "losses.json").read_text())
    drift = _assert_same_as_book(history, out, book_run)
    print(f"largest weight difference from the book's run after 24 steps: {drift:.2e}")

    # stdout holds the book's lines only; each evaluation's values are its JSON event's
    logged = [e for e in events((out / "e").read_text()) if e["event"] == "eval"]
    lines = result.stdout.splitlines()
    parsed = [BOOK_LINE.fullmatch(line) for line in lines if line.startswith("Ep ")]
    assert all(parsed) and len(parsed) == len(logged) == len(history)
    for match, event in zip(parsed, logged, strict=True):
        assert (int(match[1]), int(match[2])) == (event["epoch"], event["step"])
        assert (match[3], match[4]) == (f"{event['train_loss']:.3f}", f"{event['val_loss']:.3f}")
    book_values = [float(v) for m in map(BOOK_LINE.fullmatch, book_run["printed"]) if m for v in m.groups()[2:]]
    ours_values = [float(v) for m in parsed for v in (m[3], m[4])]
    assert ours_values == pytest.approx(book_values, abs=1.01e-3)  # the same numbers, printed to 3 decimals
    # the epoch samples: the book prints prompt and continuation on one line, after each epoch's evaluations
    samples = [line for line in lines if not line.startswith(("Ep ", "Training completed"))]
    book_samples = [line for line in book_run["printed"] if not BOOK_LINE.fullmatch(line)]
    assert len(samples) == 2 and samples == book_samples
    assert re.fullmatch(r"Training completed in \d+\.\d\d minutes\.", lines[-1])


@pytest.mark.slow
def test_book_order_survives_sigterm_mid_second_epoch(tiny_model_dir, cache, data_file, book_run, tmp_path):
    out = tmp_path / "cut"
    args = _args(tiny_model_dir, cache, data_file, out, "--log-format", "json")
    proc = start_cli(*args)
    wait_for_event(proc, lambda e: e.get("event") == "eval" and e["step"] >= 15)  # epoch 2 began at step 12
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == ExitCode.RETRY
    stopped = max(int(p.name[5:]) for p in (out / "checkpoints").iterdir())
    assert 16 <= stopped < 24

    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert [e["step"] for e in events(resumed.stdout) if e["event"] == "resumed"] == [stopped]
    _assert_same_as_book(json.loads((out / "losses.json").read_text()), out, book_run)
    saved = load_file(str(out / "model" / "model.safetensors"))
    assert "lm_head.weight" in saved and not torch.equal(saved["lm_head.weight"], saved["transformer.wte.weight"])
