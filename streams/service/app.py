"""The faust application: topics, the RocksDB state table, and the batch hook that
feeds fetched batches of raw events to :class:`~streams.pipeline.processor.BatchProcessor`.

Faust owns what it is good at -- consumer-group membership, rebalancing,
table partition assignment, changelog recovery, offset commits and the worker
lifecycle.  Everything per event happens in the processor, once per batch;
``streams/kafka/fetcher.py`` explains why records skip faust's per-event stream.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Awaitable, Sequence

import faust
from faust.types import TP

from models import ProfileModel

from ..kafka.fetcher import BatchingConsumer, install as install_batch_consumer
from ..kafka.stall import UNHEALTHY, FetchStallWatch
from ..kafka.delivery import DeliveryGuard
from ..kafka.end_offsets import EndOffsetProbe
from ..kafka.client_config import aiokafka_options, ssl_context
from .lookup import register_lookup
from .metrics import Metrics
from .monitor import sample
from ..kafka.publisher import Publisher, dead_letter_budget
from ..pipeline.processor import BatchProcessor, PreparedBatch
from ..pipeline.source_record import SourceRecord
from ..settings import Settings
from ..state.store import TableStateStore
from .status import register_status
from .ttl import sweep as ttl_sweep
from .web import register_views

log = logging.getLogger(__name__)

TABLE_NAME = "user-state"


@dataclass
class ProfileStreamApp:
    """The wired-up service; ``app`` is what a faust Worker runs."""

    settings: Settings
    app: faust.App
    table: faust.Table
    store: TableStateStore
    processor: BatchProcessor
    metrics: Metrics
    model: ProfileModel
    health: "WorkerHealth"


@dataclass
class WorkerHealth:
    """Why the worker should be restarted, if it should: ``/healthz`` fails with the reason."""

    #: Batch processing hit an error it cannot handle (bad input never is one); the worker stops itself.
    error: BaseException | None = None
    #: An events partition stayed stalled through a re-seek (streams/kafka/stall.py): the process
    #: lives on, so only its orchestrator, seeing liveness fail, restarts it.
    stalled: str | None = None

    def failure(self) -> str | None:
        """The reason liveness fails, or None while the worker is alive."""
        if self.error is not None:
            return f"batch processing failed: {self.error!r}"
        if self.stalled is not None:
            return f"fetch stall: {self.stalled}"
        return None


def faust_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    ctx = ssl_context(settings)
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=settings.sasl_username, password=settings.sasl_password,
                                     mechanism=settings.sasl_mechanism, ssl_context=ctx)
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


def faust_config(settings: Settings) -> dict[str, object]:
    """faust.App keyword settings derived from ours."""
    conf: dict[str, object] = dict(
        broker=[f"kafka://{s}" for s in settings.bootstrap_servers.split(",")],
        store="rocksdb://",
        datadir=str(settings.data_dir),
        topic_partitions=settings.partitions,
        # Every topic faust creates: the table's changelog and its assignor's leader topic.
        topic_replication_factor=settings.replication_factor,
        table_standby_replicas=settings.standby_replicas,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        canonical_url=settings.canonical_url,
        # faust's built-in views serve table contents (/table), routing metadata (/router),
        # sensor statistics and the service graph with no authentication: none of them is
        # served (docs/http.md lists what is).
        web_router_enabled=False,
        web_tables_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        web_metrics_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=settings.batch_max,
        broker_commit_interval=settings.commit_interval_s,
        producer_linger=0.005,
        producer_max_batch_size=settings.producer_batch_bytes,
        producer_request_timeout=settings.producer_request_timeout_s,
        worker_redirect_stdouts=False,
    )
    credentials = faust_credentials(settings)
    if credentials is not None:
        conf["broker_credentials"] = credentials
    if settings.embedded_broker:
        # faust's default group timeouts make a lone worker wait ~30 s to join the
        # embedded broker's group.  (Its end-offset quirk is handled by the consumer's
        # EndOffsetProbe, so this producer batches as it would against Apache Kafka.)
        conf.update(broker_session_timeout=6.0,
                    broker_rebalance_timeout=6.0, broker_heartbeat_interval=1.0)
    return conf


#: The embedded broker holds a fetch for part of its max wait even when records are
#: there (see streams.internals.FetchWaitConsumerThread), so a short wait is its latency.
#: It answers a fetch slower than the wait with no records, and its fetches slow down as a
#: partition grows: the fetch-stall watchdog raises the wait, up to PROFILESTREAM_FETCH_MAX_WAIT_MS,
#: when that stalls a partition (docs/embedded-broker.md).
EMBEDDED_FETCH_MAX_WAIT_MS = 10


def fetch_max_wait_ms(settings: Settings) -> int:
    if settings.embedded_broker:
        return min(settings.fetch_max_wait_ms, EMBEDDED_FETCH_MAX_WAIT_MS)
    return settings.fetch_max_wait_ms


def rocksdb_options(settings: Settings) -> dict[str, int]:
    """Memory bounds of each state partition's RocksDB (faust's defaults allow ~2.2 GiB each)."""
    mib = 1024 * 1024
    return {"write_buffer_size": settings.rocksdb_write_buffer_mb * mib, "max_write_buffer_number": 2,
            "block_cache_size": settings.rocksdb_block_cache_mb * mib}


def build_app(settings: Settings, model: ProfileModel, metrics: Metrics | None = None) -> ProfileStreamApp:
    app = faust.App(settings.app_id, **faust_config(settings))
    metrics = metrics or Metrics()
    metrics.set_model_info(version=model.version, fingerprint=model.fingerprint, device=str(model.device))
    events = app.topic(settings.events_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=settings.partitions)
    # Values are our binary state records; they are read and written through
    # TableStateStore (raw bytes), never through table[key].
    table = app.Table(TABLE_NAME, partitions=settings.partitions, key_type=bytes, value_type=bytes,
                      options=rocksdb_options(settings))
    guard = DeliveryGuard(lambda exc: fail(exc, "an output was not delivered"))
    store = TableStateStore(table, guard)
    publisher = Publisher(app.producer, settings.profiles_topic, settings.dlq_topic, guard,
                          dead_letter_budget(settings.producer_batch_bytes, app.conf.producer_max_request_size))

    async def events_end(partition: int) -> int:
        """Exact end offset of an events partition (the consumer probes it on the embedded broker)."""
        tp = TP(settings.events_topic, partition)
        return (await app.consumer.highwaters(tp))[tp]

    processor = BatchProcessor(model, store, publisher, metrics, events_end, settings.events_topic,
                               reset_mismatched=settings.on_model_mismatch == "reset",
                               partitions_of=lambda topic: app.consumer.topic_partitions(topic) or settings.partitions,
                               cache_users=settings.state_cache_users,
                               thread_min_events=settings.overlap_min_events)
    health = WorkerHealth()

    def on_batch(records: Sequence[SourceRecord]) -> Awaitable[None]:
        """One fetched batch of raw events: prepared now, applied by the awaitable returned.

        An unexpected error stops the whole worker (SIGTERM to itself: a graceful
        stop that commits only what was fully processed) rather than leaving a
        live process that no longer makes progress.  No record's failure gets
        here: the processor dead-letters the record (bad input, or
        ``unprocessable``), so what does is the worker's own (state, broker, model).
        """
        try:
            prepared = processor.prepare(records)
        except Exception as exc:
            fail(exc)
            raise
        return apply(prepared)

    async def apply(prepared: PreparedBatch) -> None:
        try:
            await processor.apply(prepared)
        except Exception as exc:
            fail(exc)
            raise

    async def before_commit() -> bool:
        """Flush the state cache; a failure (RocksDB, the producer) is the worker's, and stops it."""
        try:
            await processor.flush()
        except Exception as exc:
            fail(exc, "writing the cached states failed")
            return False
        return True

    def fail(exc: BaseException, what: str = "batch processing failed") -> None:
        health.error = exc
        log.critical("%s, stopping the worker: %r", what, exc, exc_info=exc)
        os.kill(os.getpid(), signal.SIGTERM)

    probe = EndOffsetProbe(aiokafka_options(settings)) if settings.embedded_broker else None
    install_batch_consumer(app, [settings.events_topic], on_batch, fetch_max_wait_ms(settings),
                           settings.overlap_min_events, guard, before_commit, processor.clock,
                           FetchStallWatch(settings.fetch_stall_s), probe,
                           settings.fetch_max_wait_ms if settings.embedded_broker else None)
    app.topics.add(events)  # subscribe; records arrive through on_batch, not an agent stream

    register_views(app, metrics, health.failure)
    register_lookup(app, store, processor.states, model, settings, metrics)
    register_status(app, metrics, settings, table.name)

    @app.timer(settings.monitor_interval_s)
    async def monitor() -> None:
        ends = await sample(app, settings, metrics, processor, store)
        consumer = app.consumer
        if ends is None or not isinstance(consumer, BatchingConsumer):
            return
        try:
            reports = await consumer.check_fetch_stalls(ends)
        except Exception as exc:  # noqa: BLE001 - an error escaping a timer would stop the worker
            log.warning("fetch-stall check failed: %r", exc)
            return
        for report in reports:
            metrics.count_fetch_stall(report.verdict)
            if report.verdict == UNHEALTHY and health.stalled is None:
                health.stalled = report.detail

    if settings.state_ttl_days > 0:
        @app.timer(settings.state_ttl_sweep_s)
        async def expire_idle_state() -> None:
            await ttl_sweep(app, settings, store, processor.states, model)

    @app.on_partitions_revoked.connect
    async def on_revoked(app_: faust.App, revoked: set, **_: object) -> None:
        # After faust's commit (which flushed the cache): the next owner recovers these
        # partitions from the changelog, and this worker, if it gets one back, from RocksDB.
        processor.states.drop(tp.partition for tp in revoked if tp.topic == settings.events_topic)

    @app.on_partitions_assigned.connect
    async def on_assigned(app_: faust.App, assigned: set, **_: object) -> None:
        metrics.count_rebalance()
        processor.known_end.clear()  # a recreated or truncated topic ends earlier than seen before
    return ProfileStreamApp(settings, app, table, store, processor, metrics, model, health)

