"""Hand many records for one partition to Kafka as whole record batches.

A micro-batch publishes one profile and one changelog record per user.
Sent one by one (``producer.send``), each record costs a delivery future, a
partition lookup and the accumulator's bookkeeping.  aiokafka's batch API
(``create_batch`` / ``send_batch``) appends records straight into a record
batch and gives one delivery future per batch, at about half the cost per
record (docs/performance.md).

The worker's batches go through the client inside faust's own producer
(:func:`client`), so faust's flush before every offset commit still covers
them: nothing consumed is committed before what it produced is on the broker.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import aiokafka
import faust

from ..internals import producer_client

Record = tuple[Optional[bytes], Optional[bytes]]


@dataclass(frozen=True, slots=True)
class SentBatch:
    """One record batch handed to the client; ``delivery`` resolves to its first record's metadata."""

    topic: str
    partition: int
    count: int
    delivery: asyncio.Future


def client(producer: faust.types.ProducerT) -> aiokafka.AIOKafkaProducer:
    """The aiokafka producer inside faust's (faust has no public accessor for it)."""
    return producer_client(producer)


async def send_records(kafka: aiokafka.AIOKafkaProducer, topic: str, partition: int,
                       records: Iterable[Record]) -> list[SentBatch]:
    """Send ``records`` (key, value) to one partition, in order, in as few batches as fit.

    Returns once they sit in the client's buffer; the futures in the result
    say when (and whether) the broker acknowledged them.  The worker passes
    the client inside faust's producer (:func:`client`).
    """
    sent: list[SentBatch] = []
    batch, count = kafka.create_batch(), 0

    async def submit() -> None:
        sent.append(SentBatch(topic, partition, count, await kafka.send_batch(batch, topic, partition=partition)))

    for key, value in records:
        if batch.append(timestamp=None, key=key, value=value) is None:  # full: send it, start the next
            await submit()
            batch, count = kafka.create_batch(), 0
            if batch.append(timestamp=None, key=key, value=value) is None:
                raise ValueError(f"a record of {len(value or b'')} bytes does not fit in a producer batch "
                                 f"(PROFILESTREAM_PRODUCER_BATCH_BYTES) for {topic}")
        count += 1
    if count:
        await submit()
    return sent


async def key_partitions(producer: faust.types.ProducerT, topic: str, keys: Sequence[bytes]) -> list[int]:
    """The partition the client's default partitioner (Kafka's murmur2) gives each key."""
    await client(producer).partitions_for(topic)  # the topic's metadata first (cached once known)
    return [producer.key_partition(topic, key).partition for key in keys]
