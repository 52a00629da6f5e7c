"""Create the service's topics if they are missing (idempotent), and check their partitions.

The events and DLQ topics get ``partitions`` partitions; the profile topic is
compacted (key = user id) so a new subscriber can rebuild every user's latest
profile by reading it from the beginning.  Faust creates the state changelog.
Every topic gets ``PROFILESTREAM_REPLICATION_FACTOR`` replicas (faust's
internal topics too: streams/service/app.py passes it on).
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from .client_config import aiokafka_options
from ..settings import Settings

log = logging.getLogger(__name__)


class PartitionCountError(RuntimeError):
    """The events topic and the state changelog (or the table) have different partition counts."""


def topic_specs(settings: Settings) -> list[NewTopic]:
    replicas = settings.replication_factor
    return [
        NewTopic(settings.events_topic, settings.partitions, replicas),
        NewTopic(settings.dlq_topic, settings.partitions, replicas),
        NewTopic(settings.profiles_topic, settings.partitions, replicas,
                 topic_configs={"cleanup.policy": "compact"}),
    ]


async def ensure_topics(settings: Settings) -> None:
    """Create the service's topics (events, profiles, dead letters) where missing."""
    await create_missing(settings, topic_specs(settings))


async def create_missing(settings: Settings, specs: list[NewTopic]) -> None:
    """Create those of ``specs`` that do not exist yet (several tools may race to it: fine)."""
    admin = AIOKafkaAdminClient(**aiokafka_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in specs if t.name not in existing]
        if not missing:
            return
        try:
            await admin.create_topics(missing)
        except TopicAlreadyExistsError:
            pass  # another worker won the race; the topic is there, which is all we need
        log.info("created topics: %s", ", ".join(t.name for t in missing))
    finally:
        await admin.close()


async def partition_counts(settings: Settings, topics: list[str]) -> dict[str, int]:
    """topic -> partition count, for those of ``topics`` that exist.

    Only existing topics are described: a metadata request naming a missing
    topic can make a broker with ``auto.create.topics.enable`` create it.
    """
    admin = AIOKafkaAdminClient(**aiokafka_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in topics if t in existing]
        described = await admin.describe_topics(wanted) if wanted else []
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0 and t["partitions"]}


def partition_problem(settings: Settings, events: int, changelog: int | None) -> str | None:
    """Why a worker must not start with these partition counts (None: it may).

    A user's state lives in the changelog partition numbered like the
    partition of their events (streams/state/changelog.py), and the table has
    ``PROFILESTREAM_PARTITIONS`` partitions, so all three must be equal.  A
    missing changelog is created by faust with ``PROFILESTREAM_PARTITIONS``.
    """
    ev, cl, configured = settings.events_topic, settings.changelog_topic, settings.partitions
    if changelog is not None and changelog != events:
        return (f"the events topic {ev} has {events} partitions but the state changelog {cl} has {changelog}: "
                f"each user's state must sit in the changelog partition numbered like the user's events "
                f"partition. Partitions were added to one of them, or one was recreated. Fix: give the events "
                f"topic {changelog} partitions again (recreate it), or keep {events} and rebuild the state for "
                f"them -- a new PROFILESTREAM_APP_ID (a new changelog) with PROFILESTREAM_PARTITIONS={events}, "
                f"then `profilestream backfill` (docs/lifecycle.md)")
    if events != configured:
        what = (f"the state changelog {cl} has {changelog}" if changelog is not None
                else f"the state changelog {cl} would be created with {configured}")
        return (f"the events topic {ev} has {events} partitions, PROFILESTREAM_PARTITIONS is {configured} and "
                f"{what}. Fix: set PROFILESTREAM_PARTITIONS={events}")
    return None


async def check_partitions(settings: Settings) -> None:
    """Refuse to start (:class:`PartitionCountError`) when the partition counts do not match."""
    counts = await partition_counts(settings, [settings.events_topic, settings.changelog_topic])
    if settings.events_topic not in counts:
        raise PartitionCountError(f"the events topic {settings.events_topic} does not exist")
    problem = partition_problem(settings, counts[settings.events_topic], counts.get(settings.changelog_topic))
    if problem is not None:
        raise PartitionCountError(problem)


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
