"""The worker's own Prometheus metrics (prometheus-client, not faust's sensor).

Every collector lives in one :class:`Metrics` object bound to one
``CollectorRegistry``, so tests build isolated instances and the worker serves
exactly what ``render()`` returns on ``/metrics``.  Names follow the Prometheus
conventions (``_total`` counters, base units: seconds), and the dashboard and
alert rules under ``deploy/`` use only names exported here -- a test checks it.

The pipeline calls these methods once per *batch*, never per event: a batch of
2,000 events costs a handful of counter increments and one vectorised
histogram update, not thousands of lock round trips.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from models.events import EVENT_TYPES

from ..internals import histogram_add, histogram_bounds
from ..kafka.stall import VERDICTS
from ..pipeline.stages import STAGES

#: Reason codes of the validation and admission steps, created at zero so that
#: ``rate()`` sees the very first dead-lettered record (a counter series that
#: appears already at 1 has no earlier sample to rate against).  Other codes
#: are accepted too; they just start existing at their first increment.
INVALID_REASONS: tuple[str, ...] = (
    "malformed_json", "missing_value", "missing_field", "wrong_type", "unknown_type", "oversized",
    "field_too_long", "bad_key", "key_mismatch", "bad_timestamp", "future_timestamp", "bad_price",
    "out_of_order", "unknown_control", "bad_encoding", "duplicate_key", "too_deep", "number_out_of_range",
    "bad_id", "wrong_partition", "unprocessable",
)
#: Why an event was not applied although it is valid (effectively-once rules).
SKIP_REASONS: tuple[str, ...] = ("redelivered", "duplicate_event")
#: The two kinds of table partitions faust recovers from the changelog: those this worker
#: owns (it is not ready until they are read) and its standby replicas of others'.
RECOVERY_KINDS: tuple[str, ...] = ("active", "standby")
#: Why a user's state was erased: a ``profilestream forget`` request, or the idle TTL.
FORGET_CAUSES: tuple[str, ...] = ("request", "ttl")

BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
MODEL_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Dense around the 0.5 s p99 SLO (deploy/README.md) so the quantile is sharp there.
#: Lookups answer in milliseconds; forwarded batches of 1,000 users take tens of them.
LOOKUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: What a state lookup found in the write-behind cache (streams/state/cache.py).
CACHE_RESULTS: tuple[str, ...] = ("hit", "miss")
#: The lookup routes, as the ``endpoint`` label names them (docs/http.md).
LOOKUP_ENDPOINTS: tuple[str, ...] = ("profile", "profiles")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def default_registry() -> CollectorRegistry:
    """A fresh registry with the process, platform and GC collectors a worker should export."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """Add many observations to an unlabelled histogram at once.

    ``Histogram.observe`` is a Python loop over the bucket bounds plus two
    locked increments per value; here one np.searchsorted + np.bincount and
    one locked increment per non-empty bucket (docs/performance.md).  The
    histogram's private fields are reached through streams/internals.py;
    tests/unit/test_metrics.py checks the exposition equals that of
    ``observe()`` one value at a time.

    Negative values (producer clock ahead of the worker's) are clamped to 0:
    a negative sum would break the counter semantics of the histogram's sum.
    NaNs are dropped: they fit no bucket and would poison the sum.
    """
    values = np.asarray(values, dtype=np.float64)
    clamped = np.clip(values[~np.isnan(values)], 0.0, None)
    if clamped.size == 0:
        return
    # side="left": bucket i holds bounds[i-1] < v <= bounds[i], as observe() does; the
    # last bound is +Inf, so every finite value lands in a bucket.
    bounds = histogram_bounds(histogram)
    index = np.searchsorted(np.asarray(bounds), clamped, side="left")
    histogram_add(histogram, np.bincount(index, minlength=len(bounds)).tolist(), float(clamped.sum()))


class Metrics:
    """All collectors of one worker, registered in ``registry`` (default: :func:`default_registry`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = default_registry() if registry is None else registry
        r = self.registry
        self.events_consumed = Counter(
            "profilestream_events_consumed_total", "Valid events applied to user state, by event type.",
            ["type"], registry=r)
        self.events_invalid = Counter(
            "profilestream_events_invalid_total", "Records sent to the dead-letter topic, by reason code.",
            ["reason"], registry=r)
        self.events_skipped = Counter(
            "profilestream_events_skipped_total",
            "Valid events not applied because they already were (effectively-once rule), by reason.",
            ["reason"], registry=r)
        self.users_forgotten = Counter(
            "profilestream_users_forgotten_total",
            "Users whose state was erased and profile tombstoned, by cause (request, ttl).",
            ["cause"], registry=r)
        self.batch_size = Histogram(
            "profilestream_batch_size_events", "Records in one micro-batch.",
            buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.model_step = Histogram(
            "profilestream_model_step_seconds", "Duration of the one batched model call of a micro-batch.",
            buckets=MODEL_STEP_BUCKETS, registry=r)
        self.event_to_profile_latency = Histogram(
            "profilestream_event_to_profile_latency_seconds",
            "Profile publish time minus the event's timestamp, per applied event.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_processing = Histogram(
            "profilestream_batch_processing_seconds", "Duration of a whole micro-batch, decode to publish.",
            buckets=BATCH_SECONDS_BUCKETS, registry=r)
        self.profiles_published = Counter(
            "profilestream_profiles_published_total", "Profile messages published.", registry=r)
        self.users_in_state = Gauge(
            "profilestream_users_in_state", "Users with state in this worker's partitions.", registry=r)
        self.lag_offsets = Gauge(
            "profilestream_consumer_lag_offsets", "Records between the committed offset and the high watermark.",
            ["topic", "partition"], registry=r)
        self.lag_seconds = Gauge(
            "profilestream_consumer_lag_seconds",
            "Age of the last processed record while records wait behind it (0 when caught up).",
            ["topic", "partition"], registry=r)
        self.rebalances = Counter(
            "profilestream_rebalances_total", "Consumer-group rebalances this worker went through.", registry=r)
        self.last_batch_timestamp = Gauge(
            "profilestream_last_batch_timestamp_seconds", "Unix time the last micro-batch finished (0: none yet).",
            registry=r)
        self.seconds_since_last_batch = Gauge(
            "profilestream_seconds_since_last_batch",
            "Seconds since the last micro-batch finished, or since start-up before the first one.",
            registry=r)
        self.model_info = Info(
            "profilestream_model", "The model this worker runs.", registry=r)
        self.assigned_partitions = Gauge(
            "profilestream_assigned_partitions", "Partitions of the events topic assigned to this worker.",
            registry=r)
        self.ready = Gauge("profilestream_ready", "1 when the worker serves traffic (see /readyz).", registry=r)
        self.lookup_requests = Counter(
            "profilestream_lookup_requests_total",
            "Profile lookup requests answered, by endpoint (profile: one user, profiles: a batch) and HTTP status.",
            ["endpoint", "status"], registry=r)
        self.lookup_seconds = Histogram(
            "profilestream_lookup_seconds", "Time to answer a profile lookup request, forwarding included.",
            ["endpoint"], buckets=LOOKUP_BUCKETS, registry=r)
        self.recovery_remaining = Gauge(
            "profilestream_recovery_remaining_records",
            "Changelog records still to be read into the state table (0: recovered), by kind (active, standby).",
            ["kind"], registry=r)
        self.stage_seconds = Counter(
            "profilestream_stage_seconds",
            "Wall seconds spent in each pipeline stage (streams/pipeline/stages.py), summed over batches.",
            ["stage"], registry=r)
        self.state_cache_users = Gauge(
            "profilestream_state_cache_users", "Users whose decoded state the write-behind cache holds.",
            registry=r)
        self.state_cache_dirty_users = Gauge(
            "profilestream_state_cache_dirty_users",
            "Cached users whose state is not yet in RocksDB and the changelog (written at the next commit).",
            registry=r)
        self.fetch_stalls = Counter(
            "profilestream_fetch_stalls",
            "Events partitions the fetch-stall watchdog found stalled (records beyond the next offset, none "
            "fetched for PROFILESTREAM_FETCH_STALL_S), by what it did: reseek, or unhealthy (/healthz fails).",
            ["action"], registry=r)
        self.state_cache_lookups = Counter(
            "profilestream_state_cache_lookups",
            "User states looked up through the write-behind cache, by result (hit, miss: read from RocksDB).",
            ["result"], registry=r)

        for kind in EVENT_TYPES:
            self.events_consumed.labels(type=kind)
        for reason in INVALID_REASONS:
            self.events_invalid.labels(reason=reason)
        for reason in SKIP_REASONS:
            self.events_skipped.labels(reason=reason)
        for cause in FORGET_CAUSES:
            self.users_forgotten.labels(cause=cause)
        for endpoint in LOOKUP_ENDPOINTS:  # the error ratio's denominator exists before the first lookup
            self.lookup_requests.labels(endpoint=endpoint, status="200")
            self.lookup_seconds.labels(endpoint=endpoint)
        for kind in RECOVERY_KINDS:
            self.recovery_remaining.labels(kind=kind)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for result in CACHE_RESULTS:
            self.state_cache_lookups.labels(result=result)
        for action in VERDICTS:
            self.fetch_stalls.labels(action=action)
        #: What :meth:`sync_stages` and :meth:`set_state_cache` last saw of the processor's own
        #: cumulative figures: the counters advance by the difference.
        self._seen_stages: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._seen_lookups: dict[str, int] = dict.fromkeys(CACHE_RESULTS, 0)
        # Computed at scrape time, so it keeps growing when the agent dies silently
        # (the NoProgressWithLag alert); counted from start-up until the first batch.
        self._last_batch_at = time.time()
        self.seconds_since_last_batch.set_function(lambda: time.time() - self._last_batch_at)
        self._lag_labels: set[tuple[str, str]] = set()

    def observe_batch(self, *, type_counts: Mapping[str, int], batch_size: int, step_seconds: float,
                      batch_seconds: float, latencies_s: np.ndarray, profiles_published: int) -> None:
        """Record one finished micro-batch; ``latencies_s`` has one value per applied event."""
        for kind, n in type_counts.items():
            if n:
                self.events_consumed.labels(type=kind).inc(n)
        self.batch_size.observe(batch_size)
        self.model_step.observe(step_seconds)
        self.batch_processing.observe(batch_seconds)
        observe_many(self.event_to_profile_latency, latencies_s)
        if profiles_published:
            self.profiles_published.inc(profiles_published)
        self._last_batch_at = time.time()
        self.last_batch_timestamp.set(self._last_batch_at)

    def count_invalid(self, reason: str, n: int = 1) -> None:
        """``n`` records of one batch dead-lettered for ``reason`` (a stable code, never free text)."""
        self.events_invalid.labels(reason=reason).inc(n)

    def count_skipped(self, reason: str, n: int = 1) -> None:
        """``n`` valid events of one batch not applied, e.g. ``redelivered`` after a rebalance."""
        self.events_skipped.labels(reason=reason).inc(n)

    def count_forgotten(self, cause: str, n: int = 1) -> None:
        """``n`` users erased for ``cause`` (one of :data:`FORGET_CAUSES`)."""
        self.users_forgotten.labels(cause=cause).inc(n)

    def set_lag(self, topic: str, partition: int, offsets: int, seconds: float) -> None:
        """Lag of one assigned partition; call it from a timer, not the agent, so it stays
        fresh when the agent stalls."""
        labels = (topic, str(partition))
        self._lag_labels.add(labels)
        self.lag_offsets.labels(*labels).set(offsets)
        self.lag_seconds.labels(*labels).set(seconds)

    def set_assignment(self, partitions: Iterable[tuple[str, int]]) -> None:
        """The (topic, partition) pairs now assigned; drops the lag series of the others.

        A revoked partition's last lag would otherwise stay exported forever and
        be counted twice once its new owner reports it, keeping lag alerts firing.
        """
        assigned = {(topic, str(partition)) for topic, partition in partitions}
        for labels in self._lag_labels - assigned:
            self.lag_offsets.remove(*labels)
            self.lag_seconds.remove(*labels)
        self._lag_labels &= assigned
        self.assigned_partitions.set(len(assigned))

    def count_rebalance(self) -> None:
        self.rebalances.inc()

    def set_users_in_state(self, n: int) -> None:
        self.users_in_state.set(n)

    def set_recovery_remaining(self, active: int, standby: int) -> None:
        """Records faust's table recovery still has to read, for owned and standby partitions."""
        self.recovery_remaining.labels(kind="active").set(active)
        self.recovery_remaining.labels(kind="standby").set(standby)

    def sync_stages(self, seconds: Mapping[str, float]) -> None:
        """Advance the stage counters to the processor's cumulative stage clock.

        Called from the monitor timer, not per batch: 13 locked increments per
        batch would cost a visible share of the small-batch budget.
        """
        for stage, total in seconds.items():
            delta = total - self._seen_stages[stage]
            if delta > 0:
                self.stage_seconds.labels(stage=stage).inc(delta)
                self._seen_stages[stage] = total

    def set_state_cache(self, *, users: int, dirty: int, hits: int, misses: int) -> None:
        """The write-behind cache's size and its cumulative hit and miss counts."""
        self.state_cache_users.set(users)
        self.state_cache_dirty_users.set(dirty)
        for result, total in (("hit", hits), ("miss", misses)):
            delta = total - self._seen_lookups[result]
            if delta > 0:
                self.state_cache_lookups.labels(result=result).inc(delta)
                self._seen_lookups[result] = total

    def count_fetch_stall(self, action: str) -> None:
        """The fetch-stall watchdog re-seeked a partition (``reseek``) or gave the worker up (``unhealthy``)."""
        self.fetch_stalls.labels(action=action).inc()

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def set_model_info(self, *, version: str, fingerprint: str, device: str) -> None:
        self.model_info.info({"version": version, "fingerprint": fingerprint, "device": device})

    def observe_lookup(self, endpoint: str, status: int, seconds: float) -> None:
        self.lookup_requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.lookup_seconds.labels(endpoint=endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every collector in the registry, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
