"""What a new user meets first: errors that say what to do, files with the usual modes."""

from __future__ import annotations

import json
import os
import re
import socket
import stat

import pytest

from tests.helpers import cli, events, free_port, smoke_run
from tests.ollama_server import FakeOllama


def _one_line(result) -> str:
    [line] = result.stderr.splitlines()
    assert len(line) < 200, line
    return line


def test_a_busy_metrics_port_names_the_flag(cache, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(*smoke_run(cache, tmp_path / "runs", "p", "--skip-judge", "--metrics-port", port))
    assert result.returncode == 2
    line = _one_line(result)
    assert f"metrics port {port} on 127.0.0.1 is in use" in line and "--metrics-port" in line and "0 to turn" in line


def test_require_gpu_on_a_machine_without_one_is_one_line_exit_1_before_anything_is_written(cache, tmp_path):
    result = cli(
        *smoke_run(cache, tmp_path / "runs", "g", "--skip-judge", "--require-gpu"),
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 1
    assert _one_line(result) == "Error: --require-gpu was given but no CUDA device is visible"
    assert not (tmp_path / "runs" / "g").exists()


def test_the_smoke_with_no_judge_running_waits_15_s_not_300_and_says_how_to_skip_it(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    args = ["run", "--smoke", "--cache", tmp_path / "cache", "--output", tmp_path / "runs", "--run-id", "nj"]
    result = cli(*args, "--judge-url", closed, "--metrics-port", "0", "--log-format", "json")
    assert result.returncode == 75
    line = _one_line(result)
    assert line.startswith(f"Error: judge at {closed} did not answer within 15s (") and line.endswith("--skip-judge")
    [waiting] = [e for e in events(result.stdout) if e["event"] == "judge_not_answering"]
    assert waiting["waiting"] == "15s"
    assert not (tmp_path / "runs" / "nj").exists()  # a preflight: nothing of the run written


def test_s3_without_credentials_names_the_variables(s3, cache, tmp_path, monkeypatch):
    s3.create_bucket(Bucket="nocreds")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    result = cli(*smoke_run(cache, "s3://nocreds/runs", "c", "--skip-judge"), env=env)
    assert result.returncode == 1
    line = _one_line(result)
    assert "no credentials for output s3://nocreds" in line
    assert all(v in line for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"))


def test_outputs_have_the_usual_file_mode_and_record_the_epochs_trained(cache, tmp_path):
    os.umask(0o022)
    result = cli(*smoke_run(cache, tmp_path / "runs", "m", "--skip-judge", "--max-steps", "3"))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "m"
    for name in ("config.yaml", "manifest.json", "losses.json", "loss-plot.png", "model/model.safetensors"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name
    # 3 steps of the smoke's 2 epochs (40 entries, batch 8: 5 steps each) is 0.6 of an epoch: the plot's axis
    config = json.loads((run / "model" / "config.json").read_text())
    trained = config["sft_job"]["trained"]
    assert (trained["steps"], trained["epochs"]) == (3, 0.6) and trained["tokens_seen"] > 0


def test_the_loss_plot_spans_the_epochs_trained_with_tokens_seen_above(tmp_path, monkeypatch):
    from job.training import outputs as train_outputs

    figures = []
    monkeypatch.setattr(train_outputs, "_save", lambda fig, path, metadata: figures.append(fig))
    history = [{"train_loss": 3.0 - i / 2, "val_loss": 3.1 - i / 3, "tokens_seen": 100 * (i + 1)} for i in range(4)]
    for epochs in (0.6, 2.0):
        train_outputs.plot_losses(history, epochs, tmp_path / "loss-plot.png")
        epochs_axis, tokens_axis = figures[-1].axes
        assert epochs_axis.get_xlabel() == "Epochs" and tokens_axis.get_xlabel() == "Tokens seen (at each evaluation)"
        for line in epochs_axis.get_lines():  # the book's torch.linspace(0, epochs, len(history))
            assert line.get_xdata() == pytest.approx([0, epochs / 3, 2 * epochs / 3, epochs])
        assert list(tokens_axis.get_lines()[0].get_xdata()) == [100, 200, 300, 400]
        ticks = [t for t in epochs_axis.get_xticks() if 0 <= t <= epochs]
        # whole epochs as ticks once there is one; fractions below that (a 0.6 epoch run is not "0, 1")
        assert all(t == int(t) for t in ticks) if epochs >= 1 else any(t != int(t) for t in ticks)


def test_the_openai_compatible_backend_accepts_a_name_for_name_latest(tmp_path, shared_data):
    server = FakeOllama(models=("llama3:latest",)).start()
    try:
        entries = json.loads((shared_data / "seed-eval" / "instruction-data-with-response.json").read_text())[:2]
        (tmp_path / "r.json").write_text(json.dumps(entries))
        result = cli(
            "judge",
            "--responses",
            tmp_path / "r.json",
            "--output",
            tmp_path / "out",
            "--judge-backend",
            "openai",
            "--judge-url",
            f"{server.url}/v1",
            "--judge-model",
            "llama3",
            "--log-format",
            "json",
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert [e for e in events(result.stdout) if e["event"] == "judge_summary"][0]["scored"] == 2


def test_progress_events_off_a_terminal_come_at_most_every_10_seconds_with_fraction_and_eta(capsys):
    import io

    from job.core.observability import Metrics, Progress, configure_logging

    out = io.StringIO()
    configure_logging("json", stream=out)
    now = [0.0]
    metrics = Metrics()
    progress = Progress("train", 100, 0, "step", metrics, every_s=10.0, clock=lambda: now[0], terminal=False)
    for _ in range(100):
        now[0] += 0.5  # a step every half second: 50 s in all
        progress.update(1, epoch=1)
    logged = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["done"] for e in logged] == [1, 21, 41, 61, 81, 100]  # the first, one per 10 s, the last
    assert {e["event"] for e in logged} == {"progress"} and all(e["stage"] == "train" for e in logged)
    assert logged[1]["fraction"] == 0.21 and logged[1]["eta_s"] == 39.5 and logged[-1]["eta_s"] == 0.0
    assert metrics.value("sft_job_progress_fraction", {"stage": "train"}) == 1.0


def test_a_terminal_sees_the_bars_and_console_lines_that_fit_120_columns(cache, tmp_path):
    """stderr on a pseudo-terminal, as a person running the job sees it."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios
    import time

    from tests.helpers import REPO

    server = FakeOllama().start()
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    try:
        args = smoke_run(cache, tmp_path / "runs", "tty", "--judge-url", server.url, "--log-format", "auto")
        proc = subprocess.Popen(
            [sys.executable, "-m", "job.cli", *map(str, args)],
            cwd=REPO,
            stdout=secondary,
            stderr=secondary,
            env={**os.environ, "COLUMNS": "120"},
        )
        os.close(secondary)
        seen, deadline = b"", time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal closed: the job is done
                break
            if not chunk:
                break
            seen += chunk
        proc.wait(timeout=60)
    finally:
        server.stop()
        os.close(primary)
    assert proc.returncode == 0
    text = seen.decode(errors="replace")
    assert "train: 100%" in text and "10/10" in text and "val_loss=" in text
    assert "judge: 100%" in text and "8/8" in text and "mean_score=" in text
    # the readable console (auto on a terminal): every line and bar redraw fits the 120 columns
    assert "run_complete" in text and '{"' not in text
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", part) for part in re.split(r"[\r\n]+", text)]
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)


def test_a_failed_preflight_leaves_no_run_folder_behind(cache, tmp_path):
    missing = cli(*smoke_run(cache, tmp_path / "runs", "gone", "--skip-judge", "--data", tmp_path / "no.json"))
    assert missing.returncode == 1 and "does not exist" in _one_line(missing)
    dead_judge = f"http://127.0.0.1:{free_port()}"
    silent = cli(*smoke_run(cache, tmp_path / "runs", "gone", "--judge-url", dead_judge, "--judge-wait", "1s"))
    assert silent.returncode == 75 and "--skip-judge" in _one_line(silent)
    assert not (tmp_path / "runs" / "gone").exists()


def _gpu_smoke(tmp_path, *args, runs: str = "", nvidia_smi: str | None = "echo 'NVIDIA H100, 580.0'", cuda=True):
    """scripts/gpu-smoke.sh on a stand-in node: a fake nvidia-smi (None: none at all) and a python3 whose
    job runs do ``runs`` (shell) and whose torch check sees a GPU or not; anything else is the real python."""
    import subprocess
    import sys

    from tests.helpers import REPO

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "nvidia-smi").unlink(missing_ok=True)
    if nvidia_smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
    torch = (
        "echo torch 2.8 NVIDIA H100; exit 0"
        if cuda
        else "echo 'RuntimeError: Found no NVIDIA driver on your system.' >&2; exit 1"
    )
    (bin_dir / "python3").write_text(
        f'#!/bin/sh\nif [ "$1" = "-m" ]; then {runs}; fi\nif [ "$1" = "-c" ]; then {torch}; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    for name in ("nvidia-smi", "python3"):
        if (bin_dir / name).exists():
            (bin_dir / name).chmod(0o755)
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-smoke.sh"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=40,  # less than the 60 s the script gives a run to checkpoint: a run that ended is not waited for
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )


def _data_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "instruction-data.json").write_text('[{"instruction": "a", "input": "", "output": "b"}]')
    return data


def test_gpu_smoke_exits_1_when_its_runs_fail(tmp_path):
    # A node where every run of the job fails (exit 1, after logging a checkpoint so the preemption
    # step does not wait): the script must not end 0.
    fails = 'echo \'{"event": "checkpoint", "step": 1}\'; exit 1'
    done = _gpu_smoke(tmp_path, _data_dir(tmp_path), tmp_path / "out", runs=fails)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "smoke: exit 1" in done.stdout and "gpu-smoke: FAILED" in done.stdout.splitlines()[-1]
    # Runs that fail before any checkpoint: the preempted run is not waited for (the 40 s timeout above).
    done = _gpu_smoke(tmp_path, _data_dir(tmp_path), tmp_path / "out2", runs="exit 1")
    assert done.returncode == 1 and "preempted: exit 1 (75 expected)" in done.stdout, done.stdout + done.stderr


def test_gpu_smoke_checks_its_arguments_data_and_gpu_first_in_one_line(tmp_path):
    data, out = _data_dir(tmp_path), tmp_path / "out"
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "instruction-data.json").write_text("")
    cases = [
        ((data,), {}, 2, "usage: bash scripts/gpu-smoke.sh DATA_DIR OUT_DIR"),
        ((tmp_path / "nowhere", out), {}, 1, f"DATA_DIR {tmp_path / 'nowhere'} is not a folder"),
        ((data / "instruction-data.json", out), {}, 1, "is not a folder"),
        ((tmp_path / "empty", out), {}, 1, f"{tmp_path / 'empty'}/instruction-data.json is missing or empty"),
        ((tmp_path / "blank", out), {}, 1, "instruction-data.json is missing or empty"),
        ((data, data / "instruction-data.json"), {}, 1, "cannot be created or written"),
        ((data, out), {"nvidia_smi": None}, 1, "nvidia-smi not found"),
        (
            (data, out),
            {"nvidia_smi": "echo 'NVIDIA-SMI has failed'; exit 9"},
            1,
            "nvidia-smi failed: NVIDIA-SMI has failed",
        ),
        ((data, out), {"cuda": False}, 1, "torch sees no CUDA device: RuntimeError: Found no NVIDIA driver"),
    ]
    for args, node, code, said in cases:
        done = _gpu_smoke(tmp_path, *args, runs="echo a run started >&2; exit 0", **node)
        assert done.returncode == code, (args, node, done.stdout, done.stderr)
        [line] = done.stderr.splitlines()
        assert line.startswith("gpu-smoke: ") and said in line, (args, node, line)
        assert done.stdout == ""  # nothing ran


@pytest.mark.parametrize(
    "text, said",
    [
        ("SKIP_JUDGE: true\n", "unknown key 'SKIP_JUDGE' (did you mean skip_judge?)"),
        ("Epochs: 1\n", "unknown key 'Epochs' (did you mean epochs?)"),
        ("epochs: 1\nlr: 0.001\nepochs: 2\n", "key 'epochs' appears twice (lines 1 and 3): keep one"),
        ("lr: 0.001\n'lr': 0.002\n", "key 'lr' appears twice (lines 1 and 2): keep one"),
        ("epochs: 1\nEPOCHS: 2\n", "unknown key 'EPOCHS' (did you mean epochs?)"),
    ],
)
def test_a_config_key_in_the_wrong_case_or_given_twice_is_exit_2_naming_it(tmp_path, text, said):
    config = tmp_path / "job.yaml"
    config.write_text(text)
    refused = cli("run", "--config", config, "--skip-judge", "--output", tmp_path / "runs")
    assert refused.returncode == 2 and said in _one_line(refused), refused.stderr
    assert not (tmp_path / "runs").exists()
