"""The last pipeline step on Kafka: profile messages out, rejected records to the dead-letter topic.

Both go through one producer; the worker's offset commits flush it first, so
nothing consumed is committed before what it produced is on the broker.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Mapping, Sequence

import faust

from .delivery import DeliveryGuard
from .record_batches import client, key_partitions, send_records
from ..pipeline.validate import Rejection

#: Bytes a dead letter's budget leaves for its headers (the error is cut at 1 KiB, a topic
#: name is at most 249 bytes) and Kafka's record and batch framing.
DEAD_LETTER_HEADROOM = 4096
#: Most bytes of an invalid key kept in a dead letter cut to fit (a valid key is at most
#: 128 characters, 512 bytes): the value gets the rest of the budget.
DEAD_LETTER_KEY_BYTES = 1024


def dead_letter_headers(rejection: Rejection) -> list[tuple[str, bytes]]:
    """Kafka headers carrying why and where from; the value stays the original bytes."""
    rec = rejection.record
    headers = [
        ("profilestream.dlq.reason", rejection.reason.encode()),
        ("profilestream.dlq.error", rejection.message.encode("utf-8", "replace")[:1024]),
        ("profilestream.dlq.topic", rec.topic.encode()),
        ("profilestream.dlq.partition", str(rec.partition).encode()),
        ("profilestream.dlq.offset", str(rec.offset).encode()),
        ("profilestream.dlq.timestamp", str(rec.timestamp_ms).encode()),
    ]
    if rejection.exception:
        headers.append(("profilestream.dlq.exception", rejection.exception.encode()))
    return headers


def dead_letter_budget(producer_batch_bytes: int, max_request_size: int) -> int:
    """Most key + value bytes a dead letter may carry: it must fit one producer batch and one request."""
    return min(producer_batch_bytes, max_request_size) - DEAD_LETTER_HEADROOM


def dead_letter(rejection: Rejection, max_bytes: int) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """(key, value, headers) of the dead letter of ``rejection``: the original bytes, unless
    they exceed ``max_bytes``.

    A record too large for the producer would make the send fail, and the
    worker stop on every restart; so the key (to :data:`DEAD_LETTER_KEY_BYTES`)
    and then the value are cut to fit, and for each part cut the headers say
    so (``profilestream.dlq.cut``) and carry its original size and SHA-256,
    enough to match the dead letter with the source record (still in the
    source topic at its partition and offset) and prove it is that record.
    """
    rec = rejection.record
    key, value = rec.key, rec.value
    headers = dead_letter_headers(rejection)
    if len(key or b"") + len(value or b"") <= max_bytes:
        return key, value, headers
    cut = []
    kept_key = key if key is None or len(key) <= DEAD_LETTER_KEY_BYTES else key[:DEAD_LETTER_KEY_BYTES]
    kept_value = value if value is None else value[:max(0, max_bytes - len(kept_key or b""))]
    for part, original, kept in (("key", key, kept_key), ("value", value, kept_value)):
        if original is not None and kept is not None and len(kept) < len(original):
            cut.append(part)
            headers.append((f"profilestream.dlq.{part}_size", str(len(original)).encode()))
            headers.append((f"profilestream.dlq.{part}_sha256", hashlib.sha256(original).hexdigest().encode()))
    headers.append(("profilestream.dlq.cut", ",".join(cut).encode()))
    return kept_key, kept_value, headers


def headers_dict(headers: Sequence[tuple[str, bytes]] | None) -> Mapping[str, str]:
    """Decode DLQ headers for readers (tests, tools)."""
    return {k: v.decode("utf-8", "replace") for k, v in (headers or ())}


class Publisher:
    """Sends profiles and dead letters through faust's producer, without awaiting delivery
    (``guard`` watches every delivery: streams/kafka/delivery.py)."""

    def __init__(self, producer: faust.types.ProducerT, profiles_topic: str, dlq_topic: str,
                 guard: DeliveryGuard, max_dead_letter_bytes: int) -> None:
        self.producer = producer
        self.profiles_topic = profiles_topic
        self.dlq_topic = dlq_topic
        self.guard = guard
        #: Key + value bytes beyond which a dead letter is cut (:func:`dead_letter_budget`).
        self.max_dead_letter_bytes = max_dead_letter_bytes

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

    async def dead_letter(self, rejection: Rejection) -> asyncio.Future:
        """Hand the dead letter to the client; returns its delivery."""
        rec = rejection.record
        key, value, headers = dead_letter(rejection, self.max_dead_letter_bytes)
        delivery = await self.producer.send(self.dlq_topic, key, value, None, None, headers)
        self.guard.watch(delivery, f"the dead letter of {rec.topic}[{rec.partition}]@{rec.offset}")  # type: ignore[arg-type]
        return delivery  # type: ignore[return-value]
