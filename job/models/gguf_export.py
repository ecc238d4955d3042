"""A model as one GGUF file, llama.cpp's format (what Ollama, llama.cpp and LM Studio load), written with
``gguf``, llama.cpp's own Python package: its architecture and hyperparameters, every tensor under GGUF's
name (``gguf``'s table of Hugging Face names) in the layout llama.cpp's ``convert_hf_to_gguf.py`` gives it,
the tokenizer (job/models/gguf_vocab.py) and a chat template. GPT-2 is ``gpt2``, Llama 3 ``llama`` (its query
and key rows permuted as the converter does, Llama 3's frequency stretch as the ``rope_freqs`` tensor), Qwen3
``qwen3``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from job.core.errors import JobError
from job.models.gguf_vocab import Vocabulary
from job.models.gpt2 import GPTModel
from job.models.llama import LlamaConfig, LlamaModel
from job.storage.store import atomic_path

DTYPES = ("f32", "f16", "bf16", "q8_0")
# What a norm's epsilon is for GPT-2 (job/models/gpt2.py's LayerNorm).
GPT2_NORM_EPS = 1e-5


def _gguf():
    try:
        import gguf
    except ImportError:
        raise JobError("GGUF export needs llama.cpp's gguf package: pip install 'sft-job[export]'") from None
    return gguf


def llama_permute(weights: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's query/key rows (each head's first half of dimensions, then its second: rotate_half)
    reordered into pairs of neighbours, the order llama.cpp's rotation for ``llama`` takes (the converter's
    ``LlamaModel.permute``)."""
    return (
        weights.reshape(n_heads, 2, weights.shape[0] // n_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama3_rope_factors(cfg: LlamaConfig) -> torch.Tensor:
    """Llama 3's stretch as the factor each rotary frequency is divided by (llama.cpp's ``rope_freqs``)."""
    scaling = cfg.rope_scaling
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    low_wavelen = scaling.original_context_length / scaling.low_freq_factor
    high_wavelen = scaling.original_context_length / scaling.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = (scaling.original_context_length / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def architecture(model: GPTModel | LlamaModel) -> str:
    if isinstance(model, GPTModel):
        return "gpt2"
    return "qwen3" if model.cfg.qk_norm else "llama"


def hf_named_tensors(model: GPTModel | LlamaModel) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under Hugging Face's names, each as llama.cpp reads it: GPT-2's projections as
    (out, in) (ours are already), a GPT-2 without query/key/value bias with a zero one (llama.cpp's graph
    adds one), Llama's query and key rows permuted; the head only where it is not the embeddings."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if model.head_tied:
        state.pop("lm_head.weight")
    if isinstance(model, GPTModel):
        for i in range(model.cfg.n_layers):
            state.setdefault(f"h.{i}.attn.c_attn.bias", torch.zeros(3 * model.cfg.emb_dim))
        for name, tensor in state.items():
            yield (name if name == "lm_head.weight" else f"transformer.{name}"), tensor
        return
    cfg = model.cfg
    for name, tensor in state.items():
        if not cfg.qk_norm and name.endswith("self_attn.q_proj.weight"):
            tensor = llama_permute(tensor, cfg.n_heads)
        elif not cfg.qk_norm and name.endswith("self_attn.k_proj.weight"):
            tensor = llama_permute(tensor, cfg.n_kv_heads)
        yield (name if name == "lm_head.weight" else f"model.{name}"), tensor
    if cfg.rope_scaling is not None:
        yield "rope_freqs.weight", llama3_rope_factors(cfg)


def stored(gguf, array: np.ndarray, dtype: str) -> tuple[np.ndarray, object]:
    """A tensor in the file's type, as the converter chooses: 1-D ones (norms, biases, rope factors) stay
    f32; q8_0 where rows are whole blocks of 32, else f16."""
    kinds = gguf.GGMLQuantizationType
    if array.ndim <= 1 or dtype == "f32":
        return array.astype(np.float32), kinds.F32
    kind = {"f16": kinds.F16, "bf16": kinds.BF16, "q8_0": kinds.Q8_0}[dtype]
    if kind == kinds.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[kinds.Q8_0][0]:
        kind = kinds.F16
    return gguf.quants.quantize(array, kind), kind


def add_hyperparameters(writer, model: GPTModel | LlamaModel) -> None:
    cfg = model.cfg
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if isinstance(model, GPTModel):
        writer.add_feed_forward_length(4 * cfg.emb_dim)
        writer.add_head_count_kv(cfg.n_heads)
        writer.add_layer_norm_eps(GPT2_NORM_EPS)
        return
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)


def add_vocabulary(writer, gguf, vocab: Vocabulary, chat_template: str | None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_eos_token_id(vocab.end_id)
    writer.add_pad_token_id(vocab.pad_id)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    # The job's prompts carry no begin-of-text token unless their template writes one: neither may llama.cpp's.
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(
    model: GPTModel | LlamaModel, vocab: Vocabulary, path: Path, dtype: str, chat_template: str | None, name: str
) -> Path:
    """``model`` with ``vocab`` as ``path`` (written beside it and renamed: never half a file under the name)."""
    gguf = _gguf()
    arch = architecture(model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.cfg.n_layers)
    vocab = vocab.padded(model.cfg.vocab_size, name)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[dtype]])
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(writer, model)
        add_vocabulary(writer, gguf, vocab, chat_template)
        for hf_name, tensor in hf_named_tensors(model):
            gguf_name = hf_name if hf_name == "rope_freqs.weight" else names.get_name(hf_name, (".weight", ".bias"))
            if gguf_name is None:  # a bug (exit 70): every tensor of the three families has a GGUF name
                raise RuntimeError(f"{name}: tensor {hf_name} has no GGUF name for {arch}")
            data, kind = stored(gguf, tensor.numpy(), dtype)
            writer.add_tensor(gguf_name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
