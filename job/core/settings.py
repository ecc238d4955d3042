"""What every settings class shares: the pydantic base (a field's docstring is its ``--help``, YAML key and
``SFT_JOB_*`` variable; values validated strictly), ``option``'s marks, and the checks and parsers that
settings of several owners use. Each stage's settings live beside their owner; ``job/config.py`` composes
the run's from them."""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from typing import Any, ClassVar
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from job.core.errors import ConfigError
from job.core.parsing import short

REDACTED = "<redacted>"
MIRROR_SCHEMES = ("http", "https", "s3")
MAX_DURATION_S = 30 * 86400.0  # a wait or lease past a month is a typo (and would overflow a socket timeout)
MAX_SEED = 2**63 - 1  # torch's generators and Ollama take 64-bit seeds
# S3's rules for bucket names (no IP addresses either); MinIO and Ceph refuse the same.
BUCKET_RE = re.compile(r"(?!\d+\.\d+\.\d+\.\d+$)(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
STRICT = ConfigDict(strict=True, allow_inf_nan=False)


class Settings(BaseModel):
    """A settings class: fields with a default and a docstring each; values of the field's own type only
    (no coercion: 1.5 is no integer, true no number; NaN and infinities are refused); an unknown name is
    refused. A failed check is a ConfigError naming the field. ``help_section`` titles the ``--help``
    section of the fields a class declares."""

    # protected_namespaces: model and model_dir are options, not pydantic's model_* API.
    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid", protected_namespaces=(), **STRICT)
    help_section: ClassVar[str] = "Options"

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise settings_error(exc) from None


def settings_error(exc: ValidationError) -> ConfigError:
    """The first of pydantic's errors as one ConfigError: our own checks' error as raised, a type's named."""
    first = exc.errors()[0]
    raised = first.get("ctx", {}).get("error")
    if isinstance(raised, ConfigError):
        return raised
    return ConfigError(type_error(str(first["loc"][0]) if first["loc"] else "value", first))


# pydantic's error types, in the words of our one-line errors ("epochs must be an integer, got 1.5")
WANTED = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string"}


def type_error(key: str, error: dict) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key} is not an option here"
    if kind == "literal_error":
        wanted = f"one of {error['ctx']['expected']}"
    elif kind == "finite_number":
        wanted = "a finite number"
    else:
        wanted = next((words for prefix, words in WANTED.items() if kind.startswith(prefix)), None)
        wanted = wanted or error["msg"][:1].lower() + error["msg"][1:]  # none of ours: pydantic's own words
    given = error["input"]
    # a mapping or a list where a scalar belongs: its kind says enough, and its repr may be long
    got = {dict: "a mapping", list: "a list"}.get(type(given)) or short(given)
    return f"{key} must be {wanted}, got {got}"


def option(
    default,
    *,
    operational: bool = False,
    secret: bool = False,
    section: str | None = None,
    feeds: tuple[str, str] | None = None,
):
    """A field's default and what the job must know of it, declared once, where the field is:

    - ``operational``: changes how a run runs, not its results; a rerun of a run id may change it (any other
      change is refused, exit 2), and config.yaml keeps the value the run started with.
    - ``secret``: the value never leaves memory (config.yaml, logs, checkpoints read ``<redacted>``); a secret
      is operational.
    - ``section``: the ``--help`` section, where it is not the declaring class's ``help_section``.
    - ``feeds``: ``(stage, field)``: ``sft-job run`` passes this value to that stage's field of another name
      (``generate_batch_size`` is generate's ``batch_size``); every other field passes to the stage field of
      its own name.
    """
    marks = {"operational": operational or secret, "secret": secret, "section": section, "feeds": feeds}
    return Field(default, json_schema_extra=marks)


def marks(cls: type[Settings], name: str) -> dict:
    """``option``'s marks of field ``name`` (none for a field declared with a plain default)."""
    return cls.model_fields[name].json_schema_extra or {}


def field_names(cls: type[Settings]) -> set[str]:
    return set(cls.model_fields)


def field_help(cls: type[Settings], name: str) -> str:
    """The field's docstring (pydantic reads it as the description), on one line."""
    return " ".join((cls.model_fields[name].description or "").split())


def default_of(cls: type[Settings], name: str):
    return cls.model_fields[name].get_default(call_default_factory=True)


def operational_options(cls: type[Settings]) -> set[str]:
    """The fields of ``cls`` a rerun may change."""
    return {name for name in cls.model_fields if marks(cls, name).get("operational")}


def redacted(cfg: Settings) -> dict:
    """``cfg`` as a dict for writing anywhere: every secret field that is set reads ``<redacted>``."""
    values = cfg.model_dump()
    for name in values:
        if marks(type(cfg), name).get("secret") and values[name] is not None:
            values[name] = REDACTED
    return values


def stage_values(run_cfg: Settings, stage: str, stage_cls: type[Settings], **overrides) -> dict:
    """The values ``sft-job run`` gives stage ``stage``'s config ``stage_cls``: each field the run's value of
    the same name, or of the run field that ``feeds`` it; then ``overrides`` (the run folder's paths)."""
    run_cls = type(run_cfg)
    renamed = {}
    for name in run_cls.model_fields:
        feeds = marks(run_cls, name).get("feeds")
        if feeds and feeds[0] == stage:
            renamed[feeds[1]] = name
    values = {}
    for name in stage_cls.model_fields:
        source = renamed.get(name, name)
        if source in run_cls.model_fields:
            values[name] = getattr(run_cfg, source)
    return values | overrides


def stage_config(run_cfg: Settings, stage: str, stage_cls: type[Settings], **overrides):
    """``stage_cls`` built from ``stage_values``."""
    return stage_cls(**stage_values(run_cfg, stage, stage_cls, **overrides))


def check_value(cls: type[Settings], key: str, value):
    """A config file's ``value`` for field ``key`` of ``cls``, validated strictly against the field's type;
    a ConfigError names the key. YAML reads ``judge_wait: 300`` and ``run_id: 42`` as numbers: a number
    a string field takes is taken as its text."""
    adapter = TypeAdapter(cls.model_fields[key].annotation, config=STRICT)
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return adapter.validate_python(str(value))
            except ValidationError:
                pass
        raise ConfigError(type_error(key, {**exc.errors()[0], "input": value})) from None


def config_file_values(path: str, cls: type[Settings] | None, known: set[str]) -> dict:
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


def result_changes(saved: dict, current: dict, cls: type[Settings]) -> list[str]:
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


# --- checks that settings of several owners share ---------------------------------------------------


def check_url(name: str, value: str | None, schemes: tuple[str, ...]) -> None:
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


def check_s3_key(name: str, value: str) -> None:
    """A dataset given as s3://bucket/key names a real bucket; a local path or http(s) URL is checked where read."""
    if urlparse(value).scheme == "s3":
        check_url(name, value, ("s3",))


def positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(obj, name)}")


def positive_if_set(obj, *names: str) -> None:
    positive(obj, *(name for name in names if getattr(obj, name) is not None))


def seed(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not 0 <= value <= MAX_SEED:
            raise ConfigError(f"{name} must be in 0..{MAX_SEED}, got {short(value)}")


def parse_duration(text: str | float | int, name: str = "duration") -> float:
    """Seconds from ``300``, ``300s``, ``5m`` or ``1h``, at most 30 days."""
    match = re.fullmatch(r"\s*(\d{1,12}(?:\.\d{1,9})?)\s*([smh]?)\s*", str(text))
    if not match:
        raise ConfigError(f"{name} {short(text)} must look like 300, 300s, 5m or 1h")
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if seconds > MAX_DURATION_S:
        raise ConfigError(f"{name} {short(text)} is longer than 30 days")
    return seconds


def check_published_endpoint(port: int | None, address: str) -> None:
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
