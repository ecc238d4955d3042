"""An option is declared once, in its owner's settings class: ``sft-job run`` passes it to its stage and the
rerun rule follows its marks, with no other edit. Checked by adding a field at test time, as a developer would."""

from __future__ import annotations

import pydantic
import pytest
import yaml

import job.run.pipeline
from job.config import (
    DecodingSettings,
    FinetuneConfig,
    GenerateConfig,
    JudgeConfig,
    JudgeSettings,
    RunConfig,
)
from job.core.errors import ConfigError
from job.core.observability import Metrics
from job.core.settings import marks, operational_options, option, redacted, result_changes, stage_values
from job.run.manifest import Manifest
from job.run.pipeline import Pipeline
from job.run.stage_record import StageRecorder


def _with_new_option(base: type, stage_cls: type, operational: bool):
    """``base`` with one more field (``beam_width``), and the stage's and the run's configs built on it."""
    extended = pydantic.create_model(base.__name__, __base__=base, beam_width=(int, option(1, operational=operational)))
    stage = extended if base is stage_cls else type(stage_cls.__name__, (stage_cls, extended), {})
    run = type("RunConfig", (RunConfig, extended), {})
    return stage, run


def _run_cfg(run_cls, tmp_path, **values):
    return run_cls(output=str(tmp_path / "runs"), run_id="r1", cache=str(tmp_path / "cache"), **values)


def test_a_new_decoding_option_reaches_the_generate_stage_through_run(tmp_path, monkeypatch):
    generate_cls, run_cls = _with_new_option(DecodingSettings, GenerateConfig, operational=False)
    seen = []
    monkeypatch.setattr(job.run.pipeline, "GenerateConfig", generate_cls)
    monkeypatch.setattr(job.run.pipeline, "run_generate", lambda cfg, metrics: seen.append(cfg))
    pipeline = Pipeline(_run_cfg(run_cls, tmp_path, beam_width=4, generate_batch_size=3, top_k=7), Metrics())
    manifest = Manifest(pipeline.storage, pipeline.run_id, None)  # a run whose manifest records no stage yet
    pipeline.stages = StageRecorder(manifest, pipeline.storage, pipeline.work, pipeline.metrics)
    for name in ("model/model.safetensors", "model/config.json"):  # what the finetune stage left
        (pipeline.work / name).parent.mkdir(parents=True, exist_ok=True)
        (pipeline.work / name).write_text("")
    pipeline.generate()
    [cfg] = seen
    assert (cfg.beam_width, cfg.top_k) == (4, 7)
    assert cfg.batch_size == 3  # --generate-batch-size feeds generate's batch_size, not finetune's --batch-size
    assert cfg.model_dir == str(pipeline.work / "model") and cfg.output == str(pipeline.work)


@pytest.mark.parametrize(
    ("base", "stage", "stage_cls"),
    [(FinetuneConfig, "finetune", FinetuneConfig), (JudgeSettings, "judge", JudgeConfig)],
)
def test_a_new_option_of_any_stage_is_derived_by_name(base, stage, stage_cls, tmp_path):
    derived_cls, run_cls = _with_new_option(base, stage_cls, operational=True)
    values = stage_values(_run_cfg(run_cls, tmp_path, beam_width=9), stage, derived_cls, output="elsewhere")
    cfg = derived_cls(**values)
    assert cfg.beam_width == 9 and cfg.output == "elsewhere"


def test_every_stage_field_the_run_has_is_passed_unchanged(tmp_path):
    """Whatever the stage: each field of its config that the run also has takes the run's value."""
    run = RunConfig(output=str(tmp_path), top_k=5, lr=1e-4, judge_model="qwen3", eos_check_every=8)
    for stage, cls in (("finetune", FinetuneConfig), ("generate", GenerateConfig), ("judge", JudgeConfig)):
        values = stage_values(run, stage, cls)
        shared = set(cls.model_fields) & set(type(run).model_fields)
        renamed = {"batch_size"} if stage == "generate" else set()
        assert {k: values[k] for k in shared - renamed} == {k: getattr(run, k) for k in shared - renamed}
    assert stage_values(run, "generate", GenerateConfig)["batch_size"] == run.generate_batch_size


@pytest.mark.parametrize("operational", [True, False])
def test_the_rerun_rule_follows_the_new_fields_metadata(operational, tmp_path):
    _generate, run_cls = _with_new_option(DecodingSettings, GenerateConfig, operational=operational)
    first, second = _run_cfg(run_cls, tmp_path, beam_width=1), _run_cfg(run_cls, tmp_path, beam_width=4)
    saved, now = redacted(first) | {"run_id": "r1"}, redacted(second) | {"run_id": "r1"}
    assert result_changes(saved, now, run_cls) == ([] if operational else ["beam_width 1 (now 4)"])
    # The same rule where a rerun meets it: the run's config.yaml against the rerun's options.
    pipeline = Pipeline(second, Metrics())
    pipeline.storage.put_text("config.yaml", yaml.safe_dump(saved, sort_keys=False))
    if operational:
        assert pipeline._check_same_run() is not None
    else:
        with pytest.raises(ConfigError, match=r"started with other options: beam_width 1 \(now 4\)"):
            pipeline._check_same_run()


def test_the_operational_and_secret_marks_are_the_ones_the_readme_describes():
    ops = operational_options(RunConfig)
    secrets = {name for name in RunConfig.model_fields if marks(RunConfig, name).get("secret")}
    assert secrets == {"judge_api_key", "hf_token"} and secrets <= ops
    # ports, endpoints, credentials, folders, --skip-judge, judge concurrency, waits and retries
    assert {"metrics_port", "s3_endpoint_url", "judge_api_key_file", "output", "cache", "scratch", "hub_url"} <= ops
    assert {"skip_judge", "judge_concurrency", "judge_wait", "judge_retries", "s3_retry_timeout"} <= ops
    # and nothing that changes what is trained, generated or scored
    assert not ops & {"lr", "epochs", "seed", "model", "data", "temperature", "judge_model", "judge_seed"}
    assert "hub_revision" not in ops  # another revision is other weights
