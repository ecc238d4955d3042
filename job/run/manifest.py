"""``manifest.json``: where a run stands. Each stage's status, times and artifacts (size, sha256), and
at the top the run's status and, when a signal or an error ended it, where it stopped.

The manifest is read back from the run's storage, which another writer may have changed: it is
parsed with bounds and checked against its shape (``ManifestFile``) before anything trusts it; a
manifest that does not fit is exit 1 naming the field.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from job import __version__
from job.core.observability import get_logger
from job.core.parsing import load_json, validated
from job.storage.store import Storage, atomic_write_text, unsafe_key

log = get_logger(__name__)
MANIFEST = "manifest.json"
FAILURE_RECORD_PATIENCE_S = 30.0  # how long a failed stage waits for the store to record its failure
StageStatusName = Literal["running", "complete", "failed", "interrupted"]


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


class StageRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: StageStatusName
    start: str | None = None
    end: str | None = None
    duration_s: float | None = None
    error: str | None = None
    artifacts: dict[str, Artifact] = {}

    @field_validator("artifacts")
    @classmethod
    def _keys_inside_the_run(cls, artifacts: dict[str, Artifact]) -> dict[str, Artifact]:
        bad = next((k for k in artifacts if unsafe_key(k)), None)
        if bad is not None:
            raise ValueError(f"artifact key {bad[:60]!r} leaves the run's folder")
        return artifacts


class InputFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    sha256: str


class RunInputs(BaseModel):
    """What the run trained from (``Pipeline`` records it at the start)."""

    model_config = ConfigDict(extra="allow")
    model: str
    model_dir: InputFile | None = None
    data: InputFile | None = None
    dpo_data: InputFile | None = None
    chat_template: InputFile | None = None


class ManifestFile(BaseModel):
    """What a manifest must hold; keys it does not name are kept as they are (a newer version's)."""

    model_config = ConfigDict(extra="allow")
    run_id: str
    version: str
    stages: dict[str, StageRecord]
    status: StageStatusName | None = None
    inputs: RunInputs | None = None


class Manifest:
    """The run's manifest in its storage. For a remote run a copy is kept in the scratch folder too,
    so a failure is on record even while the store is down."""

    def __init__(self, storage: Storage, run_id: str, local_copy: Path | None = None):
        self.storage, self.local_copy = storage, local_copy
        text = storage.get_text(MANIFEST)
        if text is None:
            self.data = {"run_id": run_id, "version": __version__, "stages": {}}
        else:
            what = f"{MANIFEST} of run {run_id} ({storage.url})"
            self.data = load_json(text, what)
            validated(ManifestFile, self.data, what)

    def stage(self, name: str) -> dict:
        return self.data["stages"].get(name, {})

    def verified(self, name: str) -> bool:
        """Complete, and every artifact still there with its recorded sha256."""
        entry = self.stage(name)
        if entry.get("status") != "complete":
            return False
        for key, meta in entry.get("artifacts", {}).items():
            if self.storage.sha256(key) != meta["sha256"].lower():  # hex in either case, as hashes are read
                log.warning("artifact_changed", stage=name, artifact=key)
                return False
        return True

    def update(self, name: str | None = None, **fields) -> None:
        """Update stage ``name`` with ``fields`` (or, without a name, the run's top-level fields), in memory."""
        if name is None:
            self.data.update(fields)
        else:
            self.data["stages"][name] = {**self.stage(name), **fields}

    def record(self, name: str | None = None, **fields) -> None:
        """``update``, then write the manifest."""
        self.update(name, **fields)
        self.data["updated"] = now()
        text = json.dumps(self.data, indent=2) + "\n"
        if self.local_copy is not None:
            atomic_write_text(self.local_copy, text)
        self.storage.put_text(MANIFEST, text)

    def record_failure(self, name: str | None = None, **fields) -> None:
        """On the way out of a failed run: a short wait for the store at most, never a new error."""
        try:
            with self.storage.patience(FAILURE_RECORD_PATIENCE_S):
                self.record(name, **fields)
        except Exception as exc:  # noqa: BLE001  (the run's own error is the one to report)
            log.error("manifest_write_failed", stage=name, error=f"{type(exc).__name__}: {exc}")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
