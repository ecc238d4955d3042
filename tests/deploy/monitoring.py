"""Debian's Prometheus and Pushgateway, started for a test: one place for how, shared by the metrics and the
alerts tests."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from tests.helpers import free_port, wait_until


def _start(argv: list[str]) -> subprocess.Popen:
    binary = shutil.which(argv[0])
    assert binary, f"{argv[0]} is not installed: run scripts/install-test-deps.sh"
    return subprocess.Popen([binary, *argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).ok
    except (requests.ConnectionError, requests.Timeout):  # still starting
        return False


@contextmanager
def _running(argv: list[str]) -> Iterator[subprocess.Popen]:
    proc = _start(argv)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def pushgateway() -> Iterator[str]:
    """A Pushgateway on a free port, in memory only: Debian's build persists to
    /var/lib/prometheus/pushgateway.data by default, a file every gateway on the machine loads (other tests'
    runs would appear in this one's). Yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _running(["prometheus-pushgateway", "--persistence.file=", f"--web.listen-address=127.0.0.1:{port}"]):
        wait_until(lambda: _answers(f"{url}/-/ready"), 60, what="the pushgateway to start")
        yield url


@contextmanager
def prometheus(folder: Path, scrape_configs: str, rules: Path | None = None) -> Iterator[str]:
    """Prometheus (scraping and evaluating every second) with ``scrape_configs`` (their YAML list) and
    ``rules``, its files in ``folder``; ready once it answers. Yields its API's URL."""
    port = free_port()
    rule_files = f'rule_files: ["{rules}"]\n' if rules else ""
    (folder / "prometheus.yml").write_text(
        f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n{rule_files}scrape_configs:\n{scrape_configs}"
    )
    argv = ["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'tsdb'}"]
    with _running([*argv, f"--web.listen-address=127.0.0.1:{port}"]):
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/-/ready"), 60, what="prometheus to start")
        yield f"http://127.0.0.1:{port}/api/v1"


@contextmanager
def prometheus_and_gateway(
    folder: Path, rules: Path | None = None, loaded: Callable[[str], bool] | None = None
) -> Iterator[dict]:
    """Prometheus scraping the job's port and a Pushgateway, with ``rules`` loaded; ready once
    ``loaded(api)`` holds too. Yields the ports and URLs."""
    job_port = free_port()
    with pushgateway() as gateway:
        scrape_configs = f"""  - job_name: sft-job
    static_configs: [{{targets: ["127.0.0.1:{job_port}"]}}]
  - job_name: pushgateway
    honor_labels: true
    static_configs: [{{targets: ["{gateway.removeprefix("http://")}"]}}]
"""
        with prometheus(folder, scrape_configs, rules) as api:
            if loaded:
                wait_until(lambda: loaded(api), 60, what="prometheus to load the alert rules")
            yield {"job_port": job_port, "gateway": gateway, "api": api}


def query(api: str, expr: str) -> list:
    return requests.get(f"{api}/query", params={"query": expr}, timeout=5).json()["data"]["result"]
