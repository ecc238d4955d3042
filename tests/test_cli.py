import io
import json

import click
import pytest
from click.testing import CliRunner

from job import cli
from job.core.errors import JobError


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
    assert capsys.readouterr().err == ""  # job.launch prints the group's one line from the files below
    line = (tmp_path / "line-3").read_text()
    assert line.startswith("Error: ") and "lost contact with another process of the group" in line
    assert "rerun every node" in line and (tmp_path / "rank-3").read_text() == "75"


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


def _readme_configuration() -> str:
    from tests.helpers import REPO

    return (REPO / "README.md").read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]


def _another_value(param: click.Option) -> tuple[str, object]:
    """A value for ``param`` other than its default, as an environment variable holds it, and as parsed."""
    if param.is_flag:
        return ("false", False) if param.default else ("true", True)
    if isinstance(param.type, click.Choice):
        # a choice of one (export's --format gguf) has no other value to set
        choice = next((c for c in param.type.choices if c != param.default), param.default)
        return choice, choice
    if param.type is click.INT:
        return str((param.default or 0) + 3), (param.default or 0) + 3
    if param.type is click.FLOAT:
        return str((param.default or 0) + 0.5), (param.default or 0) + 0.5
    return "/elsewhere/x", "/elsewhere/x"


@pytest.mark.parametrize("command", sorted(set(cli.main.commands) - {"report"}))
def test_every_option_the_readme_promises_has_its_sft_job_variable_and_it_is_honoured(command, monkeypatch):
    # README, Configuration: "Every option is a flag, a key of --config job.yaml, or an environment
    # variable SFT_JOB_<OPTION>"
    assert "environment variable `SFT_JOB_<OPTION>`" in _readme_configuration()
    cmd = cli.main.commands[command]
    options = [p for p in cmd.params if isinstance(p, click.Option) and p.name not in ("help", "config")]
    for param in options:
        assert param.envvar == f"SFT_JOB_{param.name.upper()}" and param.show_envvar, param.name
        raw, parsed = _another_value(param)
        monkeypatch.setenv(param.envvar, raw)
    context = cmd.make_context(command, [])
    for param in options:
        assert context.params[param.name] == _another_value(param)[1], param.name


def test_the_config_file_comes_from_sft_job_config_and_cannot_name_another(tmp_path, monkeypatch):
    from job.config import RunConfig

    (tmp_path / "job.yaml").write_text("epochs: 5\n")
    monkeypatch.setenv("SFT_JOB_CONFIG", str(tmp_path / "job.yaml"))
    context = cli.main.commands["run"].make_context("run", [])
    assert cli.build(RunConfig, context.params).epochs == 5
    (tmp_path / "loop.yaml").write_text(f"config: {tmp_path / 'loop.yaml'}\n")  # a file naming itself
    monkeypatch.setenv("SFT_JOB_CONFIG", str(tmp_path / "loop.yaml"))
    with pytest.raises(click.BadParameter, match="cannot name another"):
        cli.main.commands["run"].make_context("run", [])
    (tmp_path / "typo.yaml").write_text("epoch: 1\n")
    with pytest.raises(click.BadParameter, match=r"unknown key 'epoch' \(did you mean epochs\?\)"):
        cli.main.commands["run"].make_context("run", ["--config", str(tmp_path / "typo.yaml")])


def test_the_help_sections_the_readme_lists_are_the_clis(monkeypatch):
    import re

    text = " ".join(_readme_configuration().split())
    listed = re.search(r"lists the options in sections \(common ones first: (.*?); then (.*?)\), each", text)
    assert listed, "the README no longer lists the help sections"
    common = re.findall(r"`(--[\w-]+)`", listed.group(1))
    rest = [s.strip() for s in re.split(r",| and ", listed.group(2)) if s.strip()]
    groups = cli.main.commands["run"].option_groups
    titles = [g.title.removesuffix(" options") for g in groups]
    assert [t.lower() for t in titles[1:]] == [s.lower() for s in rest]
    assert [f"--{o.name.replace('_', '-')}" for o in groups[0].options] == common
