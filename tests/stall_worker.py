"""``profilestream worker`` whose Kafka client stops fetching its events partitions: a fetch stall.

Once the first assignment is positioned (``BatchingConsumer.perform_seek``), the
aiokafka consumer inside faust's pauses every events partition, as if the client
had stopped fetching them by itself: faust still counts them active, and nothing
is logged.  ``PROFILESTREAM_TEST_STALL=stuck`` also makes the client ignore
being resumed, so the watchdog's re-seek cannot end the stall.  Everything else
is the real worker: broker, RocksDB, model.
"""

from __future__ import annotations

import os
import sys

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.cli import main
from streams.kafka.fetcher import BatchingConsumer

STUCK = os.environ.get("PROFILESTREAM_TEST_STALL") == "stuck"
_real_perform_seek = BatchingConsumer.perform_seek
_stalled = False


def stall(client: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
    client.pause(*partitions)
    if STUCK:
        client.resume = lambda *tps: None  # type: ignore[method-assign]


async def perform_seek(self: BatchingConsumer) -> None:
    global _stalled
    await _real_perform_seek(self)
    if not _stalled:
        partitions = [TopicPartition(tp.topic, tp.partition) for tp in self.assignment()
                      if tp.topic in self.batch_topics]
        await self.in_client(lambda client: stall(client, partitions))
        _stalled = True


BatchingConsumer.perform_seek = perform_seek  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
