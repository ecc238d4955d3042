"""The run's settings, composed of the stages' (each beside its owner), and the smoke preset.

Where an option goes: beside the stage that uses it, in that stage's settings class (``job/stages/<stage>_config.py``,
the loop's in ``job/training/train_config.py``, the data's in ``job/data/data_config.py``, the model's origin in
``job/models/origin.py``, decoding's in ``job/models/decoding_config.py``); ``RunConfig`` composes them, so
``sft-job run`` has it too. A field's docstring is its ``--help``; ``job/core/settings.py`` holds the shared parts.
"""

from __future__ import annotations

import os
import re
from typing import ClassVar, Literal

from pydantic import model_validator

from job.core.errors import ConfigError
from job.core.parsing import short
from job.core.settings import (
    check_published_endpoint,
    check_url,
    default_of,
    option,
    parse_duration,
    positive,
)
from job.data.data_config import DataConfig
from job.models.decoding_config import DecodingSettings
from job.models.origin import HubAccess, ModelOrigin, ModelSourceConfig
from job.models.registry import ModelName
from job.stages.download_config import DownloadConfig
from job.stages.dpo_config import DPOConfig, DPOSettings
from job.stages.export_config import ExportConfig, ExportSettings
from job.stages.finetune_config import FinetuneConfig, FinetuneSettings
from job.stages.generate_config import GenerateConfig
from job.stages.judge_config import JudgeConfig, JudgeSettings
from job.training.train_config import TrainConfig, TrainSettings

__all__ = [  # the owners' classes, for code that still names them from here
    "DataConfig",
    "DecodingSettings",
    "DownloadConfig",
    "DPOConfig",
    "ExportConfig",
    "FinetuneConfig",
    "GenerateConfig",
    "JudgeConfig",
    "JudgeSettings",
    "ModelOrigin",
    "RunConfig",
    "TrainConfig",
]
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

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


def smoke_values(given: dict) -> dict:
    """``given`` (the options given by hand: a flag, an SFT_JOB_* variable, a --config key, or a keyword in
    code) with --smoke's values for every other option: its model (unless a model_dir is given), its own data
    (no network), few entries and steps; so config.yaml records what runs."""
    own_data = smoke_data(given.get("cache") or default_of(ModelOrigin, "cache"))
    preset = SMOKE_PRESET | {"data": own_data, "dpo_data": own_data}
    if given.get("model_dir") is None:
        preset["model"] = SMOKE_MODEL_NAME
    return preset | given


class RunConfig(
    FinetuneSettings,
    TrainSettings,
    ModelSourceConfig,
    ModelOrigin,
    HubAccess,
    DataConfig,
    DecodingSettings,
    JudgeSettings,
    DPOSettings,
    ExportSettings,
):
    """``sft-job run``: download, finetune, generate and judge in one job, into one run folder."""

    help_section: ClassVar[str] = "Run"
    OTHER_MODELS: ClassVar[tuple[str, ...]] = (SMOKE_MODEL_NAME,)
    model: RunModelName | None = "gpt2-medium"
    """Named model, fetched into the cache: a GPT-2 size (the book finetunes gpt2-medium, 355M), a base model
    on the Hugging Face hub (the choices: job/models/registry.py), or smoke:
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

    @model_validator(mode="before")
    @classmethod
    def _given_by_hand(cls, given: dict) -> dict:
        """What was given is what the constructor got: --smoke fills in the rest; a null model (config.yaml
        of a --model-dir run: no named model ran) is the default one, unused."""
        values = smoke_values(given) if given.get("smoke") else dict(given)
        if "model" in values and values["model"] is None:
            if values.get("model_dir") is None:
                raise ConfigError("model is null and no model_dir is given: name a model or a model_dir")
            del values["model"]
        return values

    @model_validator(mode="after")
    def _check_run(self):
        if self.model == SMOKE_MODEL_NAME and self.model_dir is not None:
            raise ConfigError(
                f"model smoke (the smoke's random model) and model_dir {short(self.model_dir)} name two models: "
                "give one"
            )
        if self.packing and self.dpo:
            raise ConfigError(
                "--packing and --dpo cannot go together: each preference pair's log-probabilities need rows of "
                "their own; drop --packing or --dpo"
            )
        positive(self, "generate_batch_size")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.metrics_sd_dir:
            check_published_endpoint(self.metrics_port, self.metrics_address)
        if self.run_id is not None and not RUN_ID_RE.fullmatch(self.run_id):
            raise ConfigError(
                f"run_id {short(self.run_id)} ({len(self.run_id)} characters) must be 1 to 128 letters, digits, "
                "'.', '_' and '-', starting with a letter or digit"
            )
        if "://" in self.output:
            check_url("output", self.output, ("s3",))
        check_url("s3_endpoint_url", self.s3_endpoint_url, ("http", "https"))
        for name in ("s3_retry_timeout", "lock_lease"):
            if parse_duration(getattr(self, name), name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        return self
