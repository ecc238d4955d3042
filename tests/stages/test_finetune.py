import json
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from job.config import FinetuneConfig
from job.core.errors import ExitCode
from job.data.instructions import PROMPT_STYLES
from job.models.decoding import generate
from job.models.gpt2_weights import load_pretrained
from job.models.tokenizer import encode, load_tokenizer
from job.stages.finetune import run_finetune
from tests.helpers import REPO, cli, conversations_file, events, free_port, start_cli, wait_for_event


def _cfg(tiny_model_dir, cache, output, **kw) -> FinetuneConfig:
    base = dict(
        model_dir=str(tiny_model_dir),
        data=str(cache / "instruction-data.json"),
        cache=str(cache),
        output=str(output),
        lr=1e-3,
    )
    return FinetuneConfig(**(base | kw))


def _weights(path):
    return load_file(str(path / "model" / "model.safetensors"))


def test_tiny_finetune_lowers_val_loss_and_writes_every_output(tiny_model_dir, cache, tmp_path):
    out = tmp_path / "run"
    run_finetune(_cfg(tiny_model_dir, cache, out, max_steps=30, eval_freq=5, checkpoint_every=10))
    losses = json.loads((out / "losses.json").read_text())
    assert [h["step"] for h in losses] == [0, 5, 10, 15, 20, 25]
    assert losses[-1]["val_loss"] < losses[0]["val_loss"] - 0.5
    assert losses[1]["tokens_seen"] > losses[0]["tokens_seen"] > 0
    model = load_pretrained(out / "model")  # readable by load_pretrained
    assert json.loads((out / "model" / "config.json").read_text())["sft_job"]["prompt_style"] == "alpaca"
    book = torch.load(out / "gpt2-custom-sft.pth")
    assert torch.equal(book["tok_emb.weight"], model.wte.weight)
    assert (out / "loss-plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 30
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000020", "step-00000030"]
    state = json.loads((out / "checkpoints" / "step-00000030" / "trainer_state.json").read_text())
    assert state["step"] == 30 and len(state["history"]) == 6


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_and_save_the_same_parameter_names(tiny_model_dir, cache, tmp_path):
    runs = {}
    for compile_ in (False, True):  # batches of different lengths: one dynamic-shape compile serves them all
        out = tmp_path / f"compile-{compile_}"
        run_finetune(_cfg(tiny_model_dir, cache, out, max_steps=6, eval_freq=3, compile=compile_))
        runs[compile_] = (json.loads((out / "losses.json").read_text()), _weights(out))
        assert (out / "checkpoints" / "step-00000006" / "trainer_state.json").is_file()
    (eager_losses, eager), (compiled_losses, compiled) = runs[False], runs[True]
    assert eager.keys() == compiled.keys()  # no "_orig_mod." prefixes: checkpoints load either way
    pairs = list(zip(eager_losses, compiled_losses, strict=True))
    assert [a["tokens_seen"] for a, _ in pairs] == [b["tokens_seen"] for _, b in pairs]
    loss_gap = max(abs(a[k] - b[k]) for a, b in pairs for k in ("train_loss", "val_loss"))
    drift = max((compiled[name] - eager[name]).abs().max().item() for name in eager)
    assert loss_gap < 1e-6 and drift < 5e-5, (loss_gap, drift)  # measured 1.9e-7 and 1.0e-5 (CPU, fp32)


@pytest.mark.slow
def test_overfits_eight_entries_until_greedy_decoding_returns_each_output(tiny_model_dir, cache, book_data, tmp_path):
    short = [e for e in book_data if len(e["output"]) < 40][:10]  # 8 train, 1 test, 1 val
    (tmp_path / "d.json").write_text(json.dumps(short))
    out = tmp_path / "run"
    cfg = _cfg(
        tiny_model_dir,
        cache,
        out,
        data=str(tmp_path / "d.json"),
        epochs=150,
        lr=3e-3,
        eval_freq=1000,
        checkpoint_every=10_000,
        keep_checkpoints=1,
    )
    run_finetune(cfg)
    model = load_pretrained(out / "model").eval()
    tok, style = load_tokenizer(cache / "gpt2"), PROMPT_STYLES["alpaca"]
    prompts = [style.format_input(e) for e in short[:8]]
    new = generate(model, [encode(tok, p) for p in prompts], max_new_tokens=40)
    responses = [style.extract_response(p + tok.decode(n), p) for p, n in zip(prompts, new, strict=True)]
    assert responses == [e["output"] for e in short[:8]]


@pytest.mark.slow
@pytest.mark.parametrize("start", ["tiny_model_dir", "qwen3_dir"], ids=["gpt2", "qwen3"])
def test_sigterm_mid_epoch_then_resume_gives_bitwise_the_uninterrupted_weights(start, cache, tmp_path, request):
    args = [
        "finetune",
        "--model-dir",
        request.getfixturevalue(start),
        "--data",
        cache / "instruction-data.json",
        "--cache",
        cache,
        "--lr",
        "1e-3",
        "--max-steps",
        "24",
        "--eval-freq",
        "4",
        "--checkpoint-every",
        "1000",
        "--log-format",
        "json",
    ]
    straight = cli(*args, "--output", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr

    proc = start_cli(*args, "--output", tmp_path / "cut")
    wait_for_event(proc, lambda e: e.get("event") == "eval" and e["step"] >= 8)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == ExitCode.RETRY
    [ckpt] = (tmp_path / "cut" / "checkpoints").iterdir()
    stopped_at = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 9 <= stopped_at < 24 and not (tmp_path / "cut" / "model").exists()

    # resumed with activation checkpointing (what a run that ran out of memory is rerun with): the same gradients
    resumed = cli(*args, "--gradient-checkpointing", "--output", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr
    assert any(e["event"] == "resumed" and e["step"] == stopped_at for e in events(resumed.stdout))
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight_losses = json.loads((tmp_path / "straight" / "losses.json").read_text())
    assert json.loads((tmp_path / "cut" / "losses.json").read_text()) == straight_losses


@pytest.mark.slow
@pytest.mark.parametrize(
    ("start", "extra"),
    [("tiny_model_dir", []), ("tiny_model_dir", ["--lora-rank", "4"]), ("qwen3_dir", [])],
    ids=["full", "lora", "qwen3"],
)
def test_accelerate_launch_two_cpu_processes(start, cache, tmp_path, extra, request):
    model_dir = request.getfixturevalue(start)
    common = [
        *extra,
        "--model-dir",
        model_dir,
        "--data",
        cache / "instruction-data.json",
        "--cache",
        cache,
        "--max-steps",
        "6",
        "--eval-freq",
        "2",
        "--log-format",
        "json",
    ]
    launched = subprocess.run(
        # accelerate's --cpu flag alone starts one process (several need MPI); --multi_gpu launches
        # through torchrun, and with no GPU each process trains on the CPU over gloo.
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            "-m",
            "job.cli",
            "finetune",
            *map(str, common),
            "--output",
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    starts = [e for e in events(launched.stdout) if e["event"] == "finetune_start"]
    assert len(starts) == 1 and starts[0]["processes"] == 2  # rank 0 alone logs
    assert len([e for e in events(launched.stdout) if e["event"] == "eval"]) == 3
    single = cli("finetune", *common, "--output", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    ddp_losses = json.loads((tmp_path / "ddp" / "losses.json").read_text())
    one_losses = json.loads((tmp_path / "one" / "losses.json").read_text())
    assert len(ddp_losses) == len(one_losses) == 3
    assert [h["tokens_seen"] for h in ddp_losses] == [h["tokens_seen"] for h in one_losses]
    ddp, one = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")  # each shard's targets differ in count
    assert max((ddp[k] - one[k]).abs().max().item() for k in one) < 1e-6
    if extra:  # the merged adapters moved the weights, and both runs wrote the same adapter
        assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()
        before = load_pretrained(model_dir).state_dict()["h.0.attn.c_attn.weight"]
        assert not torch.equal(ddp["transformer.h.0.attn.c_attn.weight"].t(), before)
    ckpt = tmp_path / "ddp" / "checkpoints" / "step-00000006"
    assert sorted(p.name for p in ckpt.glob("rng-*.safetensors")) == ["rng-0.safetensors", "rng-1.safetensors"]


def test_bad_dataset_is_a_one_line_error_and_leaves_no_output(tiny_model_dir, cache, tmp_path):
    # The stage's side of a bad dataset (exit 1, one line, nothing written); each kind of bad entry and
    # its message is the parser's test (test_data.py::test_bad_datasets_are_one_line_errors).
    (tmp_path / "bad.json").write_text('[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 5}]')
    message = "entry 1: field 'output' must be a string, got int"
    result = cli(
        "finetune",
        "--model-dir",
        tiny_model_dir,
        "--data",
        tmp_path / "bad.json",
        "--cache",
        cache,
        "--output",
        tmp_path / "out",
        "--log-format",
        "json",
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_flag_is_a_usage_error(tmp_path):
    result = cli("finetune", "--batch-size", "eight", "--output", tmp_path / "out")
    assert result.returncode == 2 and "Invalid value for '--batch-size'" in result.stderr
    result = cli("finetune", "--lr", "-1", "--output", tmp_path / "out")
    assert result.returncode == 2 and "lr must be positive" in result.stderr
    assert not (tmp_path / "out").exists()


def test_batches_padded_to_a_multiple_of_16_train_as_the_books_shapes_do(tiny_model_dir, cache, tmp_path):
    """Few shapes for a GPU (issue 18's first lever): the same losses, weights and tokens in fp32 on the CPU."""
    from job.data.instructions import Collator, Example

    examples = [Example(list(range(1, n + 1)), 3) for n in (5, 23, 9)]
    inputs, targets = Collator(100, False, pad_to_multiple=16)(examples)
    plain_inputs, plain_targets = Collator(100, False)(examples)
    assert inputs.shape == (3, 32) and plain_inputs.shape == (3, 23)
    assert torch.equal(inputs[:, :23], plain_inputs) and torch.equal(targets[:, :23], plain_targets)
    assert (targets[:, 23:] == -100).all()

    runs = {}
    for name, extra in (("plain", {}), ("padded", {"pad_to_multiple": 16})):
        out = tmp_path / name
        cfg = _cfg(tiny_model_dir, cache, out, lr=5e-5, max_steps=20, eval_freq=5, precision="fp32", **extra)
        run_finetune(cfg)
        runs[name] = (json.loads((out / "losses.json").read_text()), _weights(out))
    (plain, plain_w), (padded, padded_w) = runs["plain"], runs["padded"]
    assert [h["tokens_seen"] for h in padded] == [h["tokens_seen"] for h in plain]  # counted as the book counts
    for key in ("train_loss", "val_loss"):
        assert [h[key] for h in padded] == pytest.approx([h[key] for h in plain], abs=1e-5)
    assert max((padded_w[k] - plain_w[k]).abs().max().item() for k in plain_w) < 1e-5


def test_one_forward_per_evaluation_gives_the_per_batch_losses(tiny_model_dir, cache, tmp_path):
    """--batched-eval (issue 18's second lever): the 5 + 5 batches of an evaluation in one forward pass."""
    histories = {}
    for name, batched in (("eager", False), ("batched", True)):
        out = tmp_path / name
        run_finetune(_cfg(tiny_model_dir, cache, out, max_steps=6, eval_freq=2, batched_eval=batched))
        histories[name] = json.loads((out / "losses.json").read_text())
    eager, batched = histories["eager"], histories["batched"]
    assert len(eager) == len(batched) == 3
    for key in ("train_loss", "val_loss"):
        assert [h[key] for h in batched] == pytest.approx([h[key] for h in eager], abs=1e-5)


def test_no_untie_head_keeps_gpt2s_tied_head_and_transformers_reads_it_tied(tiny_model_dir, cache, tmp_path):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "tied"
    run_finetune(_cfg(tiny_model_dir, cache, out, max_steps=2, untie_head=False, checkpoint_every=1000))
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in _weights(out)
    ours = load_pretrained(out / "model").eval()
    theirs = GPT2LMHeadModel.from_pretrained(out / "model").eval()
    assert ours.head_tied and theirs.lm_head.weight is theirs.transformer.wte.weight
    idx = torch.tensor([[464, 3290, 318, 257, 1332]])
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, rtol=0, atol=1e-5)
    # the book's default, for contrast: the head trained apart and saved as its own matrix
    untied = tmp_path / "untied"
    run_finetune(_cfg(tiny_model_dir, cache, untied, max_steps=2, checkpoint_every=1000))
    assert "lm_head.weight" in _weights(untied)


def test_seeded_data_order_trains_on_one_shuffle_per_epoch(tiny_model_dir, cache, tmp_path):
    """--data-order seeded: each epoch's batches from its own permutation (seed * 1000 + epoch), as the
    tokens seen after each step show (each batch counts batch x its longest sequence, as the book counts)."""
    import itertools

    from job.data.instructions import load_entries, split_entries, tokenize
    from job.data.order import BookOrder, SeededOrder

    train = split_entries(load_entries(cache / "instruction-data.json"))[0]
    lengths = [len(e.token_ids) for e in tokenize(train, load_tokenizer(cache / "gpt2"), PROMPT_STYLES["alpaca"], 1024)]

    def tokens_seen(batches):
        return list(itertools.accumulate(len(b) * max(lengths[i] for i in b) for b in batches))

    seeded = SeededOrder(len(train), 8, 5, seed=5).epoch_batches(0)[:5]
    book = BookOrder(len(train), 8, 2, 1, 5, seed=5).epoch_batches(0)[:5]
    assert tokens_seen(seeded) != tokens_seen(book)
    out = tmp_path / "seeded"
    cfg = _cfg(tiny_model_dir, cache, out, max_steps=5, eval_freq=1, eval_iter=1, seed=5, data_order="seeded")
    run_finetune(cfg)
    history = json.loads((out / "losses.json").read_text())
    assert [h["tokens_seen"] for h in history] == tokens_seen(seeded)


def test_validation_entries_with_nothing_to_train_are_left_out_counted_and_a_split_of_only_them_named(
    qwen3_dir, cache, tmp_path, book_data
):
    """As the training split: an entry whose answer lies past --allowed-max-length is left out with a count
    naming the split; a validation split left with none is exit 1 naming it and its file, nothing written."""
    common = ["--cache", cache, "--max-steps", "1", "--batch-size", "2", "--allowed-max-length", "200"]
    common += ["--log-format", "json"]
    data = conversations_file(tmp_path / "all.json", book_data, range(57, 60))
    refused = cli("finetune", "--model-dir", qwen3_dir, "--data", data, "--output", tmp_path / "a", *common)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert refused.stderr.splitlines() == [
        f"Error: dataset {data}: none of the 3 messages entries of its validation split has a token to train on "
        "within --allowed-max-length 200: raise it or shorten those entries"
    ]
    assert not (tmp_path / "a").exists()
    data = conversations_file(tmp_path / "one.json", book_data, range(59, 60))
    trained = cli("finetune", "--model-dir", qwen3_dir, "--data", data, "--output", tmp_path / "b", *common)
    assert trained.returncode == 0, trained.stderr[-2000:]
    [left_out] = [e for e in events(trained.stdout) if e["event"] == "examples_without_trained_tokens"]
    assert (left_out["split"], left_out["count"], left_out["of"]) == ("validation", 1, 3)
