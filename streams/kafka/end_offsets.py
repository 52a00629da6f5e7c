"""Exact end offsets on the embedded broker.

Tansu 0.6.0 answers ListOffsets(latest) with (first offset of the partition's
last record batch + 1): exact when every batch holds one record, too low when
producers batch.  Readers that stop at the end offset then stop early, and
faust's changelog recovery both skips records and, on restart, finds its
persisted offset past the "end" and dies with ``ConsistencyError``.

Rather than making every producer send one record per batch (which serialises
each partition's sends on a broker round trip), the few readers that need the
end offset ask :class:`EndOffsetProbe`: it fetches from (reported end - 1),
the first record of that last batch, and the fetch returns the whole batch,
so its last offset + 1 is the true end.  Apache Kafka reports exact end
offsets; the probe is used only against the embedded broker.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Mapping, TypeVar

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from .client_config import aiokafka_options
from ..settings import Settings

#: faust's TP and aiokafka's TopicPartition are both (topic, partition) named tuples.
TPLike = TypeVar("TPLike", bound=tuple)


class EndOffsetProbe:
    """Corrects reported end offsets with one fetch per non-empty partition.

    Keeps one group-less consumer open between calls (the worker asks on every
    recovery and monitor tick); :meth:`close` releases it.
    """

    def __init__(self, options: Mapping[str, Any], timeout_s: float = 10.0) -> None:
        self._options = dict(options)
        self._timeout_s = timeout_s
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def exact(self, reported: Mapping[TPLike, int]) -> dict[TPLike, int]:
        """``reported`` end offsets, each raised to its partition's true end."""
        out = dict(reported)
        todo = {TopicPartition(tp[0], tp[1]): tp for tp, end in reported.items() if end and end > 0}
        if not todo:
            return out
        async with self._lock:
            consumer = await self._ensure()
            consumer.assign(list(todo))
            try:
                for tp in todo:
                    consumer.seek(tp, reported[todo[tp]] - 1)
                pending = set(todo)
                deadline = time.monotonic() + self._timeout_s
                while pending:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"end-offset probe got no records from {sorted(pending)} "
                                           f"in {self._timeout_s:.0f}s")
                    fetched = await consumer.getmany(*pending, timeout_ms=int(min(remaining, 0.5) * 1000))
                    for tp, records in fetched.items():
                        if records:
                            original = todo[tp]
                            out[original] = max(out[original], records[-1].offset + 1)
                            pending.discard(tp)
            finally:
                consumer.unsubscribe()  # no background fetching between probes
        return out

    async def _ensure(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(**self._options, enable_auto_commit=False)
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()


async def end_offsets(consumer: AIOKafkaConsumer, tps: list[TopicPartition],
                      settings: Settings) -> dict[TopicPartition, int]:
    """End offsets of ``tps`` as ``consumer`` reports them, probed exact on the embedded broker."""
    reported = await consumer.end_offsets(tps)
    if not settings.embedded_broker:
        return reported
    probe = EndOffsetProbe(aiokafka_options(settings))
    try:
        return await probe.exact(reported)
    finally:
        await probe.close()
