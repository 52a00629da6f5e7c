"""Read and write the state table's changelog topic from outside a worker.

The changelog (``<app id>-user-state-changelog``) is the source of truth a
worker's RocksDB is rebuilt from: on start or rebalance faust replays each
assigned changelog partition into the matching RocksDB partition, the last
record per key winning.  So offline tools (backfill, snapshot, restore) never
touch a worker's disk; they append records here and let recovery load them.

Partitioning: a user's state must sit in the changelog partition with the same
number as the events-topic partition holding the user's events, because the
worker stores state under the *source* partition (streams/state/store.py) and
faust assigns events partition p together with changelog partition p.  Event
producers use the Kafka default partitioner (murmur2 of the key, as the Java
client and aiokafka/kafka-python do): :func:`~streams.pipeline.partitioning.partition_for`.
"""

from __future__ import annotations

import time
from typing import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from tqdm import tqdm

from ..kafka.end_offsets import end_offsets
from ..kafka.client_config import aiokafka_options
from ..settings import Settings
from ..kafka.topics import assign_whole_topic, caught_up, create_missing

#: (partition, key, value); value None is a tombstone.
ChangelogRecord = tuple[int, bytes, bytes | None]


async def ensure_changelog(settings: Settings) -> None:
    """Create the changelog as faust would (compacted, one partition per table partition) if missing."""
    await create_missing(settings, [NewTopic(settings.changelog_topic, settings.partitions, settings.replication_factor,
                                             topic_configs={"cleanup.policy": "compact"})])


async def deliver_records(settings: Settings, topic: str, records: Iterable[ChangelogRecord],
                       progress: tqdm | None = None) -> int:
    """Send records to explicit partitions, in order, and wait until all are acknowledged.

    ``progress`` counts the acknowledged records (the slow part on a remote broker).
    """
    producer = AIOKafkaProducer(**aiokafka_options(settings), linger_ms=5)
    try:
        await producer.start()
        futures = [await producer.send(topic, value, key=key, partition=partition)
                   for partition, key, value in records]
        if progress is not None:
            progress.reset(total=len(futures))
        for future in futures:
            await future
            if progress is not None:
                progress.update()
    finally:
        await producer.stop()
    return len(futures)


async def read_latest(settings: Settings, timeout_s: float = 120.0,
                      progress: tqdm | None = None) -> dict[bytes, tuple[int, bytes]]:
    """key -> (partition, value) of the newest record per key, up to the end offsets seen at the start.

    Tombstoned keys are absent.  Returns {} when the changelog does not exist yet.
    ``progress`` counts the records read, out of those between the start and end offsets.
    """
    consumer = AIOKafkaConsumer(**aiokafka_options(settings), enable_auto_commit=False)
    try:
        await consumer.start()
        await consumer.topics()
        if not consumer.partitions_for_topic(settings.changelog_topic):
            return {}
        tps = await assign_whole_topic(consumer, settings.changelog_topic)
        ends = await end_offsets(consumer, tps, settings)
        if progress is not None:
            starts = await consumer.beginning_offsets(tps)
            progress.reset(total=sum(max(0, ends[tp] - starts[tp]) for tp in tps))
        latest: dict[bytes, tuple[int, bytes | None]] = {}
        deadline = time.monotonic() + timeout_s
        while not await caught_up(consumer, ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {settings.changelog_topic} to its end in {timeout_s}s")
            for tp, batch in (await consumer.getmany(*tps, timeout_ms=500)).items():
                for rec in batch:
                    if rec.offset < ends[tp]:
                        latest[rec.key] = (tp.partition, rec.value)
                if progress is not None:
                    progress.update(sum(rec.offset < ends[tp] for rec in batch))
        return {k: (p, v) for k, (p, v) in latest.items() if v is not None}
    finally:
        await consumer.stop()


async def newest_values(settings: Settings, tail: int = 16) -> dict[int, bytes]:
    """partition -> the newest non-tombstone value of that changelog partition (where there is one).

    A cheap probe of the stored state (which model wrote it, which event
    offset it reached): reads only the last ``tail`` records of each partition.
    """
    consumer = AIOKafkaConsumer(**aiokafka_options(settings), enable_auto_commit=False)
    try:
        await consumer.start()
        await consumer.topics()
        partitions = consumer.partitions_for_topic(settings.changelog_topic)
        if not partitions:
            return {}
        tps = [TopicPartition(settings.changelog_topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        ends = await end_offsets(consumer, tps, settings)
        newest: dict[int, bytes] = {}
        pending = {tp for tp in tps if ends[tp] > starts[tp]}
        for tp in pending:
            consumer.seek(tp, max(starts[tp], ends[tp] - tail))
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            for tp, batch in (await consumer.getmany(*pending, timeout_ms=500)).items():
                for rec in batch:
                    if rec.offset < ends[tp] and rec.value is not None:
                        newest[tp.partition] = rec.value
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
        return newest
    finally:
        await consumer.stop()
