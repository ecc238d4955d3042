"""Where the job serves its metrics: a free port unless one is given, published for Prometheus' file-based
service discovery (--metrics-sd-dir) while it serves. tests/deploy/test_slurm.py has a real Prometheus read it."""

import json
import socket
import stat

import pytest
import requests

from tests.helpers import cli, start_cli, wait_for_event, wait_until, without_endpoint


def _smoke(cache, tmp_path, run_id: str, *extra) -> list:
    data = cache / "instruction-data.json"
    common = ["--data", data, "--cache", cache, "--output", tmp_path / "runs", "--run-id", run_id]
    return ["run", "--smoke", "--skip-judge", *common, "--log-format", "json", *extra]


def test_without_a_port_the_endpoint_takes_a_free_one_kept_in_the_sd_dir_while_it_serves(cache, tmp_path):
    sd_dir = tmp_path / "shared" / "sd"  # both made by the job
    with socket.socket() as node_exporter:  # 9100 taken, as on most clusters' nodes (or already taken here)
        try:
            node_exporter.bind(("127.0.0.1", 9100))
            node_exporter.listen()
        except OSError:
            pass
        args = _smoke(cache, tmp_path, "free", "--metrics-sd-dir", sd_dir, "--metrics-address", "0.0.0.0")
        proc = start_cli(*args, umask=0o077)
        serving = wait_for_event(proc, lambda e: e.get("event") == "metrics_serving")
        port = serving["port"]
        assert port != 9100
        [published] = wait_until(lambda: list(sd_dir.glob("*.json")), 30, what="the file_sd target")
        [target] = json.loads(published.read_text())
        host = target["targets"][0].removesuffix(f":{port}")
        assert host in (socket.getfqdn(), socket.gethostname()) and host not in ("localhost", "127.0.0.1")
        assert published.name == f"free-{host}-{port}.json" and target["labels"] == {"run_id": "free"}
        # Prometheus runs as another user: the target and the folders the job made are readable by all.
        assert stat.S_IMODE(published.stat().st_mode) == 0o644
        assert [stat.S_IMODE(f.stat().st_mode) for f in (sd_dir, sd_dir.parent)] == [0o755, 0o755]
        page = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "# TYPE sft_job_train_loss gauge" in page  # the job's own registry
        _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert list(sd_dir.iterdir()) == []  # removed at exit, and no partial file left


def test_a_port_given_by_hand_that_is_taken_is_exit_2_before_anything_is_written(cache, tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sd = ["--metrics-sd-dir", tmp_path / "sd", "--metrics-address", "0.0.0.0"]
        result = cli(*_smoke(cache, tmp_path, "taken", "--metrics-port", port, *sd))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert f"metrics port {port} on 0.0.0.0 is in use" in line and "unset: a free one" in line
    assert not (tmp_path / "runs").exists() and not list((tmp_path / "sd").glob("*"))


def test_an_sd_dir_the_job_cannot_write_is_exit_2_naming_it_before_anything_is_written(cache, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    result = cli(*_smoke(cache, tmp_path, "nosd", "--metrics-sd-dir", blocked / "sd", "--metrics-address", "::"))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: --metrics-sd-dir {blocked / 'sd'}: cannot write the scrape target there")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ([], "would publish metrics_address 127.0.0.1, which only this machine reaches"),  # the default
        (["--metrics-address", "localhost"], "would publish --metrics-address localhost"),
        (["--metrics-address", "::1"], "would publish --metrics-address ::1"),
        (["--metrics-address", "127.0.1.1"], "would publish --metrics-address 127.0.1.1"),
        (["--metrics-address", "::ffff:127.0.0.1"], "would publish --metrics-address ::ffff:127.0.0.1"),
        (["--metrics-address", "0.0.0.0", "--metrics-port", "0"], "which --metrics-port 0 turns off"),
    ],
)
def test_an_sd_dir_with_nothing_another_machine_can_scrape_is_exit_2_before_anything_is_written(
    cache, tmp_path, extra, says
):
    result = cli(*_smoke(cache, tmp_path, "loop", "--metrics-sd-dir", tmp_path / "sd", *extra))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: --metrics-sd-dir ") and says in line  # the flags as given
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sd").exists()


def test_an_existing_sd_dir_others_cannot_list_is_warned_about_and_its_target_is_still_0644(cache, tmp_path):
    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()
    sd_dir.chmod(0o700)
    proc = start_cli(
        *_smoke(cache, tmp_path, "hidden", "--metrics-sd-dir", sd_dir, "--metrics-address", "::"), umask=0o077
    )
    try:
        warned = wait_for_event(proc, lambda e: e.get("event") == "metrics_sd_dir_not_readable")
        [published] = wait_until(lambda: list(sd_dir.glob("*.json")), 30, what="the file_sd target")
        assert warned["folder"] == str(sd_dir) and warned["mode"] == "0o700"
        assert stat.S_IMODE(published.stat().st_mode) == 0o644 and stat.S_IMODE(sd_dir.stat().st_mode) == 0o700
    finally:
        proc.terminate()
        proc.communicate(timeout=120)


def test_the_cli_helper_runs_without_an_endpoint_unless_the_test_asks_for_one():
    """``tests.helpers.cli`` and ``start_cli`` add ``--metrics-port 0`` to ``run``: no test depends on a port
    being free; a test that names a port, a scrape target, a config file or the variables gets what it asked."""
    assert without_endpoint(["run", "--smoke"], None) == ["run", "--metrics-port", "0", "--smoke"]
    assert without_endpoint(["run", "--lr"], None)[-1] == "--lr"  # a flag left without its value stays so
    for asked in (["--metrics-port", "9"], ["--metrics-port=9"], ["--metrics-sd-dir", "sd"], ["--config", "c.yaml"]):
        assert without_endpoint(["run", *asked], None) == ["run", *asked]
    assert without_endpoint(["run"], {"SFT_JOB_METRICS_PORT": "9"}) == ["run"]
    assert without_endpoint(["finetune", "--output", "x"], None) == ["finetune", "--output", "x"]  # only run serves
