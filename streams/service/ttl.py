"""Idle-state expiry (``PROFILESTREAM_STATE_TTL_DAYS``): erase users not seen for N days.

"Last seen" is the timestamp of the last event applied to the user's state --
event time, the clock the model itself uses -- against the worker's wall
clock.  A periodic sweep erases each idle user exactly as a forget request
would (state, changelog tombstone, profile tombstone), under the processor's
lock so it never interleaves with a batch.

The sweep only runs while the worker is ready: during table recovery a
partition's RocksDB may still miss the user's newest state, and an old copy
would look idle when the user is not.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import faust

from models import ProfileModel

from ..state import codec as state_codec
from ..pipeline.processor import BatchProcessor
from ..settings import Settings
from ..state.store import TableStateStore
from .web import is_ready

log = logging.getLogger(__name__)

DAY_MS = 86_400_000


def idle_users(entries: Iterable[tuple[bytes, bytes]], model: ProfileModel, cutoff_ms: int) -> list[str]:
    """User ids whose last applied event is older than ``cutoff_ms``.

    State of another model is left alone: its owner decides (see
    PROFILESTREAM_ON_MODEL_MISMATCH), and its codec may not be this model's.
    """
    idle = []
    for key, value in entries:
        record = state_codec.decode(value)
        if record.fingerprint != model.fingerprint:
            continue
        if model.decode_state(record.model_state).last_timestamp_ms < cutoff_ms:
            idle.append(key.decode("utf-8"))
    return idle


async def sweep(app: faust.App, settings: Settings, processor: BatchProcessor, store: TableStateStore) -> int:
    """One sweep over this worker's partitions; returns how many users it erased."""
    if not is_ready(app):
        return 0
    partitions = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == settings.events_topic)
    cutoff_ms = int(time.time() * 1000 - settings.state_ttl_days * DAY_MS)
    erased = await processor.expire_idle(
        partitions, lambda p: idle_users(store.scan(p), processor.model, cutoff_ms))
    if erased:
        log.info("state TTL: erased %d users idle for more than %g days", erased, settings.state_ttl_days)
    return erased
