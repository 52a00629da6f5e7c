"""The faust application: topics, the RocksDB state table, and the batch hook that
feeds fetched batches of raw events to :class:`~streams.processor.BatchProcessor`.

Faust owns what it is good at -- consumer-group membership, rebalancing,
table partition assignment, changelog recovery, offset commits and the worker
lifecycle.  Everything per event happens in the processor, once per batch;
``batch_consumer.py`` explains why records skip faust's per-event stream.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Awaitable, Sequence

import faust

from models import ProfileModel

from .batch_consumer import install as install_batch_consumer
from .delivery import DeliveryGuard
from .end_offsets import EndOffsetProbe
from .kafka_config import aiokafka_options, faust_credentials
from .lookup import register_lookup
from .metrics import Metrics
from .monitor import sample
from .processor import BatchProcessor, PreparedBatch
from .publish import Publisher
from .records import SourceRecord
from .settings import Settings
from .state_store import TableStateStore
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
    """Set when batch processing hits an error it cannot handle (bad input never is one)."""

    error: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self.error is None


def faust_config(settings: Settings) -> dict[str, object]:
    """faust.App keyword settings derived from ours."""
    conf: dict[str, object] = dict(
        broker=[f"kafka://{s}" for s in settings.bootstrap_servers.split(",")],
        store="rocksdb://",
        datadir=str(settings.data_dir),
        topic_partitions=settings.partitions,
        table_standby_replicas=settings.standby_replicas,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=settings.batch_max,
        broker_commit_interval=1.0,
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
#: there (see batch_consumer.FetchWaitConsumerThread), so a short wait is its latency.
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
    publisher = Publisher(app.producer, settings.profiles_topic, settings.dlq_topic, guard)
    processor = BatchProcessor(model, store, publisher, metrics,
                               reset_mismatched=settings.on_model_mismatch == "reset")
    health = WorkerHealth()

    def on_batch(records: Sequence[SourceRecord]) -> Awaitable[None]:
        """One fetched batch of raw events: prepared now, applied by the awaitable returned.

        An unexpected error stops the whole worker (SIGTERM to itself: a graceful
        stop that commits only what was fully processed) rather than leaving a
        live process that no longer makes progress.  Bad input never gets
        here as an error: it is dead-lettered by the processor.
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

    def fail(exc: BaseException, what: str = "batch processing failed") -> None:
        health.error = exc
        log.critical("%s, stopping the worker: %r", what, exc, exc_info=exc)
        os.kill(os.getpid(), signal.SIGTERM)

    probe = EndOffsetProbe(aiokafka_options(settings)) if settings.embedded_broker else None
    install_batch_consumer(app, [settings.events_topic], on_batch, fetch_max_wait_ms(settings),
                           settings.overlap_min_events, guard, probe)
    app.topics.add(events)  # subscribe; records arrive through on_batch, not an agent stream

    register_views(app, metrics, lambda: health.alive)
    register_lookup(app, store, model, settings)
    register_status(app, metrics, settings, table.name)

    @app.timer(settings.monitor_interval_s)
    async def monitor() -> None:
        await sample(app, settings, metrics, processor, store)

    if settings.state_ttl_days > 0:
        @app.timer(settings.state_ttl_sweep_s)
        async def expire_idle_state() -> None:
            await ttl_sweep(app, settings, processor, store)

    @app.on_partitions_assigned.connect
    async def on_assigned(app_: faust.App, assigned: set, **_: object) -> None:
        metrics.count_rebalance()
    return ProfileStreamApp(settings, app, table, store, processor, metrics, model, health)

