"""Idle-state expiry (``PROFILESTREAM_STATE_TTL_DAYS``): erase users not seen for N days.

"Last seen" is the timestamp of the last event applied to the user's state --
event time, the clock the model itself uses -- against the worker's wall
clock.  A periodic sweep only *finds* idle users: for each it produces an
expire request (a control record, streams/pipeline/control.py) carrying the cut-off to
the events partition the state belongs to.  The worker that owns that
partition applies the request in order with the user's events, like a forget
request, and erases the user only if the state's last event is still older
than the cut-off.  So the erasure is

* durable: the request is in the log before anything is deleted, and its
  offset is committed only after the state delete, the changelog tombstone
  and the profile tombstone were delivered -- a crash in between re-reads it;
* ordered: events that were waiting in the backlog before the request are
  applied first, and a user they made active is kept;
* ownership-safe: a sweep reads only partitions this worker owns, and even a
  stale read (a rebalance under way) can only produce a request that the
  owner judges against its own, current state.

The sweep reads RocksDB in chunks, skipping users whose newer state the
write-behind cache has not written yet (streams/state/cache.py), and yields to the event loop between them,
so a big table does not hold up batches.  It runs only while the worker is
ready: during table recovery a partition's RocksDB may still miss the
user's newest state (harmless, see above, but pointless requests).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Iterable

import faust
from aiokafka import AIOKafkaProducer

from models import ProfileModel

from ..kafka.client_config import aiokafka_options
from ..ops.forget import send_control
from ..pipeline.control import expire_headers, is_idle
from ..settings import Settings
from ..state import codec as state_codec
from ..state.cache import StateCache
from ..state.store import TableStateStore
from .web import is_ready

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
#: States decoded between two yields to the event loop.
SCAN_CHUNK = 100


def idle_users(entries: Iterable[tuple[bytes, bytes]], model: ProfileModel, cutoff_ms: int) -> list[str]:
    """User ids of the (key, state record) entries that are idle at ``cutoff_ms``.

    State of another model never is: its owner decides what happens to it
    (see PROFILESTREAM_ON_MODEL_MISMATCH), and its codec may not be this model's.
    """
    idle = []
    for key, value in entries:
        record = state_codec.decode(value)
        if record.fingerprint == model.fingerprint and is_idle(model.decode_state(record.model_state), cutoff_ms):
            idle.append(key.decode("utf-8"))
    return idle


def owned_partitions(app: faust.App, settings: Settings) -> set[int]:
    """Events partitions assigned to this worker now (standby state partitions are not owned)."""
    return {tp.partition for tp in app.consumer.assignment() if tp.topic == settings.events_topic}


async def sweep(app: faust.App, settings: Settings, store: TableStateStore, cache: StateCache,
                model: ProfileModel) -> int:
    """One sweep over this worker's partitions; returns how many expire requests it produced."""
    if not is_ready(app):
        return 0
    cutoff_ms = int(time.time() * 1000 - settings.state_ttl_days * DAY_MS)
    requested = 0
    producer: AIOKafkaProducer | None = None
    try:
        for partition in sorted(owned_partitions(app, settings)):
            after: bytes | None = None
            # Ownership is checked before every chunk: a rebalance may take the partition away
            # while this sweep waits between chunks.
            while is_ready(app) and partition in owned_partitions(app, settings):
                chunk = store.scan_chunk(partition, after, SCAN_CHUNK)
                if not chunk:
                    break
                after = chunk[-1][0]
                # A user the cache holds a newer state of was active within the commit interval.
                idle = idle_users([(key, value) for key, value in chunk if not cache.is_dirty(partition, key)],
                                  model, cutoff_ms)
                if idle:
                    if producer is None:
                        producer = AIOKafkaProducer(**aiokafka_options(settings), acks="all")
                        await producer.start()
                    # To the state's partition, whatever a producer's partitioner would pick:
                    # that is where the owner of this state reads.
                    await send_control(producer, settings.events_topic, idle, expire_headers(cutoff_ms), partition)
                    requested += len(idle)
                await asyncio.sleep(0)
    finally:
        if producer is not None:
            await producer.stop()
    if requested:
        log.info("state TTL: requested expiry of %d users idle for more than %g days", requested,
                 settings.state_ttl_days)
    return requested
