"""`profilestream demo`: the whole product on one machine with no configuration.

Starts the embedded broker, a worker, a traffic source (synthetic funnel
traffic, or a real log with ``--data``) and a profile follower, logs a live
summary every few seconds, and on Ctrl-C or ``--duration`` stops everything and
removes its temporary data.
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
from dataclasses import dataclass, field
from pathlib import Path

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
from .traffic import SyntheticTraffic
from ..service.worker import run_worker

log = logging.getLogger("profilestream.demo")


@dataclass
class DemoOptions:
    rate: float = 500.0
    users: int = 2_000
    duration_s: float | None = None
    summary_every_s: float = 5.0
    data: Path | None = None
    data_format: str = "jsonl"
    dump_profiles: Path | None = None


@dataclass
class LiveStats:
    """Rolling figures for the summary line, fed once per processed batch."""

    events: int = 0
    latencies: list[np.ndarray] = field(default_factory=list)
    last_summary: float = field(default_factory=time.monotonic)

    def on_batch(self, report: BatchReport, latencies_s: np.ndarray) -> None:
        self.events += report.records
        self.latencies.append(latencies_s)

    def take(self) -> tuple[float, float, float]:
        """(events/s, p50 s, p99 s) since the previous call."""
        now = time.monotonic()
        rate = self.events / max(now - self.last_summary, 1e-9)
        lat = np.concatenate(self.latencies) if self.latencies else np.zeros(0)
        p50, p99 = (np.percentile(lat, [50, 99]) if lat.size else (float("nan"), float("nan")))
        self.events, self.latencies, self.last_summary = 0, [], now
        return rate, float(p50), float(p99)


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


async def follow_profiles(settings: Settings, latest: dict[str, dict], until_end: bool = False) -> None:
    """Keep the latest profile per user, as a downstream ranker would.

    With ``until_end`` it stops once it has read everything published so far.
    """
    consumer = AIOKafkaConsumer(**aiokafka_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await assign_whole_topic(consumer, settings.profiles_topic)
        ends = (await end_offsets(consumer, tps, settings)
                if until_end else {})
        while not (until_end and await caught_up(consumer, ends)):
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                for msg in messages:
                    if msg.value is None:
                        latest.pop(msg.key.decode(), None)
                    else:
                        latest[msg.key.decode()] = json.loads(msg.value)
    finally:
        await consumer.stop()


def summary_line(rate: float, p50: float, p99: float, latest: dict[str, dict]) -> str:
    line = f"{rate:8.0f} events/s | event->profile p50 {p50 * 1000:6.1f} ms p99 {p99 * 1000:6.1f} ms " \
           f"| {len(latest)} users"
    if latest:
        user, prof = max(latest.items(), key=lambda kv: kv[1]["event_count"])
        intent = " ".join(f"{k}={v:.2f}" for k, v in prof["intent"].items())
        line += f" | {user} ({prof['event_count']} events) next: {intent}"
    return line


def run_demo(opts: DemoOptions) -> None:
    events = None
    if opts.data is not None:
        from models.loaders import load_events
        loaded = load_events(opts.data, opts.data_format)
        events = loaded.events
        log.info("loaded %d events from %s (%d malformed rows skipped)", len(events), opts.data,
                 loaded.malformed_total)
    workdir = Path(tempfile.mkdtemp(prefix="profilestream-demo-"))
    latest: dict[str, dict] = {}
    try:
        with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
            settings = Settings.from_env(
                bootstrap_servers=broker.bootstrap_servers, embedded_broker=True, replication_factor=1,
                data_dir=workdir / "state", web_port=free_port(), web_host="127.0.0.1")
            log.info("metrics and health on http://127.0.0.1:%d/metrics", settings.web_port)

            def customize(service: ProfileStreamApp) -> None:
                stats = LiveStats()
                service.processor.listeners.append(stats.on_batch)
                app = service.app

                @app.task
                async def traffic() -> None:
                    await produce_events(settings, events, opts)

                @app.task
                async def follower() -> None:
                    await follow_profiles(settings, latest)

                @app.timer(opts.summary_every_s)
                async def summary() -> None:
                    log.info(summary_line(*stats.take(), latest))

                if opts.duration_s is not None:
                    @app.task
                    async def stop_later() -> None:
                        await asyncio.sleep(opts.duration_s)
                        os.kill(os.getpid(), signal.SIGTERM)

            run_worker(settings, customize)
            asyncio.run(follow_profiles(settings, latest, until_end=True))
    finally:
        if opts.dump_profiles is not None:
            with open(opts.dump_profiles, "w") as out:
                for profile in latest.values():
                    out.write(json.dumps(profile) + "\n")
            log.info("wrote %d profiles to %s", len(latest), opts.dump_profiles)
        shutil.rmtree(workdir, ignore_errors=True)
