"""Where the job serves its metrics: a free port unless one is given, published for Prometheus' file-based
service discovery (--metrics-sd-dir) while it serves. tests/test_slurm.py has a real Prometheus read it."""

import json
import socket

import requests

from tests.helpers import cli, start_cli, wait_for_event, wait_until


def _smoke(cache, tmp_path, run_id: str, *extra) -> list:
    data = cache / "instruction-data.json"
    common = ["--data", data, "--cache", cache, "--output", tmp_path / "runs", "--run-id", run_id]
    return ["run", "--smoke", "--skip-judge", *common, "--log-format", "json", *extra]


def test_without_a_port_the_endpoint_takes_a_free_one_kept_in_the_sd_dir_while_it_serves(cache, tmp_path):
    sd_dir = tmp_path / "sd"
    with socket.socket() as node_exporter:  # 9100 taken, as on most clusters' nodes (or already taken here)
        try:
            node_exporter.bind(("127.0.0.1", 9100))
            node_exporter.listen()
        except OSError:
            pass
        proc = start_cli(*_smoke(cache, tmp_path, "free", "--metrics-sd-dir", sd_dir))
        serving = wait_for_event(proc, lambda e: e.get("event") == "metrics_serving")
        port = serving["port"]
        assert port != 9100
        [published] = wait_until(lambda: list(sd_dir.glob("*.json")), 30, what="the file_sd target")
        assert published.name == f"free-127.0.0.1-{port}.json"
        assert json.loads(published.read_text()) == [{"targets": [f"127.0.0.1:{port}"], "labels": {"run_id": "free"}}]
        page = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "# TYPE sft_job_train_loss gauge" in page  # the job's own registry
        _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert list(sd_dir.iterdir()) == []  # removed at exit, and no partial file left


def test_a_port_given_by_hand_that_is_taken_is_exit_2_before_anything_is_written(cache, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(*_smoke(cache, tmp_path, "taken", "--metrics-port", port, "--metrics-sd-dir", tmp_path / "sd"))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert f"metrics port {port} on 127.0.0.1 is in use" in line and "unset: a free one" in line
    assert not (tmp_path / "runs").exists() and not list((tmp_path / "sd").glob("*"))


def test_an_sd_dir_the_job_cannot_write_is_exit_2_naming_it_before_anything_is_written(cache, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    result = cli(*_smoke(cache, tmp_path, "nosd", "--metrics-sd-dir", blocked / "sd"))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: --metrics-sd-dir {blocked / 'sd'}: cannot write the scrape target there")
    assert not (tmp_path / "runs").exists()
