"""The alerts (deploy/prometheus/alerts.yml): promtool's check and unit tests, every rule evaluated by a real
Prometheus that scrapes a real run, the chart's PrometheusRule, and the restart count the job reads."""

import re
import shutil
import signal
import subprocess
import time

import helm_python as helm
import jsonschema
import pytest
import requests
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from job.core.observability import Metrics, RunStatus
from job.run.pipeline import restart_count
from tests.deploy import monitoring
from tests.deploy.monitoring import prometheus_and_gateway, query
from tests.helpers import REPO, cli, smoke_run, start_cli, wait_for_event, wait_until
from tests.ollama_server import FakeOllama

ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
UNIT_TESTS = REPO / "deploy" / "prometheus" / "alerts.test.yml"
CHART = REPO / "helm" / "sft-job"
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
# Written from the Prometheus operator's CRD (prometheusrules.monitoring.coreos.com, v1, operator 0.82):
# its openAPIV3Schema's fields, types, patterns and required keys; unknown fields refused, as
# `kubectl apply --validate=strict` does.
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1}, "labels": STRINGS, "annotations": STRINGS},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": DURATION},
                            "query_offset": {"type": "string", "pattern": DURATION},
                            "limit": {"type": "integer"},
                            "labels": STRINGS,
                            # the CRD's ^(?i)(abort|warn)?$ without Go's inline flag
                            "partial_response_strategy": {
                                "type": "string",
                                "pattern": "^([Aa][Bb][Oo][Rr][Tt]|[Ww][Aa][Rr][Nn])?$",
                            },
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": ["integer", "string"]},
                                        "for": {"type": "string", "pattern": DURATION},
                                        "keep_firing_for": {"type": "string", "minLength": 1, "pattern": DURATION},
                                        "labels": STRINGS,
                                        "annotations": STRINGS,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _promtool(*args) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed: run scripts/install-test-deps.sh"
    return subprocess.run([binary, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_promtool_checks_the_rules_and_passes_their_unit_tests():
    checked = _promtool("check", "rules", ALERTS)
    assert checked.returncode == 0 and f"SUCCESS: {len(_rules())} rules found" in checked.stdout, checked
    tested = _promtool("test", "rules", UNIT_TESTS)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def _minutes(duration: str) -> int:
    hours, minutes = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?", duration).groups()
    return 60 * int(hours or 0) + int(minutes or 0)


def test_every_rule_is_unit_tested_quiet_on_a_healthy_run_and_firing_one_minute_after_quiet():
    """Each alert: quiet in the healthy run's test; in a failure's test, firing at some minute and not
    firing the minute before (its ``for:`` counted there); a severity, a summary and a description."""
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    [healthy] = [t for t in tests if t["name"] == "a healthy run fires nothing"]
    for rule in _rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning") and rule["for"] != "0m", name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert any(c["alertname"] == name and c["exp_alerts"] == [] for c in healthy["alert_rule_test"]), name
        firing_after_quiet = [
            case
            for test in tests
            for case in test["alert_rule_test"]
            if case["alertname"] == name and case["exp_alerts"]
            for before in test["alert_rule_test"]
            if before["alertname"] == name
            and before["exp_alerts"] == []
            and _minutes(before["eval_time"]) == _minutes(case["eval_time"]) - 1
        ]
        assert firing_after_quiet, f"{name}: no unit test shows it firing a minute after it was quiet"
        for case in firing_after_quiet:
            assert all(a["exp_labels"]["severity"] == rule["labels"]["severity"] for a in case["exp_alerts"])


# --- the chart -----------------------------------------------------------------------------------


def _render(values) -> list[dict]:
    rendered = helm.Chart.load(CHART).render(values, name="sft-job", namespace="ml", is_install=True)
    return [d for path, text in rendered.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


def test_the_charts_copy_of_the_rules_is_the_source():
    assert (CHART / "files" / "alerts.yml").read_bytes() == ALERTS.read_bytes()


def test_the_prometheus_rule_renders_the_rules_and_fits_the_operators_schema(tmp_path):
    values = {"metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}}
    report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0")
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2], report
    [rule] = [d for d in _render(values) if d["kind"] == "PrometheusRule"]
    jsonschema.validate(rule, PROMETHEUS_RULE_SCHEMA)
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (tmp_path / "rendered.yml").write_text(yaml.safe_dump(rule["spec"]))
    checked = _promtool("check", "rules", tmp_path / "rendered.yml")  # Prometheus reads the rendered groups
    assert checked.returncode == 0 and f"SUCCESS: {len(_rules())} rules found" in checked.stdout, checked


@pytest.mark.parametrize(
    "broken",
    [
        lambda r: r["spec"]["groups"][0]["rules"][0].pop("expr"),
        lambda r: r["spec"]["groups"][0]["rules"][0].update({"for": "5 minutes"}),
        lambda r: r["spec"]["groups"][0]["rules"][0].update({"fro": "5m"}),
        lambda r: r["spec"]["groups"][0]["rules"][0]["labels"].update({"severity": 3}),
        lambda r: r["spec"]["groups"][0].pop("name"),
    ],
)
def test_the_schema_refuses_a_rule_the_operator_would(broken):
    values = {"metrics": {"prometheusRule": {"enabled": True}}}
    [rule] = [d for d in _render(values) if d["kind"] == "PrometheusRule"]
    broken(rule)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, PROMETHEUS_RULE_SCHEMA)


def test_no_prometheus_rule_unless_asked():
    assert "PrometheusRule" not in {d["kind"] for d in _render(None)}
    assert "PrometheusRule" not in {d["kind"] for d in _render({"metrics": {"prometheusRule": {"enabled": False}}})}


def test_compose_prometheus_loads_the_rules_it_mounts():
    prometheus = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["alerts.yml"]  # beside prometheus.yml, where compose mounts it
    mounts = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    checked = _promtool("check", "config", REPO / "deploy/prometheus/prometheus.yml")
    assert checked.returncode == 0 and "SUCCESS: 1 rule files found" in checked.stdout, checked


# --- the restart count -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "count"),
    [
        ({}, None),  # no scheduler says: not exported
        ({"SLURM_JOB_ID": "42"}, 0),  # Slurm sets the count only once it requeued
        ({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "3"}, 3),
        ({"JOBSET_RESTART_ATTEMPT": "2"}, 2),
        ({"JOBSET_RESTART_ATTEMPT": ""}, None),  # the annotation absent: the downward API gives ""
        ({"SLURM_RESTART_COUNT": "-1"}, None),
        ({"SLURM_RESTART_COUNT": "two"}, None),
        ({"SLURM_RESTART_COUNT": "\uff13"}, None),  # a full-width digit: str.isdigit, not a count
        ({"SLURM_RESTART_COUNT": "1" * 40}, None),
        ({"SLURM_RESTART_COUNT": " 3"}, None),
    ],
)
def test_restart_count_comes_from_slurm_or_jobset_and_only_as_a_plain_count(environ, count):
    assert restart_count(environ) == count


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=12))
def test_restart_count_is_the_number_written_or_nothing(text):
    count = restart_count({"SLURM_RESTART_COUNT": text})
    assert count is None or (str(count) == text.lstrip("0").rjust(1, "0") and count >= 0)


def test_run_gauges_carry_the_run_id_and_start_with_no_checkpoint():
    metrics = Metrics()
    metrics.for_run("r7", None)
    assert metrics.value("sft_job_run_status", {"run_id": "r7"}) == RunStatus.RUNNING
    assert metrics.value("sft_job_restarts", {"run_id": "r7"}) is None
    assert metrics.value("sft_job_last_checkpoint_timestamp_seconds", {"run_id": "r7"}) == 0
    assert metrics.value("sft_job_last_checkpoint_upload_timestamp_seconds", {"run_id": "r7"}) == 0
    metrics.checkpoint_written()
    written = metrics.value("sft_job_last_checkpoint_timestamp_seconds", {"run_id": "r7"})
    metrics.checkpoint_stored()
    assert metrics.value("sft_job_last_checkpoint_upload_timestamp_seconds", {"run_id": "r7"}) >= written > 1.7e9


# --- every rule against a real Prometheus scraping a real run ---------------------------------------


def _rules_loaded(api: str) -> bool:
    try:
        groups = requests.get(f"{api}/rules", timeout=1).json()["data"]["groups"]
    except (requests.ConnectionError, requests.Timeout, ValueError):  # still starting: no answer, or not JSON yet
        return False
    return sum(len(g["rules"]) for g in groups) == len(_rules())


@pytest.fixture
def alerting(tmp_path):
    """Prometheus (rules: alerts.yml, evaluated every second) scraping the job's port and a Pushgateway."""
    with prometheus_and_gateway(tmp_path, ALERTS, _rules_loaded) as started:
        yield started


def _query_range(api: str, expr: str, start: float, end: float) -> list:
    answer = requests.get(
        f"{api}/query_range", params={"query": expr, "start": start, "end": end, "step": "1s"}, timeout=30
    )
    assert answer.json()["status"] == "success", answer.text
    return answer.json()["data"]["result"]


def _labels_named(expr: str) -> set[str]:
    """The label names an expression matches on or groups by."""
    matchers = {
        name for body in re.findall(r"\{([^}]*)\}", expr) for name in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body)
    }
    groupings = re.findall(r"\b(?:by|on|group_left|group_right|ignoring|without)\s*\(([^)]*)\)", expr)
    return matchers | {name.strip() for names in groupings for name in names.split(",") if name.strip()}


@pytest.mark.slow
def test_every_rule_reads_what_a_real_run_exports_and_none_fires_on_it(alerting, cache, tmp_path):
    api, started = alerting["api"], time.time()
    ollama = FakeOllama().start()
    ollama.faults.extend(["503", ("reply", "I would rather not grade this one.")])  # a retry, an unparsed reply
    ollama.mode, ollama.healthy_for = "hang", 3  # those two and one answer, then the rest wait (below)
    try:
        proc = start_cli(
            *smoke_run(cache, tmp_path / "runs", "alerts1"),
            *("--judge-url", ollama.url, "--metrics-port", alerting["job_port"], "--pushgateway", alerting["gateway"]),
            *("--train-limit", "400"),  # about 6 s of training on 2 quiet cores: scraped at every second
            env={"JOBSET_RESTART_ATTEMPT": "2"},
        )
        training = (
            'sft_job_last_step_timestamp_seconds{instance!=""}'
            ' and on (job, instance) sft_job_stage_status{stage="finetune", instance!=""} == 1'
        )
        wait_until(lambda: proc.poll() is None and query(api, training), 300, what="a scrape of the run in training")
        # The judge's later requests wait until a scrape has seen its retry and unparsed reply: on a busy
        # machine the stage can end between two scrapes. Released, they are dropped unanswered and retried.
        unparsed = 'sft_job_judge_requests_total{outcome="unparsed", instance!=""}'
        wait_until(lambda: proc.poll() is None and query(api, unparsed), 300, what="a scrape of the judge's answers")
        ollama.mode = "ok"
        ollama.release.set()
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
    finally:
        ollama.stop()
    wait_until(lambda: query(api, 'sft_job_run_status{run_id="alerts1", instance=""} == 2'), 60, what="the final push")
    wait_until(lambda: query(api, 'up{job="sft-job"} == 0'), 60, what="a failed scrape of the job gone")
    end = time.time()
    series = requests.get(
        f"{api}/series", params={"match[]": '{__name__=~"sft_job_.+"}', "start": started, "end": end}, timeout=30
    ).json()["data"]
    exported: dict[str, set[str]] = {}
    for labels in series:
        exported.setdefault(labels["__name__"], set()).update(labels)
    for rule in _rules():
        expr, name = rule["expr"], rule["alert"]
        metrics = set(re.findall(r"\bsft_job_\w+", expr))
        assert metrics and metrics <= set(exported), f"{name}: {metrics - set(exported)} not exported"
        assert _labels_named(expr) <= set().union(*(exported[m] for m in metrics)), name
        for selector in re.findall(r"\bsft_job_\w+(?:\{[^}]*\})?", expr):  # each reads series of this run
            assert _query_range(api, f"count({selector})", started, end), f"{name}: {selector} matched nothing"
        held = _query_range(api, expr, started, end)
        assert held == [], f"{name} held during a healthy run: {held}"
    assert _query_range(api, "ALERTS", started, end) == []  # not even pending
    assert query(api, 'sft_job_restarts{run_id="alerts1"}')[0]["value"][1] == "2"


# --- the run's status, as the Pushgateway keeps it for the alerts ------------------------------------


@pytest.fixture
def pushgateway():
    with monitoring.pushgateway() as url:
        yield url


def _pushed(url: str, run_id: str) -> dict[str, float]:
    """The run's own gauges (those labelled run_id) as the Pushgateway holds them."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{url}/metrics", timeout=5).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("sft_job_") and sample.labels.get("run_id") == run_id and len(sample.labels) == 3
    }


def test_a_run_that_fails_on_its_data_is_pushed_as_failed(pushgateway, cache, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "Say hi.", "input": ""}]')  # no output
    args = smoke_run(cache, tmp_path / "runs", "bad1", "--skip-judge", "--data", bad, "--pushgateway", pushgateway)
    proc = start_cli(*args, env={"JOBSET_RESTART_ATTEMPT": "1"})
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "bad.json" in stderr, stderr
    pushed = _pushed(pushgateway, "bad1")
    assert pushed["sft_job_run_status"] == RunStatus.FAILED and pushed["sft_job_restarts"] == 1, pushed


def test_a_run_stopped_to_be_retried_is_pushed_as_such_not_as_failed(pushgateway, cache, tmp_path):
    args = smoke_run(cache, tmp_path / "runs", "stop1", "--skip-judge", "--pushgateway", pushgateway)
    proc = start_cli(*args)
    wait_for_event(proc, lambda e: e.get("event") == "eval")
    assert _pushed(pushgateway, "stop1")["sft_job_run_status"] == RunStatus.RUNNING  # pushed at its start
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr
    pushed = _pushed(pushgateway, "stop1")
    assert pushed["sft_job_run_status"] == RunStatus.RETRY and "sft_job_restarts" not in pushed, pushed
    assert (
        pushed["sft_job_last_checkpoint_upload_timestamp_seconds"]
        >= pushed["sft_job_last_checkpoint_timestamp_seconds"]
        > 0
    )


def test_a_process_refused_the_run_id_leaves_the_holders_pushed_status_alone(pushgateway, cache, tmp_path):
    from prometheus_client import pushadd_to_gateway

    from job.run.lock import LocalRunLock

    holder = Metrics()
    holder.for_run("held1", 0)
    pushadd_to_gateway(pushgateway, job="sft-job", grouping_key={"run_id": "held1"}, registry=holder.registry)
    lock = LocalRunLock(tmp_path / "runs" / "held1", "held1")
    lock.acquire()
    try:
        args = smoke_run(cache, tmp_path / "runs", "held1", "--skip-judge", "--pushgateway", pushgateway)
        refused = cli(*args)
    finally:
        lock.release()
    assert refused.returncode == 1 and "already running" in refused.stderr, refused.stderr
    assert _pushed(pushgateway, "held1")["sft_job_run_status"] == RunStatus.RUNNING
