"""Resumable checkpoints that load without unpickling anything, owned by one ``CheckpointManager``.

    checkpoints/step-00000012/
      model.safetensors        the parameters that train (all of them, tied tensors once; with LoRA
                               the adapters alone: the frozen base comes from the model folder)
      optimizer-{name}.safetensors  the optimizer's per-parameter state, one file per kind (exp_avg,
                               exp_avg_sq, step), keyed by the parameter's index: files of similar
                               size, hashed side by side
      optimizer.json           its param_groups (the hyperparameters)
      rng-{rank}.safetensors   each process's torch CPU and CUDA generator states
      rng-{rank}.json          and Python's ``random`` state
      scaler.json              fp16's gradient scaler, where there is one
      trainer_state.json       where training stands
      config.yaml              the run's resolved configuration (secrets redacted)
      index.json               every file above with its sha256; written last, it marks the checkpoint complete

A checkpoint is written into a hidden temporary folder and renamed into place. Loading opens only the
files its index lists, after checking every file's sha256; one that fails is skipped with a warning
naming the file, and the previous checkpoint is used.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from job.errors import ConfigError, DiskFullError
from job.observability import Metrics, get_logger
from job.storage import ensure_room, sha256_files, tree_bytes

log = get_logger(__name__)
CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
INDEX = "index.json"


def trained_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (a tied tensor once), on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_dirs(folder: Path) -> list[Path]:
    """The complete checkpoints in ``folder`` (those whose index was written), oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CHECKPOINT_RE.match(p.name) and (p / INDEX).is_file())


def verified_files(path: Path) -> dict[str, str] | None:
    """The checkpoint's index (file name -> sha256) when every listed file is there with its hash,
    else None with a warning naming the file."""
    try:
        files = json.loads((path / INDEX).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("checkpoint_skipped", checkpoint=path.name, reason=f"{INDEX} is unreadable")
        return None
    for name in files:
        if "/" in name or name.startswith(".") or not (path / name).is_file():
            log.warning("checkpoint_skipped", checkpoint=path.name, file=name, reason="missing or not a plain name")
            return None
    actual = sha256_files([path / name for name in files])
    for (name, digest), found in zip(files.items(), actual, strict=True):
        if found != digest:
            log.warning("checkpoint_skipped", checkpoint=path.name, file=name, reason="sha256 differs from the index")
            return None
    return files


class CheckpointManager:
    """Saves, rotates, verifies and loads the training state of every process; hands each finished
    checkpoint to ``on_checkpoint`` (the run's uploader)."""

    def __init__(
        self,
        folder: Path,
        accelerator,
        model,
        optimizer,
        keep: int,
        metrics: Metrics,
        on_checkpoint: Callable[[Path], None] | None = None,
    ):
        self.folder, self.accelerator, self.model, self.optimizer = folder, accelerator, model, optimizer
        self.keep, self.metrics, self.on_checkpoint = keep, metrics, on_checkpoint
        self.last_bytes = 0  # the last checkpoint's size: the room the next one needs
        self.seconds = 0.0
        """Wall time spent writing checkpoints in this process (benchmarks subtract it from the loop)."""

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # --- saving ----------------------------------------------------------------------------------

    def save(self, step: int, trainer_state: dict, config: dict) -> Path:
        """Every process's state at ``step``, atomically (collective: every process calls it)."""
        started = time.perf_counter()
        final, tmp = self.folder / f"step-{step:08d}", self.folder / f".step-{step:08d}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            ensure_room(self.folder, self.last_bytes or self._state_bytes(), f"checkpoint {final.name}")
        self.accelerator.wait_for_everyone()
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            self._write_rng(tmp, self.accelerator.process_index)
            if self.is_main:
                self._write_main(tmp, trainer_state, config)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(f"disk full writing checkpoint {final}: free space and rerun") from None
            raise
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self._finish(tmp, final, started)
        self.accelerator.wait_for_everyone()
        self.seconds += time.perf_counter() - started
        return final

    def _state_bytes(self) -> int:
        """About what a first checkpoint takes: the parameters and AdamW's two moments."""
        return 3 * sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)

    def _write_main(self, tmp: Path, trainer_state: dict, config: dict) -> None:
        save_file(trained_parameters(self.accelerator.unwrap_model(self.model)), str(tmp / "model.safetensors"))
        state = self.optimizer.state_dict()
        by_kind: dict[str, dict[str, torch.Tensor]] = {}
        for index, per_param in state["state"].items():
            for kind, tensor in per_param.items():
                by_kind.setdefault(kind, {})[str(index)] = tensor.detach().cpu().contiguous()
        for kind, tensors in by_kind.items():
            save_file(tensors, str(tmp / f"optimizer-{kind}.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"]}))
        if self.accelerator.scaler is not None:
            (tmp / "scaler.json").write_text(json.dumps(self.accelerator.scaler.state_dict()))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    @staticmethod
    def _write_rng(tmp: Path, rank: int) -> None:
        tensors = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        save_file(tensors, str(tmp / f"rng-{rank}.safetensors"))
        version, internal, gauss = random.getstate()
        (tmp / f"rng-{rank}.json").write_text(json.dumps({"python": [version, list(internal), gauss]}))

    def _finish(self, tmp: Path, final: Path, started: float) -> None:
        paths = sorted(p for p in tmp.iterdir() if p.is_file())
        files = dict(zip((p.name for p in paths), sha256_files(paths), strict=True))
        (tmp / INDEX).write_text(json.dumps({"files": files}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self.last_bytes = tree_bytes(final)
        for old in checkpoint_dirs(self.folder)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        seconds = time.perf_counter() - started
        self.metrics.checkpoint_seconds.set(seconds)
        log.info("checkpoint", step=int(final.name[5:]), path=str(final), seconds=round(seconds, 3))
        if self.on_checkpoint is not None:
            self.on_checkpoint(final)

    # --- loading ---------------------------------------------------------------------------------

    def latest(self) -> tuple[Path, dict[str, str]] | None:
        """The newest checkpoint whose files all match their index (older ones where one does not)."""
        for path in reversed(checkpoint_dirs(self.folder)):
            files = verified_files(path)
            if files is not None:
                return path, files
        return None

    def load(self, path: Path, files: dict[str, str]) -> dict:
        """Every process's state from a verified checkpoint; returns the trainer state."""

        def listed(name: str) -> Path:
            if name not in files:
                raise FileNotFoundError(f"{path / name} is not in the checkpoint's index")
            return path / name

        model = self.accelerator.unwrap_model(self.model)
        saved = load_file(listed("model.safetensors"))  # on the CPU; copy_ moves each to its parameter's device
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if saved.keys() != params.keys():
            differ = sorted(saved.keys() ^ params.keys())[0]
            raise ConfigError(
                f"checkpoint {path} was written by a differently configured run (parameter {differ}): "
                "resume with its options or use another --output"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name])
        state: dict = {"state": {}, **json.loads(listed("optimizer.json").read_text())}
        for name in sorted(files):
            kind = re.fullmatch(r"optimizer-(\w+)\.safetensors", name)
            for index, tensor in load_file(listed(name)).items() if kind else ():
                state["state"].setdefault(int(index), {})[kind.group(1)] = tensor
        for group in state["param_groups"]:
            group["betas"] = tuple(group["betas"])
        self.optimizer.load_state_dict(state)
        if self.accelerator.scaler is not None and "scaler.json" in files:
            self.accelerator.scaler.load_state_dict(json.loads(listed("scaler.json").read_text()))
        self._load_rng(path, files)
        return json.loads(listed("trainer_state.json").read_text())

    def _load_rng(self, path: Path, files: dict[str, str]) -> None:
        rank = self.accelerator.process_index
        if f"rng-{rank}.safetensors" not in files:  # fewer processes wrote it than read it now
            log.warning("checkpoint_rng_missing", checkpoint=path.name, rank=rank)
            return
        tensors = load_file(path / f"rng-{rank}.safetensors")
        torch.set_rng_state(tensors["torch"])
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        if f"rng-{rank}.json" in files:
            version, internal, gauss = json.loads((path / f"rng-{rank}.json").read_text())["python"]
            random.setstate((version, tuple(internal), gauss))
