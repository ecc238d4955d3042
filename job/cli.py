"""``sft-job``: parse flags, build one config, set up logs and metrics, call ``run_<stage>(cfg)``."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import typing
from pathlib import Path

import click
import cloup

from job import __version__
from job.config import RunConfig
from job.core.errors import (
    ConfigError,
    ExitCode,
    Interrupted,
    as_job_error,
    raise_on_stop_signals,
)
from job.core.observability import Metrics, bind, configure_logging, get_logger
from job.core.settings import Settings, config_file_values, default_of, field_help, field_names, marks
from job.stages.download_config import DownloadConfig
from job.stages.dpo_config import DPOConfig
from job.stages.export_config import ExportConfig
from job.stages.finetune_config import FinetuneConfig
from job.stages.generate_config import GenerateConfig
from job.stages.judge_config import JudgeConfig

ENV_PREFIX = "SFT_JOB"
CONFIG_FILE = "sft_job.config_file"  # ctx.meta's key for the --config file's path


def _load_config_file(ctx: click.Context, param: click.Parameter, value: str | None):
    """``--config job.yaml``: its keys become the command's defaults (flags and env still win)."""
    if value is None:
        return None
    known = {p.name for p in ctx.command.params}
    try:
        data = config_file_values(value, getattr(ctx.command.callback, "config_class", None), known)
    except ConfigError as exc:
        from_env = ctx.get_parameter_source(param.name) is click.core.ParameterSource.ENVIRONMENT
        hint = f"{ENV_PREFIX}_CONFIG" if from_env else "'--config'"  # where the file was named, not both
        raise click.BadParameter(str(exc), ctx, param, param_hint=hint) from None
    ctx.default_map = {**(ctx.default_map or {}), **data}
    ctx.meta[CONFIG_FILE] = value  # where its values came from, for build's errors
    return value


def _config_option():
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_config_file,
        envvar=f"{ENV_PREFIX}_CONFIG",
        show_envvar=True,
        help="YAML file of option values (keys are the flags' names with underscores; a file cannot name another).",
    )


def _with_log_options(f):
    for option in reversed(_log_options()):
        f = option(f)
    return f


def _log_options():
    return [
        click.option(
            "--log-format",
            type=click.Choice(["auto", "json", "console", "book"]),
            default="auto",
            show_default=True,
            envvar=f"{ENV_PREFIX}_LOG_FORMAT",
            show_envvar=True,
            help="JSON lines, a readable console (auto on a terminal), or book: only the lines the book's code "
            "prints (Ep 1 (Step 000000): Train loss ..., the epoch samples, the training time).",
        ),
        click.option(
            "--log-file",
            type=click.Path(dir_okay=False),
            envvar=f"{ENV_PREFIX}_LOG_FILE",
            show_envvar=True,
            help="Also append every event to this file as JSON lines, whatever --log-format shows.",
        ),
    ]


# --help's sections, in order: what people use first, then by concern: a field's ``section`` mark, else the
# ``help_section`` of the settings class that declares it.
COMMON = ("output", "run_id", "smoke", "skip_judge", "model", "model_dir", "responses", "data")  # in this order


def _section(cls: type[Settings], name: str) -> str:
    if name in COMMON:
        return "Common"
    declaring = next(k for k in reversed(cls.__mro__) if name in vars(k).get("__annotations__", {}))
    return marks(cls, name).get("section") or declaring.help_section


def settings_options(cls: type[Settings]):
    """A click option for every field of a settings class, help text from its docstring, each naming its
    SFT_JOB_* variable, in --help sections (common options first; cloup's option groups)."""

    def decorate(f):
        sections: dict[str, list] = {"Common": [_config_option()]}
        common_first = sorted(cls.model_fields, key=lambda name: COMMON.index(name) if name in COMMON else 99)
        for name in common_first:
            option = _option(cls, name)
            sections.setdefault(_section(cls, name), []).append(option)
        sections.setdefault("Observability", []).extend(_log_options())
        order = ["Common", *sorted(set(sections) - {"Common", "Storage", "Observability"}), "Storage", "Observability"]
        for title in reversed([t for t in order if t in sections]):
            f = cloup.option_group(f"{title} options", *sections[title])(f)
        f.config_class = cls  # for --config's type checks
        return f

    return decorate


class SourcedOption(cloup.Option):
    """An option whose bad value names the variable only when it came from there (click names it always:
    "Invalid value for '--precision' (env var: 'SFT_JOB_PRECISION')" for a flag too)."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        from_env = ctx is not None and ctx.get_parameter_source(self.name) is click.core.ParameterSource.ENVIRONMENT
        return super().get_error_hint(ctx) if from_env else click.Parameter.get_error_hint(self, ctx)


def _option(cls: type[Settings], name: str):
    flag = "--" + name.replace("_", "-")
    envvar = f"{ENV_PREFIX}_{name.upper()}"  # one name across stages: SFT_JOB_CACHE, SFT_JOB_JUDGE_URL
    hint, default, help_text = cls.model_fields[name].annotation, default_of(cls, name), field_help(cls, name)
    common = {"cls": SourcedOption, "default": default, "envvar": envvar, "show_envvar": True, "help": help_text}
    args = typing.get_args(hint)
    if hint is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", show_default=True, **common)
    base = next((a for a in args if a is not type(None)), hint) if type(None) in args else hint
    if typing.get_origin(base) is typing.Literal:
        return click.option(flag, type=click.Choice(typing.get_args(base)), show_default=True, **common)
    return click.option(flag, type=base, show_default=default is not None, **common)


def build(cls: type[Settings], params: dict):
    """The settings from the options the user gave (a flag, an SFT_JOB_* variable or a --config key, a value
    equal to the default included; outside a command, all of ``params``): the others take the class's
    defaults, and the class knows which were given (--smoke fills in only the others). A failed check is a
    one-line usage error."""
    ctx = click.get_current_context(silent=True)
    defaulted = (None, click.core.ParameterSource.DEFAULT)
    names = field_names(cls)
    given = {
        k: v for k, v in params.items() if k in names and (ctx is None or ctx.get_parameter_source(k) not in defaulted)
    }
    try:
        return cls(**given)
    except ConfigError as exc:
        message = str(exc) if ctx is None else _with_sources(cls, given, ctx, str(exc))
        raise click.UsageError(message) from None


def _with_sources(cls: type[Settings], given: dict, ctx: click.Context, message: str) -> str:
    """``message`` naming where each value it is about came from: the flag (``--epochs``), the variable
    (``SFT_JOB_EPOCHS``) or the config file's key (``job.yaml: epochs``), as click's own errors do. A value
    is one it is about where the check passes without it, or where the message names it and fails otherwise
    without it (a second bad value then speaks); one the check passes without but does not name is added as
    what it applies with. Any other ``--flag`` it names is called by its source's name too."""
    from_file, checked, blamed = False, message, set()
    for name in given:
        outcome = _outcome_without(cls, {k: v for k, v in given.items() if k != name})
        if outcome == checked or (outcome is not None and not _mentions(name, checked)):
            continue
        label, in_file = _label(ctx, name)
        from_file |= in_file
        blamed.add(name)
        message, found = _renamed(name, label, message)
        if not found:  # a value the check applies with, not the one it names (--lora-rank for --lora-alpha)
            message = f"{message} (with {label})"
    message, flags_in_file = _flags_by_source(ctx, message, blamed)
    return _file_first(ctx, message, from_file or flags_in_file)


def sourced(message: str) -> str:
    """A check's ``message`` (run after the settings were built: the preflight's) with each ``--flag`` it names
    called by where its value came from, the variable or the config file's key."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return message
    message, in_file = _flags_by_source(ctx, message)
    return _file_first(ctx, message, in_file)


def _file_first(ctx: click.Context, message: str, from_file: bool) -> str:
    """``message`` after the config file's path, where a value it names came from that file."""
    path = ctx.meta.get(CONFIG_FILE)
    return f"{path}: {message}" if from_file and path else message


def _label(ctx: click.Context, name: str) -> tuple[str, bool]:
    """What the user called option ``name``, and whether that was a config file's key."""
    source = ctx.get_parameter_source(name)
    if source is click.core.ParameterSource.DEFAULT_MAP:
        return name, True
    if source is click.core.ParameterSource.ENVIRONMENT:
        return f"{ENV_PREFIX}_{name.upper()}", False
    return "--" + name.replace("_", "-"), False


def _flags_by_source(ctx: click.Context, message: str, done: set[str] = frozenset()) -> tuple[str, bool]:
    """``message`` with every ``--flag`` of an option given by variable or config file called by that name
    (``done``: options already named); whether one came from the file."""
    in_file = False
    for name in ctx.params:
        label, from_file = _label(ctx, name)
        if name in done or label.startswith("--"):
            continue
        message, found = _mention("--" + name.replace("_", "-")).subn(label, message)
        in_file |= from_file and found > 0
    return message, in_file


def _mention(form: str) -> re.Pattern:
    return re.compile(rf"(?<![\w.-]){re.escape(form)}(?![\w-])")


def _mentions(name: str, message: str) -> bool:
    return any(_mention(form).search(message) for form in ("--" + name.replace("_", "-"), name))


def _renamed(name: str, label: str, message: str) -> tuple[str, int]:
    """``message`` with option ``name`` called ``label``: every ``--flag``, and every bare ``name`` with a "_"
    (no English word); a bare plain word (model, output) only where no flag names it, and once."""
    message, flags = _mention("--" + name.replace("_", "-")).subn(label, message)
    if flags and "_" not in name:
        return message, flags
    message, bare = _mention(name).subn(label, message, count=0 if "_" in name else 1)
    return message, flags + bare


def _outcome_without(cls: type[Settings], values: dict) -> str | None:
    """The check's error for ``values``, or None where they pass."""
    try:
        cls(**values)
    except ConfigError as exc:
        return str(exc)
    return None


def _run(stage: str, runner, cfg, log_format: str, log_file: str | None = None):
    """Logs and metrics set up, then the stage. Whatever fails ends as errors.py's contract says:
    one line on stderr, one log event (with the traceback, for a bug), the table's exit code."""
    try:
        configure_logging(log_format, log_file=log_file)
    except OSError as exc:
        _fail(ExitCode.BAD_CONFIG, f"--log-file {log_file}: {exc.strerror or exc}")
    bind(stage=stage, rank=int(os.environ.get("RANK", "0")))
    log = get_logger("sft_job")
    try:
        return runner(cfg, Metrics())
    except Exception as exc:  # noqa: BLE001  (every failure ends in one line and a code)
        error = as_job_error(exc)
        if error is None:
            log.exception("job_crashed", error=f"{type(exc).__name__}: {exc}", exit_code=ExitCode.INTERNAL)
            _fail(
                ExitCode.INTERNAL,
                f"internal error in {stage}: {_one_line(exc)} (a bug: the log's job_crashed event has the traceback)",
            )
        log.error("stage_failed", error=str(error), exit_code=error.exit_code)
        _fail(error.exit_code, sourced(str(error)) if isinstance(error, ConfigError) else str(error))


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _say_started() -> None:
    """Under job.launch: this process started (a launcher that fails before any did is refusing its own flags)."""
    exits = os.environ.get("SFT_JOB_EXIT_DIR")
    if exits:
        with contextlib.suppress(OSError):  # the code and line written at exit say what matters
            Path(exits, f"started-{os.environ.get('RANK', '0')}").touch()


def _fail(code: int, message: str) -> typing.NoReturn:
    line = f"Error: {' '.join(message.split())}"
    exits = os.environ.get("SFT_JOB_EXIT_DIR")
    if exits:  # under job.launch: it prints one line for the group, from every process's code and line
        rank = os.environ.get("RANK", "0")
        Path(exits, f"line-{rank}").write_text(line)
        Path(exits, f"rank-{rank}").write_text(str(int(code)))
    else:
        click.echo(line, err=True)
    sys.exit(int(code))


@click.group(context_settings={"show_default": True})
@click.version_option(__version__, prog_name="sft-job")
def main():
    """Instruction-finetune GPT-2 as in chapter 7 of Build a Large Language Model (From Scratch)."""


@main.command(cls=cloup.Command)
@settings_options(DownloadConfig)
def download(log_format, log_file, **params):
    """Fetch GPT-2 weights, the tokenizer and the dataset into the cache."""
    from job.stages.download import run_download

    _run("download", run_download, build(DownloadConfig, params), log_format, log_file)


@main.command(cls=cloup.Command)
@settings_options(FinetuneConfig)
def finetune(log_format, log_file, **params):
    """Finetune GPT-2 on the instruction data (accelerate; resumes from the output's checkpoints)."""
    from job.stages.finetune import run_finetune

    _run("finetune", run_finetune, build(FinetuneConfig, params), log_format, log_file)


@main.command(cls=cloup.Command)
@settings_options(DPOConfig)
def dpo(log_format, log_file, **params):
    """Preference-tune a finetuned model with DPO (the book's ch07/04; resumes from the output's checkpoints)."""
    from job.stages.dpo import run_dpo

    _run("dpo", run_dpo, build(DPOConfig, params), log_format, log_file)


@main.command(cls=cloup.Command)
@settings_options(GenerateConfig)
def generate(log_format, log_file, **params):
    """Generate responses for the test split (batched KV-cache decoding; resumes where it stopped)."""
    from job.stages.generate import run_generate

    _run("generate", run_generate, build(GenerateConfig, params), log_format, log_file)


@main.command(cls=cloup.Command)
@settings_options(JudgeConfig)
def judge(log_format, log_file, **params):
    """Score responses 0-100 with an LLM judge (Ollama sidecar or OpenAI-compatible server)."""
    from job.stages.judge import run_judge

    _run("judge", run_judge, build(JudgeConfig, params), log_format, log_file)


@main.command(cls=cloup.Command)
@settings_options(ExportConfig)
def export(log_format, log_file, **params):
    """Write a model folder as GGUF (llama.cpp, Ollama, LM Studio) with an Ollama Modelfile beside it."""
    from job.stages.export import run_export

    _run("export", run_export, build(ExportConfig, params), log_format, log_file)


@main.command(cls=cloup.Command)
@settings_options(RunConfig)
def run(log_format, log_file, **params):
    """Preflight, then download, finetune, generate and judge into one run folder (local or S3)."""
    from job.run.pipeline import run_pipeline

    _run("run", run_pipeline, build(RunConfig, params), log_format, log_file)


# What slurm/finetune.sbatch needs of the job's own settings (one parse: the same file, SFT_JOB_* values and
# precedence as `run`), as shell assignments it evals.
SLURM_SETTINGS = ("skip_judge", "judge_backend", "judge_url", "run_id")


@main.command(name="slurm-settings", cls=cloup.Command, hidden=True)
@settings_options(RunConfig)
def slurm_settings(log_format, log_file, **params):
    """The settings slurm/finetune.sbatch needs, checked as `run` checks them (a bad one: exit 2), as
    `name=value` shell lines; `spare_port` is a port free on this node now (for the judge's ollama serve)."""
    import shlex
    import socket

    cfg = build(RunConfig, params)
    values = {name: getattr(cfg, name) for name in SLURM_SETTINGS}
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        values["spare_port"] = spare.getsockname()[1]
    for name, value in values.items():
        text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        click.echo(f"{name}={shlex.quote(text)}")


@main.command()
@click.argument("source")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the report here instead of into the run.")
@click.option(
    "--s3-endpoint-url",
    envvar=f"{ENV_PREFIX}_S3_ENDPOINT_URL",
    show_envvar=True,
    help="S3-compatible endpoint (MinIO, Ceph); AWS when unset.",
)
@_with_log_options
def report(source, output, s3_endpoint_url, log_format, log_file):
    """Rebuild a run's report.html from its folder or s3:// prefix (RUN_DIR_OR_S3_URL)."""
    from job.run.report import run_report

    _run("report", lambda _cfg, _metrics: run_report(source, s3_endpoint_url, output), None, log_format, log_file)


def entrypoint(argv: list[str] | None = None) -> None:
    """``sft-job``: click's usage errors end like every other failure, as one line (exit 2); a stop
    signal at any moment ends it with 75."""
    restore = raise_on_stop_signals()
    _say_started()
    try:
        code = main.main(args=argv, prog_name="sft-job", standalone_mode=False)
    except Interrupted as exc:  # before any stage started (parsing, imports)
        _fail(ExitCode.RETRY, str(exc))
    except click.ClickException as exc:
        configure_logging("auto")
        rank = int(os.environ.get("RANK", "0"))  # under job.launch the line is the group's: each log says whose
        get_logger("sft_job").error("usage_error", error=exc.format_message(), exit_code=ExitCode.BAD_CONFIG, rank=rank)
        _fail(ExitCode.BAD_CONFIG, exc.format_message())
    except click.Abort:  # click's own prompts only: SIGINT raises Interrupted
        _fail(ExitCode.RETRY, "aborted")
    finally:
        restore()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    entrypoint()
