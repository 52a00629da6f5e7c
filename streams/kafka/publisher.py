"""The last pipeline step on Kafka: profile messages out, rejected records to the dead-letter topic.

Both go through one producer; the worker's offset commits flush it first, so
nothing consumed is committed before what it produced is on the broker.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import faust

from .delivery import DeliveryGuard
from .record_batches import client, key_partitions, send_records
from ..pipeline.validate import Rejection


def dead_letter_headers(rejection: Rejection) -> list[tuple[str, bytes]]:
    """Kafka headers carrying why and where from; the value stays the original bytes."""
    rec = rejection.record
    return [
        ("profilestream.dlq.reason", rejection.reason.encode()),
        ("profilestream.dlq.error", rejection.message.encode("utf-8", "replace")[:1024]),
        ("profilestream.dlq.topic", rec.topic.encode()),
        ("profilestream.dlq.partition", str(rec.partition).encode()),
        ("profilestream.dlq.offset", str(rec.offset).encode()),
        ("profilestream.dlq.timestamp", str(rec.timestamp_ms).encode()),
    ]


def headers_dict(headers: Sequence[tuple[str, bytes]] | None) -> Mapping[str, str]:
    """Decode DLQ headers for readers (tests, tools)."""
    return {k: v.decode("utf-8", "replace") for k, v in (headers or ())}


class Publisher:
    """Sends profiles and dead letters through faust's producer, without awaiting delivery
    (``guard`` watches every delivery: streams/kafka/delivery.py)."""

    def __init__(self, producer: faust.types.ProducerT, profiles_topic: str, dlq_topic: str,
                 guard: DeliveryGuard) -> None:
        self.producer = producer
        self.profiles_topic = profiles_topic
        self.dlq_topic = dlq_topic
        self.guard = guard

    async def profiles(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Profile messages (user id, value), keyed by user, as one record batch per partition."""
        keys = [user_id.encode() for user_id, _ in items]
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, partition, (_, value) in zip(keys, await key_partitions(self.producer, self.profiles_topic, keys),
                                              items):
            by_partition.setdefault(partition, []).append((key, value))
        for partition, records in by_partition.items():
            for sent in await send_records(client(self.producer), self.profiles_topic, partition, records):
                self.guard.watch(sent.delivery, f"{sent.count} profiles for {sent.topic}[{sent.partition}]")

    async def tombstone(self, user_id: str) -> None:
        """A null value: compaction then forgets the user's profile."""
        delivery = await self.producer.send(self.profiles_topic, user_id.encode(), None, None, None, None)
        self.guard.watch(delivery, f"the profile tombstone of user {user_id!r}")  # type: ignore[arg-type]

    async def dead_letter(self, rejection: Rejection) -> None:
        rec = rejection.record
        delivery = await self.producer.send(self.dlq_topic, rec.key, rec.value, None, None,
                                            dead_letter_headers(rejection))
        self.guard.watch(delivery, f"the dead letter of {rec.topic}[{rec.partition}]@{rec.offset}")  # type: ignore[arg-type]
