"""The idle TTL erases through the log: durable, in order with events, only on owned partitions.

Real worker processes, the embedded broker, real RocksDB.  The sweep
produces expire requests (control records) and the owning worker applies them
(streams/ttl.py); these tests stop, kill and rebalance workers around that.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from models import ProfileModel
from models.events import Event
from streams.changelog import partition_for, read_latest
from streams.forget import CONTROL_HEADER, EXPIRE
from streams.ttl import DAY_MS

from .harness import (Deployment, assert_matches_replay, exact_end_offsets, expected_last, latest_profiles,
                      metric_sum, state_databases, stream_through, synthetic, wait_for, wait_for_counts)

log = logging.getLogger(__name__)

#: A TTL of one day, swept every half second.
TTL = {"PROFILESTREAM_STATE_TTL_DAYS": "1", "PROFILESTREAM_STATE_TTL_SWEEP_S": "0.5"}


def aged(user: str, n: int, days: float) -> list[Event]:
    """``n`` events of ``user`` stamped ``days`` ago."""
    start = int(time.time() * 1000 - days * DAY_MS)
    return [Event(user, "view", f"i{i}", f"c{i % 3}", start + i, None, f"{user}-{start}-{i}") for i in range(n)]


def expire_requests(dep: Deployment) -> list[tuple[str, int, int]]:
    """(user, partition, offset) of every expire request in the events topic."""
    return [(r.key.decode(), r.partition, r.offset) for r in dep.read(dep.settings.events_topic)
            if (CONTROL_HEADER, EXPIRE) in (r.headers or ())]


def local_users(data_dir: Path, partitions: int) -> set[str]:
    """User keys in the RocksDB of a stopped (or killed) worker."""
    return {key.decode() for _, db in state_databases(data_dir, partitions)
            for key in db.keys() if not key.startswith(b"__faust")}


def wait_for_first_tombstone(bootstrap: str, topic: str, start: dict[int, int], timeout: float = 120.0) -> None:
    """Return as soon as a tombstone appears in ``topic`` after the offsets ``start``."""
    async def go() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=5)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in start]
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, start[tp.partition])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=20)).values():
                    if any(r.value is None for r in records):
                        return
            raise TimeoutError(f"no tombstone in {topic} in {timeout}s")
        finally:
            await consumer.stop()
    asyncio.run(go())


def test_a_user_whose_newer_events_wait_in_the_backlog_is_not_erased(
        deployment: Deployment, model: ProfileModel) -> None:
    busy_old = aged("busy", 3, days=3)
    stream_through(deployment, busy_old + aged("idle", 2, days=3))
    # A backlog the TTL worker needs seconds for, with busy's new event at its end: the first
    # sweeps find busy idle in RocksDB while that event still waits to be read.
    backlog = synthetic(20_000, users=2_000, seed=51, start_ms=int(time.time() * 1000) - 3_600_000)
    busy_new = aged("busy", 1, days=0.01)
    deployment.produce(backlog + busy_new)
    worker = deployment.worker(**TTL).start()
    try:
        wait_for(lambda: latest_profiles(deployment.read(deployment.settings.profiles_topic)).get("idle") is None,
                 120, interval=2.0, what="idle erased")
        published = wait_for_counts(deployment, Counter({**Counter(e.user_id for e in backlog), "busy": 4}))
    finally:
        worker.stop()
    requests = expire_requests(deployment)
    busy_requests = [r for r in requests if r[0] == "busy"]
    log.warning("expire requests: %d, for busy: %d", len(requests), len(busy_requests))
    assert busy_requests, "no sweep ran while busy's new event waited: the test proved nothing"
    assert {u for u, _, _ in requests} == {"busy", "idle"}
    assert "idle" not in published
    assert_matches_replay({"busy": published["busy"]}, expected_last(model, busy_old + busy_new))


def test_kill_9_between_the_local_delete_and_the_tombstones_loses_no_erasure(
        deployment: Deployment, model: ProfileModel) -> None:
    # 8,000 idle users, all in partition 0: the expire requests the sweep makes for them wait in
    # the log behind a backlog and then come in a few big runs, so the worker is still publishing
    # tombstones for users it has already deleted locally when the kill comes.
    names = (f"idle{i}" for i in itertools.count())
    idle_users = set(itertools.islice((u for u in names if partition_for(u.encode(), deployment.partitions) == 0),
                                      8000))
    stream_through(deployment, [e for user in sorted(idle_users) for e in aged(user, 1, days=3)])
    profiles = deployment.settings.profiles_topic
    before = exact_end_offsets(deployment.bootstrap, profiles)
    active = synthetic(20_000, users=2_000, seed=52, start_ms=int(time.time() * 1000) - 3_600_000)
    deployment.produce(active)

    worker = deployment.worker(**TTL).start()
    wait_for_first_tombstone(deployment.bootstrap, profiles, before)
    worker.kill()  # mid-erasure: users deleted from RocksDB whose tombstones are not all out

    still_local = local_users(worker.data_dir, deployment.partitions) & idle_users
    tombstoned = idle_users - set(latest_profiles(deployment.read(profiles)))
    in_between = idle_users - still_local - tombstoned
    log.warning("kill -9 mid-erasure: %d of %d idle users still in RocksDB, %d tombstoned, %d deleted locally "
                "without a tombstone", len(still_local), len(idle_users), len(tombstoned), len(in_between))
    assert in_between, "the kill did not land between a local delete and its tombstone: the test proved nothing"

    worker = deployment.worker().start()  # same RocksDB; no TTL: only the uncommitted requests can finish it
    try:
        wait_for(lambda: not idle_users & set(latest_profiles(deployment.read(profiles))), 120, interval=2.0,
                 what="every idle user's profile tombstoned")
        published = wait_for_counts(deployment, Counter(e.user_id for e in active))
    finally:
        assert worker.stop() == 0
    assert not idle_users & set(asyncio.run(read_latest(deployment.settings)))  # changelog tombstones too
    assert not idle_users & local_users(worker.data_dir, deployment.partitions)
    assert_matches_replay({u: published[u] for u in {e.user_id for e in active}}, expected_last(model, active))


def test_a_sweep_never_reads_a_partition_the_worker_no_longer_owns(
        deployment: Deployment, model: ProfileModel) -> None:
    users = [f"u{i}" for i in range(40)]
    old = [e for u in users for e in aged(u, 2, days=3)]
    stream_through(deployment, old)  # worker 0's RocksDB keeps all four partitions as they were: idle
    second = deployment.worker(1).start()
    new = [e for u in users for e in aged(u, 1, days=0.01)]
    try:
        deployment.produce(new)
        wait_for_counts(deployment, Counter(e.user_id for e in old + new))
        first = deployment.worker(0, **TTL).start()  # takes some partitions back; the others stay stale there
        try:
            time.sleep(8)  # ~16 sweeps
            owned = metric_sum(first.http("/metrics")[1].decode(), "profilestream_assigned_partitions")
        finally:
            assert first.stop() == 0
        published = wait_for_counts(deployment, Counter(e.user_id for e in old + new))
    finally:
        second.stop()
    log.warning("TTL worker after the rebalance owns %d of %d partitions", owned, deployment.partitions)
    assert 0 < owned < deployment.partitions
    stale = local_users(first.data_dir, deployment.partitions)
    assert stale == set(users)  # the stale copies were there to be misread
    assert expire_requests(deployment) == []
    assert_matches_replay(published, expected_last(model, old + new))
