"""`profilestream produce`: replay a behaviour log (or synthetic traffic) into the events topic.

Events go through :class:`~streams.clients.producer.EventProducer`, so every message
is one the worker accepts; events it refuses are counted by reason and
skipped.  Pacing: as fast as possible (default), ``--rate`` events/s, or
``--preserve-timing`` -- the log's own gaps between events, divided by
``--speedup``.  ``--synthetic N --forever`` never stops (a demo traffic
source, as in docker-compose.yml): it sends N events over and over, stamped
from the wall clock, until SIGTERM or Ctrl-C, then flushes and exits 0.
Exit status 1 when any event was not delivered, 2 for flags that do not go together.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

from models.events import Event, EventError, event_from_dict, event_to_dict
from models.loaders import FORMATS, load_events

from ..cli_common import EXIT_USAGE, CliError, add_json_flag, add_quiet_flag, emit, progress_bar
from ..clients.producer import DeliveryError, EventProducer
from ..kafka.topics import ensure_topics
from ..settings import Settings
from .traffic import SyntheticTraffic

log = logging.getLogger("profilestream.produce")

#: Synthetic events are generated this many at a time, so N can exceed memory.
SYNTHETIC_CHUNK = 10_000


def synthetic_events(n: int, users: int, mean_gap_ms: float, forever: bool = False) -> Iterator[Event]:
    """``n`` funnel-shaped events stamped from now on, ~``mean_gap_ms`` apart.

    ``forever``: then ``n`` more, endlessly, the same users' sessions going on.
    Each chunk is stamped from the wall clock when it is generated, so the
    timestamps of an endless paced stream stay real (no drift of the random
    gaps, no stale timestamps after the broker was unreachable for a while).
    """
    traffic = SyntheticTraffic(users=users, seed=int(time.time()))
    next_ms = int(time.time() * 1000)
    while True:
        for start in range(0, n, SYNTHETIC_CHUNK):
            if forever:
                next_ms = int(time.time() * 1000)
            chunk = traffic.events(min(SYNTHETIC_CHUNK, n - start), next_ms, mean_gap_ms)
            next_ms = chunk[-1].timestamp_ms + 1
            yield from chunk
        if not forever:
            return


def paced(events: Iterable[Event], rate: float | None = None, speedup: float | None = None,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> Iterator[Event]:
    """Yield each event no earlier than its due time after the first one.

    Due times are ``i / rate`` with ``rate``, or the event's timestamp gap to
    the first event divided by ``speedup`` with ``speedup``, else zero.
    Sleeping only when ahead of schedule lets a slow broker catch up in bursts.
    """
    start = clock()
    first_ts: int | None = None
    for i, event in enumerate(events):
        if rate is not None:
            due = i / rate
        elif speedup is not None:
            first_ts = event.timestamp_ms if first_ts is None else first_ts
            due = (event.timestamp_ms - first_ts) / 1000.0 / speedup
        else:
            due = 0.0
        ahead = due - (clock() - start)
        if ahead > 0:
            sleep(ahead)
        yield event


def accepted(events: Iterable[Event], refused: Counter[str]) -> Iterator[Event]:
    """The events the contract accepts; the others are counted in ``refused`` by reason.

    Runs before pacing, so an event the producer would refuse (say one stamped
    days in the future) cannot make ``--preserve-timing`` sleep for its gap.
    """
    for event in events:
        try:
            event_from_dict(event_to_dict(event))
        except EventError as err:
            refused[err.reason] += 1
            continue
        yield event


def produce(producer: EventProducer, events: Iterable[Event], progress: tqdm, refused: Counter[str]) -> int:
    """Send everything, counting each event on ``progress``; events refused on sending are
    added to ``refused``.  Returns how many events were handed to the producer."""
    sent = 0
    for event in events:
        try:
            producer.send(event)
            sent += 1
        except EventError as err:
            refused[err.reason] += 1
        progress.update()
        progress.set_postfix(refused=sum(refused.values()), refresh=False)
    return sent


def cmd_produce(args: argparse.Namespace) -> int:
    if args.speedup is not None and not args.preserve_timing:
        raise CliError("--speedup only applies with --preserve-timing", EXIT_USAGE)
    if args.forever and args.synthetic is None:
        raise CliError("--forever only applies with --synthetic", EXIT_USAGE)
    settings = Settings.from_env()
    events: Iterable[Event]
    if args.data is not None:
        with progress_bar(args, "produce: read log", "B", unit_scale=True) as bar:
            loaded = load_events(args.data, args.format, progress=bar)
        events, total = loaded.events, len(loaded.events)
        if args.preserve_timing:  # logs like Taobao's are sorted by user, not time; the sort is stable
            events = sorted(loaded.events, key=lambda e: e.timestamp_ms)
    else:
        mean_gap_ms = 1000.0 / args.rate if args.rate else 1.0
        events = synthetic_events(args.synthetic, args.users, mean_gap_ms, forever=args.forever)
        total = None if args.forever else args.synthetic
    speedup = (args.speedup or 1.0) if args.preserve_timing else None
    asyncio.run(ensure_topics(settings))
    refused: Counter[str] = Counter()
    if args.forever:
        # SIGTERM (a container's stop; as PID 1, Python would otherwise ignore it) or Ctrl-C
        # ends the stream between two events; the producer's `with` then flushes.
        stopping = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
        events = itertools.takewhile(lambda _: not stopping.is_set(), events)
    try:
        # Closing the producer flushes it: DeliveryError if any send failed.
        with EventProducer(settings) as producer, progress_bar(args, "produce", "ev", total) as bar:
            sent = produce(producer, paced(accepted(events, refused), args.rate, speedup), bar, refused)
    except DeliveryError as err:
        raise CliError(str(err)) from None
    if refused:
        log.warning("refused %d invalid events: %s", sum(refused.values()), dict(refused))
    emit(args, {"delivered": sent, "refused": dict(refused), "events_topic": settings.events_topic},
         f"delivered {sent} events to {settings.events_topic}"
         + (f"; refused {sum(refused.values())} invalid events" if refused else ""))
    return 0


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_produce_command(subparsers: Any) -> None:
    """Register `produce` on the `profilestream` command's sub-parsers."""
    p = subparsers.add_parser("produce", help="replay a behaviour log or synthetic traffic into the events topic",
                              description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="log file to replay")
    source.add_argument("--synthetic", type=_positive(int), metavar="N", help="send N synthetic events")
    p.add_argument("--format", choices=FORMATS, default="jsonl", help="format of --data")
    pacing = p.add_mutually_exclusive_group()
    pacing.add_argument("--rate", type=_positive(float), help="events per second (default: as fast as possible)")
    pacing.add_argument("--preserve-timing", action="store_true",
                        help="keep the gaps between the events' timestamps")
    p.add_argument("--speedup", type=_positive(float), default=None,
                   help="with --preserve-timing: replay X times faster than real time (default 1)")
    p.add_argument("--users", type=_positive(int), default=10_000, help="synthetic user population")
    p.add_argument("--forever", action="store_true",
                   help="with --synthetic N: send N events over and over until SIGTERM/Ctrl-C "
                        "(an endless traffic source; pair it with --rate)")
    add_json_flag(p)
    add_quiet_flag(p)
    p.set_defaults(func=cmd_produce)

