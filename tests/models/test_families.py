"""A Llama 3.2 and a Qwen3 folder (tiny random weights written by transformers, a tokenizer trained here
with `tokenizers`) through `sft-job run` end to end, from an empty cache: the saved model/ is Hugging Face's
layout that transformers reads back with the same logits, the first validation loss is transformers' on the
book's collate of the same batches, a LoRA adapter on q_proj,v_proj loads onto the base with PEFT, and DPO
trains from the finetuned folder."""

from __future__ import annotations

import hashlib
import json
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

from job.config import RunConfig
from job.core.errors import ExitCode
from job.core.observability import Metrics
from job.models.families import family, load_model
from job.models.registry import MODELS
from job.run.pipeline import run_pipeline
from tests.family_folders import END, VOCAB, write_family_folder
from tests.file_server import FileServer
from tests.helpers import cli, events

HUB_NAMES = {"llama": "llama3.2-1b", "qwen3": "qwen3-0.6b"}
HF_TOKEN = "hf_SECRET_gated_4b7e19"
MODEL_FOLDER = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family_dir(request, tmp_path_factory, book_data):
    return write_family_folder(tmp_path_factory.mktemp(request.param), request.param, book_data)


def _run(folder, shared_data, out, **extra):
    cfg = RunConfig(
        model_dir=str(folder),
        data=str(shared_data / "instruction-data.json"),
        cache=str(out / "empty-cache"),
        output=str(out),
        run_id="r",
        skip_judge=True,
        eval_freq=1,
        eval_iter=2,
        limit=4,
        max_new_tokens=8,
        metrics_port=0,
        **extra,
    )
    run_pipeline(cfg, Metrics())
    return out / "r"


def _ids(seed=4):
    return torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(seed))


def _book_val_loss(hf, folder, book_data, batches: int) -> float:
    """The book's calc_loss_loader over the validation split, batched by its InstructionDataset and
    custom_collate_fn (the folder's end token as the pad the collate appends), on transformers' logits."""
    from llms_from_scratch.ch05 import calc_loss_loader
    from llms_from_scratch.ch07 import InstructionDataset, custom_collate_fn
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    val = book_data[int(len(book_data) * 0.85) + int(len(book_data) * 0.1) :]
    dataset = InstructionDataset(val, type("Encode", (), {"encode": lambda _, text: tokenizer.encode(text).ids})())
    collate = partial(custom_collate_fn, pad_token_id=tokenizer.token_to_id(END), allowed_max_length=1024)
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate, shuffle=False)

    class Logits(torch.nn.Module):  # the book's loss calls model(inputs) for the logits
        def forward(self, inputs):
            return hf(inputs).logits

    with torch.no_grad():
        return calc_loss_loader(loader, Logits(), torch.device("cpu"), num_batches=batches)


@pytest.mark.slow
def test_a_full_finetune_writes_hugging_faces_folder_with_transformers_logits_and_loss(
    family_dir, shared_data, book_data, tmp_path
):
    from transformers import AutoModelForCausalLM

    run = _run(family_dir, shared_data, tmp_path, max_steps=1)
    assert sorted(p.name for p in (run / "model").iterdir()) == MODEL_FOLDER
    assert not list(run.glob("*.pth"))  # the book's .pth is GPT-2's names only
    assert (run / "model" / "tokenizer.json").read_bytes() == (family_dir / "tokenizer.json").read_bytes()
    manifest = json.loads((run / "manifest.json").read_text())
    assert "model/tokenizer.json" in manifest["stages"]["finetune"]["artifacts"]
    theirs = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(family_dir).eval()
    assert type(theirs) is type(base)
    with torch.no_grad():
        expected = theirs(_ids()).logits
        torch.testing.assert_close(load_model(run / "model").eval()(_ids()), expected, rtol=0, atol=1e-5)
        assert (expected - base(_ids()).logits).abs().max() > 1e-3  # the step trained the saved weights
    # one step, then the first evaluation: the weights saved are the weights evaluated (measured: ~1e-7)
    first = json.loads((run / "losses.json").read_text())[0]
    assert first["val_loss"] == pytest.approx(_book_val_loss(theirs, family_dir, book_data, 2), abs=1e-5)
    responses = json.loads((run / "instruction-data-with-response.json").read_text())
    assert len(responses) == 4 and all(isinstance(r["model_response"], str) for r in responses)


@pytest.mark.slow
def test_lora_on_q_and_v_proj_saves_an_adapter_peft_loads_onto_the_base_with_the_merged_logits(
    family_dir, shared_data, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = _run(family_dir, shared_data, tmp_path, max_steps=3, lora_rank=4, lora_targets="q_proj,v_proj", lr=1e-2)
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    base = AutoModelForCausalLM.from_pretrained(family_dir).eval()
    with torch.no_grad():
        before = base(_ids()).logits
        merged = AutoModelForCausalLM.from_pretrained(run / "model").eval()(_ids()).logits
        peft = PeftModel.from_pretrained(base, run / "adapter").eval()(_ids()).logits
    assert (merged - before).abs().max() > 1e-3  # the adapter moved the model
    torch.testing.assert_close(peft, merged, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_dpo_trains_from_the_finetuned_folder_and_generates_with_its_tokenizer_and_chat_template(
    family_dir, shared_data, tmp_path
):
    from transformers import AutoModelForCausalLM

    preference = shared_data / "instruction-data-with-preference.json"
    run = _run(family_dir, shared_data, tmp_path, max_steps=1, dpo=True, dpo_data=str(preference), prompt_style="chat")
    assert sorted(p.name for p in (run / "dpo" / "model").iterdir()) == MODEL_FOLDER
    for model in (run / "model", run / "dpo" / "model"):
        assert json.loads((model / "config.json").read_text())["sft_job"]["prompt_style"] == "chat"
    # generate on its own, no --prompt-style named: the style the model was trained with, its template's prompts
    args = ["--model-dir", run / "dpo" / "model", "--data", shared_data / "instruction-data.json", "--limit", "2"]
    alone = cli("generate", *args, "--max-new-tokens", "4", "--output", tmp_path / "alone", "--cache", tmp_path)
    assert alone.returncode == 0, alone.stderr[-2000:]
    [start] = [e for e in events(alone.stdout) if e["event"] == "generate_start"]
    assert start["prompt_style"] == "chat"
    with torch.no_grad():
        sft = AutoModelForCausalLM.from_pretrained(run / "model").eval()(_ids()).logits
        dpo = AutoModelForCausalLM.from_pretrained(run / "dpo" / "model").eval()(_ids()).logits
    assert (dpo - sft).abs().max() > 0
    for folder in (run / "sft", run):
        responses = json.loads((folder / "instruction-data-with-response.json").read_text())
        assert len(responses) == 4


def test_lora_targets_naming_only_gpt2s_layers_are_a_one_line_error_on_a_llama_folder(
    family_dir, shared_data, tmp_path
):
    out = tmp_path / "ft"
    args = ["--model-dir", family_dir, "--data", shared_data / "instruction-data.json", "--output", out]
    result = cli("finetune", *args, "--lora-rank", "4", "--lora-targets", "c_attn", "--cache", tmp_path / "cache")
    assert result.returncode == ExitCode.BAD_CONFIG, result.stderr
    assert "--lora-targets names no linear layer of this model (attn.c_attn)" in result.stderr
    assert not (out / "model").exists()


def _hub_repository(folder, into) -> dict[str, bytes]:
    """The folder's files as a hub repository serves them: the weights in shards that an index names."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(into, max_shard_size="200KB")
    files = {p.name: p.read_bytes() for p in into.iterdir() if p.is_file()}
    return files | {name: (folder / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}


@pytest.mark.slow
def test_a_named_model_comes_from_the_hub_in_shards_with_the_token_sent_to_the_hub_alone(
    family_dir, shared_data, tmp_path
):
    """``--model qwen3-0.6b`` / ``llama3.2-1b`` from a local server laid out like the hub (a gated repository
    that answers 401 without the token; the shards redirected to a CDN on another host, as the hub does):
    preflight, download, finetune and generate; then the same cache again with the hub unreachable."""
    from transformers import AutoModelForCausalLM

    name, commit = HUB_NAMES[family(family_dir)], "c0ffee" * 6 + "c0ff"
    repo, resolve = MODELS[name].repo, f"/{MODELS[name].repo}/resolve/{commit}"  # main resolves to the commit
    files = _hub_repository(family_dir, tmp_path / "repository")
    shards = sorted(n for n in files if n.startswith("model-"))
    assert len(shards) >= 2 and "model.safetensors" not in files
    cdn = FileServer({f"/cdn/{n}": files[n] for n in shards})
    redirects = {f"{resolve}/{n}": f"{cdn.url}/cdn/{n}" for n in shards}
    linked = {f"{resolve}/{n}": hashlib.sha256(files[n]).hexdigest() for n in shards}  # checked on arrival
    hub_files = {f"{resolve}/{n}": body for n, body in files.items() if n not in shards}
    hub_files[f"/{repo}/resolve/main/config.json"] = files["config.json"]  # the one file asked by name
    hub = FileServer(hub_files, HF_TOKEN, redirects, linked, commit)
    cache = tmp_path / "cache"
    download = ["download", "--model", name, "--no-dataset", "--download-attempts", "1"]
    with cdn, hub:
        refused = cli(*download, "--hub-url", hub.url, "--cache", tmp_path / "other", env={"HF_TOKEN": ""})
        asked_without = len(hub.authorizations)
        args = ["run", "--model", name, "--hub-url", hub.url, "--data", shared_data / "instruction-data.json"]
        args += ["--cache", cache, "--output", tmp_path / "runs", "--run-id", "r", "--skip-judge", "--max-steps", "1"]
        args += ["--eval-iter", "1", "--limit", "2", "--max-new-tokens", "4", "--metrics-port", "0"]
        result = cli(*args, env={"HF_TOKEN": HF_TOKEN})
    assert refused.returncode == ExitCode.BAD_DATA
    assert "HTTP 401" in refused.stderr and "gated: accept its license on the hub, then set HF_TOKEN" in refused.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{resolve}/model.safetensors" not in [path for path, _ in hub.requests]  # the index said shards
    assert set(hub.authorizations[:asked_without]) == {None}
    assert set(hub.authorizations[asked_without:]) == {f"Bearer {HF_TOKEN}"} and set(cdn.authorizations) == {None}
    assert sorted(p.name for p in (cache / "hf" / repo / "main").iterdir()) == sorted([*files, ".commit"])
    assert f"# model used: {name} ({repo} at {commit})" in (tmp_path / "runs" / "r" / "config.yaml").read_text()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if HF_TOKEN.encode() in p.read_bytes()]
    assert HF_TOKEN not in result.stdout + result.stderr
    run = tmp_path / "runs" / "r"
    assert AutoModelForCausalLM.from_pretrained(run / "model").config.model_type == family(family_dir)
    assert len(json.loads((run / "instruction-data-with-response.json").read_text())) == 2
    offline = cli(*download, "--hub-url", "http://127.0.0.1:9", "--cache", cache)  # nothing listens on port 9
    assert offline.returncode == 0, offline.stderr
