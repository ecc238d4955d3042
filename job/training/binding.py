"""A training stage's run binding: what its checkpoints belong to, so state of another run is refused.

    {"run_id": "20260101-...", "stage": "finetune",
     "options": {...every option that changes the trajectory...},
     "data": {"file": ".../instruction-data.json", "sha256": "..."},
     "model": {"folder": ".../gpt2/355M", "sha256": "..."}}

Every checkpoint's ``index.json`` records it (under the HMAC with ``--checkpoint-key-file``) and so does
the stage's record in the manifest. A checkpoint is resumed only where its binding is this one: the same
run id (``sft-job finetune`` on its own has none: its run is its output folder), the same stage, the same
options and the same bytes of data and starting weights (the paths may differ: another machine, another
scratch folder). Operational options and those that only say where training stops or how often it saves
(``--max-steps``, ``--checkpoint-every``, ``--keep-checkpoints``) are left out: a resume with others
follows the same trajectory, bit for bit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from job.core.errors import ConfigError, JobError
from job.core.settings import operational_options, redacted, result_changes
from job.data.sources import resolve_source, source_digest
from job.models.hub import cached_model_dir
from job.storage.store import sha256_file, sha256_files
from job.training.train_config import TrainConfig

# Not options of the trajectory: the inputs are bound by their sha256, the rest only stop or save it.
UNBOUND = frozenset({"output", "model_dir", "data", "max_steps", "checkpoint_every", "keep_checkpoints"})


class ForeignStateError(JobError):
    """A checkpoint that belongs to another run or stage, or records no binding (exit 1)."""


def stage_name(cfg: TrainConfig) -> str:
    return cfg.stage


def model_digest(folder: Path) -> str:
    """One sha256 over a model folder's files (names and contents; hidden files and partial downloads
    left out): the starting weights, whatever their layout."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".part")
    listing = "".join(f"{p.name}\0{d}\n" for p, d in zip(files, sha256_files(files), strict=True))
    return hashlib.sha256(listing.encode()).hexdigest()


def run_binding(cfg: TrainConfig, run_id: str | None) -> dict:
    """The binding of a training stage configured by ``cfg`` (its data and model already in place)."""
    values = redacted(cfg)
    skip = UNBOUND | operational_options(type(cfg))
    options = {k: v for k, v in values.items() if k not in skip}
    data = resolve_source(cfg.data, cfg.cache, cfg.base_url, cfg.data_split, cfg)
    model = Path(cfg.model_dir) if cfg.model_dir else cached_model_dir(cfg)
    return {
        "run_id": run_id,
        "stage": stage_name(cfg),
        "options": options,
        "data": {"file": data.label, "sha256": source_digest(data)},
        "model": {"folder": str(model), "sha256": model_digest(model)},
    } | _template_binding(cfg.chat_template)


def _template_binding(path: str | None) -> dict:
    """A --chat-template file decides the tokens and the loss mask as the data does: its sha256 is bound too."""
    return {"chat_template": {"file": path, "sha256": sha256_file(Path(path))}} if path else {}


# What a training stage reads besides its options: each must be the same bytes on resume.
BOUND_INPUTS = (
    ("model", "--model-dir", "folder"),
    ("data", "--data", "file"),
    ("chat_template", "--chat-template", "file"),
)


def _owner(binding: dict) -> str:
    run = f"run {binding['run_id']}" if binding.get("run_id") else "an `sft-job finetune`/`dpo` output folder"
    return f"the {binding.get('stage')} stage of {run}"


def binding_refusal(found: dict | None, ours: dict, where: str) -> JobError | None:
    """Why state recorded with binding ``found`` (None: none recorded) must not be resumed by the stage
    bound by ``ours``; ``where`` names it (``checkpoint runs/x/checkpoints/step-00000010``)."""
    if found is None:
        return ForeignStateError(
            f"{where} records no run binding (written by an earlier sft-job): finish it with that version, "
            "or move it away to train from the start"
        )
    if (found.get("run_id"), found.get("stage")) != (ours["run_id"], ours["stage"]):
        return ForeignStateError(
            f"{where} belongs to {_owner(found)}, not to {_owner(ours)}: move it away; it is not resumed"
        )
    inputs = (
        ("model", "--model-dir", "folder"),
        ("data", "--data", "file"),
        ("chat_template", "--chat-template", "file"),
    )
    for name, flag, place in inputs:
        then, now = found.get(name, {}).get("sha256"), ours.get(name, {}).get("sha256")
        if then != now:
            named = ours.get(name, found.get(name, {})).get(place)
            return ConfigError(
                f"{flag} {named} changed since {where} was written: sha256 {then} then, {now} now. "
                "Restore it, or train into another output"
            )
    changes = result_changes(found.get("options", {}), ours["options"], TrainConfig)  # every stage's operational ones
    if changes:
        return ConfigError(
            f"{where} was written with other options: {'; '.join(changes)}. Rerun with them, or train into "
            "another output"
        )
    return None
