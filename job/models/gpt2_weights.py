"""Loading GPT-2 weights from OpenAI's TensorFlow release or Hugging Face's safetensors, and saving them.

Hugging Face's GPT-2 stores its projections as ``Conv1D`` with (in, out) weights; ours are
``nn.Linear`` with (out, in), so 2-D projection weights are transposed on the way in and out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from job.core.errors import JobError
from job.core.parsing import ParseError, load_json, load_safetensors
from job.models.gpt2 import GPTConfig, GPTModel
from job.storage.store import atomic_path


class WeightsError(JobError):
    """A model folder that cannot be read; the message is one line."""


# Hugging Face names (without the "transformer." prefix) that are Conv1D (transposed).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older Hugging Face checkpoints carry; they are not weights.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
# OpenAI variable -> our parameter, per block; "w" weights are (1, in, out) Conv1D kernels.
_OPENAI_BLOCK = {
    "ln_1/g": "ln_1.weight",
    "ln_1/b": "ln_1.bias",
    "attn/c_attn/w": "attn.c_attn.weight",
    "attn/c_attn/b": "attn.c_attn.bias",
    "attn/c_proj/w": "attn.c_proj.weight",
    "attn/c_proj/b": "attn.c_proj.bias",
    "ln_2/g": "ln_2.weight",
    "ln_2/b": "ln_2.bias",
    "mlp/c_fc/w": "mlp.c_fc.weight",
    "mlp/c_fc/b": "mlp.c_fc.bias",
    "mlp/c_proj/w": "mlp.c_proj.weight",
    "mlp/c_proj/b": "mlp.c_proj.bias",
}
_OPENAI_TOP = {"wte": "wte.weight", "wpe": "wpe.weight", "ln_f/g": "ln_f.weight", "ln_f/b": "ln_f.bias"}


def detect_layout(path: str | Path) -> str:
    """``openai`` (hparams.json + TF checkpoint), ``hf`` (config.json + model.safetensors)."""
    path = Path(path)
    if not path.is_dir():
        raise WeightsError(f"model folder {path} does not exist")
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return "hf"
    if (path / "hparams.json").is_file() and (path / "checkpoint").is_file():
        return "openai"
    raise WeightsError(
        f"{path} holds neither config.json + model.safetensors (Hugging Face) nor hparams.json + checkpoint (OpenAI)"
    )


def recorded_settings(model_dir: str | Path) -> dict:
    """What sft-job recorded in a model folder's config.json (``sft_job``: the prompt style it was
    finetuned with, the smoke's tokenizer), or {} (a config.json read back from a bucket may hold anything:
    load_pretrained names what is wrong with it)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return {}
    try:
        recorded = load_json(config.read_bytes(), str(config))
    except ParseError:
        return {}
    ours = recorded.get("sft_job") if isinstance(recorded, dict) else None
    return ours if isinstance(ours, dict) else {}


def read_config(path: str | Path) -> GPTConfig:
    """The model's shape from a local folder in either layout, without reading its weights."""
    path = Path(path)
    if detect_layout(path) == "hf":
        return _config(path / "config.json", config_from_hf)
    return _config(path / "hparams.json", config_from_hparams)


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32) -> GPTModel:
    """A ``GPTModel`` with the weights of a local folder in either layout, every shape checked."""
    path = Path(path)
    if detect_layout(path) == "hf":
        cfg, tensors = _read_hf(path)
    else:
        cfg, tensors = _read_openai(path)
    model = GPTModel(cfg)
    hf = detect_layout(path) == "hf"
    untied = hf and _read_json(path / "config.json").get("tie_word_embeddings", True) is False
    if "lm_head.weight" in tensors or untied:  # saved untied (the book's way of training, a merged LoRA head)
        model.untie_head()
    config = "config.json" if hf else "hparams.json"
    assign_weights(model, tensors, source=str(path), config=config)
    return model.to(dtype)


def listed(names: set[str] | list[str], shown: int = 3) -> str:
    """The first few ``names`` in layer order (h.2 before h.10) and how many more, for a one-line message."""
    ordered = sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])
    head = ", ".join(ordered[:shown])
    return head if len(ordered) <= shown else f"{head} and {len(ordered) - shown} more"


def check_one_to_one(source: str, needed: set[str], found: set[str], config: str = "config.json") -> None:
    """Every tensor the config's shape needs is in the weights, and every tensor in the weights is one of
    them (``transformers`` calls the others missing and unexpected, and starts the missing ones at random)."""
    if missing := needed - found:
        raise WeightsError(f"{source}: missing tensor {listed(missing)} ({len(missing)} missing in all)")
    if extra := found - needed:
        raise WeightsError(
            f"{source}: tensor {listed(extra)} ({len(extra)} in all) not in the model {config} describes: "
            f"the weights and {config} are of different models"
        )


def assign_weights(model: GPTModel, tensors: dict[str, torch.Tensor], source: str, config: str = "config.json") -> None:
    """Copy ``tensors`` (our names) into ``model``, checking that every weight is there, used and fits."""
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.head_tied}
    check_one_to_one(source, set(expected), set(tensors), config)
    for name, target in expected.items():
        if tuple(tensors[name].shape) != tuple(target.shape):
            raise WeightsError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, config expects {tuple(target.shape)}"
            )
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name].to(target.dtype))


def config_from_hf(config: dict) -> GPTConfig:
    return GPTConfig(
        vocab_size=config["vocab_size"],
        context_length=config.get("n_positions", config.get("n_ctx", 1024)),
        emb_dim=config["n_embd"],
        n_heads=config["n_head"],
        n_layers=config["n_layer"],
    )


def config_from_hparams(hparams: dict) -> GPTConfig:
    return GPTConfig(
        vocab_size=hparams["n_vocab"],
        context_length=hparams["n_ctx"],
        emb_dim=hparams["n_embd"],
        n_heads=hparams["n_head"],
        n_layers=hparams["n_layer"],
    )


def _read_json(path: Path) -> dict:
    try:
        value = load_json(path.read_bytes(), str(path))
    except OSError as exc:
        raise WeightsError(f"{path}: not readable ({exc.strerror or exc})") from None
    except ParseError as exc:
        raise WeightsError(str(exc)) from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: not a JSON object")
    return value


def _config(path: Path, reader) -> GPTConfig:
    try:
        return reader(_read_json(path))
    except KeyError as exc:
        raise WeightsError(f"{path}: missing key {exc.args[0]}") from None
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"{path}: {exc}") from None


def _read_hf(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    cfg = _config(path / "config.json", config_from_hf)
    try:
        raw = load_safetensors(path / "model.safetensors")
    except ParseError as exc:
        raise WeightsError(str(exc)) from None
    tied = _read_json(path / "config.json").get("tie_word_embeddings", True)
    tensors = {}
    for stored, tensor in raw.items():
        name = stored.removeprefix("transformer.")
        if name.endswith(_HF_BUFFERS):
            continue  # causal-mask buffers, not weights (transformers ignores them too)
        if name in tensors:
            twice = f"tensor {name} is stored twice (as {name} and transformer.{name})"
            raise WeightsError(f"{path / 'model.safetensors'}: {twice}")
        tensors[name] = tensor.t() if name.endswith(_CONV1D) else tensor
    head, wte = tensors.get("lm_head.weight"), tensors.get("wte.weight")
    if tied and head is not None and wte is not None and torch.equal(head, wte):
        del tensors["lm_head.weight"]  # a tied head saved beside wte: the same weights
    # A head that differs from wte is kept untied though the config says tied, as transformers keeps it.
    return cfg, tensors


def _read_openai(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    try:
        import tensorflow as tf
    except ImportError:
        raise WeightsError(
            f"{path} is an OpenAI TensorFlow checkpoint; reading it needs TensorFlow: pip install 'sft-job[tf]'"
        ) from None
    cfg = _config(path / "hparams.json", config_from_hparams)
    ckpt = tf.train.latest_checkpoint(str(path))
    if ckpt is None:
        raise WeightsError(f"{path}/checkpoint names no readable checkpoint")
    names = {f"model/{k}": v for k, v in _OPENAI_TOP.items()}
    for i in range(cfg.n_layers):
        names.update({f"model/h{i}/{k}": f"h.{i}.{v}" for k, v in _OPENAI_BLOCK.items()})
    available = {name for name, _ in tf.train.list_variables(ckpt)}
    check_one_to_one(str(path), set(names), available, "hparams.json")
    tensors = {}
    for tf_name, ours in names.items():
        array = tf.train.load_variable(ckpt, tf_name)
        tensor = torch.from_numpy(array.copy())
        if tf_name.endswith("/w"):  # (1, in, out) Conv1D kernel -> (out, in)
            if tensor.dim() != 3 or tensor.shape[0] != 1:
                raise WeightsError(f"{path}: tensor {tf_name} has shape {tuple(tensor.shape)}, expected (1, in, out)")
            tensor = tensor[0].t()
        tensors[ours] = tensor
    return cfg, tensors


def hf_config(cfg: GPTConfig, tied: bool = True) -> dict:
    """``config.json`` in Hugging Face's format, so ``transformers`` can read our saved models too."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_layer": cfg.n_layers,
        # the end-of-text token is the vocabulary's last id: GPT-2's 50256, the smoke's bytes' 256
        "bos_token_id": cfg.vocab_size - 1,
        "eos_token_id": cfg.vocab_size - 1,
        "tie_word_embeddings": tied,
    }


def hf_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face's names and Conv1D orientation (the head only if untied)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not model.head_tied:
                out[name] = tensor.detach().to("cpu", torch.float32).contiguous()
            continue
        tensor = tensor.detach().to("cpu", torch.float32)
        out[f"transformer.{name}"] = (tensor.t() if name.endswith(_CONV1D) else tensor).contiguous()
    return out


def save_hf(model: GPTModel, directory: str | Path, extra_config: dict | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (each atomically) that ``load_pretrained`` reads."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(hf_state_dict(model), str(tmp), metadata={"format": "pt"})
    config = hf_config(model.cfg, model.head_tied) | (extra_config or {})
    with atomic_path(directory / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")


def book_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """Our weights under the book's ``GPTModel`` names (``trf_blocks.0.att.W_query.weight``...),
    so ``book_model.load_state_dict(torch.load(path))`` works for the book's readers."""
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    n = model.cfg.context_length
    causal = torch.triu(torch.ones(n, n), diagonal=1)
    out = {
        "tok_emb.weight": sd["wte.weight"],
        "pos_emb.weight": sd["wpe.weight"],
        "final_norm.scale": sd["ln_f.weight"],
        "final_norm.shift": sd["ln_f.bias"],
        "out_head.weight": sd["lm_head.weight"].clone(),
    }
    for i in range(model.cfg.n_layers):
        p, b = f"h.{i}.", f"trf_blocks.{i}."
        for kind, w, bias in zip(
            ("query", "key", "value"),
            sd[p + "attn.c_attn.weight"].chunk(3, dim=0),
            sd[p + "attn.c_attn.bias"].chunk(3, dim=0),
            strict=True,
        ):
            out[f"{b}att.W_{kind}.weight"] = w.clone()
            out[f"{b}att.W_{kind}.bias"] = bias.clone()
        pairs = {
            "att.out_proj": "attn.c_proj",
            "ff.layers.0": "mlp.c_fc",
            "ff.layers.2": "mlp.c_proj",
        }
        for book, ours in pairs.items():
            out[f"{b}{book}.weight"] = sd[f"{p}{ours}.weight"]
            out[f"{b}{book}.bias"] = sd[f"{p}{ours}.bias"]
        for book, ours in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{b}{book}.scale"] = sd[f"{p}{ours}.weight"]
            out[f"{b}{book}.shift"] = sd[f"{p}{ours}.bias"]
        out[f"{b}att.mask"] = causal  # the book's attention keeps its causal mask as a saved buffer
    return out
