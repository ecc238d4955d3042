"""What a checkpoint folder holds, and the checks it passes before anything is loaded from it.

A checkpoint may come back from a bucket that others can write to, so a folder is used only when:
its ``index.json`` has the expected shape (and, with ``--checkpoint-key-file``, an HMAC-SHA256 of its
file list and its run binding made with that key); every file it lists is there with its sha256; every JSON file has
its shape; every safetensors header is sound; fsdp's shards join into whole tensors as their listings say.
``checkpoint_problem`` says which file fails and why,
the same answer on every process, so all of them skip the same checkpoints.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

from job.core.errors import ConfigError
from job.core.parsing import ParseError, load_json, read_bounded, safetensors_header, validated
from job.storage.store import sha256_files
from job.training.checkpoint_shards import Shards, ShardsError

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
INDEX = "index.json"
REQUIRED = ("optimizer.json", "trainer_state.json")  # and the model: whole, or every process's shards
FILE_RE = re.compile(
    r"^(model|optimizer-\w+|rng-\d+|model-\d+|optimizer-\w+-\d+)\.safetensors$"
    r"|^(optimizer|scaler|trainer_state|rng-\d+|shards-\d+)\.json$"
)
MAX_JSON_BYTES = 16 << 20  # the trainer state with its loss history is KBs; optimizer.json less


class BindingRecord(BaseModel):
    """The run binding a checkpoint records (``job/training/binding.py``)."""

    model_config = ConfigDict(extra="forbid")
    run_id: str | None
    stage: str
    options: dict[str, Any]
    data: dict[str, str]
    model: dict[str, str]
    chat_template: dict[str, str] | None = None
    """The --chat-template file's path and sha256, where one was given."""


class IndexFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    files: dict[str, str]
    binding: BindingRecord | None = None  # None: written before checkpoints were bound to their run
    hmac: str | None = None


class EvalRecord(BaseModel):
    """One evaluation: the losses, and with DPO the chosen and rejected rewards of each split."""

    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=0)
    epoch: int = Field(ge=1)
    tokens_seen: int = Field(ge=0)
    train_loss: float
    val_loss: float
    train_chosen_reward: float | None = None
    train_rejected_reward: float | None = None
    val_chosen_reward: float | None = None
    val_rejected_reward: float | None = None


class TrainStateFile(BaseModel):
    """``trainer_state.json``: exactly the fields of the trainer's ``TrainState``."""

    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=0)
    epoch: int = Field(ge=0)
    batch_in_epoch: int = Field(ge=0)
    tokens_seen: int = Field(ge=0)
    history: list[EvalRecord]


class ParamGroup(BaseModel):
    model_config = ConfigDict(extra="allow")
    params: list[int]
    lr: float
    betas: list[float] = Field(min_length=2, max_length=2)


class OptimizerFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    param_groups: list[ParamGroup]


class PythonRandomFile(BaseModel):
    """Python's ``random.getstate()`` as a JSON list: version 3, 624 words of state and a position,
    a cached gauss (checked by ``_check_python_random``)."""

    model_config = ConfigDict(extra="forbid")
    python: list[int | list[int] | float | None] = Field(min_length=3, max_length=3)


class ScalerFile(RootModel[dict[str, float | int | bool]]):
    pass


class ShardPlace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int] = Field(max_length=8)
    offset: int = Field(ge=0)


class ShardsFile(BaseModel):
    """``shards-{rank}.json`` (``job/training/checkpoint_shards.py``): where each of a process's rows sit."""

    model_config = ConfigDict(extra="forbid")
    world: int = Field(ge=1, le=1 << 16)
    rank: int = Field(ge=0)
    tensors: dict[str, ShardPlace]


SHAPES = {"trainer_state.json": TrainStateFile, "optimizer.json": OptimizerFile, "scaler.json": ScalerFile}
SHARDS_RE = re.compile(r"^shards-\d+\.json$")


def read_key(path: str | None) -> bytes | None:
    """The HMAC key in ``--checkpoint-key-file`` (a mounted Secret), or None without one."""
    if path is None:
        return None
    try:
        key = read_bounded(path, 64 << 10, f"--checkpoint-key-file {path}").strip()
    except OSError as exc:
        raise ConfigError(f"--checkpoint-key-file {path}: {exc.strerror or exc}") from None
    except ParseError as exc:
        raise ConfigError(str(exc)) from None
    if len(key) < 16:
        raise ConfigError(f"--checkpoint-key-file {path} holds {len(key)} bytes: use a key of at least 16")
    return key


def signature(key: bytes, files: dict[str, str], binding: dict | None = None) -> str:
    """HMAC-SHA256 of the index's file list (names and sha256s) and its run binding, as canonical JSON:
    it covers every byte and the run the checkpoint belongs to."""
    signed = {"files": files} | ({"binding": binding} if binding is not None else {})
    message = json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def index_text(files: dict[str, str], key: bytes | None, binding: dict | None = None) -> str:
    index = {"files": files} | ({"binding": binding} if binding is not None else {})
    index |= {"hmac": signature(key, files, binding)} if key else {}
    return json.dumps(index, indent=1)


def index_binding(path: Path) -> dict | None:
    """The run binding in a checkpoint's index (one ``checkpoint_problem`` passed), None where it has none."""
    return json.loads((path / INDEX).read_text()).get("binding")


def index_signed(path: Path) -> bool:
    """Whether the checkpoint at ``path`` has an HMAC in its index (read as far as that: an index that does
    not parse says no, and fails its checks where it matters)."""
    try:
        index = _json(path, INDEX)
    except Rejected:
        return False
    return isinstance(index, dict) and index.get("hmac") is not None


def checkpoint_dirs(folder: Path) -> list[Path]:
    """The complete checkpoints in ``folder`` (those whose index was written), oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CHECKPOINT_RE.match(p.name) and (p / INDEX).is_file())


class Rejected(Exception):
    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


def checkpoint_problem(path: Path, key: bytes | None = None) -> Rejected | None:
    """Why the checkpoint at ``path`` must not be loaded (the file and the reason), or None."""
    try:
        files = _index_files(path, key)
        for name, found in zip(files, sha256_files([path / n for n in files]), strict=True):
            if found != files[name].lower():  # hex in either case, as hashes are read
                raise Rejected(name, "sha256 differs from the index")
        for name in files:
            _check_content(path, name)
        _check_shards_join(path, files)
    except Rejected as rejected:
        return rejected
    return None


def _index_files(path: Path, key: bytes | None) -> dict[str, str]:
    index = _json(path, INDEX)
    try:
        parsed = validated(IndexFile, index, INDEX)
    except ParseError as exc:
        raise Rejected(INDEX, str(exc)) from None
    files = parsed.files
    odd = next((n for n in files if not FILE_RE.match(n) and n != "config.yaml"), None)
    if odd is not None:
        raise Rejected(INDEX, f"lists {odd[:60]!r}, not a checkpoint file")
    if any(not re.fullmatch(r"[0-9a-fA-F]{64}", d) for d in files.values()):
        raise Rejected(INDEX, "a sha256 is not 64 hex digits")
    missing = next((n for n in (*REQUIRED, *_model_files(path, files)) if n not in files), None)
    missing = missing or next((n for n in files if not (path / n).is_file()), None)
    if missing is not None:
        raise Rejected(missing, "missing from the checkpoint or its index")
    if key is not None:
        expected = signature(key, files, index.get("binding"))  # the binding as read, in canonical form
        if not (parsed.hmac and hmac.compare_digest(parsed.hmac, expected)):
            raise Rejected(INDEX, "not signed with --checkpoint-key-file's key")
    return files


def _model_files(path: Path, files: dict[str, str]) -> tuple[str, ...]:
    """The model's files a checkpoint must hold: ``model.safetensors``, or each process's shards and
    their places (as many as ``shards-0.json`` says processes wrote it)."""
    if "model.safetensors" in files or "shards-0.json" not in files:
        return ("model.safetensors",)
    world = _shards(path, "shards-0.json").world
    return tuple(
        f"{kind}-{rank}.{ext}" for rank in range(world) for kind, ext in (("shards", "json"), ("model", "safetensors"))
    )


def _check_shards_join(path: Path, files: dict[str, str]) -> None:
    """fsdp's shards join into whole tensors, listed from the files' headers (no tensor is read): a listing
    that disagrees with its files (rows, shapes, ranks) fails the checkpoint as a wrong sha256 does, on every
    process alike, so all of them fall back to the same one."""
    if "model.safetensors" in files:
        return
    try:
        with Shards(path, files):
            pass
    except ShardsError as exc:
        raise Rejected(exc.file or INDEX, str(exc)) from None


def _shards(path: Path, name: str) -> ShardsFile:
    try:
        return validated(ShardsFile, _json(path, name), name)
    except ParseError as exc:
        raise Rejected(name, str(exc).removeprefix(f"{name}: ")) from None


def _check_content(path: Path, name: str) -> None:
    try:
        if name.endswith(".safetensors"):
            safetensors_header(path / name, name)
        elif name.startswith("rng-"):
            _check_python_random(validated(PythonRandomFile, _json(path, name), name).python, name)
        elif name in SHAPES:
            validated(SHAPES[name], _json(path, name), name)
        elif SHARDS_RE.match(name):
            _shards(path, name)
    except ParseError as exc:
        raise Rejected(name, str(exc).removeprefix(f"{name}: ")) from None


def _check_python_random(state: list, name: str) -> None:
    version, internal, gauss = state
    words = isinstance(internal, list) and len(internal) == 625 and all(0 <= w < 2**32 for w in internal)
    if version != 3 or not words or internal[-1] > 624 or not (gauss is None or isinstance(gauss, float)):
        raise ParseError(f"{name}: not a state of Python's random")


def _json(path: Path, name: str):
    try:
        with open(path / name, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise Rejected(name, f"unreadable ({exc.strerror or exc})") from None
    if len(data) > MAX_JSON_BYTES:
        raise Rejected(name, f"larger than {MAX_JSON_BYTES >> 20} MB")
    try:
        return load_json(data, name)
    except ParseError as exc:
        raise Rejected(name, str(exc)) from None
