"""Preference tuning with DPO, point for point with the book's ch07/04 ("DPO from scratch"): its collate
and masks, its log-probabilities and loss (a reference written here from the notebook's formulas), its
printed example batch, the loss at the start, and the stage end to end."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from job.config import DPOConfig
from job.core.errors import ExitCode
from job.data.instructions import PROMPT_STYLES
from job.data.preference import Pair, collate_pairs, tokenize_pairs
from job.models.gpt2 import GPTConfig, GPTModel
from job.models.lora import adapters_off, add_adapters
from job.models.tokenizer import END_OF_TEXT_ID, load_tokenizer
from job.stages.dpo import dpo_task, run_dpo
from job.training.objectives import Reference, dpo_losses, sequence_logprobs
from tests.helpers import cli, events, finetune_run

ALPACA = PROMPT_STYLES["alpaca"]


@pytest.fixture(scope="module")
def preference_data(shared_data):
    return json.loads((shared_data / "instruction-data-with-preference.json").read_text())


def _book_collate(batch: list[dict], pad=END_OF_TEXT_ID, allowed_max_length=None):
    """The notebook's ``custom_collate_fn`` (mask_prompt_tokens=True), as it reads."""
    width = max(max(len(item["chosen"]) + 1, len(item["rejected"]) + 1) for item in batch)
    out = {"chosen": [], "rejected": [], "chosen_mask": [], "rejected_mask": []}
    for item in batch:
        for key in ("chosen", "rejected"):
            sequence = item[key]
            mask = torch.ones(width).bool()
            mask[len(sequence) :] = False
            mask[: len(item["prompt"]) + 2] = False
            out[key].append(torch.tensor(sequence + [pad] * (width - len(sequence))))
            out[f"{key}_mask"].append(mask)
    return {k: torch.stack(v)[:, :allowed_max_length] for k, v in out.items()}


def _book_items(entries, tokenizer):
    """The notebook's ``PreferenceDataset`` items."""
    items = []
    for entry in entries:
        prompt = ALPACA.format_input(entry)
        items.append(
            {
                "prompt": tokenizer.encode(prompt),
                "chosen": tokenizer.encode(f"{prompt}\n\n### Response:\n{entry['chosen']}"),
                "rejected": tokenizer.encode(f"{prompt}\n\n### Response:\n{entry['rejected']}"),
            }
        )
    return items


def test_the_books_example_batch_is_collated_as_the_notebook_prints_it(preference_data, tokenizer_dir):
    """The notebook's first two entries: an (2, 81) batch whose first chosen mask is 50 False, 24 True, 7 False."""
    tokenizer = load_tokenizer(tokenizer_dir)
    pairs = tokenize_pairs(preference_data[:2], tokenizer, ALPACA, 1024)
    chosen, rejected, chosen_mask, rejected_mask = collate_pairs(pairs, 1024)
    assert chosen.shape == rejected.shape == (2, 81)
    assert chosen_mask[0].tolist() == [False] * 50 + [True] * 24 + [False] * 7
    assert chosen[0, :5].tolist() == [21106, 318, 281, 12064, 326] and chosen[0, -7:].tolist() == [END_OF_TEXT_ID] * 7
    assert tokenizer.decode(chosen[0][chosen_mask[0]].tolist()) == (
        '### Response:\nThe spelling of the given phrase "freind" is incorrect, the correct spelling is "friend".'
    )


@pytest.mark.parametrize("limit", [1024, 60])
def test_collate_and_masks_equal_the_notebooks_on_the_books_data(preference_data, tokenizer_dir, limit):
    tokenizer = load_tokenizer(tokenizer_dir)
    entries = preference_data[100:116]
    ours = collate_pairs(tokenize_pairs(entries, tokenizer, ALPACA, 1024), limit)
    book = _book_collate(_book_items(entries, tokenizer), allowed_max_length=limit)
    for got, key in zip(ours, ("chosen", "rejected", "chosen_mask", "rejected_mask"), strict=True):
        assert torch.equal(got, book[key]), key


def _book_logprobs(logits, labels, selection_mask):
    """The notebook's ``compute_logprobs``."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    selected = torch.gather(input=log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    mask = selection_mask[:, 1:].clone()
    selected = selected * mask
    return selected.sum(-1) / mask.sum(-1)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 4),
    width=st.integers(3, 12),
    seed=st.integers(0, 2**31),
    beta=st.floats(0.01, 1.0),
)
def test_logprobs_and_loss_follow_the_notebooks_formulas(rows, width, seed, beta):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 17, (rows, width), generator=g)
    mask = torch.rand(rows, width, generator=g) > 0.4
    mask[:, -1] = True  # at least one masked-in target per row
    logits = [torch.randn(rows, width, 17, generator=g) for _ in range(4)]
    ours = [sequence_logprobs(x, tokens, mask, "mean") for x in logits]
    book = [_book_logprobs(x, tokens, mask) for x in logits]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, book, strict=True))
    summed = sequence_logprobs(logits[0], tokens, mask, "sum")
    assert torch.allclose(summed, book[0] * mask[:, 1:].sum(-1), atol=1e-5)
    losses, chosen, rejected = dpo_losses(*ours, beta)
    # compute_dpo_loss: -logsigmoid(beta * ((pc - pr) - (rc - rr))), rewards p - r
    pc, pr, rc, rr = book
    assert torch.allclose(losses, -F.logsigmoid(beta * ((pc - pr) - (rc - rr))), atol=1e-6)
    assert torch.allclose(chosen, pc - rc, atol=1e-6) and torch.allclose(rejected, pr - rr, atol=1e-6)


def test_pairs_with_no_response_left_within_the_context_are_left_out(preference_data, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    pairs = tokenize_pairs(preference_data[:20], tokenizer, ALPACA, 1024)
    short = tokenize_pairs(preference_data[:20], tokenizer, ALPACA, 46)
    kept = [p for p in pairs if max(p.chosen_start, p.rejected_start) < min(len(p.chosen), len(p.rejected), 46)]
    assert [p.chosen_start for p in short] == [p.chosen_start for p in kept] and 0 < len(short) < 20
    _, _, chosen_mask, rejected_mask = collate_pairs(short, 46)
    assert (chosen_mask[:, 1:].sum(-1) > 0).all() and (rejected_mask[:, 1:].sum(-1) > 0).all()  # no 0/0


def _dpo_cfg(model_dir, cache, out, **kw) -> DPOConfig:
    settings = dict(train_limit=40, eval_freq=2, eval_iter=2, precision="fp32", batch_size=4)
    return DPOConfig(
        model_dir=str(model_dir),
        data=str(cache / "instruction-data-with-preference.json"),
        cache=str(cache),
        output=str(out),
        **settings | kw,
    )


def test_before_any_update_the_loss_is_ln2_and_the_margins_zero(tiny_model_dir, cache, tmp_path):
    task, _ = dpo_task(_dpo_cfg(tiny_model_dir, cache, tmp_path))
    figures = task.evaluator(task.model.eval(), [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert figures["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert figures["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    for split in ("train", "val"):
        assert figures[f"{split}_chosen_reward"] == figures[f"{split}_rejected_reward"] == 0.0


def test_a_lora_reference_is_the_base_without_its_adapters():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2)).eval()
    inputs = torch.randint(0, 64, (2, 10))
    base = model(inputs)
    add_adapters(model, 4, 16.0, {"attn.c_attn", "mlp.c_fc", "lm_head"}, 0.0, seed=1)
    for name, p in model.named_parameters():
        if name.endswith(".B"):
            p.data.normal_()  # adapters that change the output
    assert not torch.allclose(model(inputs), base)
    with adapters_off(model):
        assert torch.equal(model(inputs), base)
    model.train()
    assert torch.equal(Reference(None).logits(model, inputs), base) and model.training
    assert not torch.allclose(model.eval()(inputs), base)  # switched back on


@pytest.mark.parametrize("lora", [False, True])
def test_training_grows_the_reward_margin_and_writes_the_outputs(tiny_model_dir, cache, tmp_path, lora):
    """Eight pairs, two batches an epoch: every evaluation's training estimate is all eight, so the margin on
    them moves only by training."""
    extra = {"lora_rank": 8, "lr": 2e-2} if lora else {"lr": 2e-3}
    cfg = _dpo_cfg(tiny_model_dir, cache, tmp_path, train_limit=8, epochs=6, eval_freq=4, **extra)
    outputs = run_dpo(cfg)
    history = json.loads((tmp_path / "losses.json").read_text())
    assert [h["step"] for h in history] == [0, 4, 8]
    margins = [h["train_chosen_reward"] - h["train_rejected_reward"] for h in history]
    assert margins[-1] > margins[0] and history[-1]["train_loss"] < history[0]["train_loss"]
    expected = {"model", "pth", "losses", "plot", "margins_plot"} | ({"adapter"} if lora else set())
    assert set(outputs) == expected and all(p.exists() for p in outputs.values())
    assert outputs["pth"].name == "gpt2-custom-dpo.pth"
    assert (tmp_path / "reward-margins-plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_run_ends_with_the_same_weights_as_a_straight_one(tiny_model_dir, cache, tmp_path):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_dpo(_dpo_cfg(tiny_model_dir, cache, straight, lr=1e-3, max_steps=6))
    run_dpo(_dpo_cfg(tiny_model_dir, cache, resumed, lr=1e-3, max_steps=3))  # checkpointed at 3
    run_dpo(_dpo_cfg(tiny_model_dir, cache, resumed, lr=1e-3, max_steps=6))  # resumes from step 3
    a, b = (load_file(str(p / "model" / "model.safetensors")) for p in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "losses.json").read_text()) == json.loads((resumed / "losses.json").read_text())


def test_an_entry_without_a_rejected_response_is_exit_1_naming_it(tiny_model_dir, cache, tmp_path):
    entries = json.loads((cache / "instruction-data-with-preference.json").read_text())[:30]
    del entries[7]["rejected"]
    data = tmp_path / "pref.json"
    data.write_text(json.dumps(entries))
    result = cli("dpo", "--model-dir", tiny_model_dir, "--data", data, "--cache", cache, "--output", tmp_path)
    assert result.returncode == ExitCode.BAD_DATA, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: dataset {data}: entry 7: field 'rejected' is missing (preference data needs chosen and rejected "
        "responses) (--skip-invalid drops such entries)"
    ]
    assert not (tmp_path / "model").exists()


def test_train_on_is_finetunes_dpo_alone_refuses_it_and_run_keeps_it_for_its_finetune(tiny_model_dir, cache, tmp_path):
    """A pair trains on its responses whatever --train-on says: ``sft-job dpo --train-on last`` (flag, variable
    or config file) is exit 2 before anything is written, never silently ignored; run's DPO stage is built
    without it (the run's --train-on is its finetune's)."""
    config = tmp_path / "job.yaml"
    config.write_text("train_on: all\n")
    for extra, env in ((["--train-on", "last"], {}), ([], {"SFT_JOB_TRAIN_ON": "last"}), (["--config", config], {})):
        done = cli(*_dpo_args(tiny_model_dir, cache, tmp_path / "out", *extra), env=env)
        assert done.returncode == ExitCode.BAD_CONFIG and len(done.stderr.splitlines()) == 1, done.stderr
        assert "applies to finetune's messages data; DPO trains on each pair's chosen and rejected" in done.stderr
    assert not (tmp_path / "out").exists()  # run --dpo --train-on last: tests/e2e/test_formats_run.py


def _dpo_args(model_dir, cache, out, *extra) -> list:
    data = cache / "instruction-data-with-preference.json"
    small = ["--train-limit", "8", "--batch-size", "4", "--max-steps", "2", "--precision", "fp32"]
    return ["dpo", "--model-dir", model_dir, "--data", data, "--cache", cache, "--output", out, *small, *extra]


def test_dpo_prompts_as_the_model_was_finetuned_unless_told_otherwise_with_a_warning(tiny_model_dir, cache, tmp_path):
    small = ["--train-limit", "8", "--batch-size", "4", "--max-steps", "1", "--precision", "fp32"]
    finetuned = cli(*finetune_run(tiny_model_dir, cache, tmp_path / "sft", "--prompt-style", "phi3", *small))
    assert finetuned.returncode == 0, finetuned.stderr[-2000:]
    model = tmp_path / "sft" / "model"
    result = cli(*_dpo_args(model, cache, tmp_path / "dpo", "--log-format", "json"))
    assert result.returncode == 0, result.stderr[-2000:]
    [started] = [e for e in events(result.stdout) if e["event"] == "dpo_start"]
    [sample] = [e for e in events(result.stdout) if e["event"] == "sample"]
    assert started["prompt_style"] == "phi3" and sample["prompt"].startswith("<|user|>\n")  # the prompts: phi3's
    assert not [e for e in events(result.stdout) if e["event"] == "prompt_style_differs_from_model"]
    recorded = json.loads((tmp_path / "dpo" / "model" / "config.json").read_text())["sft_job"]
    assert recorded["prompt_style"] == "phi3"
    assert yaml.safe_load((tmp_path / "dpo" / "config.yaml").read_text())["prompt_style"] == "phi3"
    # one that differs is the user's: used, recorded, and warned about in one line naming both
    told = cli(*_dpo_args(model, cache, tmp_path / "told", "--prompt-style", "alpaca", "--log-format", "json"))
    assert told.returncode == 0, told.stderr[-2000:]
    [warned] = [e for e in events(told.stdout) if e["event"] == "prompt_style_differs_from_model"]
    assert (warned["prompt_style"], warned["finetuned_with"]) == ("alpaca", "phi3")
    [sample] = [e for e in events(told.stdout) if e["event"] == "sample"]
    assert sample["prompt"].startswith("Below is an instruction")
    assert json.loads((tmp_path / "told" / "model" / "config.json").read_text())["sft_job"]["prompt_style"] == "alpaca"


@pytest.mark.parametrize("command", ["dpo", "finetune", "generate", "run"])
def test_prompt_style_help_names_the_chat_template_file_that_wins(command):
    result = cli(command, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "the model's own chat template (chat_template.jinja, else tokenizer_config.json's" in text
    assert ("by default the one the model was finetuned with" in text) == (command in ("dpo", "generate"))


def test_book_log_format_prints_the_notebooks_lines(tiny_model_dir, cache, tmp_path):
    args = ["--model-dir", tiny_model_dir, "--data", cache / "instruction-data-with-preference.json"]
    result = cli(
        "dpo", *args, "--cache", cache, "--output", tmp_path, "--train-limit", "16", "--batch-size", "4",
        "--max-steps", "2", "--eval-freq", "1", "--precision", "fp32", "--log-format", "book",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    number = r"-?\d\.\d{3}"
    pattern = (
        rf"Ep 1 \(Step 00000[01]\): Train loss {number}, Val loss {number}, "
        rf"Train reward margins {number}, Val reward margins {number}"
    )
    assert [bool(re.fullmatch(pattern, line)) for line in lines[:2]] == [True, True]
    assert lines[-1].startswith("Training completed in ")


def test_pairs_are_the_unit_of_the_loss_whatever_the_micro_batches(tiny_model_dir, cache, tmp_path):
    """--grad-accum splits a batch into micro-batches: the same mean over pairs, the same step (within fp32)."""
    from safetensors.torch import load_file

    runs = {}
    for accum in (1, 2, 4):
        out = tmp_path / f"accum{accum}"
        run_dpo(_dpo_cfg(tiny_model_dir, cache, out, lr=1e-3, max_steps=3, grad_accum=accum))
        runs[accum] = load_file(str(out / "model" / "model.safetensors"))
    for accum in (2, 4):
        assert max((runs[accum][k] - runs[1][k]).abs().max().item() for k in runs[1]) < 1e-5


def _pair(prompt: int, chosen: int, rejected: int) -> Pair:
    return Pair(list(range(1, chosen + 1)), list(range(1, rejected + 1)), prompt + 2, prompt + 2)


@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=6))
def test_any_batch_pads_to_its_longest_plus_one_and_masks_prompt_and_padding(shapes):
    pairs = [_pair(p, p + 2 + c, p + 2 + r) for p, c, r in shapes]
    chosen, rejected, chosen_mask, rejected_mask = collate_pairs(pairs, 1024)
    width = max(max(len(x.chosen), len(x.rejected)) for x in pairs) + 1
    assert chosen.shape == rejected.shape == chosen_mask.shape == (len(pairs), width)
    for row, pair in enumerate(pairs):
        for seq, mask in ((pair.chosen, chosen_mask[row]), (pair.rejected, rejected_mask[row])):
            want = [pair.chosen_start <= i < len(seq) for i in range(width)]
            assert mask.tolist() == want


def test_run_dpo_into_s3_trains_dpo_after_finetune_and_judges_both_models(s3, tiny_model_dir, cache, ollama, tmp_path):
    from tests.helpers import events

    s3.create_bucket(Bucket="runs")
    args = [
        "run", "--dpo", "--model-dir", tiny_model_dir, "--data", cache / "instruction-data.json",
        "--dpo-data", cache / "instruction-data-with-preference.json", "--cache", cache,
        "--output", "s3://runs/p", "--run-id", "d1", "--scratch", tmp_path / "scratch", "--judge-url", ollama.url,
        "--train-limit", "16", "--batch-size", "4", "--max-steps", "4", "--eval-freq", "2", "--checkpoint-every", "2",
        "--limit", "4", "--max-new-tokens", "4", "--metrics-port", "0", "--log-format", "json",
    ]  # fmt: skip
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads(s3.get_object(Bucket="runs", Key="p/d1/manifest.json")["Body"].read())
    assert list(manifest["stages"]) == ["download", "finetune", "dpo", "generate", "judge"]
    assert all(s["status"] == "complete" for s in manifest["stages"].values())
    # the finetuned model's responses and scores beside the DPO model's (the run's results at the top)
    assert set(manifest["stages"]["generate"]["artifacts"]) == {
        "sft/instruction-data-with-response.json",
        "instruction-data-with-response.json",
    }
    assert set(manifest["stages"]["judge"]["artifacts"]) == {
        "sft/scores.json",
        "sft/summary.json",
        "scores.json",
        "summary.json",
    }
    dpo_artifacts = set(manifest["stages"]["dpo"]["artifacts"])
    assert dpo_artifacts == {
        "dpo/model/model.safetensors",
        "dpo/model/config.json",
        "dpo/losses.json",
        "dpo/loss-plot.png",
        "dpo/reward-margins-plot.png",
        "dpo/gpt2-custom-dpo.pth",
    }
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix="p/d1/")["Contents"]}
    assert any(k.startswith("p/d1/dpo/checkpoints/step-00000004/") for k in keys)  # apart from finetune's
    assert any(k.startswith("p/d1/checkpoints/step-00000004/") for k in keys)
    starts = [e["model_dir"] for e in events(first.stdout) if e["event"] == "generate_start"]
    assert [d.rsplit("/d1/", 1)[1] for d in starts] == ["model", "dpo/model"]
    dpo_losses = json.loads(s3.get_object(Bucket="runs", Key="p/d1/dpo/losses.json")["Body"].read())
    assert [h["step"] for h in dpo_losses] == [0, 2] and "val_chosen_reward" in dpo_losses[0]
    report = s3.get_object(Bucket="runs", Key="p/d1/report.html")["Body"].read().decode()
    assert "DPO reward margins: training and validation" in report and "DPO last validation reward margin" in report
    compared = report.split('<table id="compared">')[1].split("</table>")[0]
    assert compared.count("<tr>") == 1 + 4 and "After DPO" in compared  # the header and the 4 test entries

    again = cli(*args)  # the same command: every stage verified and skipped
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = [e["stage"] for e in events(again.stdout) if e["event"] == "stage_skipped"]
    assert skipped == ["download", "finetune", "dpo", "generate", "judge"]


def test_sigterm_mid_dpo_exits_75_and_the_rerun_ends_with_the_uninterrupted_weights(tiny_model_dir, cache, tmp_path):
    """With LoRA (the reference is the base under the adapters): preempted, checkpointed, resumed, bit for bit."""
    import signal

    from safetensors.torch import load_file

    from tests.helpers import events, start_cli, wait_for_event

    args = [
        "dpo", "--model-dir", tiny_model_dir, "--data", cache / "instruction-data-with-preference.json",
        "--cache", cache, "--lora-rank", "4", "--lr", "1e-3", "--batch-size", "4", "--train-limit", "64",
        "--eval-freq", "2", "--eval-iter", "1", "--max-steps", "14", "--checkpoint-every", "1000",
        "--precision", "fp32", "--log-format", "json",
    ]  # fmt: skip
    straight = cli(*args, "--output", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    proc = start_cli(*args, "--output", tmp_path / "cut")
    wait_for_event(proc, lambda e: e.get("event") == "eval" and e["step"] >= 4)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == ExitCode.RETRY
    [checkpoint] = (tmp_path / "cut" / "checkpoints").iterdir()
    stopped_at = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert 5 <= stopped_at < 14 and not (tmp_path / "cut" / "model").exists()
    resumed = cli(*args, "--output", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr
    assert any(e["event"] == "resumed" and e["step"] == stopped_at for e in events(resumed.stdout))
    for name in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = (load_file(str(tmp_path / run / name)) for run in ("straight", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (tmp_path / "cut" / "losses.json").read_text() == (tmp_path / "straight" / "losses.json").read_text()


NO_NETWORK = """
import os
import socket

_tried = os.environ["SFT_JOB_TEST_CONNECTIONS"]


def _refuse(what):
    with open(_tried, "a") as f:
        f.write(repr(what) + "\\n")
    raise OSError(101, "Network is unreachable (the test's socket guard)")


def _connect(self, address, _real=socket.socket.connect):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(address)
    return _real(self, address)


def _connect_ex(self, address, _real=socket.socket.connect_ex):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(address)
    return _real(self, address)


def _getaddrinfo(host, *args, **kwargs):
    _refuse(host)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = _connect, _connect_ex, _getaddrinfo
"""


def test_run_smoke_dpo_needs_no_network_and_no_cache(tmp_path):
    """The smoke makes what it needs (its model, its data with chosen and rejected, its byte tokenizer): with
    an empty cache and every network connection refused (a socket guard: connect and name lookups on IPv4
    and IPv6 raise, and are recorded), `run --smoke --dpo` completes without trying one."""
    import subprocess
    import sys

    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    tried = tmp_path / "connections"
    env = {"PYTHONPATH": str(guard), "SFT_JOB_TEST_CONNECTIONS": str(tried)}
    probe = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9', timeout=5)"
    guarded = subprocess.run([sys.executable, "-c", probe], env=os.environ | env, capture_output=True, text=True)
    assert guarded.returncode == 1 and "socket guard" in guarded.stderr and tried.read_text() == "'127.0.0.1'\n"
    tried.unlink()
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    result = cli(
        "run", "--smoke", "--dpo", "--skip-judge", "--cache", cache, "--output", runs, "--run-id", "offline",
        "--metrics-port", "0", "--log-format", "json", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not tried.exists()  # not one connection tried
    run = runs / "offline"
    manifest = json.loads((run / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["download", "finetune", "dpo", "generate"] and manifest["status"] == "complete"
    assert [p.name for p in cache.iterdir()] == ["smoke"]  # nothing downloaded: only the smoke's own data
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"] == config["dpo_data"] == str(cache / "smoke" / "instruction-data.json")
    responses = json.loads((run / "instruction-data-with-response.json").read_text())
    assert len(responses) == 8 and all(isinstance(r["model_response"], str) for r in responses)
    report = (run / "report.html").read_text()
    assert "DPO reward margins: training and validation" in report


@pytest.mark.parametrize("stage", ["finetune", "dpo"])
def test_a_dataset_too_small_for_the_split_fails_before_any_model_loads(stage, preference_data, cache, tmp_path):
    from job.config import FinetuneConfig
    from job.data.instructions import DataError
    from job.data.preference import preference_problem
    from job.training.stage_io import load_inputs
    from job.training.starting_model import starting_model

    data = tmp_path / "one.json"
    data.write_text(json.dumps(preference_data[:1]))  # no training entry in 85 % of one
    cls, check = (FinetuneConfig, None) if stage == "finetune" else (DPOConfig, preference_problem)
    cfg = cls(model_dir=str(tmp_path / "no-model"), data=str(data), cache=str(cache), output=str(tmp_path))
    too_small = rf"^dataset {re.escape(str(data))} of 1 entries is too small for the 85/10/5 split$"
    with pytest.raises(DataError, match=too_small):
        load_inputs(cfg, starting_model(cfg), check) if check else load_inputs(cfg, starting_model(cfg))


def test_conversational_pairs_are_laid_out_by_the_template_whatever_the_prompt_style_and_no_warning_says_otherwise(
    qwen3_dir, cache, tmp_path
):
    """--prompt-style lays the book's pairs out, not TRL's conversations: one that differs from the model's record
    is no warning there, and the DPO model records the template's layout it trained with (chat)."""
    model = tmp_path / "finetuned"
    shutil.copytree(qwen3_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"sft_job": {"prompt_style": "chat"}}))
    preference = json.loads((cache / "instruction-data-with-preference.json").read_text())[:40]
    turns = [
        {"prompt": [{"role": "user", "content": e["instruction"]}]}
        | {k: [{"role": "assistant", "content": e[k]}] for k in ("chosen", "rejected")}
        for e in preference
    ]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(turns))
    small = ["--batch-size", "2", "--max-steps", "1", "--log-format", "json", "--prompt-style", "alpaca"]
    result = cli("dpo", "--model-dir", model, "--data", data, "--cache", cache, "--output", tmp_path / "dpo", *small)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not [e for e in events(result.stdout) if e["event"] == "prompt_style_differs_from_model"]
    assert json.loads((tmp_path / "dpo" / "model" / "config.json").read_text())["sft_job"]["prompt_style"] == "chat"
