import collections
import json
import signal

import pytest
import torch

from job.config import GenerateConfig
from job.data.instructions import PROMPT_STYLES, split_entries
from job.models.decoding import generate
from job.models.gpt2 import GPTConfig, GPTModel
from job.models.gpt2_weights import save_hf
from job.models.tokenizer import END_OF_TEXT_ID, encode, load_tokenizer
from job.stages.generate import RESPONSES_FILE, run_generate
from tests.helpers import cli, events, start_cli, wait_for_event


@pytest.fixture(scope="module")
def wide_context_model(tmp_path_factory):
    """Tiny random weights with room for the longest test prompt plus 64 new tokens."""
    torch.manual_seed(7)
    model = GPTModel(GPTConfig(context_length=512, emb_dim=64, n_heads=4, n_layers=2)).eval()
    path = tmp_path_factory.mktemp("wide")
    save_hf(model, path)
    return model, path


@pytest.fixture(scope="module")
def ends_often_model(wide_context_model, tokenizer_dir, book_data, tmp_path_factory):
    """The wide model with end-of-text given 1.05 times the embedding of the token it says most: greedy
    decoding then ends rows at different steps (a random model otherwise never says end-of-text)."""
    model, _ = wide_context_model
    tok = load_tokenizer(tokenizer_dir)
    prompts = [encode(tok, PROMPT_STYLES["alpaca"].format_input(e)) for e in split_entries(book_data)[1][:32]]
    said = collections.Counter(t for row in generate(model, prompts, max_new_tokens=16, eos_id=None) for t in row)
    ends = GPTModel(model.cfg).eval()
    ends.load_state_dict(model.state_dict())
    with torch.no_grad():
        ends.wte.weight[END_OF_TEXT_ID] = 1.05 * ends.wte.weight[said.most_common(1)[0][0]]
    path = tmp_path_factory.mktemp("ends-often")
    save_hf(ends, path)
    return path


@torch.no_grad()
def books_generate(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """The book's loop: one prompt, the whole sequence recomputed each step, argmax, stop at 50256."""
    idx = torch.tensor([ids])
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -model.cfg.context_length :]
        logits = model.lm_head(model.hidden_states(idx_cond)[:, -1])  # the last position's logits
        nxt = torch.argmax(logits, dim=-1, keepdim=True)
        if nxt.item() == END_OF_TEXT_ID:
            break
        idx = torch.cat([idx, nxt], dim=1)
    return idx[0, len(ids) :].tolist()


@pytest.mark.slow
def test_batched_kv_cache_is_token_identical_to_the_books_loop_on_all_110_prompts(
    wide_context_model, tokenizer_dir, book_data
):
    model, _ = wide_context_model
    tok = load_tokenizer(tokenizer_dir)
    test = split_entries(book_data)[1]
    prompts = [encode(tok, PROMPT_STYLES["alpaca"].format_input(e)) for e in test]
    assert len(prompts) == 110
    ours = []
    for i in range(0, 110, 16):
        ours += generate(model, prompts[i : i + 16], max_new_tokens=64)
    books = [books_generate(model, p, 64) for p in prompts]
    mismatches = [i for i, (a, b) in enumerate(zip(ours, books, strict=True)) if a != b]
    assert mismatches == []
    assert sum(len(b) for b in books) > 110 * 32  # the comparison covered long continuations


def test_rows_stop_at_end_of_text_independently():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=1)).eval()
    prompts = [[1, 2, 3], [4, 5], [6]]
    free = generate(model, prompts, 10, eos_id=None)
    assert [len(f) for f in free] == [10, 10, 10]
    # End-of-text: a token row 0 says and then moves on from. A random model repeats tokens, so a row
    # that went on past its end (not dropped from the batch) would show the different token that follows.
    eos = free[0][next(j for j in range(9) if free[0][j + 1] != free[0][j])]
    alone = [generate(model, [p], 10, eos_id=eos)[0] for p in prompts]
    assert alone[0] == free[0][: free[0].index(eos)] and len(alone[0]) <= 2
    assert generate(model, prompts, 10, eos_id=eos) == alone
    assert max(len(a) for a in alone) > len(alone[0])  # the other rows went on


def test_sampling_with_a_seed_is_reproducible(wide_context_model, tokenizer_dir, cache, tmp_path):
    _, path = wide_context_model
    common = dict(
        model_dir=str(path),
        data=str(cache / "instruction-data.json"),
        cache=str(cache),
        max_new_tokens=8,
        limit=12,
        batch_size=5,
        temperature=1.0,
        top_k=50,
        seed=3,
    )
    a = json.loads(run_generate(GenerateConfig(output=str(tmp_path / "a"), **common)).read_text())
    b = json.loads(run_generate(GenerateConfig(output=str(tmp_path / "b"), **common)).read_text())
    c = json.loads(run_generate(GenerateConfig(output=str(tmp_path / "c"), **common | {"seed": 4})).read_text())
    assert [x["model_response"] for x in a] == [x["model_response"] for x in b]
    assert [x["model_response"] for x in a] != [x["model_response"] for x in c]


def test_output_is_the_test_split_with_responses(ends_often_model, cache, book_data, tmp_path):
    path = ends_often_model
    result = cli(
        "generate",
        "--model-dir",
        path,
        "--data",
        cache / "instruction-data.json",
        "--cache",
        cache,
        "--output",
        tmp_path,
        "--max-new-tokens",
        "16",
        "--log-format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / RESPONSES_FILE).read_text())
    test = split_entries(book_data)[1]
    assert [{k: v for k, v in e.items() if k != "model_response"} for e in saved] == test
    assert all(isinstance(e["model_response"], str) for e in saved)
    assert [p.name for p in tmp_path.iterdir()] == [RESPONSES_FILE]
    done = [e for e in events(result.stdout) if e["event"] == "generate_done"][0]
    assert done["decoded"] == 110 and done["tokens_per_second"] > 0
    # rows ended at different steps: some at once (empty), some later, some ran to the 16 tokens
    assert 0 < done["new_tokens"] < 110 * 16 and "" in {e["model_response"] for e in saved}
    assert [e["precision"] for e in events(result.stdout) if e["event"] == "generate_start"] == [
        "fp32"
    ]  # auto on a CPU
    # the fixed-batch decoder through the stage, its finished rows masked: the same file
    fixed = cli("generate", *result.args[4:-2], "--output", tmp_path / "fixed", "--eos-check-every", "2")
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads((tmp_path / "fixed" / RESPONSES_FILE).read_text()) == saved


def test_bf16_on_request_decodes_in_bf16_and_a_bad_precision_is_a_usage_error(wide_context_model, cache, tmp_path):
    _, path = wide_context_model
    args = [
        "generate",
        "--model-dir",
        path,
        "--data",
        cache / "instruction-data.json",
        "--cache",
        cache,
        "--output",
        tmp_path,
        "--max-new-tokens",
        "3",
        "--limit",
        "8",
        "--log-format",
        "json",
    ]
    result = cli(*args, "--precision", "bf16")
    assert result.returncode == 0, result.stderr
    assert [e["precision"] for e in events(result.stdout) if e["event"] == "generate_start"] == ["bf16"]
    assert len(json.loads((tmp_path / RESPONSES_FILE).read_text())) == 8
    bad = cli(*args, "--precision", "fp8")
    assert bad.returncode == 2 and "--precision" in bad.stderr


@pytest.mark.slow
def test_restart_after_a_kill_decodes_only_the_missing_entries(wide_context_model, cache, tmp_path):
    _, path = wide_context_model
    args = [
        "generate",
        "--model-dir",
        path,
        "--data",
        cache / "instruction-data.json",
        "--cache",
        cache,
        "--max-new-tokens",
        "48",
        "--batch-size",
        "10",
        "--log-format",
        "json",
    ]
    proc = start_cli(*args, "--output", tmp_path / "cut")
    progress = wait_for_event(
        proc, lambda e: e.get("event") == "progress" and e["stage"] == "generate" and e["done"] >= 30
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "cut" / RESPONSES_FILE).exists()

    rerun = cli(*args, "--output", tmp_path / "cut")
    assert rerun.returncode == 0, rerun.stderr
    start = [e for e in events(rerun.stdout) if e["event"] == "generate_start"][0]
    done = [e for e in events(rerun.stdout) if e["event"] == "generate_done"][0]
    assert start["already_done"] >= progress["done"]
    assert done["decoded"] == start["to_decode"] == 110 - start["already_done"]
    straight = cli(*args, "--output", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    assert (tmp_path / "cut" / RESPONSES_FILE).read_text() == (tmp_path / "straight" / RESPONSES_FILE).read_text()


def test_the_fixed_batch_decoder_is_token_for_token_the_greedy_decoder_on_the_110_test_prompts(
    tiny_model_dir, shared_data
):
    """Finished rows kept and masked, the end checked every 16 steps (issue 18's graph-ready decoding)."""
    from job.data.instructions import PROMPT_STYLES, load_entries, split_entries
    from job.models.decoding import generate, generate_fixed_batch
    from job.models.gpt2_weights import load_pretrained
    from job.models.tokenizer import encode, load_tokenizer

    model = load_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(shared_data / "gpt2")
    _train, test, _val = split_entries(load_entries(shared_data / "instruction-data.json"))
    prompts = [encode(tokenizer, PROMPT_STYLES["alpaca"].format_input(e))[-60:] for e in test]
    assert len(prompts) == 110
    batches = [prompts[start : start + 16] for start in range(0, 110, 16)]
    # a random tiny model rarely says end-of-text: let its most frequent token end the responses instead,
    # so rows finish at different steps and the masking is exercised
    unbounded = [row for batch in batches for row in generate(model, batch, max_new_tokens=40, eos_id=None)]
    end = collections.Counter(t for row in unbounded for t in row).most_common(1)[0][0]
    expected, got = [], []
    for batch in batches:
        expected += generate(model, batch, max_new_tokens=40, eos_id=end)
        got += generate_fixed_batch(model, batch, max_new_tokens=40, eos_id=end, check_every=16)
    assert got == expected
    lengths = {len(t) for t in expected}
    assert len(lengths) > 1, lengths  # rows ended at different steps, so the masking was exercised


def test_generate_uses_the_prompt_style_the_model_was_finetuned_with(tiny_model_dir, cache, tmp_path):
    from tests.helpers import finetune_run

    trained = cli(*finetune_run(tiny_model_dir, cache, tmp_path / "ft", "--max-steps", "2", "--prompt-style", "phi3"))
    assert trained.returncode == 0, trained.stderr
    model = tmp_path / "ft" / "model"
    common = ["--model-dir", model, "--data", cache / "instruction-data.json", "--cache", cache]
    common += ["--limit", "6", "--max-new-tokens", "6", "--log-format", "json"]

    def responses(name: str, *style: str) -> tuple[str, list[str]]:
        result = cli("generate", *common, "--output", tmp_path / name, *style)
        assert result.returncode == 0, result.stderr
        [start] = [e for e in events(result.stdout) if e["event"] == "generate_start"]
        return start["prompt_style"], [
            e["model_response"] for e in json.loads((tmp_path / name / RESPONSES_FILE).read_text())
        ]

    unnamed = responses("unnamed")  # no --prompt-style: the model's config.json says phi3
    assert unnamed == responses("phi3", "--prompt-style", "phi3") and unnamed[0] == "phi3"
    alpaca = responses("alpaca", "--prompt-style", "alpaca")  # other prompts, other answers
    assert alpaca[0] == "alpaca" and alpaca[1] != unnamed[1]


def _splits(test: list[dict], data_format: str = "alpaca"):
    from job.data.sources import Splits

    return Splits([{"instruction": "t", "output": "o", "score": 1}], test, [], {"test": "d.json"}, data_format)


@pytest.mark.parametrize(
    ("data_format", "column", "refused"),
    [
        ("alpaca", "score", True),
        ("alpaca", "model_response", True),
        ("alpaca", "judge_reply", True),
        ("alpaca", "Score", False),  # another name: kept beside the job's
        ("alpaca", "scores", False),
        ("messages", "output", True),  # would stand for the conversation's last answer
        ("messages", "input", True),
        ("alpaca", "output", False),  # the book's own field
    ],
)
def test_a_test_entrys_column_named_like_a_written_field_is_refused_naming_it(data_format, column, refused):
    from job.data.instructions import DataError
    from job.stages.generate import check_written_fields

    fine = {"instruction": "a", "output": "b"} if data_format == "alpaca" else {"messages": []}
    test = [fine, {**fine, column: "high"}]
    if not refused:
        check_written_fields(_splits(test, data_format))  # the training entry's score is no record's
        return
    with pytest.raises(DataError) as info:
        check_written_fields(_splits(test, data_format))
    assert str(info.value).startswith(f"dataset d.json: test entry 1: column {column!r} has the name of a field ")
    assert str(info.value).endswith(": rename or drop the column")
