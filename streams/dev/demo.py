"""`profilestream demo`: the whole product on one machine with no configuration.

Starts the embedded broker, a worker, a traffic source (synthetic funnel
traffic, or a real log with ``--data``) and a profile follower, logs a live
summary every few seconds, and on Ctrl-C, ``--duration`` or a memory limit
(streams/dev/demo_limits.py) stops everything and removes its temporary data.
Left running, it must not exhaust the machine: the follower keeps a bounded
number of profiles, and the embedded broker, which keeps every record, is
watched and the demo stopped before it grows past its limit.
``python -m streams.dev.soak`` runs the same pipeline and samples it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from models.events import Event, event_to_dict

from ..service.app import ProfileStreamApp
from .embedded_broker import EmbeddedBroker, free_port
from ..kafka.end_offsets import end_offsets
from ..kafka.client_config import aiokafka_options
from ..pipeline.processor import BatchReport
from ..settings import Settings
from ..kafka.topics import assign_whole_topic, caught_up
from .demo_limits import DEFAULT_KEEP_PROFILES, MIB, MemoryLimits
from .proc_stats import available_memory_bytes, sample
from .traffic import SyntheticTraffic
from ..service.worker import run_worker

log = logging.getLogger("profilestream.demo")

#: Partitions of the demo's topics.  Its one worker gains nothing from more, and the
#: embedded broker's memory per record falls as batches grow (docs/embedded-broker.md):
#: with the default 8 its memory grew ~1.5x as fast and its CPU 5-7x as fast (docs/performance.md "Soak").
DEMO_PARTITIONS = 1


@dataclass
class DemoOptions:
    rate: float = 500.0
    users: int = 2_000
    duration_s: float | None = None
    #: Seconds between summary lines; None: no summary (the soak prints its own rows).
    summary_every_s: float | None = 5.0
    data: Path | None = None
    data_format: str = "jsonl"
    dump_profiles: Path | None = None
    #: Profiles the follower keeps (the most recently updated users'), and so the most a dump holds.
    keep_profiles: int = DEFAULT_KEEP_PROFILES
    limits: MemoryLimits = field(default_factory=MemoryLimits)
    #: Seconds between two checks of the memory limits.
    guard_every_s: float = 2.0


@dataclass
class Window:
    """What the worker did between two :meth:`LiveStats.take` calls."""

    events: int
    seconds: float
    p50_s: float
    p99_s: float

    @property
    def rate(self) -> float:
        return self.events / max(self.seconds, 1e-9)


@dataclass
class LiveStats:
    """Rolling figures for a summary line or a soak row, fed once per processed batch."""

    events: int = 0
    latencies: list[np.ndarray] = field(default_factory=list)
    last_take: float = field(default_factory=time.monotonic)

    def on_batch(self, report: BatchReport, latencies_s: np.ndarray) -> None:
        self.events += report.records
        self.latencies.append(latencies_s)

    def take(self) -> Window:
        """Events and event->profile latency percentiles since the previous call."""
        now = time.monotonic()
        lat = np.concatenate(self.latencies) if self.latencies else np.zeros(0)
        p50, p99 = (np.percentile(lat, [50, 99]) if lat.size else (float("nan"), float("nan")))
        window = Window(self.events, now - self.last_take, float(p50), float(p99))
        self.events, self.latencies, self.last_take = 0, [], now
        return window


def encode_event(event: Event) -> tuple[bytes, bytes]:
    """Kafka key and value of an event, per the event contract."""
    return event.user_id.encode(), json.dumps(event_to_dict(event), separators=(",", ":")).encode()


async def produce_events(settings: Settings, events: list[Event] | None, opts: DemoOptions) -> None:
    """Send a real log (``events``) or endless synthetic traffic at ``opts.rate`` events/s."""
    producer = AIOKafkaProducer(**aiokafka_options(settings), linger_ms=5)
    await producer.start()
    try:
        traffic = SyntheticTraffic(users=opts.users, seed=int(time.time()))
        sent, started = 0, time.monotonic()
        chunk = max(1, int(opts.rate / 20))
        while events is None or sent < len(events):
            batch = (events[sent:sent + chunk] if events is not None
                     else traffic.events(chunk, int(time.time() * 1000), 1000.0 / opts.rate))
            for event in batch:
                key, value = encode_event(event)
                await producer.send(settings.events_topic, value, key=key)
            sent += len(batch)
            ahead = sent / opts.rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        await producer.flush()
        log.info("replayed all %d events of the log", sent)
    finally:
        await producer.stop()


class ProfileFollower:
    """The latest profile of the most recently updated users, as a downstream ranker would keep it.

    At most ``keep`` profiles are held, least recently updated dropped first: a
    parsed profile costs a few KiB, so keeping every user's grew the demo by
    ~100 MiB a minute at 200,000 users.  It remembers how far it has read, so
    the final catch-up before a dump reads only what came after.
    """

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError("the follower must keep at least one profile")
        self.keep = keep
        self.latest: OrderedDict[str, dict] = OrderedDict()
        #: Partition -> offset of the next profile message to read.
        self.positions: dict[int, int] = {}

    def apply(self, partition: int, offset: int, key: bytes, value: bytes | None) -> None:
        """Take one profile message (a tombstone, value None, forgets the user)."""
        user = key.decode()
        if value is None:
            self.latest.pop(user, None)
        else:
            self.latest[user] = json.loads(value)
            self.latest.move_to_end(user)
            if len(self.latest) > self.keep:
                self.latest.popitem(last=False)
        self.positions[partition] = offset + 1

    async def follow(self, settings: Settings, until_end: bool = False) -> None:
        """Read the profile topic from where this follower stopped (the start, the first time).

        With ``until_end`` it stops once it has read everything published so far.
        """
        consumer = AIOKafkaConsumer(**aiokafka_options(settings), enable_auto_commit=False)
        await consumer.start()
        try:
            tps = await assign_whole_topic(consumer, settings.profiles_topic)
            for tp in tps:
                if tp.partition in self.positions:
                    consumer.seek(tp, self.positions[tp.partition])
            ends = (await end_offsets(consumer, tps, settings)
                    if until_end else {})
            while not (until_end and await caught_up(consumer, ends)):
                batches = await consumer.getmany(timeout_ms=500)
                for messages in batches.values():
                    for msg in messages:
                        self.apply(msg.partition, msg.offset, msg.key, msg.value)
        finally:
            await consumer.stop()

    def dump(self, path: Path) -> None:
        with open(path, "w") as out:
            for profile in self.latest.values():
                out.write(json.dumps(profile) + "\n")
        log.info("wrote %d profiles to %s (the most recently updated users', --keep-profiles %d)",
                 len(self.latest), path, self.keep)


def summary_line(window: Window, users_in_state: int, broker_rss_bytes: int | None,
                 latest: dict[str, dict]) -> str:
    line = f"{window.rate:8.0f} events/s | event->profile p50 {window.p50_s * 1000:6.1f} ms " \
           f"p99 {window.p99_s * 1000:6.1f} ms | {users_in_state} users"
    if broker_rss_bytes is not None:
        line += f" | broker {broker_rss_bytes / MIB:,.0f} MiB"
    if latest:
        user, prof = max(latest.items(), key=lambda kv: kv[1]["event_count"])
        intent = " ".join(f"{k}={v:.2f}" for k, v in prof["intent"].items())
        line += f" | {user} ({prof['event_count']} events) next: {intent}"
    return line


@dataclass
class DemoRun:
    """A running demo, handed to an extension (the soak's sampler) and returned when it ends."""

    options: DemoOptions
    broker: EmbeddedBroker
    follower: ProfileFollower
    #: Why the memory guard stopped the demo; None when it did not.
    stopped_by_limit: str | None = None
    _stopping: bool = field(default=False, repr=False)

    def stop(self) -> None:
        """Stop the demo as Ctrl-C does: the worker shuts down, then the demo cleans up."""
        if not self._stopping:
            self._stopping = True
            os.kill(os.getpid(), signal.SIGTERM)

    def check_limits(self) -> None:
        """Stop the demo, saying why, once the broker or the machine's memory crosses its limit."""
        if self._stopping:
            return
        broker = sample(self.broker.pid)
        reason = self.options.limits.breach(broker.rss_bytes if broker else None, available_memory_bytes())
        if reason is not None:
            self.stopped_by_limit = reason
            log.warning("stopping the demo: %s", reason)
            self.stop()


#: Adds tasks, timers or batch listeners to the demo's worker (the soak's sampler).
Extension = Callable[[ProfileStreamApp, DemoRun], None]


def run_demo(opts: DemoOptions, extend: Extension | None = None) -> DemoRun:
    events = None
    if opts.data is not None:
        from models.loaders import load_events
        loaded = load_events(opts.data, opts.data_format)
        events = loaded.events
        log.info("loaded %d events from %s (%d malformed rows skipped)", len(events), opts.data,
                 loaded.malformed_total)
    workdir = Path(tempfile.mkdtemp(prefix="profilestream-demo-"))
    follower = ProfileFollower(opts.keep_profiles)
    try:
        with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
            run = DemoRun(opts, broker, follower)
            settings = Settings.from_env(
                bootstrap_servers=broker.bootstrap_servers, embedded_broker=True, replication_factor=1,
                partitions=DEMO_PARTITIONS, data_dir=workdir / "state", web_port=free_port(),
                web_host="127.0.0.1")
            log.info("metrics and health on http://127.0.0.1:%d/metrics", settings.web_port)

            def customize(service: ProfileStreamApp) -> None:
                app = service.app

                @app.task
                async def traffic() -> None:
                    await produce_events(settings, events, opts)

                @app.task
                async def follow() -> None:
                    await follower.follow(settings)

                @app.timer(opts.guard_every_s)
                async def guard() -> None:
                    run.check_limits()

                if opts.summary_every_s is not None:
                    stats = LiveStats()
                    service.processor.listeners.append(stats.on_batch)

                    @app.timer(opts.summary_every_s)
                    async def summary() -> None:
                        broker_now = sample(broker.pid)
                        log.info(summary_line(stats.take(), service.store.count(),
                                              broker_now.rss_bytes if broker_now else None, follower.latest))

                if opts.duration_s is not None:
                    @app.task
                    async def stop_later() -> None:
                        await asyncio.sleep(opts.duration_s)
                        run.stop()

                if extend is not None:
                    extend(service, run)

            run_worker(settings, customize)
            if opts.dump_profiles is not None:
                asyncio.run(follower.follow(settings, until_end=True))
    finally:
        if opts.dump_profiles is not None:
            follower.dump(opts.dump_profiles)
        shutil.rmtree(workdir, ignore_errors=True)
    return run
