"""Topics the worker relies on: their replication factor, their partition counts, and states that
claim offsets the events topic no longer has (a topic recreated or truncated).

Real worker processes against the embedded broker.  Tansu reports the
replicas a topic was created with (one node, listed that many times), and it
deletes topics, so a recreated events topic is the real thing here.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from models import ProfileModel
from models.events import Event
from streams.dev.embedded_broker import EmbeddedBroker
from streams.kafka.group_offsets import reset_offsets
from streams.kafka.topics import ensure_topics, partition_problem
from streams.pipeline.partitioning import partition_for
from streams.state.changelog import ensure_changelog

from ..harness import (Deployment, assert_matches_replay, expected_last, stream_through, synthetic,
                       wait_for, wait_for_counts)

HOUR_MS = 3_600_000


def replicas_of(bootstrap: str, prefix: str) -> dict[str, set[int]]:
    """topic -> the replica counts of its partitions, for every topic whose name starts with ``prefix``."""
    async def go() -> dict[str, set[int]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            names = [t for t in await admin.list_topics() if t.startswith(prefix)]
            return {t["topic"]: {len(p["replicas"]) for p in t["partitions"]}
                    for t in await admin.describe_topics(names)}
        finally:
            await admin.close()
    return asyncio.run(go())


def delete_topic(bootstrap: str, topic: str) -> None:
    async def go() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()
    asyncio.run(go())


def test_every_topic_gets_the_configured_replication_factor(broker: EmbeddedBroker, tmp_path: Path) -> None:
    dep = Deployment(broker.bootstrap_servers, tmp_path)  # no topics yet: the worker creates them all
    worker = dep.worker(PROFILESTREAM_REPLICATION_FACTOR="2").start()
    try:
        events = synthetic(40, users=8, seed=3)
        dep.produce(events)
        wait_for_counts(dep, Counter(e.user_id for e in events))
    finally:
        worker.stop()
    s = dep.settings
    replicas = replicas_of(dep.bootstrap, dep.name)
    expected = {s.events_topic, s.profiles_topic, s.dlq_topic, s.changelog_topic, f"{s.app_id}-__assignor-__leader"}
    assert expected <= set(replicas), replicas
    assert all(counts == {2} for counts in replicas.values()), replicas


def test_partition_problems_name_both_counts_and_the_fix(deployment: Deployment) -> None:
    s = deployment.settings  # 4 partitions
    assert partition_problem(s, 4, 4) is None and partition_problem(s, 4, None) is None
    grown = partition_problem(s, 8, 4)
    assert grown is not None and "has 8 partitions" in grown and "has 4" in grown
    assert "PROFILESTREAM_PARTITIONS=8" in grown and "profilestream backfill" in grown
    configured = partition_problem(s, 6, None)
    assert configured is not None and "has 6 partitions" in configured and "created with 4" in configured
    assert "PROFILESTREAM_PARTITIONS=6" in configured


def test_worker_refuses_when_events_and_changelog_partitions_differ(deployment: Deployment) -> None:
    asyncio.run(ensure_changelog(Deployment(deployment.bootstrap, deployment.tmp, partitions=2,
                                            name=deployment.name).settings))
    log_text = deployment.worker().refusal_log(120.0)
    assert "refusing to start" in log_text
    assert f"{deployment.settings.events_topic} has 4 partitions" in log_text
    assert f"{deployment.settings.changelog_topic} has 2" in log_text and "Fix:" in log_text


def test_worker_refuses_when_its_partition_setting_differs_from_the_events_topic(deployment: Deployment) -> None:
    log_text = deployment.worker(PROFILESTREAM_PARTITIONS="2").refusal_log(120.0)
    assert "has 4 partitions, PROFILESTREAM_PARTITIONS is 2" in log_text
    assert "PROFILESTREAM_PARTITIONS=4" in log_text
    assert deployment.settings.changelog_topic not in replicas_of(deployment.bootstrap, deployment.name)


def last_offsets(dep: Deployment) -> dict[str, tuple[int, int]]:
    """user -> (partition, offset of the user's last record in the events topic)."""
    return {r.key.decode(): (r.partition, r.offset) for r in dep.read(dep.settings.events_topic)}


def test_states_beyond_a_recreated_events_topic_are_refused_or_reset(
        deployment: Deployment, model: ProfileModel) -> None:
    first = synthetic(800, users=24, seed=41)
    stream_through(deployment, first)
    # One user per partition whose state has applied offset >= 20, and one more to come back later.
    old = last_offsets(deployment)
    candidates = sorted((u for u, (_, offset) in old.items() if offset >= 20), key=lambda u: old[u])
    chosen: dict[int, str] = {}
    for user in candidates:
        chosen.setdefault(old[user][0], user)
    assert len(chosen) == deployment.partitions, old
    late = next(u for u in candidates if u not in chosen.values())

    topic = deployment.settings.events_topic
    delete_topic(deployment.bootstrap, topic)
    wait_for(lambda: topic not in replicas_of(deployment.bootstrap, deployment.name), 30, what="topic deleted")
    asyncio.run(ensure_topics(deployment.settings))
    start = first[-1].timestamp_ms + HOUR_MS
    second = [Event(user, "view", f"i{k}", "c1", start + 1000 * k, None, f"re-{user}-{k}")
              for user in chosen.values() for k in range(2)]
    deployment.produce(second)  # at most 2 records per partition: far below the stored offsets
    # Deleting a topic drops the group's commits on it; a truncated partition keeps them, beyond its end.
    asyncio.run(reset_offsets(deployment.settings, {p: 500 for p in range(deployment.partitions)}))

    log_text = deployment.worker().refusal_log(120.0)
    assert "refusing to start" in log_text and "recreated or truncated" in log_text
    assert f"the newest stored state of {topic}[" in log_text
    assert f"the group's committed offset of {topic}[0] is at offset 500" in log_text
    assert "PROFILESTREAM_ON_MODEL_MISMATCH=reset" in log_text

    resetting = deployment.worker(PROFILESTREAM_ON_MODEL_MISMATCH="reset").start()
    try:
        published = wait_for_counts(deployment, Counter(e.user_id for e in second))
    finally:
        assert resetting.stop() == 0
    # Read from the start despite the commit, and not skipped as redelivered: each user started
    # afresh with the recreated topic's events.
    assert_matches_replay({u: published[u] for u in chosen.values()}, expected_last(model, second))

    # Every partition's newest state is now a fresh one, so the start-up probe passes; a user
    # whose old state is still stored is met only when their next event is read.
    again = Event(late, "view", "i-late", "c1", start + 60_000, None, "late-1")
    deployment.produce([again])
    assert partition_for(late.encode(), deployment.partitions) == old[late][0]
    stopping = deployment.worker().start(wait_ready=False)
    assert stopping.proc is not None
    stopping.proc.wait(timeout=120)
    assert stopping.proc.returncode != 0
    log_text = stopping.log_path.read_text(errors="replace")
    assert f"the stored state of user {late!r} of {topic}[{old[late][0]}] is at offset {old[late][1]}" in log_text
    assert "batch processing failed, stopping the worker" in log_text
