"""EndOffsetProbe on the real embedded broker: exact ends whatever the producer's batching."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from streams.dev.bench import create_topic
from streams.dev.embedded_broker import EmbeddedBroker
from streams.kafka.end_offsets import EndOffsetProbe

from ..harness import read_topic


async def _produce_batches(bootstrap: str, topic: str, sizes: list[int]) -> None:
    """One record batch per entry of ``sizes`` (all sent before a flush: one linger window)."""
    await create_topic(bootstrap, topic, 2)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=200)
    await producer.start()
    try:
        for size in sizes:
            futures = [await producer.send(topic, f"v{i}".encode(), key=b"k", partition=0) for i in range(size)]
            await producer.flush()
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _ends(bootstrap: str, topic: str) -> tuple[int, int]:
    """(end offset as the broker reports it, as the probe corrects it) of partition 0."""
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    probe = EndOffsetProbe({"bootstrap_servers": bootstrap})
    await consumer.start()
    try:
        reported = await consumer.end_offsets([tp])
        return reported[tp], (await probe.exact(reported))[tp]
    finally:
        await probe.close()
        await consumer.stop()


def test_probe_finds_the_true_end_behind_multi_record_batches(broker: EmbeddedBroker) -> None:
    topic = f"probe-{uuid.uuid4().hex[:8]}"
    asyncio.run(_produce_batches(broker.bootstrap_servers, topic, [5, 1, 7]))
    reported, exact = asyncio.run(_ends(broker.bootstrap_servers, topic))
    assert exact == 13
    assert reported <= exact  # Tansu 0.6.0 reports 7 (first offset of the last batch + 1)
    assert len(read_topic(broker.bootstrap_servers, topic)) == 13


def test_probe_keeps_empty_and_single_record_partitions(broker: EmbeddedBroker) -> None:
    topic = f"probe-{uuid.uuid4().hex[:8]}"
    asyncio.run(_produce_batches(broker.bootstrap_servers, topic, [1, 1]))
    assert asyncio.run(_ends(broker.bootstrap_servers, topic)) == (2, 2)

    async def empty() -> dict:
        probe = EndOffsetProbe({"bootstrap_servers": broker.bootstrap_servers})
        try:
            return await probe.exact({TopicPartition(topic, 1): 0})
        finally:
            await probe.close()
    assert asyncio.run(empty()) == {TopicPartition(topic, 1): 0}
