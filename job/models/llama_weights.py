"""Llama 3 and Qwen3 weights in Hugging Face's layout: ``config.json`` (``model_type`` llama or qwen3) with
``model.safetensors``, or shards named by ``model.safetensors.index.json``. Read tensor by tensor into
the model (one tensor beside the model at a time, never a second full copy); written back in the same
layout, which ``transformers``' ``AutoModelForCausalLM`` reads as it is."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from job.core.parsing import ParseError, load_json, safetensors_header, short
from job.models.gpt2_weights import WeightsError, check_one_to_one, listed
from job.models.llama import LlamaConfig, LlamaModel
from job.storage.store import atomic_path, atomic_write_text

FAMILIES = ("llama", "qwen3")
INDEX = "model.safetensors.index.json"
MAX_CONFIG_BYTES = 1 << 20


def read_hf_config(path: Path) -> dict:
    """A model folder's config.json, checked to be a Llama 3 or Qwen3 one."""
    file = path / "config.json"
    try:
        config = load_json(file.read_bytes()[: MAX_CONFIG_BYTES + 1], str(file))
    except (OSError, ParseError) as exc:
        raise WeightsError(f"{file}: {exc}") from None
    if not isinstance(config, dict) or config.get("model_type") not in FAMILIES:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise WeightsError(f"{file}: model_type {found!r} is not one of {', '.join(FAMILIES)}")
    return config


def index_shards(index: Path) -> dict[str, str]:
    """An index's map of tensor names to shard files, each a plain file name (an index from a bucket or
    a hub names nothing outside its folder)."""
    try:
        weight_map = load_json(index.read_bytes()[: MAX_CONFIG_BYTES * 16 + 1], str(index)).get("weight_map")
    except (OSError, ParseError, AttributeError) as exc:
        raise WeightsError(f"{index}: {exc}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index}: weight_map is not a table of tensor names to shard files")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", "..") or not shard.endswith(".safetensors"):
            raise WeightsError(f"{index}: shard {short(shard)} is not a .safetensors file name")
    return weight_map


def shard_files(path: Path) -> dict[str, Path]:
    """Each tensor's file: the one model.safetensors, or the shards the index maps them to."""
    if (path / "model.safetensors").is_file():
        names = safetensors_header(path / "model.safetensors")
        return dict.fromkeys(names, path / "model.safetensors")
    index = path / INDEX
    if not index.is_file():
        raise WeightsError(f"{path} holds neither model.safetensors nor {INDEX}")
    weight_map = index_shards(index)
    for shard in set(weight_map.values()):
        if not (path / shard).is_file():
            raise WeightsError(f"{index}: shard {short(shard)} is not a file of {path}")
    return {name: path / shard for name, shard in weight_map.items()}


def load_llama(path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaModel:
    """A ``LlamaModel`` with the weights of a Hugging Face folder, every tensor's presence and shape checked."""
    from safetensors import safe_open

    path = Path(path)
    model = LlamaModel(LlamaConfig.from_hf(read_hf_config(path))).to(dtype)
    files = shard_files(path)
    if "lm_head.weight" in files and model.head_tied and not _head_is_embeddings(files):
        model.untie_head()  # tie_word_embeddings, but a head of its own: transformers keeps it untied too
    expected = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.head_tied)}
    needed = {_hf_name(k) for k in expected}
    check_one_to_one(str(path), needed, set(files) - ({"lm_head.weight"} if model.head_tied else set()))
    _shards_match_index(path, files)
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[_hf_name(name)], []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            safetensors_header(file)  # bounded and in range before safetensors reads it
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    tensor = f.get_tensor(_hf_name(name))
                    if tuple(tensor.shape) != tuple(expected[name].shape):
                        raise WeightsError(
                            f"{file}: tensor {_hf_name(name)} has shape {tuple(tensor.shape)}, "
                            f"config expects {tuple(expected[name].shape)}"
                        )
                    expected[name].copy_(tensor.to(dtype))
    return model


def save_llama(model: LlamaModel, directory: str | Path, config: dict) -> None:
    """``config.json`` (the given Hugging Face config, its dtype float32) and ``model.safetensors``, each
    written atomically, in the layout ``load_llama`` and ``transformers`` read."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        _hf_name(k): v.detach().to("cpu", torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if not (k == "lm_head.weight" and model.head_tied)
    }
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    saved = config | {"torch_dtype": "float32", "tie_word_embeddings": model.head_tied}
    atomic_write_text(directory / "config.json", json.dumps(saved, indent=2) + "\n")


def _shards_match_index(path: Path, files: dict[str, Path]) -> None:
    """Every shard's own table against the index: a tensor the index maps to a shard that lacks it, or
    one a shard holds that the index does not map there, is named (it would be read nowhere, or twice)."""
    if (path / "model.safetensors").is_file():
        return
    for shard in sorted(set(files.values())):
        held = set(_header(shard))
        mapped = {name for name, file in files.items() if file == shard}
        if mapped - held:
            raise WeightsError(f"{path / INDEX}: maps tensor {listed(mapped - held)} to {shard.name}, which lacks it")
        if held - mapped:
            raise WeightsError(f"{shard}: holds tensor {listed(held - mapped)} that {INDEX} does not map to it")


def _header(file: Path) -> dict[str, dict]:
    try:
        return safetensors_header(file)
    except ParseError as exc:
        raise WeightsError(str(exc)) from None


def _head_is_embeddings(files: dict[str, Path]) -> bool:
    """Whether a stored ``lm_head.weight`` equals the token embeddings (then tying them loses nothing)."""
    from safetensors import safe_open

    def read(name: str) -> torch.Tensor:
        with safe_open(str(files[name]), framework="pt") as f:
            return f.get_tensor(name)

    embeddings = files.get("model.embed_tokens.weight")
    return embeddings is not None and torch.equal(read("lm_head.weight"), read("model.embed_tokens.weight"))


def _hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"
