"""The idle TTL erases through the log: durable, in order with events, only on owned partitions.

Real worker processes, the embedded broker, real RocksDB.  The sweep
produces expire requests (control records) and the owning worker applies them
(streams/service/ttl.py); these tests stop, kill and rebalance workers around that.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from pathlib import Path

import pytest
import rocksdict
from aiokafka import AIOKafkaProducer

from models import ProfileModel
from models.events import Event
from streams.pipeline.partitioning import partition_for
from streams.state.changelog import read_latest
from streams.ops.forget import send_control
from streams.pipeline.control import CONTROL_HEADER, EXPIRE, expire_headers
from streams.service.ttl import DAY_MS

from ..harness import (Deployment, assert_matches_replay, expected_last, latest_profiles,
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


def wait_for_local_delete(data_dir: Path, partition: int, key: bytes, timeout: float = 120.0) -> None:
    """Return as soon as ``key`` is gone from a running worker's RocksDB partition (read-only opens)."""
    path = str(data_dir / "v1" / "tables" / f"user-state-{partition}.db")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        db = rocksdict.Rdict(path, options=rocksdict.Options(raw_mode=True),
                             access_type=rocksdict.AccessType.read_only())
        try:
            if db.get(key) is None:
                return
        finally:
            db.close()
        time.sleep(0.005)
    raise TimeoutError(f"{key!r} still in {path} after {timeout}s")


def test_a_user_whose_newer_events_wait_in_the_backlog_is_not_erased(
        deployment: Deployment, model: ProfileModel) -> None:
    busy_old = aged("busy", 3, days=3)
    stream_through(deployment, busy_old + aged("idle", 2, days=3))
    # A backlog the TTL worker needs seconds for, with busy's new event at its end: the first
    # sweeps find busy idle in RocksDB while that event still waits to be read.
    backlog = synthetic(20_000, users=2_000, seed=51, start_ms=int(time.time() * 1000) - 3_600_000)
    busy_new = aged("busy", 1, days=0.01)
    deployment.produce(backlog + busy_new)
    # Batches of 20 keep the worker on the backlog for seconds: a backlog batch of thousands is
    # applied within a sweep interval, and busy's event with it.
    worker = deployment.worker(**TTL, PROFILESTREAM_BATCH_MAX="20").start()
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


def request_expiry(dep: Deployment, partition: int, user_ids: list[str], idle_before_ms: int) -> None:
    """Produce expire requests as the sweep does (its sender, to the state's partition)."""
    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=dep.bootstrap, acks="all")
        await producer.start()
        try:
            await send_control(producer, dep.settings.events_topic, user_ids, expire_headers(idle_before_ms),
                               partition)
        finally:
            await producer.stop()
    asyncio.run(go())


@pytest.mark.parametrize("cache", ["write-through", "write-behind"])
def test_kill_9_mid_erasure_loses_no_erasure(deployment: Deployment, model: ProfileModel, cache: str) -> None:
    """8,000 idle users of partition 0 and their expire requests, made while no worker runs: the next
    worker reads them as one long run and erases those users; the kill lands half-way through.
    (A live sweep's requests trickle in as the worker reads them, in runs too short to aim a kill
    at; the tests above cover what the sweep finds.)

    write-through (no state cache): the users are deleted locally in one write, and the kill comes
    as soon as that write shows, while the tombstones are still being handed over.
    write-behind (the default cache, commits every 60 s): the tombstones go out first and the local
    delete waits for the next commit's flush; the kill comes once tombstones show, the users still
    in RocksDB."""
    names = (f"idle{i}" for i in itertools.count())
    idle_users = sorted(itertools.islice(
        (u for u in names if partition_for(u.encode(), deployment.partitions) == 0), 8000))
    active = synthetic(300, users=30, seed=52, start_ms=int(time.time() * 1000) - 60_000)
    stream_through(deployment, [e for user in idle_users for e in aged(user, 1, days=3)] + active)
    request_expiry(deployment, 0, idle_users, int(time.time() * 1000) - DAY_MS)
    profiles = deployment.settings.profiles_topic
    idle = set(idle_users)

    if cache == "write-through":
        worker = deployment.worker(PROFILESTREAM_STATE_CACHE_USERS="0").start(wait_ready=False)
        wait_for_local_delete(worker.data_dir, 0, idle_users[0].encode())
    else:
        worker = deployment.worker(PROFILESTREAM_COMMIT_INTERVAL_S="60").start(wait_ready=False)
        wait_for(lambda: idle - set(latest_profiles(deployment.read(profiles))), 120, interval=0.1,
                 what="the first tombstones")
    worker.kill()  # mid-erasure: local deletes and tombstones not all done

    still_local = local_users(worker.data_dir, deployment.partitions) & idle
    tombstoned = idle - set(latest_profiles(deployment.read(profiles)))
    in_between = idle - still_local - tombstoned if cache == "write-through" else still_local & tombstoned
    log.warning("kill -9 mid-erasure (%s): %d of %d idle users still in RocksDB, %d tombstoned, %d half erased",
                cache, len(still_local), len(idle), len(tombstoned), len(in_between))
    assert in_between, "the kill did not land half-way through an erasure: the test proved nothing"

    worker = deployment.worker().start()  # same RocksDB: only the uncommitted requests can finish the erasure
    try:
        wait_for(lambda: not idle & set(latest_profiles(deployment.read(profiles))), 120, interval=2.0,
                 what="every idle user's profile tombstoned")
        metrics = worker.http("/metrics")[1].decode()
    finally:
        assert worker.stop() == 0
    assert not idle & set(asyncio.run(read_latest(deployment.settings)))  # changelog tombstones too
    assert not idle & local_users(worker.data_dir, deployment.partitions)
    assert metric_sum(metrics, "profilestream_users_forgotten_total", cause="ttl") >= len(in_between)
    published = latest_profiles(deployment.read(profiles))
    assert_matches_replay(published, expected_last(model, active))


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
