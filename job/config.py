"""Typed configuration: one dataclass per stage, a docstring per field, checks in ``__post_init__``.

The docstrings double as the flags' help text (``field_docs``), so each knob is described once.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import ipaddress
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from job.core.errors import ConfigError
from job.core.parsing import finite, short
from job.models.registry import MODEL_NAMES, ModelName

MIRROR_SCHEMES = ("http", "https", "s3")
REDACTED = "<redacted>"
PREFERENCE_DATA = (  # the book's preference data (ch07/04), as job/stages/download.py knows it
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
    "instruction-data-with-preference.json"
)
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sft-job")


@cache
def _class_bodies(path: str) -> dict[str, list[ast.stmt]]:
    """Every class body in a source file, parsed once (inspect.getsource per class costs ~15 ms)."""
    tree = ast.parse(Path(path).read_text())
    return {node.name: node.body for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal that follows each field in the class body (its docstring)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = _class_bodies(inspect.getsourcefile(klass))[klass.__name__]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def option(
    default,
    *,
    operational: bool = False,
    secret: bool = False,
    section: str | None = None,
    feeds: tuple[str, str] | None = None,
):
    """A field's default and what the job must know of it, declared once, where the field is (as metadata):

    - ``operational``: changes how a run runs, not its results; a rerun of a run id may change it (any other
      change is refused, exit 2), and config.yaml keeps the value the run started with.
    - ``secret``: the value never leaves memory (config.yaml, logs, checkpoints read ``<redacted>``); a secret
      is operational.
    - ``section``: the ``--help`` section, where it is not the declaring dataclass's.
    - ``feeds``: ``(stage, field)``: ``sft-job run`` passes this value to that stage's field of another name
      (``generate_batch_size`` is generate's ``batch_size``); every other field passes to the stage field of
      its own name.
    """
    metadata = {"operational": operational or secret, "secret": secret, "section": section, "feeds": feeds}
    return dataclasses.field(default=default, metadata=metadata)


def operational_options(cls: type) -> set[str]:
    """The fields of ``cls`` a rerun may change."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("operational")}


def stage_values(run_cfg, stage: str, stage_cls: type, **overrides) -> dict:
    """The values ``sft-job run`` gives stage ``stage``'s config ``stage_cls``: each field the run's value of
    the same name, or of the run field that ``feeds`` it; then ``overrides`` (the run folder's paths)."""
    run_fields = dataclasses.fields(run_cfg)
    renamed = {f.metadata["feeds"][1]: f.name for f in run_fields if (f.metadata.get("feeds") or ("",))[0] == stage}
    names = {f.name for f in run_fields}
    values = {}
    for f in dataclasses.fields(stage_cls):
        source = renamed.get(f.name, f.name)
        if source in names:
            values[f.name] = getattr(run_cfg, source)
    return values | overrides


def stage_config(run_cfg, stage: str, stage_cls: type, **overrides):
    """``stage_cls`` built from ``stage_values``."""
    return stage_cls(**stage_values(run_cfg, stage, stage_cls, **overrides))


def redacted(cfg) -> dict:
    """``cfg`` as a dict for writing anywhere: every secret field that is set reads ``<redacted>``."""
    values = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        if f.metadata.get("secret") and values[f.name] is not None:
            values[f.name] = REDACTED
    return values


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def check_value(cls: type, key: str, value):
    """A config file's ``value`` for field ``key`` of ``cls``, checked against the field's type
    (no coercion: 1.5 is not an integer, true is not a number); a ConfigError names the key."""
    hint = typing.get_type_hints(cls)[key]
    if isinstance(value, int | float) and not isinstance(value, bool) and _accepts(hint, str):
        value = str(value)  # YAML reads `judge_wait: 300` and `run_id: 42` as numbers
    if not _matches(hint, value):
        raise ConfigError(f"{key} must be {_describe(hint)}, got {short(value)}")
    return value


def config_file_values(path: str, cls: type | None, known: set[str]) -> dict:
    """The values of a ``--config`` file: a YAML mapping of option names (``known``) to values, each
    checked against ``cls``'s field type. Any other file is a ConfigError naming it, short."""
    from job.core.parsing import MAX_YAML_BYTES, ParseError, load_yaml

    try:
        with open(path, "rb") as f:
            text = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = load_yaml(text, path)
    except ParseError as exc:
        raise ConfigError(str(exc)) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values")
    if "config" in data:  # --config names this file: one naming another would be read by nothing
        raise ConfigError(f"{path}: key config: a config file cannot name another; merge the two files")
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        by_case = {name.lower(): name for name in known - {"config"}}  # SKIP_JUDGE is skip_judge, mistyped
        close = difflib.get_close_matches(unknown[0].lower(), sorted(by_case), n=1)
        hint = f" (did you mean {by_case[close[0]]}?)" if close else ""
        raise ConfigError(f"{path}: unknown key {short(unknown[0])}{hint}")
    # Checked against the fields' types here: click would turn 1.5 into 1 and true into 1.
    names = field_names(cls) if cls else set()
    try:
        return {k: check_value(cls, k, v) if k in names else v for k, v in data.items()}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _accepts(hint, kind: type) -> bool:
    return hint is kind or kind in typing.get_args(hint)


def _matches(hint, value) -> bool:
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _check_published_endpoint(port: int | None, address: str) -> None:
    """metrics_sd_dir publishes the endpoint for a Prometheus elsewhere: it needs one, reachable from there."""
    if port == 0:
        raise ConfigError(
            "metrics_sd_dir publishes the metrics endpoint, which metrics_port 0 turns off: "
            "leave metrics_port unset (a free port) or drop metrics_sd_dir"
        )
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
        loopback = ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)
    except ValueError:
        loopback = address.lower().rstrip(".") in ("localhost", "localhost.localdomain")
    if loopback:
        raise ConfigError(
            f"metrics_sd_dir would publish metrics_address {address}, which only this machine reaches: "
            "set metrics_address to 0.0.0.0 (this machine's name is published) or to its own address"
        )


def _check_url(name: str, value: str | None, schemes: tuple[str, ...]) -> None:
    """``value`` is None or a URL of one of ``schemes`` with a host (or an S3 bucket)."""
    if value is None:
        return
    try:
        parsed = urlparse(value)
    except ValueError:  # an unbalanced [ in the host
        parsed = urlparse("")
    if parsed.scheme not in schemes or not parsed.netloc:
        want = " or ".join(f"{s}://" for s in schemes)
        raise ConfigError(f"{name} must be a {want} URL naming a host or bucket, got {short(value)}")
    if parsed.scheme == "s3" and not BUCKET_RE.fullmatch(parsed.netloc):
        raise ConfigError(
            f"{name}: {short(parsed.netloc)} is not an S3 bucket name (3-63 lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit)"
        )


# S3's rules for bucket names (no IP addresses either); MinIO and Ceph refuse the same.
BUCKET_RE = re.compile(r"(?!\d+\.\d+\.\d+\.\d+$)(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_finite(obj) -> None:
    """Every number of a config is finite: NaN and infinities pass every comparison check (nan <= 0
    is false) and would train a NaN model or never time out; click and YAML both accept them."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not finite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")


def _positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(obj, name)}")


# A hub revision: a branch, tag or commit (letters, digits, '.', '_', '-', '/'; no '..').
REVISION_RE = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


@dataclass
class ModelOrigin:
    """Where a named model comes from: GPT-2's sizes from OpenAI or Hugging Face, the Llama 3.2 and Qwen3
    base models from the Hugging Face hub, each into the cache."""

    MODELS: typing.ClassVar[tuple[str, ...]] = MODEL_NAMES  # the names ``model`` takes (``run`` adds smoke)
    model: ModelName = "gpt2-medium"
    """Named model, fetched into the cache: a GPT-2 size (the book finetunes gpt2-medium, 355M) or a base model
    on the Hugging Face hub (qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b, llama3.2-1b, llama3.2-3b)."""
    source: Literal["openai", "hf"] = option("openai", section="Storage")
    """Where a GPT-2 size comes from: OpenAI's TensorFlow checkpoint (as in the book; reading it needs the tf
    extra) or Hugging Face's safetensors. The hub's models always come from the hub."""
    cache: str = option(DEFAULT_CACHE, operational=True, section="Storage")
    """Folder that holds downloaded weights, tokenizer files and the dataset."""
    base_url: str | None = option(None, operational=True, section="Storage")
    """Mirror to fetch from instead of the public hosts: an http(s):// URL or s3://bucket/prefix laid out
    like the cache."""
    hub_url: str | None = option(None, operational=True, section="Storage")
    """The Hugging Face hub, or a server laid out like it ({hub}/{repo}/resolve/{revision}/{file}), that the
    Llama 3.2 and Qwen3 models come from; defaults to HF_ENDPOINT, else https://huggingface.co."""
    hub_revision: str = option("main", section="Storage")
    """Branch, tag or commit of the hub repository to fetch; a commit pins the weights."""
    hf_token: str | None = option(None, secret=True, section="Storage")
    """Hugging Face access token for gated repositories (Llama 3.2: accept its license on the hub first);
    defaults to HF_TOKEN. Sent to the hub's host only, never logged."""

    def __post_init__(self) -> None:
        check_finite(self)
        if self.model not in self.MODELS:
            raise ConfigError(f"model must be one of {', '.join(self.MODELS)}, got {short(self.model)}")
        if self.source not in ("openai", "hf"):
            raise ConfigError(f"source must be openai or hf, got {short(self.source)}")
        _check_url("base_url", self.base_url, MIRROR_SCHEMES)
        _check_url("hub_url", self.hub_url, ("http", "https"))
        if not isinstance(self.hub_revision, str) or not REVISION_RE.fullmatch(self.hub_revision):
            raise ConfigError(
                f"hub_revision must be a branch, tag or commit (letters, digits, '.', '_', '-', '/'), "
                f"got {short(self.hub_revision)}"
            )


@dataclass
class DownloadConfig(ModelOrigin):
    """What ``sft-job download`` fetches, and from where."""

    dataset: bool = True
    """Also fetch the book's instruction dataset into the cache."""
    download_attempts: int = 5
    """Tries per file for transient errors (dropped connections, 5xx); each resumes the partial file."""

    def __post_init__(self) -> None:
        ModelOrigin.__post_init__(self)
        _positive(self, "download_attempts")


@dataclass
class ModelSourceConfig(ModelOrigin):
    """Which pretrained model a stage starts from."""

    model_dir: str | None = None
    """A local folder to start from instead of --model: GPT-2's (OpenAI's checkpoint or config.json +
    model.safetensors) or a Llama 3 / Qwen3 one in Hugging Face's layout."""


@dataclass
class DataConfig:
    """The instruction dataset and how its entries become training text."""

    data: str = (
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
    )
    """Dataset: a local JSON/JSON Lines file, an http(s):// URL (fetched into the cache) or s3://bucket/key."""
    prompt_style: Literal["alpaca", "phi3", "chat"] = "alpaca"
    """Prompt template: the book's Alpaca text, Phi-3's (exercise 7.1), or chat: the model's own chat template
    (chat_template.jinja, else tokenizer_config.json's; Llama 3 and Qwen3 checkpoints carry one, GPT-2 none)."""
    shuffle_seed: int | None = None
    """Shuffle entries with this seed before the 85/10/5 split (the book splits in file order)."""
    skip_invalid: bool = False
    """Drop entries with a missing or non-string field (and log how many) instead of failing."""
    allowed_max_length: int = 1024
    """Longest training sequence in tokens; longer ones are truncated (and counted in the log)."""

    def __post_init__(self) -> None:
        check_finite(self)
        _positive(self, "allowed_max_length")
        _seed(self, "shuffle_seed")
        if urlparse(self.data).scheme == "s3":
            _check_url("data", self.data, ("s3",))


@dataclass
class TrainConfig(ModelSourceConfig, DataConfig):
    """What every training stage shares: the loop, its checkpoints, LoRA (``finetune`` and ``dpo``)."""

    output: str = option("runs/finetune", operational=True)
    """Folder the model, losses, plot, checkpoints and resolved config are written to."""
    epochs: int = 2
    """Passes over the training split."""
    batch_size: int = 8
    """Examples per optimizer step across all processes (each of N processes takes batch_size / N)."""
    lr: float = 5e-5
    """AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    eval_freq: int = 5
    """Evaluate train and validation loss every this many steps."""
    eval_iter: int = 5
    """Batches of each split an evaluation averages over."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (smoke runs); the epochs still bound it."""
    seed: int = 123
    """Seed of model-independent randomness: data order, dropout, sampling."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision: auto is bf16 on CUDA devices that support it, fp32 elsewhere."""
    grad_accum: int = 1
    """Micro-batches each process splits its share of a --batch-size batch into (less memory, the same step)."""
    grad_clip: float | None = None
    """Clip the gradient norm to this value (off by default, as in the book)."""
    compile: bool = False
    """torch.compile the transformer blocks (pays on GPUs for long runs; adds compile time at the start)."""
    gradient_checkpointing: bool = option(False, operational=True)
    """Keep only each block's input for the backward pass and recompute the rest there: far less activation
    memory (long sequences, large models) for about a third more compute; the same gradients, so a run that
    ran out of memory may be resumed with it."""
    sharding: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every process holds the whole model, its gradients and AdamW's state; fsdp: each holds 1/N of
    them (torch's FSDP2, each transformer block sharded over all processes) and checkpoints are written as
    each process's shards: models too big for one GPU, on the same loop and with the same losses."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many steps (and at each epoch's end and on SIGTERM/SIGUSR1)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep."""
    train_limit: int | None = None
    """Train on only the first N entries of the training split (smoke runs); validation and test are unchanged."""
    data_order: Literal["book", "seeded"] = "book"
    """book: exactly the batches and training-loss estimates of the book's train_model_simple after
    torch.manual_seed(seed) (its DataLoaders' draws replayed); seeded: one shuffle per epoch from the seed."""
    untie_head: bool = True
    """Train the output head as its own copy of the token embeddings, as the book's load_weights_into_gpt
    leaves it (with --data-order book, the book's numbers exactly; the saved model then has both);
    --no-untie-head keeps GPT-2's tied head, as Hugging Face trains it (smaller checkpoints). With LoRA
    the frozen head stays tied: it computes the same either way. GPT-2's only: a Llama 3.2 / Qwen3 head
    trains as its checkpoint has it (tied for the small sizes)."""
    lora_rank: int | None = None
    """Train low-rank adapters of this rank instead of every weight (the book's exercise 7.4 uses 16); the
    base stays frozen, checkpoints hold only the adapters, and the outputs are the merged model plus adapter/."""
    lora_alpha: float = 16.0
    """Scale of the adapters' output, as the book's appendix E applies it (alpha * x @ A @ B; PEFT's
    lora_alpha is this times the rank)."""
    lora_targets: str = "all"
    """Layers that get adapters: all (every linear layer, as the book), or a comma list of attn, mlp, head,
    or Hugging Face's names: GPT-2's c_attn, c_proj (both), attn.c_proj, mlp.c_proj, c_fc, Llama 3 /
    Qwen3's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, and lm_head."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (PEFT's lora_dropout; the book has none)."""
    checkpoint_key_file: str | None = option(None, operational=True)
    """File holding a key (16 bytes or more; a mounted Secret) that signs each checkpoint's index
    (HMAC-SHA256): with it, a checkpoint without a valid signature is never resumed from, so a bucket
    writer without the key cannot forge one."""

    def __post_init__(self) -> None:
        ModelSourceConfig.__post_init__(self)
        DataConfig.__post_init__(self)
        _positive(
            self,
            "epochs",
            "batch_size",
            "lr",
            "eval_freq",
            "eval_iter",
            "grad_accum",
            "checkpoint_every",
            "keep_checkpoints",
        )
        for name in ("max_steps", "train_limit", "grad_clip"):
            if getattr(self, name) is not None:
                _positive(self, name)
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        _seed(self, "seed")
        if self.lora_rank is not None:
            _positive(self, "lora_rank", "lora_alpha")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        lora_layers(self.lora_targets)  # refuses an unknown name before anything loads
        if self.sharding == "fsdp" and self.precision == "fp16":  # FSDP2 would need a sharded gradient scaler
            raise ConfigError("--precision fp16 does not combine with --sharding fsdp: use --precision bf16 or fp32")


@dataclass
class FinetuneConfig(TrainConfig):
    """``sft-job finetune``: the book's recipe (section 7.6) on accelerate, resumable."""

    mask_instruction: bool = False
    """Leave the prompt's tokens out of the loss (exercise 7.2)."""
    pad_to_multiple: int | None = None
    """Pad each batch's length up to a multiple of this (16 leaves the book's batches 3 shapes): the same
    loss, fewer shapes for a GPU's kernels and compiled graphs; off (the book's shapes) by default."""
    batched_eval: bool = False
    """Each evaluation's training and validation batches in one forward pass, their per-batch means taken
    from per-token losses (the book's numbers; fewer launches for a GPU, off until measured there)."""

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        if self.pad_to_multiple is not None:
            _positive(self, "pad_to_multiple")
            limit = self.allowed_max_length
            if self.pad_to_multiple > limit:
                raise ConfigError(f"pad_to_multiple {self.pad_to_multiple} must be at most allowed_max_length {limit}")


@dataclass
class DPOConfig(TrainConfig):
    """``sft-job dpo``: preference tuning with DPO as the book's ch07/04, from the finetuned model."""

    data: str = PREFERENCE_DATA
    """Preference dataset (entries with chosen and rejected responses): a local JSON/JSON Lines file, an
    http(s):// URL (fetched into the cache) or s3://bucket/key; the book's by default."""
    prompt_style: Literal["alpaca", "phi3", "chat"] | None = None
    """Prompt template: the book's Alpaca text, Phi-3's (exercise 7.1), or chat: the model's own chat template
    (chat_template.jinja, else tokenizer_config.json's); by default the one the model was finetuned with (saved
    in its config.json), else alpaca. One that differs from the recorded one is used, with a warning."""
    output: str = option("runs/dpo", operational=True)
    """Folder the model, losses, plots, checkpoints and resolved config are written to."""
    epochs: int = 1
    """Passes over the training split (the book's 1: DPO is prone to collapse)."""
    lr: float = 5e-6
    """AdamW learning rate (the book's 5e-6)."""
    weight_decay: float = 0.01
    """AdamW weight decay (the book's 0.01)."""
    beta: float = 0.1
    """How far the policy may move from the reference (the book's 0.1; larger keeps it closer)."""
    logprob_reduction: Literal["mean", "sum"] = "mean"
    """A response's log-probability: the mean over its tokens (the book's) or their sum (TRL's and the DPO
    paper's)."""

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        _positive(self, "beta")
        if self.logprob_reduction not in ("mean", "sum"):
            raise ConfigError(f"logprob_reduction must be mean or sum, got {short(self.logprob_reduction)}")


@dataclass
class DecodingSettings:
    """How responses are decoded (shared by ``generate`` and ``run``)."""

    max_new_tokens: int = 256
    """Most tokens generated per response (the book's 256)."""
    temperature: float = 0.0
    """0 is greedy (the book's); above 0 samples from the softened distribution."""
    top_k: int | None = None
    """Sample only among the k most likely tokens."""
    limit: int | None = None
    """Answer only the first N test entries (smoke runs)."""
    eos_check_every: int | None = None
    """Greedy decoding with each batch's shape fixed: finished rows stay in (masked) and the end is checked
    every N steps, not after each (the same tokens; for GPUs, off until measured there)."""

    def __post_init__(self) -> None:
        check_finite(self)
        _positive(self, "max_new_tokens")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.eos_check_every is not None and self.temperature > 0:
            raise ConfigError("eos_check_every needs greedy decoding (temperature 0)")
        for name in ("top_k", "limit", "eos_check_every"):
            if getattr(self, name) is not None:
                _positive(self, name)


@dataclass
class GenerateConfig(DataConfig, DecodingSettings):
    """``sft-job generate``: responses for the test split (book, 7.7), batched with the KV cache."""

    model_dir: str = "runs/finetune/model"
    """The finetuned model: the finetune stage's model/ folder or any folder load_pretrained reads."""
    prompt_style: Literal["alpaca", "phi3", "chat"] | None = None
    """Prompt template: the book's Alpaca text, Phi-3's (exercise 7.1), or chat: the model's own chat template
    (chat_template.jinja, else tokenizer_config.json's); by default the one the model was finetuned with (saved
    in its config.json), else alpaca."""
    cache: str = option(DEFAULT_CACHE, operational=True, section="Storage")
    """Folder that holds the tokenizer files and a downloaded dataset."""
    base_url: str | None = option(None, operational=True, section="Storage")
    """Mirror to fetch the tokenizer and dataset from: an http(s):// URL or s3://bucket/prefix laid out like
    the cache."""
    output: str = option("runs/generate", operational=True)
    """Folder instruction-data-with-response.json (and its progress file) is written to."""
    batch_size: int = 16
    """Prompts decoded together."""
    seed: int = 123
    """Seed of sampling (each batch is seeded from it, so restarts sample the same)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast dtype: auto is bf16 on CUDA devices that support it, fp32 elsewhere (bf16 on a CPU with
    AVX-512 BF16 is ~2.5x faster)."""

    def __post_init__(self) -> None:
        DataConfig.__post_init__(self)
        DecodingSettings.__post_init__(self)
        _positive(self, "batch_size")
        _seed(self, "seed")


# --lora-targets' words -> the layers' names within a block (and the head), as job/models/lora.py names them.
# GPT-2's and Llama 3 / Qwen3's layers (names within a block): a model has one family's, so a group names both.
_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LORA_GROUPS = {
    "all": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", *_LLAMA_ATTN, *_LLAMA_MLP, "lm_head"),
    "attn": ("attn.c_attn", "attn.c_proj", *_LLAMA_ATTN),
    "mlp": ("mlp.c_fc", "mlp.c_proj", *_LLAMA_MLP),
    "head": ("lm_head",),
    "c_attn": ("attn.c_attn",),
    "c_proj": ("attn.c_proj", "mlp.c_proj"),
    "attn.c_proj": ("attn.c_proj",),
    "mlp.c_proj": ("mlp.c_proj",),
    "c_fc": ("mlp.c_fc",),
    "lm_head": ("lm_head",),
} | {layer.rpartition(".")[2]: (layer,) for layer in (*_LLAMA_ATTN, *_LLAMA_MLP)}


def lora_layers(targets: str) -> set[str]:
    """The layers ``--lora-targets`` names."""
    words = [w.strip() for w in targets.split(",") if w.strip()]
    unknown = [w for w in words if w not in LORA_GROUPS]
    if unknown or not words:
        raise ConfigError(
            f"lora_targets: unknown {unknown[0] if unknown else 'empty'} (one of {', '.join(LORA_GROUPS)})"
        )
    return {layer for w in words for layer in LORA_GROUPS[w]}


def resolve_precision(precision: str) -> str:
    """``precision`` with auto made concrete: bf16 on a CUDA device that supports it, else fp32."""
    if precision != "auto":
        return precision
    import torch  # here, not at the top: `sft-job --help` must not wait for torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


MAX_DURATION_S = 30 * 86400.0  # a wait or lease past a month is a typo (and would overflow a socket timeout)


def parse_duration(text: str | float | int, name: str = "duration") -> float:
    """Seconds from ``300``, ``300s``, ``5m`` or ``1h``, at most 30 days."""
    match = re.fullmatch(r"\s*(\d{1,12}(?:\.\d{1,9})?)\s*([smh]?)\s*", str(text))
    if not match:
        raise ConfigError(f"{name} {short(text)} must look like 300, 300s, 5m or 1h")
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if seconds > MAX_DURATION_S:
        raise ConfigError(f"{name} {short(text)} is longer than 30 days")
    return seconds


MAX_SEED = 2**63 - 1  # torch's generators and Ollama take 64-bit seeds


def _seed(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not 0 <= value <= MAX_SEED:
            raise ConfigError(f"{name} must be in 0..{MAX_SEED}, got {short(value)}")


@dataclass
class JudgeSettings:
    """The judge server and how it is asked (shared by ``judge`` and ``run``)."""

    judge_backend: Literal["ollama", "openai"] = "ollama"
    """Ollama's API through the ollama client, or an OpenAI-compatible chat API (vLLM, llama.cpp, hosted)."""
    judge_url: str | None = option(None, operational=True)
    """Judge server, an http(s):// URL; defaults to OLLAMA_HOST or http://localhost:11434 (ollama),
    OPENAI_BASE_URL (openai)."""
    judge_api_key: str | None = option(None, secret=True)
    """API key for the openai backend; defaults to OPENAI_API_KEY. Prefer the variable or --judge-api-key-file:
    a flag shows in the process list."""
    judge_api_key_file: str | None = option(None, operational=True)
    """File holding the judge's API key (a Kubernetes Secret mounted as a file); read when the judge is asked."""
    judge_model: str = "llama3"
    """Judge model tag (the book's llama3; any tag works)."""
    judge_format: Literal["structured", "plain"] = "structured"
    """structured asks for JSON {"score": int} by schema; plain sends the book's request and parses the integer."""
    judge_seed: int = 123
    """Sampling seed sent to the judge (the book's)."""
    judge_temperature: float = 0.0
    """Judge temperature (the book's 0)."""
    judge_num_ctx: int = 2048
    """Judge context window, Ollama's num_ctx (the book's)."""
    judge_concurrency: int = option(4, operational=True)
    """Requests in flight at once."""
    judge_timeout: float = option(120.0, operational=True)
    """Seconds one request may take before it counts as failed (and is retried)."""
    judge_retries: int = option(4, operational=True)
    """Retries of a request after connection errors, timeouts and 5xx answers (exponential backoff, jitter)."""
    judge_wait: str = option("300s", operational=True)
    """How long to wait for the judge server to answer at start (the sidecar may start after the job)."""
    judge_pull: bool = option(True, operational=True)
    """Pull the judge model when the server lacks it (ollama backend)."""

    def __post_init__(self) -> None:
        check_finite(self)
        _positive(self, "judge_concurrency", "judge_timeout", "judge_num_ctx")
        _seed(self, "judge_seed")
        _check_url("judge_url", self.judge_url, ("http", "https"))
        if self.judge_timeout > 86400:
            raise ConfigError(f"judge_timeout must be at most 86400 seconds, got {self.judge_timeout}")
        if self.judge_retries < 0:
            raise ConfigError(f"judge_retries must be >= 0, got {self.judge_retries}")
        parse_duration(self.judge_wait, "judge_wait")

    @property
    def judge_wait_seconds(self) -> float:
        return parse_duration(self.judge_wait)


@dataclass
class JudgeConfig(JudgeSettings):
    """``sft-job judge``: LLM-as-judge scores 0-100 (book, 7.8) from Ollama or an OpenAI-compatible server."""

    responses: str = "runs/generate/instruction-data-with-response.json"
    """File of entries with responses to score, like the generate stage's output."""
    output: str = option("runs/judge", operational=True)
    """Folder scores.json and summary.json are written to."""
    response_key: str = "model_response"
    """Field of each entry that holds the response to score."""


def result_changes(saved: dict, current: dict, cls: type) -> list[str]:
    """Each option whose value differs between a run's saved config and ``current``, with both values,
    leaving out ``cls``'s operational ones. A value is the same as itself (NaN included)."""
    keys = sorted((set(saved) | set(current)) - operational_options(cls), key=str)
    return [
        f"{k} {short(saved.get(k))} (now {short(current.get(k))})"
        for k in keys
        if not _same(saved.get(k), current.get(k))
    ]


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b or (_number(a) and _number(b) and a == b)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --smoke: few entries rather than few steps, so the run still crosses both epoch ends (with their
# checkpoints and samples), the code that runs only at those moments.
# It samples (temperature 1, top-k 50), so the judge sees text: a random model's greedy answer is empty.
# A plumbing check waits for a judge briefly (a real run's 300 s are for a sidecar still loading a model).
SMOKE_PRESET = {
    "train_limit": 40,
    "epochs": 2,
    "limit": 8,
    "max_new_tokens": 16,
    "temperature": 1.0,
    "top_k": 50,
    "judge_wait": "15s",
}
SMOKE_DATA = ("smoke", "instruction-data.json")  # in the cache: the smoke's own data (job/data/smoke.py), no download
SMOKE_MODEL_NAME = "smoke"  # run's --model for the smoke's random 2-layer GPT-2 (byte tokenizer, no download)
RunModelName = Literal[ModelName, "smoke"]


def smoke_data(cache: str) -> str:
    return os.path.join(cache, *SMOKE_DATA)


def apply_smoke_preset(cfg, given: frozenset[str] | None) -> None:
    """--smoke's values for every option of ``cfg`` the user did not give (``given``: the options set by a flag,
    an SFT_JOB_* variable or a --config key; the CLI knows), in place, so config.yaml records what runs: its
    model (unless --model-dir names one), its own data (no network), few entries and steps. Where ``given`` is
    unknown (a config built in code), an option at its default counts as not given."""
    if given is None:
        given = frozenset(f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default)
    own_data = smoke_data(cfg.cache)
    preset = SMOKE_PRESET | {"data": own_data, "dpo_data": own_data}
    if cfg.model_dir is None:
        preset["model"] = SMOKE_MODEL_NAME
    for name, value in preset.items():
        if name not in given:
            setattr(cfg, name, value)


@dataclass
class DPOSettings:
    """The DPO stage of ``sft-job run --dpo``: the options whose names finetune already uses, for DPO
    (every other training option is the same for both stages)."""

    dpo: bool = False
    """Preference-tune the finetuned model with DPO (the book's ch07/04) before generating; generate and judge
    then read the DPO model."""
    dpo_data: str = option(PREFERENCE_DATA, feeds=("dpo", "data"))
    """Preference dataset for --dpo (chosen and rejected responses): a local file, an http(s):// URL or
    s3://bucket/key; the book's by default."""
    dpo_epochs: int = option(1, feeds=("dpo", "epochs"))
    """Passes over the preference data (the book's 1)."""
    dpo_lr: float = option(5e-6, feeds=("dpo", "lr"))
    """DPO's AdamW learning rate (the book's 5e-6)."""
    dpo_weight_decay: float = option(0.01, feeds=("dpo", "weight_decay"))
    """DPO's AdamW weight decay (the book's 0.01)."""
    dpo_beta: float = option(0.1, feeds=("dpo", "beta"))
    """DPO's beta (the book's 0.1)."""
    dpo_logprob_reduction: Literal["mean", "sum"] = option("mean", feeds=("dpo", "logprob_reduction"))
    """A response's log-probability for DPO: the mean over its tokens (the book's) or their sum (TRL's)."""

    def __post_init__(self) -> None:
        check_finite(self)
        _positive(self, "dpo_epochs", "dpo_lr", "dpo_beta")
        if self.dpo_weight_decay < 0:
            raise ConfigError(f"dpo_weight_decay must be >= 0, got {self.dpo_weight_decay}")
        if urlparse(self.dpo_data).scheme == "s3":
            _check_url("dpo_data", self.dpo_data, ("s3",))


@dataclass
class RunConfig(FinetuneConfig, DecodingSettings, JudgeSettings, DPOSettings):
    """``sft-job run``: download, finetune, generate and judge in one job, into one run folder."""

    MODELS: typing.ClassVar[tuple[str, ...]] = typing.get_args(RunModelName)
    model: RunModelName | None = "gpt2-medium"
    """Named model, fetched into the cache: a GPT-2 size (the book finetunes gpt2-medium, 355M), a base model
    on the Hugging Face hub (qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b, llama3.2-1b, llama3.2-3b), or smoke:
    the smoke's random 2-layer GPT-2 with its byte tokenizer (nothing downloaded; --smoke's). Unused with
    --model-dir: config.yaml then records null."""
    output: str = option("runs", operational=True)
    """Where runs go: a local folder or s3://bucket/prefix; each run is the subfolder {run_id}/."""
    run_id: str | None = None
    """Name of the run; the same id again skips finished stages and resumes finetuning. Default: time + config hash."""
    generate_batch_size: int = option(16, feeds=("generate", "batch_size"))
    """Prompts decoded together in the generate stage."""
    skip_judge: bool = option(False, operational=True)
    """Stop after generating responses (no judge server needed)."""
    smoke: bool = False
    """Plumbing check in a minute: a random 2-layer GPT-2 (--model smoke, no weight download) trained on 40 entries
    for 2 epochs (each epoch's end, checkpoint and sample happen), 8 test entries, 16 sampled new tokens; every
    option given by hand (flag, SFT_JOB_* variable or --config key, a default's value too) wins: --model-dir DIR
    trains that folder."""
    require_gpu: bool = option(False, operational=True, section="Observability")
    """Fail at preflight unless a CUDA device is present."""
    s3_endpoint_url: str | None = option(None, operational=True, section="Storage")
    """S3-compatible endpoint (MinIO, Ceph...); defaults to AWS_ENDPOINT_URL, else AWS."""
    scratch: str | None = option(None, operational=True, section="Storage")
    """Local working folder for S3 runs (checkpoints are written here first); default {cache}/scratch."""
    metrics_port: int | None = option(None, operational=True, section="Observability")
    """Port of the Prometheus metrics endpoint for the whole run: unset, a free port the system picks (logged in
    the metrics_serving event and written to --metrics-sd-dir); a port given here must be free (exit 2 if taken);
    0 turns the endpoint off."""
    metrics_address: str = option("127.0.0.1", operational=True, section="Observability")
    """Interface the metrics endpoint listens on: this machine only by default; 0.0.0.0 in a pod or container,
    where Prometheus scrapes it from outside."""
    metrics_sd_dir: str | None = option(None, operational=True, section="Observability")
    """Folder Prometheus' file_sd_configs reads (files: [DIR/*.json]): while the endpoint serves, the job keeps its
    host:port there (0644), labelled with the run id, and removes it at exit. The host is this machine's name for
    --metrics-address 0.0.0.0 or ::, else the address; a loopback address or --metrics-port 0 is refused."""
    pushgateway: str | None = option(None, operational=True, section="Observability")
    """Pushgateway URL to push metrics to at each stage's end and at exit (for runs that end before a scrape)."""
    s3_retry_timeout: str = option("15m", operational=True, section="Storage")
    """How long uploads to the object store are retried (training goes on meanwhile) before the run exits
    with 75, its checkpoints kept in the scratch folder."""
    lock_lease: str = option("10m", operational=True, section="Storage")
    """How long the run's lock outlives a run that died without releasing it (renewed while the run lives)."""

    given_by_hand: dataclasses.InitVar[frozenset[str] | None] = None
    """The options the user gave (flag, SFT_JOB_* variable or --config key), as the CLI saw them: --smoke fills
    in only the others. Not an option, and not recorded."""

    def __post_init__(self, given_by_hand: frozenset[str] | None = None) -> None:
        if self.model is None:  # config.yaml of a --model-dir run: no named model ran
            if self.model_dir is None:
                raise ConfigError("model is null and no model_dir is given: name a model or a model_dir")
            self.model = RunConfig.model
        if self.smoke:
            apply_smoke_preset(self, given_by_hand)
        if self.model == SMOKE_MODEL_NAME and self.model_dir is not None:
            raise ConfigError(
                f"model smoke (the smoke's random model) and model_dir {short(self.model_dir)} name two models: "
                "give one"
            )
        FinetuneConfig.__post_init__(self)
        DecodingSettings.__post_init__(self)
        JudgeSettings.__post_init__(self)
        DPOSettings.__post_init__(self)
        _positive(self, "generate_batch_size")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.metrics_sd_dir:
            _check_published_endpoint(self.metrics_port, self.metrics_address)
        if self.run_id is not None and not RUN_ID_RE.fullmatch(self.run_id):
            raise ConfigError(
                f"run_id {short(self.run_id)} ({len(self.run_id)} characters) must be 1 to 128 letters, digits, "
                "'.', '_' and '-', starting with a letter or digit"
            )
        if "://" in self.output:
            _check_url("output", self.output, ("s3",))
        _check_url("s3_endpoint_url", self.s3_endpoint_url, ("http", "https"))
        for name in ("s3_retry_timeout", "lock_lease"):
            if parse_duration(getattr(self, name), name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
