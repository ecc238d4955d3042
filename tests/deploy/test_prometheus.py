"""Real Prometheus and Pushgateway (Debian's packages) scraping and receiving the job's metrics."""

import pytest

from tests.deploy.monitoring import prometheus_and_gateway, query
from tests.helpers import start_cli, wait_for_event, wait_until
from tests.ollama_server import FakeOllama


@pytest.fixture
def monitoring(tmp_path):
    with prometheus_and_gateway(tmp_path) as started:
        yield started


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
            lambda: proc.poll() is None and query(monitoring["api"], 'sft_job_train_loss{job="sft-job"} > 0'),
            120,
            what="a scrape of sft_job_train_loss while the job runs",
        )
        assert 0 < float(scraped[0]["value"][1]) < 20
        proc.communicate(timeout=600)
        assert proc.returncode == 0
    finally:
        ollama.stop()
    pushed = wait_until(
        lambda: query(monitoring["api"], 'sft_job_last_success_timestamp_seconds{run_id="prom1"}'),
        60,
        what="the pushed last-success timestamp",
    )
    assert pushed[0]["metric"]["job"] == "sft-job" and float(pushed[0]["value"][1]) > 1.7e9
    statuses = query(monitoring["api"], 'sft_job_stage_status{run_id="prom1"}')
    assert {s["metric"]["stage"]: s["value"][1] for s in statuses} == {
        "download": "2",
        "finetune": "2",
        "generate": "2",
        "judge": "2",
    }
