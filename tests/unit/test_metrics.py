"""streams.service.metrics: the real text exposition, parsed back with prometheus-client's own parser."""

from __future__ import annotations

import math
import shutil
import subprocess
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from models.events import EVENT_TYPES
from streams.service.metrics import LATENCY_BUCKETS, Metrics, observe_many

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(m: Metrics) -> tuple[Samples, dict[str, str]]:
    """(sample values keyed by name and labels, family types) of one render()."""
    body, _ = m.render()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def buckets(samples: Samples, name: str) -> dict[float, float]:
    return {float(dict(lbl)["le"]): v for (n, lbl), v in samples.items() if n == f"{name}_bucket"}


@pytest.fixture
def m() -> Metrics:
    return Metrics()


def test_every_family_has_its_name_and_type(m: Metrics) -> None:
    _, types = scrape(m)
    # The parser reports counters and infos under their base name.
    expected = {
        "profilestream_events_consumed": "counter",
        "profilestream_events_invalid": "counter",
        "profilestream_events_skipped": "counter",
        "profilestream_batch_size_events": "histogram",
        "profilestream_model_step_seconds": "histogram",
        "profilestream_event_to_profile_latency_seconds": "histogram",
        "profilestream_batch_processing_seconds": "histogram",
        "profilestream_profiles_published": "counter",
        "profilestream_users_in_state": "gauge",
        "profilestream_consumer_lag_offsets": "gauge",
        "profilestream_consumer_lag_seconds": "gauge",
        "profilestream_rebalances": "counter",
        "profilestream_last_batch_timestamp_seconds": "gauge",
        "profilestream_seconds_since_last_batch": "gauge",
        "profilestream_model_info": "gauge",  # Info renders as a gauge in the text format
        "profilestream_assigned_partitions": "gauge",
        "profilestream_ready": "gauge",
        "profilestream_recovery_remaining_records": "gauge",
        "profilestream_stage_seconds": "counter",
        "profilestream_state_cache_users": "gauge",
        "profilestream_state_cache_dirty_users": "gauge",
        "profilestream_state_cache_lookups": "counter",
    }
    assert {name: types.get(name) for name in expected} == expected


def test_default_registry_has_process_platform_and_gc_collectors(m: Metrics) -> None:
    _, types = scrape(m)
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info",
            "python_gc_collections"} <= set(types)


def test_instances_are_isolated() -> None:
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.count_invalid("oversized", 3)
    assert value(scrape(a)[0], "profilestream_events_invalid_total", reason="oversized") == 3
    assert value(scrape(b)[0], "profilestream_events_invalid_total", reason="oversized") == 0
    assert "process_cpu_seconds" not in scrape(a)[1]  # a registry given is used as is


def test_counters_exist_at_zero_before_the_first_event(m: Metrics) -> None:
    samples, _ = scrape(m)
    for kind in EVENT_TYPES:
        assert value(samples, "profilestream_events_consumed_total", type=kind) == 0
    assert value(samples, "profilestream_events_invalid_total", reason="malformed_json") == 0
    assert value(samples, "profilestream_events_skipped_total", reason="redelivered") == 0


def test_observe_batch(m: Metrics) -> None:
    before = time.time()
    m.observe_batch(type_counts={"view": 7, "purchase": 2, "cart": 0}, batch_size=12, step_seconds=0.003,
                    batch_seconds=0.04, latencies_s=np.array([0.004, 0.05, 0.05, 0.3, 0.3, 0.3, 2.0, 70.0, -0.2, np.nan]),
                    profiles_published=4)
    m.observe_batch(type_counts={"view": 1}, batch_size=1, step_seconds=0.0004, batch_seconds=0.002,
                    latencies_s=np.zeros(0), profiles_published=1)
    samples, _ = scrape(m)

    assert value(samples, "profilestream_events_consumed_total", type="view") == 8
    assert value(samples, "profilestream_events_consumed_total", type="purchase") == 2
    assert value(samples, "profilestream_events_consumed_total", type="cart") == 0
    assert value(samples, "profilestream_profiles_published_total") == 5

    sizes = buckets(samples, "profilestream_batch_size_events")
    assert (sizes[1.0], sizes[10.0], sizes[20.0], sizes[math.inf]) == (1, 1, 2, 2)
    assert value(samples, "profilestream_batch_size_events_sum") == 13

    step = buckets(samples, "profilestream_model_step_seconds")
    assert (step[0.0005], step[0.0025], step[0.005]) == (1, 1, 2)
    assert value(samples, "profilestream_batch_processing_seconds_count") == 2

    latency = buckets(samples, "profilestream_event_to_profile_latency_seconds")
    assert sorted(latency) == [*LATENCY_BUCKETS, math.inf]
    # -0.2 is clamped to 0, NaN dropped; 0.05 sits exactly on a bound (le is inclusive); 70 only fits +Inf.
    assert latency[0.005] == 2 and latency[0.025] == 2 and latency[0.05] == 4
    assert latency[0.25] == 4 and latency[0.5] == 7 and latency[2.5] == 8
    assert latency[60.0] == 8 and latency[math.inf] == 9
    assert value(samples, "profilestream_event_to_profile_latency_seconds_count") == 9
    assert value(samples, "profilestream_event_to_profile_latency_seconds_sum") == pytest.approx(73.004)

    last = value(samples, "profilestream_last_batch_timestamp_seconds")
    assert before <= last <= time.time()
    assert 0 <= value(samples, "profilestream_seconds_since_last_batch") < 5


def test_observe_many_matches_observe_one_at_a_time() -> None:
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.exponential(0.2, 5000), np.array(LATENCY_BUCKETS), [0.0, 1e6]])
    fast_reg, slow_reg = CollectorRegistry(), CollectorRegistry()
    fast = Histogram("h_seconds", "h", buckets=LATENCY_BUCKETS, registry=fast_reg)
    slow = Histogram("h_seconds", "h", buckets=LATENCY_BUCKETS, registry=slow_reg)
    observe_many(fast, values)
    for v in values.tolist():
        slow.observe(v)

    def exposition(reg: CollectorRegistry) -> dict[str, float]:
        return {f"{s.name}{sorted(s.labels.items())}": s.value
                for fam in reg.collect() for s in fam.samples if not s.name.endswith("_created")}

    got, want = exposition(fast_reg), exposition(slow_reg)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9), key


def test_seconds_since_last_batch_is_computed_at_scrape(m: Metrics, monkeypatch: pytest.MonkeyPatch) -> None:
    start = time.time()
    monkeypatch.setattr(time, "time", lambda: start + 120.0)
    samples, _ = scrape(m)
    assert value(samples, "profilestream_seconds_since_last_batch") == pytest.approx(120.0, abs=5)
    assert value(samples, "profilestream_last_batch_timestamp_seconds") == 0


def test_invalid_and_skipped_reasons(m: Metrics) -> None:
    m.count_invalid("malformed_json")
    m.count_invalid("malformed_json", 4)
    m.count_invalid("some_new_code", 2)
    m.count_skipped("redelivered", 10)
    samples, _ = scrape(m)
    assert value(samples, "profilestream_events_invalid_total", reason="malformed_json") == 5
    assert value(samples, "profilestream_events_invalid_total", reason="some_new_code") == 2
    assert value(samples, "profilestream_events_skipped_total", reason="redelivered") == 10
    assert value(samples, "profilestream_events_skipped_total", reason="duplicate_event") == 0


def test_lag_and_assignment(m: Metrics) -> None:
    m.set_assignment([("profilestream.events", 0), ("profilestream.events", 3)])
    m.set_lag("profilestream.events", 0, 120, 1.5)
    m.set_lag("profilestream.events", 3, 0, 0.0)
    samples, _ = scrape(m)
    assert value(samples, "profilestream_assigned_partitions") == 2
    assert value(samples, "profilestream_consumer_lag_offsets", topic="profilestream.events", partition="0") == 120
    assert value(samples, "profilestream_consumer_lag_seconds", topic="profilestream.events", partition="0") == 1.5

    m.count_rebalance()
    m.set_assignment([("profilestream.events", 3), ("profilestream.events", 5)])
    samples, _ = scrape(m)
    lag_partitions = {dict(lbl)["partition"] for (n, lbl) in samples if n == "profilestream_consumer_lag_offsets"}
    assert lag_partitions == {"3"}  # revoked partition 0 is gone, 5 has not reported yet
    assert value(samples, "profilestream_assigned_partitions") == 2
    assert value(samples, "profilestream_rebalances_total") == 1


def test_gauges_and_model_info(m: Metrics) -> None:
    m.set_users_in_state(42)
    m.set_ready(True)
    m.set_model_info(version="2024.1", fingerprint="9f2c", device="cuda:0")
    samples, _ = scrape(m)
    assert value(samples, "profilestream_users_in_state") == 42
    assert value(samples, "profilestream_ready") == 1
    assert value(samples, "profilestream_model_info", version="2024.1", fingerprint="9f2c", device="cuda:0") == 1
    m.set_ready(False)
    assert value(scrape(m)[0], "profilestream_ready") == 0


def test_lookup_requests_by_endpoint_and_status(m: Metrics) -> None:
    samples, types = scrape(m)
    assert types["profilestream_lookup_requests"] == "counter" and types["profilestream_lookup_seconds"] == "histogram"
    for endpoint in ("profile", "profiles"):  # present at 0 before the first lookup
        assert value(samples, "profilestream_lookup_requests_total", endpoint=endpoint, status="200") == 0
        assert value(samples, "profilestream_lookup_seconds_count", endpoint=endpoint) == 0
    m.observe_lookup("profiles", 200, 0.004)
    m.observe_lookup("profiles", 503, 0.0002)
    m.observe_lookup("profile", 404, 0.002)
    samples, _ = scrape(m)
    assert value(samples, "profilestream_lookup_requests_total", endpoint="profiles", status="200") == 1
    assert value(samples, "profilestream_lookup_requests_total", endpoint="profiles", status="503") == 1
    assert value(samples, "profilestream_lookup_requests_total", endpoint="profile", status="404") == 1
    assert value(samples, "profilestream_lookup_seconds_count", endpoint="profiles") == 2
    assert value(samples, "profilestream_lookup_seconds_bucket", endpoint="profiles", le="0.001") == 1
    assert value(samples, "profilestream_lookup_seconds_sum", endpoint="profile") == pytest.approx(0.002)
def test_recovery_remaining(m: Metrics) -> None:
    samples, _ = scrape(m)
    # Both kinds exist at 0 before the first sample, so the RecoveryStalled join has series.
    assert value(samples, "profilestream_recovery_remaining_records", kind="active") == 0
    m.set_recovery_remaining(active=1200, standby=35)
    samples, _ = scrape(m)
    assert value(samples, "profilestream_recovery_remaining_records", kind="active") == 1200
    assert value(samples, "profilestream_recovery_remaining_records", kind="standby") == 35


def test_stage_and_cache_counters_follow_the_processors_cumulative_figures(m: Metrics) -> None:
    m.sync_stages({"lookup": 0.25, "model_step": 1.0})
    m.sync_stages({"lookup": 0.75, "model_step": 1.0})  # model_step unchanged: no increment
    m.set_state_cache(users=10, dirty=4, hits=7, misses=3)
    m.set_state_cache(users=12, dirty=0, hits=9, misses=3)
    samples, _ = scrape(m)
    assert value(samples, "profilestream_stage_seconds_total", stage="lookup") == 0.75
    assert value(samples, "profilestream_stage_seconds_total", stage="model_step") == 1.0
    assert value(samples, "profilestream_stage_seconds_total", stage="flush") == 0.0  # exists before use
    assert value(samples, "profilestream_state_cache_users") == 12
    assert value(samples, "profilestream_state_cache_dirty_users") == 0
    assert value(samples, "profilestream_state_cache_lookups_total", result="hit") == 9
    assert value(samples, "profilestream_state_cache_lookups_total", result="miss") == 3


def test_render_content_type(m: Metrics) -> None:
    body, content_type = m.render()
    assert content_type.startswith("text/plain; version=")  # Prometheus text format, not OpenMetrics
    assert body.startswith(b"# HELP")


#: Issue 6's list of what a worker exports -> (family name, type, label names of its series);
#: prometheus-client names counter families without ``_total`` (their samples have it).
ISSUE_METRICS = {
    "events consumed by type": ("profilestream_events_consumed", "counter", {"type"}),
    "invalid events by reason": ("profilestream_events_invalid", "counter", {"reason"}),
    "batch size histogram": ("profilestream_batch_size_events", "histogram", set()),
    "model step seconds histogram": ("profilestream_model_step_seconds", "histogram", set()),
    "event->profile latency histogram": ("profilestream_event_to_profile_latency_seconds", "histogram", set()),
    "profiles published": ("profilestream_profiles_published", "counter", set()),
    "users in state": ("profilestream_users_in_state", "gauge", set()),
    "consumer lag per partition, offsets": ("profilestream_consumer_lag_offsets", "gauge", {"topic", "partition"}),
    "consumer lag per partition, seconds": ("profilestream_consumer_lag_seconds", "gauge", {"topic", "partition"}),
    "rebalances": ("profilestream_rebalances", "counter", set()),
    "seconds since last processed batch": ("profilestream_seconds_since_last_batch", "gauge", set()),
    # An Info family is named without its _info suffix, which its one sample carries.
    "model version and device as info": ("profilestream_model", "info", {"version", "fingerprint", "device"}),
    "process CPU": ("process_cpu_seconds", "counter", set()),
    "process memory": ("process_resident_memory_bytes", "gauge", set()),
    "process open fds": ("process_open_fds", "gauge", set()),
    "process start time": ("process_start_time_seconds", "gauge", set()),
}


def populated() -> Metrics:
    """A Metrics with every family holding at least one series."""
    m = Metrics()
    m.set_model_info(version="2024.1", fingerprint="9f2c", device="cuda:0")
    m.set_assignment([("profilestream.events", 0)])
    m.set_lag("profilestream.events", 0, 12, 0.5)
    m.count_rebalance()
    m.observe_batch(type_counts={"view": 2}, batch_size=2, step_seconds=0.01, batch_seconds=0.02,
                    latencies_s=np.array([0.05, 0.1]), profiles_published=1)
    return m


def test_the_issues_metric_list_is_exported() -> None:
    families = {f.name: f for f in populated().registry.collect()}
    for item, (name, kind, labels) in ISSUE_METRICS.items():
        family = families.get(name)
        assert family is not None, f"{item}: no metric family {name}"
        assert family.type == kind, f"{item}: {name} is a {family.type}, not a {kind}"
        main = [s for s in family.samples if not s.name.endswith("_created")]
        assert main, f"{item}: {name} has no series"
        assert {frozenset(s.labels) - {"le"} for s in main} == {frozenset(labels)}, item


def test_names_follow_the_prometheus_conventions() -> None:
    body, _ = populated().render()
    for family in text_string_to_metric_families(body.decode()):
        name = family.name
        assert name == name.lower() and " " not in name, name
        if name.startswith("profilestream_") and family.type == "counter":
            assert f"{name}_total" in {s.name for s in family.samples}, name
        if family.type != "counter":
            assert not name.endswith("_total"), name
        # Base units only: seconds and bytes, never ms / milliseconds / kb.
        assert not any(part in name.split("_") for part in ("ms", "milliseconds", "minutes", "kb", "mb")), name
    # promtool's own linter (Debian's prometheus package), where installed.
    if shutil.which("promtool"):
        lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60)
        assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()
