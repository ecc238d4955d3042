"""What finetune and DPO share: where the starting model comes from and what it is called, and the outputs a
training stage writes from a typed record of what was trained."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from job.config import DPOConfig, FinetuneConfig
from job.models.gpt2 import GPTModel, gpt2_config
from job.models.gpt2_weights import save_hf
from job.models.hub import cached_model_dir
from job.models.lora import add_adapters
from job.training.outputs import Adapter, Trained, write_outputs
from job.training.stage_io import load_model
from job.training.starting_model import starting_model
from job.training.train_config import lora_layers

HISTORY = [{"step": 0, "epoch": 1, "tokens_seen": 40, "train_loss": 3.0, "val_loss": 3.1}]


@pytest.mark.parametrize("cls", [FinetuneConfig, DPOConfig])
def test_a_folder_of_ones_own_is_its_own_adapter_base_and_a_named_model_its_hub_id(cls, tiny_model_dir, tmp_path):
    own = starting_model(cls(model_dir=str(tiny_model_dir), cache=str(tmp_path)))
    assert (own.folder, own.hub_id, own.adapter_base) == (tiny_model_dir, None, str(tiny_model_dir))
    named = starting_model(cls(model="gpt2-small", cache=str(tmp_path)))
    assert named.folder == cached_model_dir(cls(model="gpt2-small", cache=str(tmp_path)))
    assert named.adapter_base == named.hub_id == "openai-community/gpt2"
    # --model-dir at the named model's own cache folder is the named model: PEFT names the hub's id
    cached = cls(model="gpt2-small", cache=str(tmp_path), model_dir=str(named.folder))
    assert starting_model(cached).adapter_base == "openai-community/gpt2"
    assert not (tmp_path / "gpt2").exists()  # nothing fetched until asked


def test_the_book_style_name_is_the_size_a_folder_holds_or_the_familys_custom_one(tiny_model_dir, tmp_path):
    own = starting_model(FinetuneConfig(model_dir=str(tiny_model_dir), cache=str(tmp_path)))
    assert load_model("gpt2-medium", own)[1] == "gpt2-custom"
    small = tmp_path / "small"
    save_hf(GPTModel(gpt2_config("gpt2-small")), small)
    assert load_model("gpt2-medium", starting_model(FinetuneConfig(model_dir=str(small))))[1] == "gpt2-small124M"
    cfg = FinetuneConfig(model="gpt2-small", cache=str(tmp_path / "cache"))
    shutil.copytree(tiny_model_dir, cached_model_dir(cfg))  # as downloaded: named, it is called by its name
    named = FinetuneConfig(model="gpt2-small", cache=cfg.cache, model_dir=str(cached_model_dir(cfg)))
    assert load_model("gpt2-small", starting_model(named))[1] == "gpt2-small124M"


def test_the_outputs_record_what_was_trained_and_with_lora_the_adapter_naming_its_base(tiny_model_dir, tmp_path):
    from job.models.families import load_model as load_folder

    model = load_folder(tiny_model_dir)
    add_adapters(model, 2, 4.0, lora_layers("attn"), 0.1, seed=0)
    trained = Trained(HISTORY, steps=3, tokens_seen=120, epochs=2 / 3)
    written = write_outputs(
        model, tmp_path, trained, book_name="gpt2-custom", prompt_style="phi3", adapter=Adapter("my/base", 0.1)
    )
    config = json.loads((tmp_path / "model" / "config.json").read_text())["sft_job"]
    assert config == {"prompt_style": "phi3", "trained": {"steps": 3, "tokens_seen": 120, "epochs": 0.6667}}
    adapter = json.loads((written["adapter"] / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["lora_dropout"]) == ("my/base", 0.1)
    assert json.loads((tmp_path / "losses.json").read_text()) == HISTORY
    written_files = ["adapter", "gpt2-custom-sft.pth", "loss-plot.png", "losses.json", "model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == written_files
    assert torch.load(tmp_path / "gpt2-custom-sft.pth")["tok_emb.weight"].shape[0] == model.cfg.vocab_size
