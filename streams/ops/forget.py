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
import sys
from pathlib import Path
from typing import Sequence

from aiokafka import AIOKafkaProducer

from models.events import MAX_ID_CHARS

from ..cli_common import EXIT_USAGE, CliError, add_json_flag, add_yes_flag, confirm, emit
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
    try:
        await producer.start()
        await send_control(producer, settings.events_topic, user_ids, forget_headers())
    finally:
        await producer.stop()


def read_user_ids(source: str) -> list[str]:
    """One user id per line of a file, or of stdin for ``-``; blank lines are ignored.

    Lines are not stripped: an id is exactly its line, as the events carry it.
    """
    if source == "-":
        lines = sys.stdin.read().splitlines()
    else:
        lines = Path(source).read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


def cmd_forget(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    user_ids = list(args.user_ids) + (read_user_ids(args.ids_from) if args.ids_from else [])
    if not user_ids:
        raise CliError("no user ids: name them as arguments or give --ids-from FILE (- for stdin)", EXIT_USAGE)
    bad = [u for u in user_ids if not u or len(u) > MAX_ID_CHARS]
    if bad:
        shown = ", ".join(repr(u[:40]) for u in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CliError(f"{len(bad)} not user ids (1..{MAX_ID_CHARS} characters): {shown}", EXIT_USAGE)
    user_ids = list(dict.fromkeys(user_ids))  # one request per user, in the order given
    confirm(args, f"erase the state and profile of {len(user_ids)} users "
                  f"({', '.join(user_ids[:3])}{', ...' if len(user_ids) > 3 else ''})")
    asyncio.run(request_forget(settings, user_ids))
    emit(args, {"requested": len(user_ids), "events_topic": settings.events_topic},
         f"forget requested for {len(user_ids)} users on {settings.events_topic}; the owning workers delete "
         f"their state and publish tombstones to {settings.profiles_topic}")
    return 0


def add_forget_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forget", help="erase users: delete their state and tombstone their profiles")
    p.add_argument("user_ids", nargs="*", metavar="USER_ID", help="users to erase")
    p.add_argument("--ids-from", metavar="FILE",
                   help="also erase the users listed in FILE, one id per line (- reads stdin)")
    add_yes_flag(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_forget)
