"""Forgetting users (right to erasure) while workers run: a control record on the events topic.

A user's state lives in the RocksDB partition of the worker that owns the
user's events partition, and that worker may be writing it right now.  So
`profilestream forget` does not touch state itself: it produces a *forget
request* -- key = user id, no value, header ``profilestream.control: forget``
-- to the events topic.  Keyed like the user's events, it lands in the same
partition, and the owning worker applies it in order with them: events before
it are erased with the state, events after it start a fresh state.  Applying
it deletes the state (RocksDB and a changelog tombstone) and publishes a
tombstone (key = user id, value = null) to the compacted profile topic, so
compaction removes the profile and subscribers drop the user.

The idle TTL (streams/service/ttl.py) erases through the same log: its sweep
produces *expire requests* -- the same record with header
``profilestream.control: expire`` and the idle cut-off in
``profilestream.expire.idle_before_ms`` -- and the owning worker erases the
user only if the state's last event is still older than the cut-off when the
request's turn comes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Sequence

from aiokafka import AIOKafkaProducer

from models.events import MAX_ID_CHARS

from ..kafka.client_config import aiokafka_options
from ..pipeline.control import Headers, forget_headers
from ..settings import Settings

log = logging.getLogger(__name__)


async def send_control(producer: AIOKafkaProducer, topic: str, user_ids: Sequence[str], headers: Headers,
                       partition: int | None = None) -> None:
    """Produce one control record per user and wait until the broker has them all."""
    futures = [await producer.send(topic, None, key=user_id.encode(), headers=headers, partition=partition)
               for user_id in user_ids]
    await asyncio.gather(*futures)


async def request_forget(settings: Settings, user_ids: Sequence[str]) -> None:
    """Produce one forget request per user and wait until the broker has them all."""
    producer = AIOKafkaProducer(**aiokafka_options(settings), acks="all")
    await producer.start()
    try:
        await send_control(producer, settings.events_topic, user_ids, forget_headers())
    finally:
        await producer.stop()


def cmd_forget(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    bad = [u for u in args.user_ids if not u or len(u) > MAX_ID_CHARS]
    if bad:
        log.error("not user ids (1..%d characters): %r", MAX_ID_CHARS, bad)
        return 2
    asyncio.run(request_forget(settings, args.user_ids))
    log.info("forget requested for %d users on %s; the owning workers delete their state and "
             "publish tombstones to %s", len(args.user_ids), settings.events_topic, settings.profiles_topic)
    return 0


def add_forget_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forget", help="erase users: delete their state and tombstone their profiles")
    p.add_argument("user_ids", nargs="+", metavar="USER_ID")
    p.set_defaults(func=cmd_forget)
