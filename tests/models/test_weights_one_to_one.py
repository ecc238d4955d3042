"""Weights and config.json (hparams.json) describe one model, tensor for tensor: through `sft-job generate`,
a folder whose weights hold more layers than its config, fewer, lack a tensor, carry one no model of the
config has, or hold one of another shape is exit 1 with one line naming the tensors (the first few and
how many), in each family and layout; nothing is written. A head stored beside tied embeddings is read
as transformers reads it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from job import cli
from job.models.families import load_model
from tests.family_folders import write_family_folder
from tests.tf_checkpoint import openai_variables

# (what the file holds against its config, the words the line must hold) per layout: GPT-2 has 12
# tensors a block, Llama 3.2 9, Qwen3 11 (its q_norm and k_norm).
CASES = ["more layers", "fewer layers", "missing tensor", "unknown tensor", "wrong shape"]


def _generate(folder: Path, cache: Path, out: Path, capsys) -> tuple[int, str]:
    argv = ["generate", "--model-dir", folder, "--data", cache / "instruction-data.json", "--limit", "1"]
    argv += ["--max-new-tokens", "2", "--cache", cache, "--output", out]
    with pytest.raises(SystemExit) as exited:
        cli.entrypoint([str(a) for a in argv])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return exited.value.code, lines[0]


def _hf_gpt2_case(source: Path, into: Path, case: str) -> tuple[str, ...]:
    config = json.loads((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    if case == "more layers":
        config["n_layer"] = 1
        expected = ("tensor h.1.attn.c_attn.bias", "(12 in all)", "config.json")
    elif case == "fewer layers":
        config["n_layer"] = 3
        expected = ("missing tensor h.2.attn.c_attn.bias", "(12 missing in all)")
    elif case == "missing tensor":
        del tensors["transformer.h.1.mlp.c_proj.bias"]
        expected = ("missing tensor h.1.mlp.c_proj.bias (1 missing in all)",)
    elif case == "unknown tensor":
        tensors["transformer.h.0.attn.rotary.weight"] = torch.zeros(4)
        expected = ("tensor h.0.attn.rotary.weight (1 in all)",)
    else:
        tensors["transformer.ln_f.weight"] = torch.ones(65)
        expected = ("tensor ln_f.weight has shape (65,), config expects (64,)",)
    into.mkdir()
    (into / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(into / "model.safetensors"), metadata={"format": "pt"})
    return expected


def _openai_case(hf_model, into: Path, case: str) -> tuple[str, ...]:
    import tensorflow as tf

    variables = openai_variables(hf_model)
    hparams = {"n_vocab": 50257, "n_ctx": 128, "n_embd": 64, "n_head": 4, "n_layer": 2}
    if case == "more layers":
        hparams["n_layer"] = 1
        expected = ("tensor model/h1/attn/c_attn/b", "(12 in all)", "hparams.json")
    elif case == "fewer layers":
        hparams["n_layer"] = 3
        expected = ("missing tensor model/h2/attn/c_attn/b", "(12 missing in all)")
    elif case == "missing tensor":
        del variables["model/ln_f/b"]
        expected = ("missing tensor model/ln_f/b (1 missing in all)",)
    elif case == "unknown tensor":
        variables["model/h0/attn/rotary"] = variables["model/ln_f/b"]
        expected = ("tensor model/h0/attn/rotary (1 in all)",)
    else:
        variables["model/wpe"] = variables["model/wpe"][:100]
        expected = ("tensor wpe.weight has shape (100, 64), config expects (128, 64)",)
    into.mkdir()
    (into / "hparams.json").write_text(json.dumps(hparams))
    graph = tf.Graph()
    with graph.as_default():
        made = [tf.compat.v1.Variable(value, name=name) for name, value in variables.items()]
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.train.Saver(made).save(sess, str(into / "model.ckpt"))
    return expected


def _family_case(source: Path, into: Path, case: str) -> tuple[str, ...]:
    shutil.copytree(source, into)
    config = json.loads((into / "config.json").read_text())
    tensors = load_file(str(into / "model.safetensors"))
    per_block = 11 if config["model_type"] == "qwen3" else 9
    if case == "more layers":
        config["num_hidden_layers"] = 1
        expected = ("tensor model.layers.1.input_layernorm.weight", f"({per_block} in all)", "config.json")
    elif case == "fewer layers":
        config["num_hidden_layers"] = 3
        expected = ("missing tensor model.layers.2.input_layernorm.weight", f"({per_block} missing in all)")
    elif case == "missing tensor":
        del tensors["model.layers.1.mlp.up_proj.weight"]
        expected = ("missing tensor model.layers.1.mlp.up_proj.weight (1 missing in all)",)
    elif case == "unknown tensor":
        tensors["model.layers.0.self_attn.rotary_emb.scale"] = torch.zeros(4)
        expected = ("tensor model.layers.0.self_attn.rotary_emb.scale (1 in all)",)
    else:
        tensors["model.norm.weight"] = torch.ones(3)
        expected = ("tensor model.norm.weight has shape (3,), config expects",)
    (into / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(into / "model.safetensors"), metadata={"format": "pt"})
    return expected


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family_dir(request, tmp_path_factory, book_data):
    return write_family_folder(tmp_path_factory.mktemp(request.param), request.param, book_data)


def _refused(folder: Path, expected: tuple[str, ...], cache: Path, tmp_path: Path, capsys) -> None:
    code, line = _generate(folder, cache, tmp_path / "out", capsys)
    assert code == 1 and line.startswith("Error: ") and str(folder) in line, line
    assert all(words in line for words in expected) and len(line) < 400, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


@pytest.mark.parametrize("case", CASES)
def test_gpt2_safetensors_that_do_not_match_config_json_are_one_line_naming_the_tensors(
    case, hf_tiny, cache, tmp_path, capsys
):
    expected = _hf_gpt2_case(hf_tiny[1], tmp_path / "model", case)
    _refused(tmp_path / "model", expected, cache, tmp_path, capsys)


@pytest.mark.parametrize("case", CASES)
def test_an_openai_checkpoint_that_does_not_match_hparams_json_is_one_line_naming_the_tensors(
    case, hf_tiny, cache, tmp_path, capsys
):
    expected = _openai_case(hf_tiny[0], tmp_path / "model", case)
    (tmp_path / "model" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    _refused(tmp_path / "model", expected, cache, tmp_path, capsys)


@pytest.mark.parametrize("case", CASES)
def test_a_llama_or_qwen3_folder_that_does_not_match_config_json_is_one_line_naming_the_tensors(
    case, family_dir, cache, tmp_path, capsys
):
    expected = _family_case(family_dir, tmp_path / "model", case)
    _refused(tmp_path / "model", expected, cache, tmp_path, capsys)


def _with_head(source: Path, into: Path, head: str, embeddings: str, equal: bool) -> torch.Tensor:
    """``source`` with a head stored beside tied embeddings: a copy of them, or weights of its own."""
    shutil.copytree(source, into)
    tensors = load_file(str(into / "model.safetensors"))
    torch.manual_seed(5)
    tensors[head] = tensors[embeddings].clone() if equal else 0.02 * torch.randn_like(tensors[embeddings])
    save_file(tensors, str(into / "model.safetensors"), metadata={"format": "pt"})
    return tensors[head]


@pytest.mark.parametrize("equal", [True, False], ids=["a copy of the embeddings", "a head of its own"])
def test_a_head_stored_beside_tied_embeddings_is_read_as_transformers_reads_it(equal, family_dir, hf_tiny, tmp_path):
    """transformers ties the head to the embeddings where the file's head equals them and keeps a head of
    its own untied (with a warning): the logits are transformers' either way."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 600, (2, 12), generator=torch.Generator().manual_seed(7))
    for source, embeddings in ((hf_tiny[1], "transformer.wte.weight"), (family_dir, "model.embed_tokens.weight")):
        folder = tmp_path / source.name
        config = json.loads((source / "config.json").read_text())
        assert config.get("tie_word_embeddings", True)
        head = _with_head(source, folder, "lm_head.weight", embeddings, equal)
        ours = load_model(folder).eval()
        theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert ours.head_tied == equal
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-5)
        assert torch.equal(ours.lm_head.weight, head)


def test_shards_that_disagree_with_their_index_are_one_line_naming_the_tensor_and_the_shard(family_dir, tmp_path):
    """The index maps a tensor to a shard that lacks it, or a shard holds a tensor the index maps elsewhere:
    either would be read nowhere or twice."""
    from transformers import AutoModelForCausalLM

    from job.models.gpt2_weights import WeightsError
    from job.models.llama_weights import INDEX

    AutoModelForCausalLM.from_pretrained(family_dir).save_pretrained(tmp_path / "m", max_shard_size="100KB")
    index = json.loads((tmp_path / "m" / INDEX).read_text())
    name, shard = "model.norm.weight", index["weight_map"]["model.norm.weight"]
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    moved = index | {"weight_map": index["weight_map"] | {name: other}}
    (tmp_path / "m" / INDEX).write_text(json.dumps(moved))
    with pytest.raises(WeightsError, match=f"maps tensor {name} to {other}, which lacks it"):
        load_model(tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / other)) | {name: torch.ones(64)}
    save_file(tensors, str(tmp_path / "m" / other), metadata={"format": "pt"})
    (tmp_path / "m" / INDEX).write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=f"{other}: holds tensor {name} that {INDEX} does not map to it"):
        load_model(tmp_path / "m")


def test_a_gpt2_tensor_stored_twice_or_an_untied_config_without_a_head_is_one_line(hf_tiny, tmp_path):
    from job.models.gpt2_weights import WeightsError

    tensors = load_file(str(hf_tiny[1] / "model.safetensors"))
    config = json.loads((hf_tiny[1] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors | {"ln_f.bias": tensors["transformer.ln_f.bias"].clone()}, str(tmp_path / "model.safetensors"))
    twice = r"tensor ln_f\.bias is stored twice \(as ln_f\.bias and transformer\.ln_f\.bias\)"
    with pytest.raises(WeightsError, match=twice):
        load_model(tmp_path)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": False}))
    with pytest.raises(WeightsError, match=r"missing tensor lm_head\.weight \(1 missing in all\)"):
        load_model(tmp_path)
