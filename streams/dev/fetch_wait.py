"""How long the embedded broker takes to answer a fetch as one partition grows, at two fetch waits.

The issue 19 soak's stall (docs/reliability.md "Fetch stall"): Tansu 0.6.0's
fetch takes longer the more records the partition holds, and a fetch that takes
longer than the request's max wait comes back with no records and no error --
every time, so a consumer with a short wait never reads that partition again.
The worker's wait on the embedded broker is 10 ms (streams/service/app.py,
``EMBEDDED_FETCH_MAX_WAIT_MS``).  This fills one partition in rounds of
``--round`` records (170-byte values, as the demo's events) and after each
round seeks a fresh consumer per wait to 100 records before the end and times
its first records, giving up after ``--give-up-s``; ``-`` means none came.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from .embedded_broker import EmbeddedBroker
from .proc_stats import sample

TOPIC = "fetch-wait"
#: The demo's event value size.
VALUE = b"x" * 170


async def first_records_s(bootstrap: str, tp: TopicPartition, offset: int, wait_ms: int,
                          give_up_s: float) -> float | None:
    """Seconds until a consumer with ``wait_ms`` seeked to ``offset`` gets records (None: none in ``give_up_s``)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=wait_ms)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        started = time.monotonic()
        while time.monotonic() - started < give_up_s:
            if (await consumer.getmany(tp, timeout_ms=500)).get(tp):
                return time.monotonic() - started
        return None
    finally:
        await consumer.stop()


async def run(rounds: int, per_round: int, waits: list[int], give_up_s: float) -> None:
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(TOPIC, 1, 1)])
        finally:
            await admin.close()
        tp = TopicPartition(TOPIC, 0)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=2048)
        await producer.start()
        print("records | broker MiB | " + " | ".join(f"first records, wait {w} ms" for w in waits))
        try:
            for n in range(1, rounds + 1):
                sends = [await producer.send(TOPIC, VALUE) for _ in range(per_round)]
                end = (await asyncio.gather(*sends))[-1].offset + 1
                times = [await first_records_s(bootstrap, tp, end - 100, w, give_up_s) for w in waits]
                stats = sample(broker.pid)
                rss = f"{stats.rss_bytes / 2**20:,.0f}" if stats is not None else "-"
                print(f"{n * per_round:,} | {rss} | " + " | ".join(
                    "-" if t is None else f"{t * 1000:,.0f} ms" for t in times), flush=True)
        finally:
            await producer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streams.dev.fetch_wait", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--round", type=int, default=200_000, help="records produced per round")
    parser.add_argument("--waits", type=int, nargs="+", default=[10, 500], help="fetch max waits to time, ms")
    parser.add_argument("--give-up-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    asyncio.run(run(args.rounds, args.round, args.waits, args.give_up_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
