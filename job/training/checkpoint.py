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
      index.json               every file above with its sha256, and the run binding (``job/training/binding.py``);
                               written last, it marks the checkpoint complete

A checkpoint is written into a hidden temporary folder and renamed into place; one a crash left behind is
removed when training starts. Loading opens only the
files its index lists, after ``checkpoint_files.checkpoint_problem`` passed (every sha256, every file's
shape, the index's HMAC with ``--checkpoint-key-file``); one that fails is skipped with a warning naming
the file, and the previous checkpoint is used; it is never counted among the checkpoints kept, so no
good one is rotated away because of it. Where checkpoints exist and none passes, the job stops (exit 1)
rather than start again from step 0. A signed one (its index has an HMAC) is resumed only with
``--checkpoint-key-file`` (else exit 2). The newest one that passes is resumed only where its run binding is
this stage's: one of another run or stage, or one without a binding, stops the job (exit 1), one written
with other options, data or starting weights too (exit 2); it is left where it is, never deleted.

With a bucket, the run's storage holds them too: ``CheckpointUploader`` uploads each one in the
background (``index.json`` last) and rotates the bucket's copies as the local folder's;
``fetch_checkpoint`` brings the newest one that passes back into an empty local folder (a new pod,
another node). The pipeline only wires both.
"""

from __future__ import annotations

import contextvars
import errno
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from job.core.errors import ConfigError, DiskFullError, JobError
from job.core.observability import Metrics, get_logger
from job.storage.store import Storage, contained_path, ensure_room, sha256_files, tree_bytes, upload_tree
from job.training.binding import binding_refusal
from job.training.checkpoint_files import (
    CHECKPOINT_RE,
    INDEX,
    checkpoint_dirs,
    checkpoint_problem,
    index_binding,
    index_signed,
    index_text,
)
from job.training.checkpoint_shards import Shards, ShardsError, WholeTensors, write_shards
from job.training.roles import Roles
from job.training.sharding import full_tensor, is_sharded

log = get_logger(__name__)
TMP_RE = re.compile(r"^\.step-\d{8}\.tmp$")  # where ``save`` writes a checkpoint before renaming it


class CheckpointError(JobError):
    """Checkpoints that cannot be resumed from (exit 1): none verifies, or one fits no model of this run."""


def trained_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (a tied tensor once), whole on the CPU (with fsdp gathered from
    every process's shards: a collective)."""
    return {n: full_tensor(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _check_fits(path: Path, saved: dict[str, list[int]], shapes: dict[str, torch.Size], what: str) -> None:
    """The checkpoint's tensors (``saved``: their shapes) are exactly this run's (names and shapes)."""
    differ = sorted(saved.keys() ^ shapes.keys()) or sorted(n for n in shapes if list(saved[n]) != list(shapes[n]))
    if differ:
        raise ConfigError(
            f"checkpoint {path} was written by a differently configured run ({what} {differ[0]}): "
            "resume with its options or use another --output"
        )


def state_tensors(model, optimizer, whole: bool) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The parameters that train and the optimizer's per-parameter state (by kind, then index): ``whole``,
    on the CPU (with fsdp gathered from the shards, so every process calls it), or as held (shards)."""
    parameters = trained_parameters(model) if whole else {n: p for n, p in model.named_parameters() if p.requires_grad}
    by_kind: dict[str, dict[str, torch.Tensor]] = {}
    for index, per_param in optimizer.state_dict()["state"].items():
        for kind, tensor in per_param.items():
            value = full_tensor(tensor.detach()).cpu().contiguous() if whole else tensor
            by_kind.setdefault(kind, {})[str(index)] = value
    return parameters, by_kind


def whole_files(path: Path, files: dict[str, str]) -> WholeTensors:
    """The parameters and the optimizer's per-parameter state (``model/NAME``, ``KIND/INDEX``) from the
    whole files the main process wrote."""
    tensors = {f"model/{name}": t for name, t in load_file(path / "model.safetensors").items()}
    kinds = (re.fullmatch(r"optimizer-(\w+)\.safetensors", name) for name in sorted(files))
    for kind in filter(None, kinds):
        tensors |= {f"{kind.group(1)}/{index}": t for index, t in load_file(path / kind.group(0)).items()}
    return WholeTensors(tensors)


def rng_files(rank: int) -> dict[str, bytes]:
    """This process's generator states, as the two files a checkpoint keeps of them."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    version, internal, gauss = random.getstate()
    python = json.dumps({"python": [version, list(internal), gauss]}).encode()
    return {f"rng-{rank}.safetensors": safetensors_bytes(tensors), f"rng-{rank}.json": python}


def gathered_rng_files(accelerator, rank: int) -> dict[str, bytes]:
    """Every process's ``rng_files``, on every process (a collective). Over several nodes only the main
    process's folder becomes the checkpoint, so it writes the others' states too (as bytes in a tensor:
    nothing is pickled)."""
    files = rng_files(rank)
    state, python = files.values()
    packed = len(state).to_bytes(8, "little") + state + python
    mine = torch.frombuffer(bytearray(packed), dtype=torch.uint8).to(accelerator.device)
    sizes = accelerator.gather(torch.tensor([mine.numel()], device=accelerator.device)).tolist()
    everyone = accelerator.gather(accelerator.pad_across_processes(mine)).cpu().numpy().tobytes()
    gathered, longest = {}, max(sizes)
    for peer, size in enumerate(sizes):
        blob = everyone[peer * longest : peer * longest + size]
        cut = 8 + int.from_bytes(blob[:8], "little")
        gathered |= {f"rng-{peer}.safetensors": blob[8:cut], f"rng-{peer}.json": blob[cut:]}
    return gathered


class CheckpointManager:
    """Saves, rotates, verifies and loads the training state of every process; hands each finished
    checkpoint to ``on_checkpoint`` (the run's uploader). Each is bound to ``binding`` (None: unbound,
    for tests of the files alone)."""

    def __init__(
        self,
        folder: Path,
        accelerator,
        model,
        optimizer,
        keep: int,
        metrics: Metrics,
        *,
        on_checkpoint: Callable[[Path], None] | None = None,
        key: bytes | None = None,
        binding: dict | None = None,
    ):
        self.folder, self.accelerator, self.model, self.optimizer = folder, accelerator, model, optimizer
        self.binding = binding
        self.roles = Roles(accelerator)
        self.keep, self.metrics, self.on_checkpoint, self.key = keep, metrics, on_checkpoint, key
        self.rejected: set[str] = set()  # checkpoints that failed their checks: never among those kept
        self.last_bytes = 0  # the last checkpoint's size: the room the next one needs
        self.seconds = 0.0
        """Wall time spent writing checkpoints in this process (benchmarks subtract it from the loop)."""
        # fsdp's processes write their shards side by side where they all see one folder: on one node. Over
        # several nodes each has its own scratch folder and only the main process's is uploaded, so the
        # state is gathered into the main process's whole files there instead.
        self.shards_meet = int(os.environ.get("LOCAL_WORLD_SIZE", self.roles.world)) == self.roles.world

    # --- saving ----------------------------------------------------------------------------------

    def save(self, step: int, trainer_state: dict, config: dict) -> Path:
        """Every process's state at ``step``, atomically (collective: every process calls it)."""
        started = time.perf_counter()
        final, tmp = self.folder / f"step-{step:08d}", self.folder / f".step-{step:08d}.tmp"
        if self.roles.keeps_run:
            shutil.rmtree(tmp, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            ensure_room(self.folder, self.last_bytes or self._state_bytes(), f"checkpoint {final.name}")
        self.roles.together()
        shards = is_sharded(self.model) and self.shards_meet
        # fsdp: each process's own rows; else whole on the main process (gathered with fsdp: a collective)
        gather = is_sharded(self.model) and not shards
        model = self.accelerator.unwrap_model(self.model)
        needed = self.roles.keeps_run or shards or gather
        tensors = state_tensors(model, self.optimizer, not shards) if needed else None
        # over several nodes the main process writes every process's generator states; the others no folder
        rng = rng_files(self.roles.rank) if self.shards_meet else gathered_rng_files(self.accelerator, self.roles.rank)
        try:
            if self.shards_meet or self.roles.keeps_run:
                tmp.mkdir(parents=True, exist_ok=True)
                for name, data in rng.items():
                    (tmp / name).write_bytes(data)
            if shards:
                write_shards(tmp, self.roles.rank, self.roles.world, *tensors)
            if self.roles.keeps_run:
                self._write_main(tmp, None if shards else tensors, trainer_state, config)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(f"disk full writing checkpoint {final}: free space and rerun") from None
            raise
        self.roles.together()
        if self.roles.keeps_run:
            self._finish(tmp, final, started)
        self.roles.together()
        self.seconds += time.perf_counter() - started
        return final

    def _state_bytes(self) -> int:
        """About what a first checkpoint takes: the parameters and AdamW's two moments."""
        return 3 * sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)

    def _write_main(self, tmp: Path, tensors, trainer_state: dict, config: dict) -> None:
        """The files the main process writes: the whole ``tensors`` (None: every process wrote its shards)
        and what every process shares."""
        if tensors is not None:
            parameters, by_kind = tensors
            save_file(parameters, str(tmp / "model.safetensors"))
            for kind, per_kind in by_kind.items():
                save_file(per_kind, str(tmp / f"optimizer-{kind}.safetensors"))
        state = self.optimizer.state_dict()
        (tmp / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"]}))
        if self.accelerator.scaler is not None:
            (tmp / "scaler.json").write_text(json.dumps(self.accelerator.scaler.state_dict()))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def _finish(self, tmp: Path, final: Path, started: float) -> None:
        paths = sorted(p for p in tmp.iterdir() if p.is_file())
        files = dict(zip((p.name for p in paths), sha256_files(paths), strict=True))
        (tmp / INDEX).write_text(index_text(files, self.key, self.binding))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self.rejected.discard(final.name)
        self.last_bytes = tree_bytes(final)
        good = [p for p in checkpoint_dirs(self.folder) if p.name not in self.rejected]
        for old in good[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        seconds = time.perf_counter() - started
        self.metrics.checkpoint_seconds.set(seconds)
        self.metrics.checkpoint_written()
        log.info("checkpoint", step=int(final.name[5:]), path=str(final), seconds=round(seconds, 3))
        if self.on_checkpoint is not None:
            self.on_checkpoint(final)
        else:  # no uploader: the folder written is the run's storage
            self.metrics.checkpoint_stored()

    # --- loading ---------------------------------------------------------------------------------

    def latest(self) -> tuple[Path, dict[str, str]] | None:
        """The newest checkpoint that passes every check (older ones where one does not); None where
        there is none at all; a CheckpointError where there are some and none passes."""
        found, newest = checkpoint_dirs(self.folder), None
        for path in reversed(found):
            rejected = checkpoint_problem(path, self.key)
            if rejected is None:
                check_owner(path, self.key, self.binding)
                return path, json.loads((path / INDEX).read_text())["files"]
            log.warning("checkpoint_skipped", checkpoint=path.name, file=rejected.file, reason=rejected.reason)
            self.rejected.add(path.name)
            newest = newest or f"{path.name}: {rejected}"
        if found:
            raise CheckpointError(
                f"none of the {len(found)} checkpoints in {self.folder} can be resumed from ({newest}): "
                "restore them, or move them away to train from the start"
            )
        return None

    def load(self, path: Path, files: dict[str, str]) -> dict:
        """Every process's state from a verified checkpoint; returns the trainer state. Every tensor is
        checked against this run's model and optimizer before any is applied."""

        def listed(name: str) -> Path:
            if name not in files:
                raise FileNotFoundError(f"{path / name} is not in the checkpoint's index")
            return path / name

        model = self.accelerator.unwrap_model(self.model)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        try:  # on the CPU; copy_ moves each to its parameter's device
            with whole_files(path, files) if "model.safetensors" in files else Shards(path, files) as saved:
                shapes = {key[6:]: shape for key, shape in saved.shapes.items() if key.startswith("model/")}
                _check_fits(path, shapes, {n: p.shape for n, p in params.items()}, "parameter")
                state = self._optimizer_state(path, saved, list(params.values()))
                with torch.no_grad():
                    for name, param in params.items():  # with fsdp: only this process's rows are read
                        param.copy_(saved.placed(f"model/{name}", param))
        except ShardsError as exc:
            raise CheckpointError(f"checkpoint {path}: {exc}") from None
        self.optimizer.load_state_dict(state)
        if self.accelerator.scaler is not None and "scaler.json" in files:
            self.accelerator.scaler.load_state_dict(json.loads(listed("scaler.json").read_text()))
        self._load_rng(path, files)
        return json.loads(listed("trainer_state.json").read_text())

    def _optimizer_state(self, path: Path, saved: Shards | WholeTensors, params: list[torch.Tensor]) -> dict:
        """The optimizer's state dict from the checkpoint, its groups and tensors checked against ours
        (each moment placed as its parameter is: with fsdp, only this process's rows read)."""
        shapes = [p.shape for p in params]
        state: dict = {"state": {}, **json.loads((path / "optimizer.json").read_text())}
        ours = self.optimizer.state_dict()["param_groups"]
        if [g["params"] for g in state["param_groups"]] != [g["params"] for g in ours]:
            raise ConfigError(
                f"checkpoint {path} was written by a differently configured run (its optimizer's parameter "
                "groups differ): resume with its options or use another --output"
            )
        moments = [key.partition("/") for key in saved.shapes if not key.startswith("model/")]
        for kind, _, index in moments:
            i, shape = int(index) if index.isdigit() else -1, saved.shapes[f"{kind}/{index}"]
            want = torch.Size([]) if kind == "step" else shapes[i] if 0 <= i < len(shapes) else None
            if want is None or list(shape) != list(want):
                raise CheckpointError(f"checkpoint {path}: optimizer {kind} holds {index[:20]!r} of shape {shape}")
        for kind, _, index in moments:  # every shape checked before anything is read
            like = None if kind == "step" else params[int(index)]
            state["state"].setdefault(int(index), {})[kind] = saved.placed(f"{kind}/{index}", like)
        for group in state["param_groups"]:
            group["betas"] = tuple(group["betas"])
        return state

    def _load_rng(self, path: Path, files: dict[str, str]) -> None:
        rank = self.roles.rank
        if f"rng-{rank}.safetensors" not in files:  # fewer processes wrote it than read it now
            log.warning("checkpoint_rng_missing", checkpoint=path.name, rank=rank)
            return
        tensors = load_file(path / f"rng-{rank}.safetensors")
        ours = torch.get_rng_state()
        theirs = tensors.get("torch")
        if theirs is None or theirs.dtype != ours.dtype or theirs.shape != ours.shape:
            raise CheckpointError(f"checkpoint {path}: rng-{rank}.safetensors holds no CPU generator state")
        torch.set_rng_state(theirs)
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        if f"rng-{rank}.json" in files:
            version, internal, gauss = json.loads((path / f"rng-{rank}.json").read_text())["python"]
            random.setstate((version, tuple(internal), gauss))


def remove_stale_tmp(folder: Path) -> None:
    """The hidden ``.step-NNNNNNNN.tmp`` folders in ``folder`` that a crash left while writing a checkpoint,
    removed when training starts, by the main process (one writer a run: none is being written now).
    Nothing else is touched: files, links and other names stay."""
    if not folder.is_dir():
        return
    for stale in sorted(folder.iterdir()):
        if TMP_RE.match(stale.name) and stale.is_dir() and not stale.is_symlink():
            try:
                shutil.rmtree(stale)
            except OSError as exc:  # litter, not state: training goes on, and a save of its step retries
                log.warning("checkpoint_tmp_not_removed", path=str(stale), error=exc.strerror or str(exc))
                continue
            log.info("checkpoint_tmp_removed", path=str(stale))


def check_owner(path: Path, key: bytes | None, binding: dict | None, name: str | None = None) -> None:
    """The checkpoint at ``path`` (its files verified) is this stage's to resume: signed only where a key is
    given (``check_signed``), of this run (``check_binding``)."""
    check_signed(path, key, name)
    check_binding(path, binding, name)


def check_signed(path: Path, key: bytes | None, name: str | None = None) -> None:
    """A run whose checkpoints are signed (an index with an HMAC: ``path``'s or another in its folder) is
    resumed only with ``--checkpoint-key-file``: without it the signature would go unchecked and the run's
    next checkpoints unsigned (exit 2, nothing written)."""
    if key is not None:
        return
    signed = next((p for p in (path, *reversed(checkpoint_dirs(path.parent))) if index_signed(p)), None)
    if signed is not None:
        where = name if signed == path and name else signed
        raise ConfigError(
            f"checkpoint {where} is signed: rerun with --checkpoint-key-file (the key it was signed with)"
        )


def check_binding(path: Path, binding: dict | None, name: str | None = None) -> None:
    """The checkpoint at ``path`` (its files verified; ``name``: where it came from) belongs to the stage
    bound by ``binding``."""
    where = f"checkpoint {name or path}"
    refusal = None if binding is None else binding_refusal(index_binding(path), binding, where)
    if refusal is not None:
        raise refusal


def fetch_checkpoint(
    storage: Storage, work: Path, *, key: bytes | None, folder: str = "checkpoints", binding: dict | None = None
) -> None:
    """Into ``work/{folder}``, when it holds none (a new pod, another node), the newest checkpoint under
    ``folder`` in ``storage`` that passes every check, older ones where it does not; a CheckpointError
    where there are some and none passes; the binding's refusal where that one belongs to another run,
    stage, options or inputs (nothing is kept of it locally)."""
    local = work / folder
    if checkpoint_dirs(local):
        return
    names = {k[len(folder) + 1 :].split("/")[0] for k in storage.list(f"{folder}/") if k.endswith(f"/{INDEX}")}
    complete = sorted((n for n in names if CHECKPOINT_RE.match(n)), reverse=True)
    for name in complete:
        if _fetch_one(storage, work, f"{folder}/{name}", key, binding):
            log.info("checkpoint_downloaded", checkpoint=name, source=storage.url)
            return
    if complete:
        raise CheckpointError(
            f"none of the {len(complete)} checkpoints in {storage.url}/{folder} can be resumed from "
            "(see the checkpoint_skipped events): restore them, or move them away to train from the start"
        )


def _fetch_one(storage: Storage, work: Path, where: str, key: bytes | None, binding: dict | None) -> bool:
    """Checkpoint ``where`` (``checkpoints/step-...``) into a hidden folder beside its place, renamed into
    place if it passes. The bucket is not trusted: every key must map inside ``work``, all checked before
    anything is written."""
    prefix = f"{where}/"
    keys = [k for k in storage.list(prefix) if not k.endswith("/")]
    for object_key in keys:
        contained_path(work, object_key)
    final = work / where
    fetched = final.with_name(f".{final.name}.fetch")
    shutil.rmtree(fetched, ignore_errors=True)
    for object_key in keys:
        storage.get_file(object_key, contained_path(fetched, object_key[len(prefix) :]))
    rejected = checkpoint_problem(fetched, key)
    if rejected is not None:
        log.warning("checkpoint_skipped", checkpoint=final.name, file=rejected.file, reason=rejected.reason)
        shutil.rmtree(fetched, ignore_errors=True)
        return False
    try:
        check_owner(fetched, key, binding, f"{storage.url}/{where}")
    except JobError:
        shutil.rmtree(fetched, ignore_errors=True)  # nothing of another run's state stays here
        raise
    fetched.rename(final)
    return True


class CheckpointUploader:
    """Uploads each checkpoint in the background while training goes on, and rotates the store's copies as
    the local folder was rotated (``fetch_checkpoint`` brings the newest good one back). Used as a context
    around training: on the way out every upload has finished; the first failure is raised where training
    succeeded, only logged where it failed (also on preemption: the checkpoint must reach storage first)."""

    def __init__(self, storage: Storage, metrics: Metrics, folder: str = "checkpoints"):
        self.storage, self.metrics, self.folder = storage, metrics, folder
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self.pending: list[Future] = []

    def __enter__(self) -> CheckpointUploader:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self.wait()
        else:
            self.wait_quietly()

    def __call__(self, checkpoint: Path) -> None:
        self.raise_if_failed()  # an upload that gave up ends training at its next checkpoint
        # The log context (run_id, stage, rank) lives in contextvars, which threads do not inherit.
        context = contextvars.copy_context()
        self.pending.append(self.pool.submit(context.run, self._upload, checkpoint, checkpoint.stat().st_ino))

    def _upload(self, checkpoint: Path, inode: int) -> None:
        started = time.perf_counter()
        keep = {p.name for p in checkpoint_dirs(checkpoint.parent)}
        try:
            upload_tree(
                self.storage,
                checkpoint,
                f"{self.folder}/{checkpoint.name}",
                on_bytes=self.metrics.artifact_bytes_uploaded_total.inc,
                last=INDEX,  # uploaded last: its presence marks the checkpoint complete
            )
        except FileNotFoundError:
            if checkpoint.exists() and checkpoint.stat().st_ino == inode:
                raise
            # Rotated away (or written again) while the store was slow: a newer one is queued behind it.
            log.info("checkpoint_upload_skipped", checkpoint=checkpoint.name, reason="superseded")
            return
        self.metrics.checkpoint_stored()
        for key in self.storage.list(f"{self.folder}/"):
            name = key[len(self.folder) + 1 :].split("/")[0]
            if name not in keep and name != checkpoint.name:
                self.storage.delete_prefix(f"{self.folder}/{name}")
        log.info("checkpoint_uploaded", checkpoint=checkpoint.name, seconds=round(time.perf_counter() - started, 3))

    def raise_if_failed(self) -> None:
        for future in self.pending:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def wait(self) -> None:
        """Every upload finished; the first failure is raised."""
        self.pool.shutdown(wait=True)
        self.raise_if_failed()

    def wait_quietly(self) -> None:
        """Every upload finished (on the way out of a failed stage); failures are only logged."""
        self.pool.shutdown(wait=True)
        for future in self.pending:
            if future.exception() is not None:
                log.error("checkpoint_upload_failed", error=str(future.exception()))
