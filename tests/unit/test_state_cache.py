"""The write-behind state cache on a real RocksDB: what reads see, what the store and the changelog get, and when."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Sequence

import pytest
import rocksdict

from models import ProfileModel
from streams.state import cache as cache_module
from streams.state.cache import StateCache, StoredState


class RecordingBackend:
    """One real RocksDB, and the changelog records in the order they were sent.

    Sending yields to the event loop, as the Kafka client's buffer may, so
    batches interleave with a flush the way they do in a worker.
    """

    def __init__(self, root: Path) -> None:
        self.db = rocksdict.Rdict(str(root / "db"), options=rocksdict.Options(raw_mode=True))
        self.changelog: list[tuple[int, bytes, bytes | None]] = []
        self.local_writes = 0

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        return list(self.db[[bytes([partition]) + key for key in keys]]) if keys else []

    def write_local(self, partition: int, items: Sequence[tuple[bytes, bytes | None]]) -> None:
        self.local_writes += 1
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key, value in items:
            if value is None:
                batch.delete(bytes([partition]) + key)
            else:
                batch.put(bytes([partition]) + key, value)
        self.db.write(batch)

    async def send_changelog(self, partition: int, items: Sequence[tuple[bytes, bytes | None]]) -> None:
        await asyncio.sleep(0)
        self.changelog.extend((partition, key, value) for key, value in items)


@pytest.fixture
def backend(tmp_path: Path):  # type: ignore[no-untyped-def]
    backend = RecordingBackend(tmp_path)
    yield backend
    backend.db.close()


def entry(model: ProfileModel, offset: int) -> StoredState:
    return StoredState(offset, (), model.new_state())


def cache_of(model: ProfileModel, backend: RecordingBackend, max_users: int) -> StateCache:
    """Entries encode as their offset, so the tests can read what was written."""
    def decode(key: bytes, value: bytes) -> StoredState | None:
        return entry(model, int(value))

    return StateCache(backend, decode, lambda e: str(e.last_offset).encode(), max_users)


def test_changes_reach_the_store_only_when_flushed(model: ProfileModel, backend: RecordingBackend) -> None:
    cache = cache_of(model, backend, 100)
    cache.put_many(0, [(b"a", entry(model, 1)), (b"b", entry(model, 2))])
    cache.put_many(0, [(b"a", entry(model, 3))])
    asyncio.run(cache.settle())
    assert backend.get_many(0, [b"a", b"b"]) == [None, None] and cache.dirty == 2
    assert [e.last_offset for e in cache.get_many(0, [b"a", b"b"]) if e] == [3, 2]
    asyncio.run(cache.flush())
    assert backend.get_many(0, [b"a", b"b"]) == [b"3", b"2"] and cache.dirty == 0
    # Each user once, its newest state: two batches' changes cost one write.
    assert backend.changelog == [(0, b"a", b"3"), (0, b"b", b"2")]
    asyncio.run(cache.flush())
    assert len(backend.changelog) == 2  # nothing dirty, nothing written


def test_misses_are_read_once_then_served_from_memory(model: ProfileModel, backend: RecordingBackend) -> None:
    backend.write_local(1, [(b"u", b"7")])
    cache = cache_of(model, backend, 100)
    assert [e.last_offset for e in cache.get_many(1, [b"u"]) if e] == [7]
    backend.write_local(1, [(b"u", b"8")])  # behind the cache's back: the cached copy is what is served
    assert [e.last_offset for e in cache.get_many(1, [b"u"]) if e] == [7]
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.get_many(1, [b"nobody"]) == [None]


def test_eviction_writes_back_the_least_recently_used(model: ProfileModel, backend: RecordingBackend) -> None:
    cache = cache_of(model, backend, 2)
    cache.put_many(0, [(b"a", entry(model, 1)), (b"b", entry(model, 2))])
    cache.get_many(0, [b"a"])  # a is now more recently used than b
    cache.put_many(0, [(b"c", entry(model, 3))])
    asyncio.run(cache.settle())
    assert len(cache) == 2 and cache.peek(0, b"b") == (False, None)
    assert backend.get_many(0, [b"b"]) == [b"2"] and backend.changelog == [(0, b"b", b"2")]
    assert [e.last_offset for e in cache.get_many(0, [b"b"]) if e] == [2]  # read back from the store


def test_a_deleted_user_reads_as_absent_and_is_tombstoned(model: ProfileModel, backend: RecordingBackend) -> None:
    backend.write_local(0, [(b"a", b"5")])
    cache = cache_of(model, backend, 100)
    cache.put_many(0, [(b"a", None)])
    assert cache.get_many(0, [b"a"]) == [None] and cache.peek(0, b"a") == (True, None)
    asyncio.run(cache.flush())
    assert backend.get_many(0, [b"a"]) == [None] and backend.changelog == [(0, b"a", None)]


def test_without_a_cache_every_batch_writes_through(model: ProfileModel, backend: RecordingBackend) -> None:
    cache = cache_of(model, backend, 0)
    cache.put_many(0, [(b"a", entry(model, 1))])
    asyncio.run(cache.settle())
    assert backend.get_many(0, [b"a"]) == [b"1"] and len(cache) == 0


def test_batches_between_flush_chunks_keep_each_users_versions_in_order(
        model: ProfileModel, backend: RecordingBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush yields between chunks; batches that change and evict users meanwhile must leave the
    store with every user's newest state and the changelog with each user's versions ascending."""
    monkeypatch.setattr(cache_module, "FLUSH_CHUNK", 3)
    cache = cache_of(model, backend, 12)
    users = [f"u{i}".encode() for i in range(20)]
    latest: dict[bytes, int] = {}

    async def batches() -> None:
        for offset in range(1, 200):
            key = users[(offset * 7) % len(users)]
            cache.put_many(0, [(key, entry(model, offset))])
            latest[key] = offset
            await cache.settle()
            if offset % 25 == 0:
                flush = asyncio.ensure_future(cache.flush())  # as the commit timer does, concurrently
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                await flush

    async def main() -> None:
        await batches()
        await cache.flush()

    asyncio.run(main())
    assert {k: int(v) for k, v in zip(users, backend.get_many(0, users)) if v} == latest
    for key in users:
        versions = [int(value) for _, k, value in backend.changelog if k == key and value is not None]
        assert versions == sorted(versions) and versions[-1] == latest[key]


def test_dropped_partitions_are_forgotten_flushed_or_not(model: ProfileModel, backend: RecordingBackend) -> None:
    cache = cache_of(model, backend, 100)
    cache.put_many(0, [(b"a", entry(model, 1))])
    cache.put_many(1, [(b"b", entry(model, 2))])
    assert cache.drop([1]) == 1
    assert cache.peek(1, b"b") == (False, None) and cache.peek(0, b"a")[0]
    asyncio.run(cache.flush())
    assert backend.changelog == [(0, b"a", b"1")]
