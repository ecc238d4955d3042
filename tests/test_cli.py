import io
import json

import pytest
from click.testing import CliRunner

from job import cli
from job.errors import JobError


def test_help_lists_every_stage():
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    for stage in ("download", "finetune", "generate", "judge", "run"):
        assert f"  {stage} " in result.output


def test_every_flag_has_help_from_the_field_docstrings():
    for name, command in cli.main.commands.items():
        for param in command.params:
            if param.name not in ("help",):
                assert getattr(param, "help", None), f"{name} --{param.name} has no help"


def _capture(monkeypatch):
    out = io.StringIO()
    real = cli.configure_logging
    monkeypatch.setattr(cli, "configure_logging", lambda fmt: real(fmt, stream=out))
    return out


def test_uncaught_error_is_one_json_event_with_its_traceback(monkeypatch):
    out = _capture(monkeypatch)

    def crash(cfg, metrics):
        return {}["missing"]

    with pytest.raises(SystemExit) as exited:
        cli._run("finetune", crash, object(), "json")
    assert exited.value.code == 1
    [line] = out.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "job_crashed" and event["stage"] == "finetune" and event["level"] == "error"
    assert event["error"] == "KeyError: 'missing'"
    frames = event["exception"][0]["frames"]
    assert frames[-1]["name"] == "crash"


def test_job_error_is_one_line_on_stderr_with_its_exit_code(monkeypatch, capsys):
    out = _capture(monkeypatch)

    class Bad(JobError):
        exit_code = 2

    def fail(cfg, metrics):
        raise Bad("--data: entry 3: field 'output' is missing")

    with pytest.raises(SystemExit) as exited:
        cli._run("finetune", fail, object(), "json")
    assert exited.value.code == 2
    assert capsys.readouterr().err == "Error: --data: entry 3: field 'output' is missing\n"
    assert json.loads(out.getvalue())["event"] == "stage_failed"
