"""The run's settings: composed of the stages', each beside its owner; the smoke preset fills in only the
options not given by hand, whichever way they were given (a keyword in code, a flag, an SFT_JOB_* variable,
a --config key), a value equal to the default included."""

from __future__ import annotations

import pytest

from job import cli
from job.config import SMOKE_PRESET, RunConfig
from job.core.settings import Settings, default_of, field_names
from job.data.data_config import DataConfig
from job.models.decoding_config import DecodingSettings
from job.models.origin import HubAccess, ModelOrigin, ModelSourceConfig
from job.stages.dpo_config import DPOConfig, DPOSettings
from job.stages.export_config import ExportSettings
from job.stages.finetune_config import FinetuneConfig, FinetuneSettings
from job.stages.generate_config import GenerateConfig
from job.stages.judge_config import JudgeConfig, JudgeSettings
from job.training.train_config import TrainSettings

PARTS = (
    ModelOrigin,
    HubAccess,
    ModelSourceConfig,
    DataConfig,
    TrainSettings,
    FinetuneSettings,
    DecodingSettings,
    JudgeSettings,
    DPOSettings,
    ExportSettings,
)


def _depth(cls: type) -> int:
    """Edges from ``cls`` up to the settings' base along its longest line of settings classes."""
    bases = [b for b in cls.__bases__ if issubclass(b, Settings)]
    return 1 + max(map(_depth, bases)) if bases else 0


def test_the_run_is_its_parts_and_its_own_options_composed_not_inherited_deep():
    parts = set().union(*(field_names(p) for p in PARTS))
    assert parts <= field_names(RunConfig)
    assert field_names(RunConfig) - parts == {
        "run_id",
        "generate_batch_size",
        "skip_judge",
        "smoke",
        "require_gpu",
        "s3_endpoint_url",
        "scratch",
        "metrics_port",
        "metrics_address",
        "metrics_sd_dir",
        "pushgateway",
        "s3_retry_timeout",
        "lock_lease",
    }
    assert _depth(RunConfig) == 2 and {_depth(p) for p in PARTS} == {1}
    assert max(map(_depth, (FinetuneConfig, DPOConfig, GenerateConfig, JudgeConfig))) == 3


@pytest.mark.parametrize("name", sorted(k for k, v in SMOKE_PRESET.items() if v != default_of(RunConfig, k)))
def test_a_smoke_keeps_a_default_value_given_in_code(name):
    default = default_of(RunConfig, name)
    cfg = RunConfig(smoke=True, **{name: default})
    assert getattr(cfg, name) == default != SMOKE_PRESET[name]
    assert getattr(RunConfig(smoke=True), name) == SMOKE_PRESET[name]


def test_a_smoke_keeps_the_default_model_given_in_code_and_a_null_model_with_a_folder(tmp_path):
    assert RunConfig(smoke=True, model="gpt2-medium").model == "gpt2-medium"
    assert RunConfig(smoke=True).model == "smoke"
    folder = RunConfig(smoke=True, model=None, model_dir=str(tmp_path))  # config.yaml of a --model-dir run
    assert (folder.model, folder.model_dir) == ("gpt2-medium", str(tmp_path))


@pytest.mark.parametrize("door", ["flag", "env", "yaml"])
def test_a_smoke_keeps_a_default_value_given_through_any_door(door, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(cli, "_run", lambda stage, runner, cfg, *args: built.append(cfg))
    argv = ["run", "--smoke", "--output", str(tmp_path / "runs")]
    if door == "flag":
        argv += ["--temperature", "0", "--judge-wait", "300s"]
    elif door == "env":
        monkeypatch.setenv("SFT_JOB_TEMPERATURE", "0")
        monkeypatch.setenv("SFT_JOB_JUDGE_WAIT", "300s")
    else:
        (tmp_path / "job.yaml").write_text("temperature: 0\njudge_wait: 300s\n")
        argv += ["--config", str(tmp_path / "job.yaml")]
    with pytest.raises(SystemExit) as exited:
        cli.entrypoint(argv)
    assert exited.value.code == 0
    [cfg] = built
    assert (cfg.temperature, cfg.judge_wait) == (0.0, "300s")  # given, though equal to the defaults
    assert (cfg.top_k, cfg.train_limit, cfg.model) == (50, 40, "smoke")  # not given: the smoke's
