"""Create the service's topics if they are missing (idempotent).

The events and DLQ topics get ``partitions`` partitions; the profile topic is
compacted (key = user id) so a new subscriber can rebuild every user's latest
profile by reading it from the beginning.  Faust creates the state changelog.
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from .client_config import aiokafka_options
from ..settings import Settings

log = logging.getLogger(__name__)


def topic_specs(settings: Settings) -> list[NewTopic]:
    return [
        NewTopic(settings.events_topic, settings.partitions, 1),
        NewTopic(settings.dlq_topic, settings.partitions, 1),
        NewTopic(settings.profiles_topic, settings.partitions, 1,
                 topic_configs={"cleanup.policy": "compact"}),
    ]


async def ensure_topics(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(**aiokafka_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topic_specs(settings) if t.name not in existing]
        if not missing:
            return
        try:
            await admin.create_topics(missing)
        except TopicAlreadyExistsError:
            pass  # another worker won the race; the topic is there, which is all we need
        log.info("created topics: %s", ", ".join(t.name for t in missing))
    finally:
        await admin.close()


async def assign_whole_topic(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Assign every partition of ``topic`` to a group-less consumer, from the beginning."""
    await consumer.topics()  # refreshes cluster metadata, so the partition list is known
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise RuntimeError(f"topic {topic!r} does not exist")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return tps


async def caught_up(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    """Whether ``consumer`` has read every partition up to the given end offsets."""
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True
