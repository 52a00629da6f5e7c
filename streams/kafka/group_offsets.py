"""The worker group's committed offsets on the events topic: read them, move them.

A snapshot remembers them and a restore (or a backfill with ``--rewind``)
moves them back, so the events after that point are consumed again; the
admission rules (streams/pipeline/admission.py) skip whatever the state already holds.
Moving offsets needs the group to be empty: stop the workers first.
"""

from __future__ import annotations

import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.structs import OffsetAndMetadata

from .client_config import aiokafka_options
from ..settings import Settings

log = logging.getLogger(__name__)


class _FaustNamedAssignor(RoundRobinPartitionAssignor):
    """Round robin under faust's protocol name: the broker only lets a member into the
    workers' group (faust.App id) if it speaks a protocol the group knows."""

    name = "faust"


def _consumer(settings: Settings) -> AIOKafkaConsumer:
    # The worker's group id is the faust app id.
    return AIOKafkaConsumer(**aiokafka_options(settings), group_id=settings.app_id, enable_auto_commit=False,
                            partition_assignment_strategy=(_FaustNamedAssignor,))


async def _events_partitions(consumer: AIOKafkaConsumer, settings: Settings) -> list[TopicPartition]:
    await consumer.topics()
    partitions = consumer.partitions_for_topic(settings.events_topic)
    if not partitions:
        raise RuntimeError(f"topic {settings.events_topic!r} does not exist")
    return [TopicPartition(settings.events_topic, p) for p in sorted(partitions)]


async def committed_offsets(settings: Settings) -> dict[int, int]:
    """partition -> next offset the group will consume; the log start where nothing is committed."""
    consumer = _consumer(settings)
    try:
        await consumer.start()
        tps = await _events_partitions(consumer, settings)
        starts = await consumer.beginning_offsets(tps)
        out = {}
        for tp in tps:
            committed = await consumer.committed(tp)
            out[tp.partition] = starts[tp] if committed is None else committed
        return out
    finally:
        await consumer.stop()


async def beginning_offsets(settings: Settings) -> dict[int, int]:
    """partition -> first offset still in the events topic."""
    consumer = AIOKafkaConsumer(**aiokafka_options(settings), enable_auto_commit=False)
    try:
        await consumer.start()
        tps = await _events_partitions(consumer, settings)
        return {tp.partition: off for tp, off in (await consumer.beginning_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def reset_offsets(settings: Settings, offsets: dict[int, int], wait_s: float = 60.0) -> None:
    """Commit ``offsets`` (partition -> next offset to consume) for the worker group.

    Joins the group as its only member to commit (brokers such as the
    embedded one refuse commits from outside a group generation), then leaves.
    If workers are still members, they would share the partitions: this waits
    ``wait_s`` for the whole assignment and fails otherwise.
    """
    consumer = _consumer(settings)
    try:
        await consumer.start()
        tps = set(await _events_partitions(consumer, settings))
        consumer.subscribe([settings.events_topic])
        deadline = time.monotonic() + wait_s
        while consumer.assignment() != tps:
            if time.monotonic() > deadline:
                raise RuntimeError(f"group {settings.app_id} still has other members after {wait_s:.0f} s: "
                                   f"stop every worker before moving its offsets")
            await consumer.getmany(timeout_ms=200, max_records=1)  # drives the join; positions are not committed
        await consumer.commit({TopicPartition(settings.events_topic, p): OffsetAndMetadata(o, "")
                               for p, o in offsets.items()})
        log.info("group %s now resumes %s at %s", settings.app_id, settings.events_topic,
                 ", ".join(f"p{p}:{o}" for p, o in sorted(offsets.items())))
    finally:
        await consumer.stop()
