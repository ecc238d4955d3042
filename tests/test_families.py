"""A Llama 3.2 and a Qwen3 folder (tiny random weights written by transformers, a tokenizer trained here
with `tokenizers`) through `sft-job run` end to end, from an empty cache: the saved model/ is Hugging Face's
layout that transformers reads back with the same logits, the first validation loss is transformers' on the
book's collate of the same batches, a LoRA adapter on q_proj,v_proj loads onto the base with PEFT, and DPO
trains from the finetuned folder."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

from job.config import RunConfig
from job.errors import ExitCode
from job.families import load_model
from job.observability import Metrics
from job.pipeline import run_pipeline
from tests.helpers import cli
from tests.test_llama import LLAMA, QWEN3

VOCAB = 640  # the trained tokenizer's 600 ids and room: far below GPT-2's end-of-text id, which must not be used
END, PAD = "<|eot_id|>", "<|end_of_text|>"
MODEL_FOLDER = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def _tokenizer(path, book_data) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", PAD, END]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([e["instruction"] + " " + e["input"] + " " + e["output"] for e in book_data], trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": END, "pad_token": PAD}))


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family_dir(request, tmp_path_factory, book_data):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(3)
    shape = dict(vocab_size=VOCAB, max_position_embeddings=1024)
    if request.param == "llama":
        model = LlamaForCausalLM(LlamaConfig(**LLAMA | shape))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**QWEN3 | shape))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    _tokenizer(path, book_data)
    return path


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
def test_dpo_trains_from_the_finetuned_folder_and_generates_with_its_tokenizer(family_dir, shared_data, tmp_path):
    from transformers import AutoModelForCausalLM

    preference = shared_data / "instruction-data-with-preference.json"
    run = _run(family_dir, shared_data, tmp_path, max_steps=1, dpo=True, dpo_data=str(preference))
    assert sorted(p.name for p in (run / "dpo" / "model").iterdir()) == MODEL_FOLDER
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
