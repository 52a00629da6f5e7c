"""Faults under live traffic: real worker processes, the real embedded broker, real RocksDB.

Each test ends the same way: every user's last published profile must count
exactly that user's events (none lost, none applied twice) and equal offline
replay of them.  The counts are logged so a CI log shows what each run went
through, not just that it passed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from models import ProfileModel
from models.events import Event
from streams.dev.embedded_broker import EmbeddedBroker

from ..harness import (BackgroundProducer, Deployment, WorkerProcess, assert_matches_replay, count_errors,
                      expected_last, metric_sum, paced, settle, synthetic, wait_for)

log = logging.getLogger(__name__)
pytestmark = pytest.mark.slow


#: Worker log lines that tell what a stalled or wrong worker went through.
REBALANCE_STEPS = r"WARNING|ERROR|CRITICAL|Recovery\]|Revoking|newly assigned|generation|rewinding"


def finish(dep: Deployment, model: ProfileModel, events: list[Event], what: str,
           workers: Sequence[WorkerProcess]) -> None:
    """Wait for the outputs, log lost / applied-twice counts, and check them against replay."""
    counts = Counter(e.user_id for e in events)
    published = settle(dep, counts)
    lost, twice = count_errors(published, counts)
    log.warning("%s: %d events, %d users, lost %d, applied twice %d", what, len(events), len(counts), lost, twice)
    if lost or twice:  # tell a stalled worker from a wrong one
        for worker in workers:
            lag = [line for line in worker.http("/metrics")[1].decode().splitlines()
                   if line.startswith(("profilestream_consumer_lag_offsets", "profilestream_seconds_since"))]
            log.error("worker %s: %s\nits last warnings and rebalance steps:\n%s\nits tasks:\n%s",
                      worker.data_dir.name, lag, worker.log_tail(60, matching=REBALANCE_STEPS),
                      worker.task_stacks())
    assert (lost, twice) == (0, 0)
    assert_matches_replay(published, expected_last(model, events))


def redelivered(worker: WorkerProcess) -> float:
    return metric_sum(worker.http("/metrics")[1].decode(), "profilestream_events_skipped_total", reason="redelivered")


#: At these rates batches are far below PROFILESTREAM_OVERLAP_MIN_EVENTS; with 1, every batch is
#: fetched and validated while the one before is in its model step, so the faults below hit a
#: batch in flight (the other tests cover batches applied one after the other).
OVERLAP_EVERY_BATCH = {"PROFILESTREAM_OVERLAP_MIN_EVENTS": "1"}


def test_kill_9_mid_stream_loses_nothing_and_applies_nothing_twice(
        deployment: Deployment, model: ProfileModel) -> None:
    rng = random.Random(7)
    events = synthetic(3000, users=150, seed=21)
    worker = deployment.worker(**OVERLAP_EVERY_BATCH).start()
    producer = BackgroundProducer(deployment, events, paced(len(events), 120.0)).start()
    skipped = 0.0
    try:
        for _ in range(3):
            time.sleep(rng.uniform(0.5, 4.0))
            skipped += redelivered(worker)
            worker.kill()  # no shutdown code runs: no flush, no commit
            worker = deployment.worker(**OVERLAP_EVERY_BATCH).start()  # same RocksDB directory
        producer.join()
        finish(deployment, model, events, "kill -9 x3", [worker])
        skipped += redelivered(worker)
    finally:
        worker.stop()
    log.warning("kill -9 x3: %d redelivered events skipped", skipped)


def test_kill_9_while_the_state_cache_holds_unflushed_states(deployment: Deployment, model: ProfileModel) -> None:
    """The write-behind cache (streams/state/cache.py) has applied events whose states are in
    neither RocksDB nor the changelog, and published their profiles, when the worker dies.
    Their offsets were not committed either (a commit flushes first), so the next worker reads
    those events again and rebuilds exactly those states."""
    events = synthetic(2500, users=120, seed=26)
    slow_commits = {"PROFILESTREAM_COMMIT_INTERVAL_S": "60", "PROFILESTREAM_MONITOR_INTERVAL_S": "0.5"}
    worker = deployment.worker(**slow_commits).start()
    producer = BackgroundProducer(deployment, events, paced(len(events), 150.0)).start()
    try:
        def unflushed() -> float:
            body = worker.http("/metrics")[1].decode()
            return metric_sum(body, "profilestream_state_cache_dirty_users") if metric_sum(
                body, "profilestream_profiles_published_total") > 0 else 0.0
        dirty = wait_for(unflushed, 60, what="published profiles whose states are not flushed yet")
        worker.kill()  # no shutdown code runs: the cached states are lost with the process
        producer.join()
        worker = deployment.worker().start()  # same RocksDB directory, default commit interval
        finish(deployment, model, events, f"kill -9 with {dirty:.0f} unflushed users", [worker])
        # Nothing was committed in the 60 s interval, and nothing reached RocksDB: the next
        # worker applies every event once, from the start.
        consumed = metric_sum(worker.http("/metrics")[1].decode(), "profilestream_events_consumed_total")
        assert consumed == len(events)
    finally:
        worker.stop()


def test_rebalance_under_live_traffic(deployment: Deployment, model: ProfileModel) -> None:
    events = synthetic(3000, users=200, seed=22)
    first = deployment.worker(0, **OVERLAP_EVERY_BATCH).start()
    second = deployment.worker(1, **OVERLAP_EVERY_BATCH).start()
    producer = BackgroundProducer(deployment, events, paced(len(events), 150.0)).start()
    try:
        time.sleep(6)
        assert second.stop() == 0  # its partitions (and their state) move to the first worker...
        time.sleep(6)
        second.start(wait_ready=False)  # ...and some move back
        producer.join()
        finish(deployment, model, events, "rebalance stop+start", [first, second])
        assert metric_sum(first.http("/metrics")[1].decode(), "profilestream_rebalances_total") >= 2
    finally:
        first.stop()
        second.stop()


def test_broker_stall_recovers_by_itself(broker: EmbeddedBroker, deployment: Deployment,
                                         model: ProfileModel) -> None:
    events = synthetic(2000, users=150, seed=23)
    worker = deployment.worker().start()
    producer = BackgroundProducer(deployment, events, paced(len(events), 100.0)).start()
    try:
        time.sleep(4)
        broker.pause()
        try:
            time.sleep(10)
        finally:
            broker.resume()
        producer.join()
        finish(deployment, model, events, "broker SIGSTOP 10 s", [worker])
        assert worker.proc is not None and worker.proc.poll() is None
        assert worker.http("/healthz")[0] == 200
    finally:
        worker.stop()


def test_outputs_lost_in_a_broker_stall_stop_the_worker_before_it_commits(
        broker: EmbeddedBroker, deployment: Deployment, model: ProfileModel) -> None:
    """The broker stalls longer than the producer retries while the worker works through a backlog:
    the client gives outputs up.  Committing past them could lose those users' newest state and
    profile, so the worker must stop itself without committing; the next one reads the events
    again and writes them again (streams/kafka/delivery.py).

    What can be run here is a stall: Tansu enforces neither message size nor ACLs, so a broker
    that refuses records outright cannot be.  After a stall Tansu still appends the request it
    had read, so the records the client gave up usually arrive after all; what this proves is
    the stop, that the next worker re-reads, and that nothing ends up lost or applied twice.
    """
    events = synthetic(36_000, users=36_000, seed=25)
    worker = deployment.worker(PROFILESTREAM_PRODUCER_REQUEST_TIMEOUT_S="2").start()
    deployment.produce(events)  # seconds of work for the worker...
    broker.pause()  # ...which it is in the middle of when the broker stops answering
    try:
        time.sleep(6)
    finally:
        broker.resume()
    assert worker.proc is not None
    wait_for(lambda: worker.proc.poll() is not None, 90, what="the worker to stop itself")
    output = worker.log_path.read_text(errors="replace")
    assert worker.proc.returncode != 0
    assert "not delivered" in output and "an output was not delivered, stopping the worker" in output
    # A commit under way when the worker stops is cancelled, so "refused" may be 0.
    log.warning("broker stall past the producer timeout: %d outputs given up, %d commits refused",
                output.count("not delivered:"), output.count("not committing offsets"))
    worker = deployment.worker().start()  # same RocksDB directory
    try:
        finish(deployment, model, events, "outputs lost in a broker stall, restart", [worker])
        assert redelivered(worker) > 0
    finally:
        worker.stop()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_burst_of_ten_times_the_rate_keeps_memory_bounded_and_drains(
        deployment: Deployment, model: ProfileModel) -> None:
    normal, burst, n_burst = 100.0, 1000.0, 6000
    events = synthetic(300 + n_burst + 200, users=400, seed=24)
    send_at = paced(300, normal) + paced(n_burst, burst, start_s=3.0) + paced(200, normal, start_s=3.0 + n_burst / burst)
    worker = deployment.worker(PROFILESTREAM_MONITOR_INTERVAL_S="1").start()
    assert worker.proc is not None
    try:
        producer = BackgroundProducer(deployment, events, send_at).start()
        wait_for(lambda: producer.sent >= 250, 30, interval=0.05, what="normal traffic")
        baseline = peak = rss_mib(worker.proc.pid)
        wait_for(lambda: producer.sent >= 300, 30, interval=0.01, what="the burst")
        burst_started = time.monotonic()
        while producer.sent < 300 + n_burst:
            peak = max(peak, rss_mib(worker.proc.pid))
            time.sleep(0.05)
        achieved = n_burst / (time.monotonic() - burst_started)
        producer.join()
        finish(deployment, model, events, "burst 10x", [worker])
        peak = max(peak, rss_mib(worker.proc.pid))

        def drained() -> bool:
            text = worker.http("/metrics")[1].decode()
            return "profilestream_consumer_lag_offsets{" in text and \
                metric_sum(text, "profilestream_consumer_lag_offsets") == 0
        wait_for(drained, 30, what="consumer lag back to 0")
    finally:
        worker.stop()
    log.warning("burst 10x: %.0f -> %.0f events/s produced (%.0f achieved); RSS %.0f MiB before, peak %.0f MiB",
                normal, burst, achieved, baseline, peak)
    assert achieved > 5 * normal, "the producer could not make a burst; the test proves nothing"
    # Memory follows the batch size (PROFILESTREAM_BATCH_MAX), not the backlog.
    assert peak - baseline < 150, f"RSS grew by {peak - baseline:.0f} MiB"


#: A short stall period, and lag sampled often enough to notice it (tests/stall_worker.py stalls the client).
STALL_WATCH = {"PROFILESTREAM_FETCH_STALL_S": "2", "PROFILESTREAM_MONITOR_INTERVAL_S": "0.5"}


def test_a_partition_the_client_stops_fetching_is_reseeked_and_read(
        deployment: Deployment, model: ProfileModel) -> None:
    """The client pauses every events partition behind faust's back (nothing logged, faust still
    counts them active): the fetch-stall watchdog notices each partition with records waiting, logs
    what the client had, resumes and re-seeks it, and every event is processed."""
    events = synthetic(800, users=80, seed=27)
    worker = deployment.worker(module="tests.stall_worker", **STALL_WATCH).start()
    try:
        deployment.produce(events)
        finish(deployment, model, events, "client stopped fetching, re-seeked", [worker])
        body = worker.http("/metrics")[1].decode()
        with_events = {e.partition for e in deployment.read(deployment.settings.events_topic)}
        assert metric_sum(body, "profilestream_fetch_stalls_total", action="reseek") == len(with_events)
        assert metric_sum(body, "profilestream_fetch_stalls_total", action="unhealthy") == 0
        warnings = worker.log_tail(20, matching=r"WARNING.*fetch stall on")
        assert warnings.count("'paused': True") == len(with_events), warnings
        assert worker.http("/healthz") == (200, b'{"alive": true}')
    finally:
        worker.stop()


def test_a_stall_a_reseek_cannot_end_fails_liveness_and_a_restart_reads_on(
        deployment: Deployment, model: ProfileModel) -> None:
    """The client also ignores being resumed: after the re-seek and another period the worker is
    marked unhealthy (/healthz 503 with the reason, ERROR logged), and a restarted worker, as an
    orchestrator would start, resumes from the committed offsets and processes every event."""
    events = synthetic(400, users=50, seed=28)
    worker = deployment.worker(module="tests.stall_worker", PROFILESTREAM_TEST_STALL="stuck", **STALL_WATCH).start()
    try:
        deployment.produce(events)

        def unhealthy() -> dict | None:
            status, body = worker.http("/healthz")
            return json.loads(body) if status == 503 else None
        answer = wait_for(unhealthy, 60, what="/healthz to fail")
        assert answer["alive"] is False and answer["reason"].startswith("fetch stall: "), answer
        body = worker.http("/metrics")[1].decode()
        assert metric_sum(body, "profilestream_fetch_stalls_total", action="unhealthy") >= 1
        assert metric_sum(body, "profilestream_fetch_stalls_total", action="reseek") >= 1
        assert "a re-seek did not end it: marking the worker unhealthy" in worker.log_tail(20, matching="ERROR")
    finally:
        assert worker.stop() == 0
    worker = deployment.worker().start()  # same RocksDB directory, a client that fetches
    try:
        finish(deployment, model, events, "stall a re-seek could not end, restart", [worker])
    finally:
        worker.stop()


def test_a_partition_too_big_for_the_embedded_fetch_wait_raises_it(
        broker: EmbeddedBroker, tmp_path: Path, model: ProfileModel) -> None:
    """Tansu answers a fetch that takes longer than its max wait with no records, and its fetches
    slow down as a partition's record batches add up (docs/embedded-broker.md; the soak's stall):
    at 600,000 records in batches of ~10, as a steady trickle of events makes them, a fetch takes
    ~40 ms, so the worker's 10 ms wait gets nothing, ever.  The watchdog re-seeks and doubles the
    wait until records come, and the events are processed."""
    deployment = Deployment(broker.bootstrap_servers, tmp_path, partitions=1)
    deployment.create_topics()
    topic, filler = deployment.settings.events_topic, 600_000
    fill_in_small_batches(deployment.bootstrap, topic, filler)
    commit_group_offset(deployment, {0: filler})  # the worker starts past the filler, at the end
    events = synthetic(300, users=40, seed=29)
    worker = deployment.worker(**STALL_WATCH).start()
    try:
        deployment.produce(events)
        finish(deployment, model, events, "partition too big for a 10 ms fetch wait", [worker])
        raised = worker.log_tail(10, matching="fetch wait raised")
        assert "fetch wait raised from 10 to 20 ms" in raised, worker.log_tail(40, matching="WARNING|ERROR")
        body = worker.http("/metrics")[1].decode()
        assert metric_sum(body, "profilestream_fetch_stalls_total", action="reseek") >= 1
        assert metric_sum(body, "profilestream_fetch_stalls_total", action="unhealthy") == 0
    finally:
        worker.stop()


def fill_in_small_batches(bootstrap: str, topic: str, n: int) -> None:
    """``n`` records of the demo's event size in batches of ~10 (2 KB), as the demo's traffic makes them."""
    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=2048)
        await producer.start()
        try:
            await asyncio.gather(*[await producer.send(topic, b"x" * 170) for _ in range(n)])
        finally:
            await producer.stop()
    asyncio.run(go())


def commit_group_offset(deployment: Deployment, offsets: dict[int, int]) -> None:
    """Commit ``offsets`` (partition -> offset) of the events topic for the deployment's consumer group."""
    async def go() -> None:
        topic = deployment.settings.events_topic
        consumer = AIOKafkaConsumer(bootstrap_servers=deployment.bootstrap, group_id=deployment.settings.app_id,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            tps = {TopicPartition(topic, p): offset for p, offset in offsets.items()}
            consumer.assign(list(tps))
            await consumer.commit(tps)
        finally:
            await consumer.stop()
    asyncio.run(go())
