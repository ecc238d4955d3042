import io
import json

import click
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
            if isinstance(param, click.Option) and param.name != "help":  # arguments: the command's docstring
                assert getattr(param, "help", None), f"{name} --{param.name} has no help"


def _capture(monkeypatch):
    out = io.StringIO()
    real = cli.configure_logging
    monkeypatch.setattr(cli, "configure_logging", lambda fmt, **kw: real(fmt, stream=out, **kw))
    return out


def test_uncaught_error_is_exit_70_one_line_and_one_json_event_with_its_traceback_without_locals(monkeypatch, capsys):
    out = _capture(monkeypatch)

    def crash(cfg, metrics):
        secret = "hunter2"  # a frame local: never in the log
        return {}[secret[:0] + "missing"]

    with pytest.raises(SystemExit) as exited:
        cli._run("finetune", crash, object(), "json")
    assert exited.value.code == 70
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("Error: internal error in finetune: KeyError: 'missing' (a bug")
    [line] = out.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "job_crashed" and event["stage"] == "finetune" and event["level"] == "error"
    assert event["error"] == "KeyError: 'missing'" and event["exit_code"] == 70
    frames = event["exception"][0]["frames"]
    assert frames[-1]["name"] == "crash" and "hunter2" not in line


def test_a_full_disk_anywhere_is_exit_75_naming_the_file(monkeypatch, capsys):
    _capture(monkeypatch)

    def write(cfg, metrics):
        raise OSError(28, "No space left on device", "/runs/r1/model/model.safetensors")

    with pytest.raises(SystemExit) as exited:
        cli._run("finetune", write, object(), "json")
    assert exited.value.code == 75
    [line] = capsys.readouterr().err.splitlines()
    assert "no space left on device writing /runs/r1/model/model.safetensors" in line


@pytest.mark.parametrize("kind", ["gloo", "nccl"])
def test_a_lost_peer_process_is_exit_75_and_writes_the_code_for_the_launcher(kind, monkeypatch, capsys, tmp_path):
    """A collective that failed because another node went away: the group restarts from its checkpoint."""
    import torch.distributed

    _capture(monkeypatch)
    monkeypatch.setenv("SFT_JOB_EXIT_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "3")

    def collective(cfg, metrics):
        if kind == "gloo":  # what gloo raises when the peer's connection closes
            raise RuntimeError("[pair.cc:553] Connection closed by peer [10.0.0.7]:16016. This is typically ...")
        raise torch.distributed.DistBackendError("NCCL communicator was aborted")

    with pytest.raises(SystemExit) as exited:
        cli._run("run", collective, object(), "json")
    assert exited.value.code == 75
    [line] = capsys.readouterr().err.splitlines()
    assert "lost contact with another process of the group" in line and "rerun every node" in line
    assert (tmp_path / "rank-3").read_text() == "75"


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


def test_run_help_leads_with_the_common_options_names_each_variable_and_needs_no_torch():
    import subprocess
    import sys

    result = CliRunner().invoke(cli.main, ["run", "--help"])
    assert result.exit_code == 0
    sections = [line for line in result.output.splitlines() if line.endswith("options:")]
    assert sections[0] == "Common options:" and sections[-2:] == ["Observability options:", "Other options:"]
    common = result.output.split("Common options:")[1].split("options:")[0]
    flags = [line.split()[0] for line in common.splitlines() if line.startswith("  --")]
    assert flags == ["--config", "--output", "--run-id", "--smoke", "--skip-judge", "--model", "--model-dir", "--data"]
    assert "[env var: SFT_JOB_LR; default: 5e-05]" in " ".join(result.output.split())
    # --help must not wait for torch (1.4 s to import): the CLI module imports none of it.
    probe = "import sys, job.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
