"""A write-behind cache of decoded user states in front of the state store.

Without it every batch decoded each of its users' states from RocksDB,
encoded them again, wrote them to RocksDB and sent one changelog record per
user: per-profile work paid once per batch, so a small batch (the stream at
moderate load) paid most of it for one event.  Like Kafka Streams' record
cache, this keeps users' decoded states in memory, bounded by
PROFILESTREAM_STATE_CACHE_USERS with least-recently-used eviction, and writes
a changed state to RocksDB and the changelog once per *commit*, not once per
batch.

The recovery guarantee is unchanged because a commit flushes first
(:meth:`StateCache.flush`, called from the consumer's commit,
streams/kafka/fetcher.py): every state the committed records produced is in
RocksDB and handed to the producer, and the commit then waits for the
changelog acknowledgements (streams/kafka/delivery.py).  A crash loses only
states of records that were not committed, which are read and applied again.

Consistency while a flush runs between batches: reads see the cache first,
then the store; an entry leaves the cache only once the store has it; every
write -- flush chunk or eviction -- takes one lock and writes an entry's
*current* value, so the changelog receives each user's versions in order and
a newer version always contains an older one's events.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

from models import UserState

__all__ = ["StateBackend", "StateCache", "StoredState"]

#: Entries encoded and written between two yields to the event loop while flushing: a batch
#: waiting behind a flush waits for one chunk, not the whole flush (docs/performance.md has
#: the p99 of 512 against 128).
FLUSH_CHUNK = 128


@dataclass(frozen=True, slots=True)
class StoredState:
    """A user's state as the pipeline works with it: the envelope of streams/state/codec.py
    (without the model's fingerprint: a cached state is always this model's) and the model's
    state, decoded.  Immutable once made: a change is a new object."""

    last_offset: int
    recent_event_ids: tuple[int, ...]
    state: UserState
    legacy_event_ids: tuple[int, ...] = ()


class StateBackend(Protocol):
    """Where the cache reads misses from and writes changes to: the local store (RocksDB), then
    the changelog.  The local write is synchronous so that an evicted entry is in the store
    before any reader can miss it."""

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]: ...
    def write_local(self, partition: int, items: Sequence[tuple[bytes, bytes | None]]) -> None: ...
    async def send_changelog(self, partition: int, items: Sequence[tuple[bytes, bytes | None]]) -> None: ...


class _Slot:
    """A cached user: its state (None: deleted, tombstone not yet written) and whether the store lags."""

    __slots__ = ("value", "dirty")

    def __init__(self, value: StoredState | None, dirty: bool) -> None:
        self.value = value
        self.dirty = dirty


class StateCache:
    """Decoded user states of the partitions this worker owns, written behind.

    ``decode`` turns a stored value into a :class:`StoredState` (None: start the
    user afresh) and may raise to stop the worker; ``encode`` is its inverse.
    ``max_users`` 0 writes every change through at once (the behaviour without
    a cache, kept for comparison in the bench).
    """

    def __init__(self, backend: StateBackend, decode: Callable[[bytes, bytes], StoredState | None],
                 encode: Callable[[StoredState], bytes], max_users: int) -> None:
        self.backend = backend
        self.decode = decode
        self.encode = encode
        self.max_users = max_users
        #: (partition, user key) -> slot, least recently used first.
        self._slots: OrderedDict[tuple[int, bytes], _Slot] = OrderedDict()
        #: Serialises writes to the backend, so each key's changelog records keep their order.
        self._write_lock = asyncio.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def dirty(self) -> int:
        """Users whose latest state the store does not have yet."""
        return sum(slot.dirty for slot in self._slots.values())

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[StoredState | None]:
        """Current states of ``keys`` (None: no state), misses read with one multi-get and cached."""
        slots = self._slots
        out: list[StoredState | None] = []
        missing: list[int] = []
        for i, key in enumerate(keys):
            slot = slots.get((partition, key))
            if slot is None:
                missing.append(i)
                out.append(None)
            else:
                slots.move_to_end((partition, key))
                out.append(slot.value)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            values = self.backend.get_many(partition, [keys[i] for i in missing])
            for i, value in zip(missing, values):
                if value is not None:
                    stored = self.decode(keys[i], value)
                    out[i] = stored
                    if stored is not None and self.max_users:
                        slots[(partition, keys[i])] = _Slot(stored, False)
        return out

    def peek(self, partition: int, key: bytes) -> tuple[bool, StoredState | None]:
        """(whether the cache holds ``key``, its state), without reading the store or touching the LRU order."""
        slot = self._slots.get((partition, key))
        return (False, None) if slot is None else (True, slot.value)

    def is_dirty(self, partition: int, key: bytes) -> bool:
        slot = self._slots.get((partition, key))
        return slot is not None and slot.dirty

    def put_many(self, partition: int, items: Iterable[tuple[bytes, StoredState | None]]) -> None:
        """Record new states (None: delete the user); the store gets them at the next flush or eviction."""
        slots = self._slots
        for key, value in items:
            slot = slots.get((partition, key))
            if slot is None:
                slots[(partition, key)] = _Slot(value, True)
            else:
                slot.value, slot.dirty = value, True
                slots.move_to_end((partition, key))

    async def settle(self) -> None:
        """After a batch: write through (no cache), or evict beyond the bound, writing back what is dirty."""
        if not self.max_users:
            await self._write(list(self._slots), evict=True)
            return
        excess = len(self._slots) - self.max_users
        if excess > 0:
            victims = [pk for pk, _ in zip(self._slots, range(excess))]
            await self._write(victims, evict=True)

    async def flush(self) -> float:
        """Write every dirty state to the store (and the changelog), in chunks between which batches run.

        Returns the seconds spent encoding and writing to RocksDB: the flush's wall time also
        holds the batches run between its chunks, and the changelog hand-off its waits for the
        client's partition buffers."""
        pending = [pk for pk, slot in self._slots.items() if slot.dirty]
        spent = 0.0
        for start in range(0, len(pending), FLUSH_CHUNK):
            spent += await self._write(pending[start:start + FLUSH_CHUNK], evict=False)
        return spent

    async def _write(self, keys: list[tuple[int, bytes]], evict: bool) -> float:
        """Write the current value of each of ``keys`` that is still dirty; with ``evict``, drop them after.
        Returns the seconds spent encoding and writing to RocksDB."""
        async with self._write_lock:
            started = time.perf_counter()
            by_partition: dict[int, list[tuple[bytes, bytes | None]]] = {}
            slots = self._slots
            for pk in keys:
                slot = slots.get(pk)
                if slot is None:
                    continue
                if slot.dirty:
                    by_partition.setdefault(pk[0], []).append(
                        (pk[1], None if slot.value is None else self.encode(slot.value)))
                    slot.dirty = False
                if evict:
                    del slots[pk]
            for partition, items in by_partition.items():
                self.backend.write_local(partition, items)
            spent = time.perf_counter() - started
            for partition, items in by_partition.items():
                await self.backend.send_changelog(partition, items)
            return spent

    def drop(self, partitions: Iterable[int] | None = None) -> int:
        """Forget the cached states of ``partitions`` (all if None), flushed or not; returns how many.

        For partitions this worker no longer owns: their next owner recovers
        them from the changelog, and this worker, if it gets them back, from
        its RocksDB, which recovery has brought up to date meanwhile.
        """
        wanted = None if partitions is None else set(partitions)
        doomed = [pk for pk in self._slots if wanted is None or pk[0] in wanted]
        for pk in doomed:
            del self._slots[pk]
        return len(doomed)
