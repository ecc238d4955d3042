"""Real Prometheus and Pushgateway (Debian's packages) scraping and receiving the job's metrics."""

import shutil
import subprocess

import pytest
import requests

from tests.helpers import free_port, start_cli, wait_for_event, wait_until
from tests.ollama_server import FakeOllama


def _start(argv, name):
    binary = shutil.which(argv[0])
    assert binary, f"{argv[0]} is not installed: run scripts/install-test-deps.sh"
    return subprocess.Popen([binary, *argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def monitoring(tmp_path):
    job_port, gateway_port, prom_port = free_port(), free_port(), free_port()
    # No persistence file: by default every gateway on the machine loads and saves /var/lib/prometheus/pushgateway.data.
    listen = f"--web.listen-address=127.0.0.1:{gateway_port}"
    gateway = _start(["prometheus-pushgateway", "--persistence.file=", listen], "pushgateway")
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: sft-job
    static_configs: [{{targets: ["127.0.0.1:{job_port}"]}}]
  - job_name: pushgateway
    honor_labels: true
    static_configs: [{{targets: ["127.0.0.1:{gateway_port}"]}}]
""")
    prometheus = _start(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        "prometheus",
    )
    api = f"http://127.0.0.1:{prom_port}/api/v1"

    def ready():
        try:
            return requests.get(f"http://127.0.0.1:{prom_port}/-/ready", timeout=1).ok
        except requests.ConnectionError:
            return False

    wait_until(ready, 60, what="prometheus to start")
    yield {"job_port": job_port, "gateway": f"http://127.0.0.1:{gateway_port}", "api": api}
    for proc in (prometheus, gateway):
        proc.terminate()
        proc.wait(timeout=30)


def _query(api: str, expr: str) -> list:
    return requests.get(f"{api}/query", params={"query": expr}, timeout=5).json()["data"]["result"]


@pytest.mark.slow
def test_prometheus_scrapes_the_running_job_and_gets_the_final_push(monitoring, tiny_model_dir, cache, tmp_path):
    ollama = FakeOllama().start()
    try:
        proc = start_cli(
            "run",
            "--model-dir",
            tiny_model_dir,
            "--data",
            cache / "instruction-data.json",
            "--cache",
            cache,
            "--output",
            tmp_path / "runs",
            "--run-id",
            "prom1",
            "--judge-url",
            ollama.url,
            "--max-steps",
            "80",
            "--eval-freq",
            "5",
            "--limit",
            "4",
            "--max-new-tokens",
            "4",
            "--metrics-port",
            monitoring["job_port"],
            "--pushgateway",
            monitoring["gateway"],
            "--log-format",
            "json",
        )
        wait_for_event(proc, lambda e: e.get("event") == "eval")
        scraped = wait_until(
            lambda: proc.poll() is None and _query(monitoring["api"], 'sft_job_train_loss{job="sft-job"} > 0'),
            120,
            what="a scrape of sft_job_train_loss while the job runs",
        )
        assert 0 < float(scraped[0]["value"][1]) < 20
        proc.communicate(timeout=600)
        assert proc.returncode == 0
    finally:
        ollama.stop()
    pushed = wait_until(
        lambda: _query(monitoring["api"], 'sft_job_last_success_timestamp_seconds{run_id="prom1"}'),
        60,
        what="the pushed last-success timestamp",
    )
    assert pushed[0]["metric"]["job"] == "sft-job" and float(pushed[0]["value"][1]) > 1.7e9
    statuses = _query(monitoring["api"], 'sft_job_stage_status{run_id="prom1"}')
    assert {s["metric"]["stage"]: s["value"][1] for s in statuses} == {
        "download": "2",
        "finetune": "2",
        "generate": "2",
        "judge": "2",
    }
