"""The pipeline in-process: real model, real RocksDB, an in-memory publisher; no broker, no faust."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import pytest
from prometheus_client import CollectorRegistry

from models import ProfileModel
from models.events import Event
from streams.dev.demo import encode_event
from streams.dev.stage_budget import LocalStateStore
from streams.pipeline.control import forget_headers
from streams.pipeline.processor import BatchProcessor, BatchReport
from streams.pipeline.source_record import SourceRecord
from streams.pipeline.validate import Rejection
from streams.service.metrics import Metrics
from streams.state import codec as state_codec

from ..harness import assert_matches_replay, expected_last, synthetic

PARTITIONS = 3
TOPIC = "events"


class MemoryPublisher:
    """Collects what the worker would send to the profiles and dead-letter topics."""

    def __init__(self) -> None:
        self.profiles_sent: list[tuple[str, dict | None]] = []
        self.dead_letters: list[Rejection] = []

    async def profiles(self, items: Sequence[tuple[str, bytes]]) -> None:
        self.profiles_sent.extend((user_id, json.loads(value)) for user_id, value in items)

    async def tombstone(self, user_id: str) -> None:
        self.profiles_sent.append((user_id, None))

    async def dead_letter(self, rejection: Rejection) -> asyncio.Future:
        self.dead_letters.append(rejection)
        delivered = asyncio.get_running_loop().create_future()
        delivered.set_result(None)
        return delivered

    def latest(self) -> dict[str, dict | None]:
        return dict(self.profiles_sent)


@pytest.fixture(params=[(0, 1), (3, 1), (10_000, 2**31)], ids=["write-through", "cache-of-3", "cache-inline"])
def pipeline(model: ProfileModel, tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """The processor with no state cache, one so small that most batches evict, and a roomy one;
    the last steps the model inline instead of in the model thread, as the worker does for small batches."""
    store, publisher = LocalStateStore(tmp_path, PARTITIONS), MemoryPublisher()
    async def events_end(partition: int) -> int:
        """No log here: every offset the tests use lies below its partition's end."""
        return 2**63 - 1

    processor = BatchProcessor(model, store, publisher, Metrics(CollectorRegistry()), events_end, "events",
                               cache_users=request.param[0], thread_min_events=request.param[1])
    yield processor, store, publisher
    store.close()


class Partitions:
    """Source records as the fetch loop hands them over: keyed by user, offsets per partition."""

    def __init__(self) -> None:
        self.next_offset: dict[int, int] = defaultdict(int)

    def record(self, key: bytes, value: bytes | None, headers: tuple[tuple[str, bytes], ...] = ()) -> SourceRecord:
        partition = sum(key) % PARTITIONS
        offset = self.next_offset[partition]
        self.next_offset[partition] += 1
        return SourceRecord(TOPIC, partition, offset, 0, key, value, headers)

    def events(self, events: Sequence[Event]) -> list[SourceRecord]:
        return [self.record(*encode_event(e)) for e in events]


def run(processor: BatchProcessor, records: Sequence[SourceRecord]) -> BatchReport:
    return asyncio.run(processor.apply(processor.prepare(records)))


def flushed(processor: BatchProcessor, store: LocalStateStore) -> LocalStateStore:
    """``store`` after the cache's flush (what a commit does first)."""
    asyncio.run(processor.flush())
    return store


def test_batches_give_replays_profiles_and_count_each_event_once(pipeline, model: ProfileModel) -> None:  # type: ignore[no-untyped-def]
    processor, store, publisher = pipeline
    events = synthetic(600, users=40)
    records = Partitions().events(events)
    for start in range(0, len(records), 150):
        report = run(processor, records[start:start + 150])
        assert report.applied == len(records[start:start + 150])
    latest = publisher.latest()
    assert_matches_replay({u: p for u, p in latest.items() if p is not None}, expected_last(model, events))
    assert {u: p["event_count"] for u, p in latest.items() if p} == Counter(e.user_id for e in events)
    stored = [state_codec.decode(v) for db in flushed(processor, store).dbs.values() for _, v in db.items()]
    assert len(stored) == 40 and {s.fingerprint for s in stored} == {model.fingerprint}


def test_a_redelivered_batch_changes_no_state(pipeline) -> None:  # type: ignore[no-untyped-def]
    processor, store, _ = pipeline
    records = Partitions().events(synthetic(120, users=10))
    run(processor, records)
    before = {p: dict(db.items()) for p, db in flushed(processor, store).dbs.items()}
    report = run(processor, records)
    assert report.redelivered == len(records) and report.applied == 0
    assert {p: dict(db.items()) for p, db in flushed(processor, store).dbs.items()} == before


def test_bad_records_are_dead_lettered_with_their_reason_and_bytes(pipeline) -> None:  # type: ignore[no-untyped-def]
    processor, _, publisher = pipeline
    source = Partitions()
    good = source.events(synthetic(5, users=1))
    bad = [source.record(b"u1", b"{not json"), source.record(b"u2", None), source.record(b"u3", b'{"user_id": "u3"}')]
    report = run(processor, good + bad)
    assert report.applied == 5
    assert sorted((r.reason, r.record.value) for r in publisher.dead_letters if r.record.value) == [
        ("malformed_json", b"{not json"), ("missing_field", b'{"user_id": "u3"}')]
    assert report.rejected == Counter({"malformed_json": 1, "missing_value": 1, "missing_field": 1})


def test_a_forget_request_erases_the_users_state_and_tombstones_the_profile(pipeline) -> None:  # type: ignore[no-untyped-def]
    processor, store, publisher = pipeline
    source = Partitions()
    traffic = synthetic(200, users=8)
    events = [e for e in traffic if e.user_id == traffic[0].user_id]
    user = events[0].user_id.encode()
    run(processor, source.events(events))
    partition = sum(user) % PARTITIONS
    assert flushed(processor, store).get_many(partition, [user]) != [None]
    report = run(processor, [source.record(user, None, tuple(forget_headers()))])
    assert report.forgotten == 1
    assert flushed(processor, store).get_many(partition, [user]) == [None]
    assert publisher.profiles_sent[-1] == (user.decode(), None)
