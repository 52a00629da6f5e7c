"""Periodic health facts that no batch reports by itself: lag, state size, readiness,
table-recovery progress, the state cache and the per-stage clock.

Sampled on a timer, not in the processing path, so the figures keep moving
when processing stalls -- which is exactly when SREs need them.

Lag of a partition is ``end offset - next offset to process``; lag in seconds
is how long ago the last record this worker processed on that partition was
produced, when anything is waiting behind it (0 when caught up).  The
committed offset trails the processed one by about the commit interval
(PROFILESTREAM_COMMIT_INTERVAL_S).
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

import faust
from faust.types import TP

from .metrics import Metrics
from ..pipeline.processor import BatchProcessor
from ..settings import Settings
from ..state.store import TableStateStore
from .web import is_ready

log = logging.getLogger(__name__)


async def sample(app: faust.App, settings: Settings, metrics: Metrics, processor: BatchProcessor,
                 store: TableStateStore) -> Mapping[TP, int] | None:
    """Update the gauges; returns the assigned events partitions' end offsets it read (None: not
    read, while unassigned, rebalancing or the broker does not answer), which the fetch-stall
    watchdog then checks against, with no second round trip."""
    assigned = [tp for tp in app.consumer.assignment() if tp.topic == settings.events_topic]
    metrics.set_assignment((tp.topic, tp.partition) for tp in assigned)
    metrics.set_ready(is_ready(app))
    # faust's own count (changelog highwater - offset read, per partition); it stays
    # readable while recovery runs, which is when the monitor must report it.
    recovery = app.tables.recovery
    metrics.set_recovery_remaining(recovery.active_remaining_total(), recovery.standby_remaining_total())
    metrics.set_users_in_state(store.count())
    metrics.sync_stages(processor.clock.seconds)
    cache = processor.states
    metrics.set_state_cache(users=len(cache), dirty=cache.dirty, hits=cache.hits, misses=cache.misses)
    if not assigned or app.rebalancing:
        return None
    try:
        ends = await app.consumer.highwaters(*assigned)
    except Exception as exc:  # noqa: BLE001 - a stalled broker must not crash the worker through its monitor
        log.warning("lag not sampled: end offsets unavailable (%r)", exc)
        return None
    now_ms = time.time() * 1000
    for tp in assigned:
        offset, ts_ms = processor.progress.get(tp.partition, (-1, now_ms))
        lag = max(0, int(ends.get(tp, 0)) - (offset + 1))
        metrics.set_lag(tp.topic, tp.partition, lag, (now_ms - ts_ms) / 1000.0 if lag else 0.0)
    return ends
