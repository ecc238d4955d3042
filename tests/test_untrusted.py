"""Every reader of input from outside, fuzzed: config files, datasets, and each file read back from
the bucket (manifest, lock, config.yaml, checkpoint files, safetensors headers, the report's inputs,
progress files). Any input gives a valid result or the documented error (ParseError/ConfigError, exit
1/2, one short line), never another exception, and nothing unbounded."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from job.cli import build
from job.config import FinetuneConfig, GenerateConfig, JudgeConfig, RunConfig
from job.core.errors import ConfigError, ExitCode
from job.core.parsing import MAX_YAML_NODES, ParseError, load_json, load_yaml, safetensors_header
from job.core.settings import config_file_values, field_names
from job.run.lock import parse_lock_record
from job.run.manifest import Manifest
from job.run.report import SHAPES, _read
from job.storage.store import LocalStorage, read_progress
from job.training.checkpoint_files import INDEX, checkpoint_problem, index_text, signature

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON document: scalars of every kind (huge and odd numbers included) nested in lists and objects.
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)


def _json_text(value) -> str:
    return json.dumps(value)  # NaN and Infinity as Python writes them


# --- the bounded parsers ----------------------------------------------------------------------------


@pytest.mark.parametrize("parse", [load_json, load_yaml])
@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_the_parsers_return_a_value_or_a_parse_error(parse, data):
    try:
        parse(data, "input")
    except ParseError as exc:
        assert str(exc).startswith("input") and "\n" not in str(exc) and len(str(exc)) < 200


@FUZZ
@given(
    st.recursive(
        JSON_SCALARS,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    )
)
def test_yaml_that_python_wrote_reads_back(value):
    text = yaml.safe_dump(value)
    loaded = load_yaml(text, "input")
    assert json.dumps(loaded, sort_keys=True, default=str) == json.dumps(value, sort_keys=True, default=str) or (
        isinstance(value, float) and math.isnan(value)
    )


def _bomb(levels: int, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [6, 9, 20])
def test_an_alias_bomb_is_refused_before_it_expands(levels):
    with pytest.raises(ParseError, match=f"expands to more than {MAX_YAML_NODES}") as raised:
        load_yaml(_bomb(levels), "job.yaml")
    assert len(str(raised.value)) < 200


def test_deep_nesting_and_long_numbers_are_refused():
    for text, what in (("[" * 200_000 + "]" * 200_000, "nested"), ("[" + "9" * 5000 + "]", "5000 characters")):
        with pytest.raises(ParseError, match=what):
            load_json(text, "data")
    with pytest.raises(ParseError, match="nested deeper"):
        load_yaml("[" * 1000 + "]" * 1000, "job.yaml")
    with pytest.raises(ParseError, match="contains it"):
        load_yaml("a: &a [*a]", "job.yaml")


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1))
def test_safetensors_headers_are_checked_before_any_read(body, length):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(length.to_bytes(8, "little") + body)
        try:
            tensors = safetensors_header(path)
        except ParseError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 300
        else:
            assert all(8 + length + e["data_offsets"][1] <= path.stat().st_size for e in tensors.values())


# --- the config loader --------------------------------------------------------------------------------

RUN_FIELDS = sorted(field_names(RunConfig))


@FUZZ
@given(st.dictionaries(st.sampled_from(RUN_FIELDS), JSON, max_size=4))
def test_any_config_file_builds_a_config_or_is_one_config_error(values):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump(values))
        try:
            data = config_file_values(str(path), RunConfig, set(RUN_FIELDS))
            build(RunConfig, data)
        except ConfigError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 300
        except Exception as exc:  # click's UsageError from build(): the same one line, exit 2
            assert type(exc).__name__ == "UsageError" and exc.exit_code == ExitCode.BAD_CONFIG, exc


@FUZZ
@given(st.text(max_size=200))
def test_any_config_text_is_a_mapping_or_one_config_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(text)
        try:
            assert isinstance(config_file_values(str(path), FinetuneConfig, set(RUN_FIELDS)), dict)
        except ConfigError as exc:
            assert "\n" not in str(exc)


FLOAT_FIELDS = {
    cls: [f for f in sorted(field_names(cls)) if isinstance(getattr(cls(), f), float)]
    for cls in (RunConfig, FinetuneConfig, GenerateConfig, JudgeConfig)
}


@pytest.mark.parametrize("cls", list(FLOAT_FIELDS), ids=lambda c: c.__name__)
@given(data=st.data())
@FUZZ
def test_every_float_option_refuses_nan_and_infinities(cls, data):
    name = data.draw(st.sampled_from(FLOAT_FIELDS[cls]))
    value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    with pytest.raises(ConfigError, match=f"^{name} must be a finite number"):
        cls(**{name: value})


# --- files read back from the bucket -----------------------------------------------------------------


@FUZZ
@given(JSON | st.binary(max_size=100))
def test_any_manifest_is_read_or_refused_naming_it(value):
    with tempfile.TemporaryDirectory() as tmp:
        data = value if isinstance(value, bytes) else _json_text(value).encode()
        (Path(tmp) / "manifest.json").write_bytes(data)
        try:
            manifest = Manifest(LocalStorage(tmp), "r")
        except ParseError as exc:
            assert "manifest.json" in str(exc) and "\n" not in str(exc)
        else:  # a manifest that passed can be asked anything the pipeline asks
            for name in manifest.data["stages"]:
                manifest.verified(name)


def _manifest(**stage) -> dict:
    return {"run_id": "r", "version": "0.1.0", "stages": {"finetune": {"status": "complete", **stage}}}


@pytest.mark.parametrize(
    "document, field",
    [
        (_manifest(artifacts={"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}), "leaves the run"),
        (_manifest(artifacts={"model/config.json": {"size": -1, "sha256": "0" * 64}}), "size"),
        (_manifest(artifacts={"model/config.json": {"size": 1, "sha256": "xyz"}}), "sha256"),
        (_manifest(status="done"), "status"),
        ({"run_id": "r", "version": "0.1.0", "stages": []}, "stages"),
        ([], "the document"),
    ],
)
def test_a_manifest_of_the_wrong_shape_names_the_field(document, field, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(ParseError, match=field) as raised:
        Manifest(LocalStorage(tmp_path), "r")
    assert raised.value.exit_code == ExitCode.BAD_DATA


LOCK = {"run_id": "r", "host": "h", "pid": 1, "started": "2026-01-01T00:00:00+00:00", "expires": "2026-01-01T00:10:00"}


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(LOCK)), JSON, max_size=5) | JSON)
def test_any_lock_object_is_a_record_or_refused(value):
    body = {**LOCK, **value} if isinstance(value, dict) else value
    try:
        record = parse_lock_record(_json_text(body).encode(), "s3://b/r/.lock", "r")
    except ParseError as exc:
        assert str(exc).startswith("lock s3://b/r/.lock") and "delete it if no run of r is running" in str(exc)
    else:
        assert isinstance(record["pid"], int) and isinstance(record["expires"], str)


def test_a_lock_with_a_number_for_its_time_is_refused():
    with pytest.raises(ParseError, match="expires"):
        parse_lock_record(json.dumps({**LOCK, "expires": 1767225600}).encode(), "s3://b/r/.lock", "r")


# --- checkpoint files ----------------------------------------------------------------------------------

GOOD = {
    "trainer_state.json": {"step": 4, "epoch": 0, "batch_in_epoch": 4, "tokens_seen": 100, "history": []},
    "optimizer.json": {"param_groups": [{"params": [0, 1], "lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8}]},
    "rng-0.json": {"python": [3, [0] * 624 + [624], None]},
}


def _checkpoint(folder: Path, files: dict[str, bytes], key: bytes | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    digests = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    (folder / INDEX).write_text(index_text(digests, key))


def _good_files() -> dict[str, bytes]:
    import torch
    from safetensors.torch import save

    files = {n: json.dumps(v).encode() for n, v in GOOD.items()}
    files["model.safetensors"] = save({"w": torch.zeros(2, 2)})
    return files


def test_a_good_checkpoint_passes_and_a_signed_one_only_with_its_key(tmp_path):
    _checkpoint(tmp_path / "plain", _good_files())
    assert checkpoint_problem(tmp_path / "plain") is None
    key = b"k" * 32
    _checkpoint(tmp_path / "signed", _good_files(), key)
    assert checkpoint_problem(tmp_path / "signed", key) is None
    assert checkpoint_problem(tmp_path / "plain", key).reason == "not signed with --checkpoint-key-file's key"
    assert checkpoint_problem(tmp_path / "signed", b"x" * 32).file == INDEX
    forged = json.loads((tmp_path / "signed" / INDEX).read_text())
    forged["files"]["trainer_state.json"] = "0" * 64  # a writer without the key changes a file and its hash
    (tmp_path / "signed" / INDEX).write_text(json.dumps(forged))
    assert forged["hmac"] != signature(key, forged["files"])
    assert checkpoint_problem(tmp_path / "signed", key).file == INDEX


@FUZZ
@given(st.sampled_from(sorted(GOOD) + ["model.safetensors", INDEX]), JSON | st.binary(max_size=80))
def test_any_checkpoint_file_passes_its_checks_or_is_named(name, value):
    with tempfile.TemporaryDirectory() as tmp:
        files = _good_files()
        data = value if isinstance(value, bytes) else _json_text(value).encode()
        folder = Path(tmp) / "step-00000004"
        if name == INDEX:
            _checkpoint(folder, files)
            (folder / INDEX).write_bytes(data)
        else:
            _checkpoint(folder, {**files, name: data})  # the index re-hashed: only the shape checks stand
        rejected = checkpoint_problem(folder)
        assert rejected is None or (rejected.file in (name, *GOOD, "model.safetensors") and rejected.reason)


@FUZZ
@given(st.sampled_from(sorted(SHAPES)), JSON | st.binary(max_size=80))
def test_any_report_input_is_read_or_refused_naming_it(name, value):
    with tempfile.TemporaryDirectory() as tmp:
        data = value if isinstance(value, bytes) else _json_text(value).encode()
        (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)  # dpo/ and sft/ of a run --dpo
        (Path(tmp) / name).write_bytes(data)
        try:
            _read(Path(tmp), name)
        except ParseError as exc:
            assert name in str(exc) and "\n" not in str(exc)


@FUZZ
@given(st.lists(st.text(max_size=40) | JSON.map(_json_text), max_size=6))
def test_any_progress_file_gives_records_keyed_by_their_index(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "progress.jsonl"
        path.write_text("\n".join(line.replace("\n", " ") for line in lines))
        records = read_progress(path)
        assert all(type(i) is int and records[i]["index"] == i for i in records)
