"""The three contestants of `profilestream bench`, each run as its own process.

    python -m streams.dev.bench_modes passthrough   --bootstrap B --topic T --events N ...
    python -m streams.dev.bench_modes naive         --bootstrap B --topic T --events N --seconds S ...
    python -m streams.dev.bench_modes profilestream --bootstrap B --topic T --events N ...

Each reads the same preloaded events topic from the beginning with a consumer
group of its own, and ends by printing one line ``BENCH_RESULT {json}`` on
stdout (a worker also prints ``BENCH_READY`` once it has joined its group and
recovered its table, so the orchestrator knows when to start live traffic).
They are processes of their own because a faust worker owns its process: its
event loop, its signal handlers and its shutdown.

Rates are measured over each mode's *processing window* -- from its first
record in to its last output handed to the producer and flushed -- so start-up
(model load, group join, table recovery) is not counted against anyone.  Each
result also carries the window's bounds on the system-wide monotonic clock
(``window_monotonic``), so the orchestrator can measure the broker's CPU over
the same seconds, and the mode's own CPU share over it (``worker_cpu``, one
core = 1.0).  The ProfileStream mode adds where its batches' time went, per
pipeline stage, between the end of its warm-up and its last batch (``stages``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..pipeline.stages import STAGES, StageClock

RESULT_PREFIX = "BENCH_RESULT "
READY_LINE = "BENCH_READY"

log = logging.getLogger("profilestream.bench")


# -- shared helpers -------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process now (VmRSS)."""
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM)."""
    return _status_kb("VmHWM") * 1024


def _status_kb(field_name: str) -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:  # not Linux: fall back to the peak from getrusage (KiB on Linux, bytes on macOS)
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    return 0


@dataclass(frozen=True, slots=True)
class _Instant:
    """One end of a processing window: when (on two clocks) and the process's CPU seconds so far."""

    perf_s: float
    monotonic_s: float
    cpu_s: float

    @staticmethod
    def now() -> "_Instant":
        # process_time: all of this process's threads (the model thread's step included).
        return _Instant(time.perf_counter(), time.monotonic(), time.process_time())


def window_fields(opened: _Instant | None, closed: _Instant | None) -> dict[str, Any]:
    """The window's monotonic bounds and this process's CPU share over it (None without a window)."""
    if opened is None or closed is None or closed.perf_s <= opened.perf_s:
        return {"window_monotonic": None, "worker_cpu": None}
    return {"window_monotonic": [opened.monotonic_s, closed.monotonic_s],
            "worker_cpu": round((closed.cpu_s - opened.cpu_s) / (closed.perf_s - opened.perf_s), 3)}


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def percentiles_ms(latencies_s: np.ndarray) -> dict[str, float | None]:
    if latencies_s.size == 0:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    p50, p99, p999 = np.percentile(latencies_s, [50, 99, 99.9]) * 1000.0
    return {"p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2),
            "p999_ms": round(float(p999), 2), "max_ms": round(float(latencies_s.max() * 1000.0), 2)}


def worker_settings(args: argparse.Namespace, name: str) -> Any:
    """Settings of a bench worker: its own group, changelog and output topics on the shared input."""
    from .embedded_broker import free_port
    from ..settings import Settings
    return Settings.from_env(
        bootstrap_servers=args.bootstrap, embedded_broker=args.embedded, app_id=f"{name}-app",
        events_topic=args.topic, profiles_topic=f"{name}.profiles", dlq_topic=f"{name}.dlq",
        partitions=args.partitions, replication_factor=1,  # the bench's own one-node embedded broker
        data_dir=Path(args.data_dir), web_port=free_port(),
        web_host="127.0.0.1", device=args.device, log_level=args.log_level)


# -- (a) passthrough ------------------------------------------------------------


async def _passthrough(args: argparse.Namespace) -> dict[str, Any]:
    """Plain aiokafka: consume -> json decode -> json encode -> produce, per event, no model."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from ..service.app import fetch_max_wait_ms
    from ..kafka.client_config import aiokafka_options
    settings = worker_settings(args, args.name)
    consumer = AIOKafkaConsumer(
        args.topic, bootstrap_servers=args.bootstrap, group_id=f"{args.name}-group",
        auto_offset_reset="earliest", enable_auto_commit=True, max_poll_records=settings.batch_max,
        fetch_max_wait_ms=fetch_max_wait_ms(settings),
        fetch_max_bytes=args.fetch_max_bytes, max_partition_fetch_bytes=args.max_partition_fetch_bytes)
    # Batching as freely as the worker's own producer does.
    producer = AIOKafkaProducer(**aiokafka_options(settings), linger_ms=args.linger_ms,
                                max_batch_size=settings.producer_batch_bytes)
    await producer.start()
    await consumer.start()
    out_topic = f"{args.name}.out"
    n = 0
    started: _Instant | None = None
    deadline = time.monotonic() + args.seconds
    try:
        while n < args.events and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000, max_records=settings.batch_max)
            if started is None and batches:
                started = _Instant.now()
            for records in batches.values():
                for rec in records:
                    obj = json.loads(rec.value)
                    obj["seen"] = True
                    await producer.send(out_topic, json.dumps(obj, separators=(",", ":")).encode(), key=rec.key)
                n += len(records)
        await producer.flush()
        ended = _Instant.now()
        elapsed = ended.perf_s - started.perf_s if started else 0.0
    finally:
        await consumer.stop()
        await producer.stop()
    return {"mode": "passthrough", "events": n, "outputs": n, "seconds": round(elapsed, 3),
            "events_per_s": round(n / max(elapsed, 1e-9), 1), "peak_rss_bytes": peak_rss_bytes(),
            **window_fields(started, ended)}


# -- (b) naive per-event faust agent --------------------------------------------


def _naive(args: argparse.Namespace) -> dict[str, Any]:
    """A textbook faust agent: per event table get, one batch-1 model step, table set, publish."""
    import faust

    from ..state import codec as state_codec
    from ..pipeline.admission import admit
    from ..service.app import faust_config, fetch_max_wait_ms
    from ..kafka.fetcher import install_fetch_wait
    from ..pipeline.profile_message import profile_message
    from ..pipeline.source_record import SourceRecord
    from ..state.codec import StateRecord
    from ..kafka.topics import ensure_topics
    from ..pipeline.validate import Accepted, check_message
    from ..service.worker import load_model

    settings = worker_settings(args, args.name)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(ensure_topics(settings))
    model = load_model(settings)
    # Raw bytes in and out, as ProfileStream: the table holds the same state records.
    app = faust.App(settings.app_id, **faust_config(settings), key_serializer="raw", value_serializer="raw")
    install_fetch_wait(app, fetch_max_wait_ms(settings))  # the same fetch wait as ProfileStream
    source = app.topic(settings.events_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=settings.partitions)
    profiles = app.topic(settings.profiles_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw")
    table = app.Table("naive-state", partitions=settings.partitions, key_type=bytes, value_type=bytes)
    window = _Window(args.events, args.seconds)

    @app.agent(source)
    async def naive_agent(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            window.start()
            record = SourceRecord(msg.topic, msg.partition, msg.offset, int(msg.timestamp * 1000), msg.key,
                                  msg.value)
            try:
                ev = check_message(msg.key, msg.value, int(time.time() * 1000))
            except Exception:  # noqa: BLE001 - the bench's input is all valid; count and move on
                window.add(1)
                continue
            raw = table.get(msg.key)
            stored = state_codec.decode(raw) if raw is not None else None
            state = model.decode_state(stored.model_state) if stored is not None else None
            adm = admit([Accepted(record, ev)], stored, state.last_timestamp_ms if state else None)
            if adm.apply:
                result = model.advance([state], [[ev]])
                new = result.states[0]
                table[msg.key] = state_codec.encode(StateRecord(
                    model.fingerprint, adm.last_offset, adm.recent_ids, model.encode_state(new)))
                now_ms = int(time.time() * 1000)
                value = profile_message(ev.user_id, model.version, now_ms, new.n_events, new.last_timestamp_ms,
                                        result.profile[0], result.intent[0], result.top_categories[0])
                await profiles.send(key=msg.key, value=value)
                window.latencies.append(now_ms - record.timestamp_ms)
            window.add(1)
            if window.done():
                window.stop_process()

    @app.timer(1.0)
    async def stop_when_over_budget() -> None:
        if window.done():
            window.stop_process()

    worker = faust.Worker(app, loglevel=settings.log_level, loop=loop, quiet=True, redirect_stdouts=False)
    worker.spinner = None  # see --log-level
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    return {"mode": "naive", "events": window.n, "outputs": window.n, "seconds": round(window.elapsed, 3),
            "events_per_s": round(window.n / max(window.elapsed, 1e-9), 1),
            "time_limited": window.n < args.events, "peak_rss_bytes": peak_rss_bytes(),
            **window_fields(window.opened, window.closed)}


@dataclass
class _Window:
    """Counts events over the processing window and stops the worker at the target or deadline."""

    target: int
    budget_s: float
    n: int = 0
    opened: _Instant | None = None
    closed: _Instant | None = None
    stopping: bool = False
    latencies: list[int] = field(default_factory=list)

    def start(self) -> None:
        if self.opened is None:
            self.opened = _Instant.now()

    def add(self, n: int) -> None:
        self.n += n
        self.closed = _Instant.now()

    def done(self) -> bool:
        return self.n >= self.target or (self.opened is not None
                                         and time.perf_counter() - self.opened.perf_s >= self.budget_s)

    @property
    def elapsed(self) -> float:
        if self.opened is None or self.closed is None:
            return 0.0
        return self.closed.perf_s - self.opened.perf_s

    def stop_process(self) -> None:
        if not self.stopping:
            self.stopping = True
            os.kill(os.getpid(), signal.SIGTERM)


# -- (c) ProfileStream ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _StageMark:
    """The worker's counters at the end of one batch: a stage breakdown is the difference of two."""

    batches: int
    seconds: dict[str, float]
    events: int
    busy_s: float
    overlap_s: float
    flushes: int
    perf_s: float


def stage_breakdown(start: _StageMark | None, end: _StageMark | None) -> dict[str, Any] | None:
    """Mean wall microseconds per batch of each stage between two marks, and the flush per commit.

    ``flush`` (the write-behind cache's write at each commit) is kept out of the
    per-batch figures: commits come by timer, not per batch.  ``handoff`` (the
    fetch loop's turn between a fetched batch and its handler) is in the sum but
    outside ``batch_us``, the wall time in which a batch was being prepared or
    applied; with overlap a batch's stages may add up to ``batch_us`` plus
    ``overlap_us``.
    """
    if start is None or end is None or end.batches <= start.batches:
        return None
    batches = end.batches - start.batches
    stages = {stage: round((end.seconds[stage] - start.seconds[stage]) / batches * 1e6, 1)
              for stage in STAGES if stage != "flush"}
    total = sum(stages.values())
    flushes = end.flushes - start.flushes
    flush_s = end.seconds["flush"] - start.seconds["flush"]
    window_s = end.perf_s - start.perf_s
    return {"batches": batches, "events_per_batch": round((end.events - start.events) / batches, 1),
            "batch_us": round((end.busy_s - start.busy_s) / batches * 1e6, 1),
            "overlap_us": round((end.overlap_s - start.overlap_s) / batches * 1e6, 1),
            "us_per_batch": stages, "sum_us": round(total, 1),
            "all_but_model_step_us": round(total - stages["model_step"], 1),
            "flush": {"commits": flushes, "us_per_commit": round(flush_s / flushes * 1e6, 1) if flushes else None,
                      "ms_per_s": round(flush_s / window_s * 1e3, 2) if window_s > 0 else None}}


@dataclass
class _Recorder:
    """Processor listener: progress, latencies, RSS samples, stage marks; stops the worker at the target.

    Every record counts towards the target, but the rate window opens at the end
    of the first batch: that batch pays one-off costs (lazy torch init, first
    RocksDB opens) and its start time is not known here.  The stage breakdown
    starts at the first batch that ends after the warm-up.
    """

    target: int
    budget_s: float
    store: Any
    rss_points: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    warmup_s: float = 0.0
    processed: int = 0
    in_window: int = 0
    opened: _Instant | None = None
    closed: _Instant | None = None
    latencies: list[np.ndarray] = field(default_factory=list)
    batches: int = 0
    outputs: int = 0
    rss: list[dict[str, Any]] = field(default_factory=list)
    stopping: bool = False
    busy_s: float = 0.0
    overlap_s: float = 0.0
    publish_s: float = 0.0
    flushes: int = 0
    clock: StageClock | None = None
    #: The processor's write-behind state cache (streams/state/cache.py), counted beside RocksDB.
    states: Any = None
    stage_start: _StageMark | None = None
    stage_end: _StageMark | None = None
    _next_point: int = 0
    _active: int = 0
    _active_since: float = 0.0

    def instrument(self, processor: Any) -> None:
        """Time the processor's batches and its profile sends (where the worker's time goes),
        and count its flushes (one per commit)."""
        prepare, apply, profiles, flush = (processor.prepare, processor.apply, processor.publisher.profiles,
                                           processor.flush)
        self.clock, self.states = processor.clock, processor.states

        def timed_prepare(records: Any) -> Any:
            self._busy(+1)
            try:
                return prepare(records)
            finally:
                self._busy(-1)

        async def timed_apply(batch: Any) -> Any:
            self._busy(+1)
            try:
                return await apply(batch)
            finally:
                self._busy(-1)

        async def timed_profiles(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await profiles(*args)
            finally:
                self.publish_s += time.perf_counter() - t0

        async def counted_flush() -> None:
            self.flushes += 1
            await flush()

        processor.prepare, processor.apply, processor.flush = timed_prepare, timed_apply, counted_flush
        processor.publisher.profiles = timed_profiles

    def _busy(self, change: int) -> None:
        """Count the wall time in which a batch is being prepared or applied, and in which
        one is prepared while the previous one is applied (streams/kafka/fetcher.py)."""
        now = time.perf_counter()
        if self._active:
            self.busy_s += now - self._active_since
        if self._active > 1:
            self.overlap_s += now - self._active_since
        self._active += change
        self._active_since = now

    def _mark(self, now: float) -> _StageMark | None:
        """The counters now, the busy interval still open (this batch's apply) included."""
        if self.clock is None:
            return None
        open_s = now - self._active_since if self._active else 0.0
        batches, seconds = self.clock.snapshot()
        return _StageMark(batches, seconds, self.processed, self.busy_s + open_s,
                          self.overlap_s + (open_s if self._active > 1 else 0.0), self.flushes, now)

    def on_batch(self, report: Any, latencies_s: np.ndarray) -> None:
        instant = _Instant.now()
        now = instant.perf_s
        if self.opened is None:
            self.opened = instant
        else:
            self.in_window += report.records
            self.closed = instant
        self.processed += report.records
        self.batches += 1
        self.outputs += report.users
        if now - self.opened.perf_s >= self.warmup_s:
            self.latencies.append(latencies_s)
            if self.stage_start is None:
                self.stage_start = self._mark(now)
            else:
                self.stage_end = self._mark(now)
        while (self._next_point < len(self.rss_points)
               and self.processed >= self.rss_points[self._next_point] * self.target):
            # RocksDB gets a cached user's state only at a commit or an eviction: both counts.
            self.rss.append({"fraction": self.rss_points[self._next_point], "events": self.processed,
                             "rss_bytes": rss_bytes(), "users_cached": count_users(self.store),
                             "users_in_cache": len(self.states) if self.states is not None else None})
            self._next_point += 1
        self.check()

    def check(self) -> None:
        """Stop at the target, or when the time budget is spent (also called from a timer)."""
        if self.stopping:
            return
        over = self.opened is not None and time.perf_counter() - self.opened.perf_s >= self.budget_s
        if self.processed >= self.target or over:
            self.stopping = True
            os.kill(os.getpid(), signal.SIGTERM)

    @property
    def elapsed(self) -> float:
        return 0.0 if self.opened is None or self.closed is None else self.closed.perf_s - self.opened.perf_s


def count_users(store: Any) -> int:
    """Users held in the worker's RocksDB state (exact: RocksDB's own estimate counts overwrites)."""
    from ..internals import open_partitions, partition_db
    total = 0
    for partition in open_partitions(store.table):
        total += sum(1 for _ in partition_db(store.table, partition).keys())
    return total


def _profilestream(args: argparse.Namespace) -> dict[str, Any]:
    from ..service.app import ProfileStreamApp
    from ..service.web import is_ready
    from ..service.worker import run_worker

    settings = worker_settings(args, args.name)
    holder: dict[str, Any] = {}

    def customize(service: ProfileStreamApp) -> None:
        rec = _Recorder(args.events, args.seconds, service.store, warmup_s=args.warmup)
        service.processor.listeners.append(rec.on_batch)
        rec.instrument(service.processor)
        holder["recorder"] = rec

        @service.app.timer(1.0)
        async def stop_when_over_budget() -> None:
            rec.check()

        @service.app.timer(0.1)
        async def announce_ready() -> None:
            if not holder.get("ready") and is_ready(service.app) and service.app.consumer.assignment():
                holder["ready"] = True
                sys.stdout.write(READY_LINE + "\n")
                sys.stdout.flush()

    run_worker(settings, customize)
    rec: _Recorder = holder["recorder"]
    n = rec.in_window
    elapsed = rec.elapsed
    lat = np.concatenate(rec.latencies) if rec.latencies else np.zeros(0)
    return {"mode": args.mode_label, "events": rec.processed, "window_events": n, "outputs": rec.outputs,
            "batches": rec.batches, "seconds": round(elapsed, 3), "events_per_s": round(n / max(elapsed, 1e-9), 1),
            "mean_batch": round(rec.processed / max(rec.batches, 1), 1), "latency": percentiles_ms(lat),
            "latency_samples": int(lat.size), "busy_s": round(rec.busy_s, 3),
            "overlap_s": round(rec.overlap_s, 3),
            "publish_wait_s": round(rec.publish_s, 3), "rss": rec.rss,
            # Linux folds the current RSS into VmHWM only at some points (e.g. an unmap), so
            # VmHWM can read a few pages below a VmRSS sampled earlier (seen once in CI).
            "peak_rss_bytes": max([peak_rss_bytes(), *(s["rss_bytes"] for s in rec.rss)]),
            "time_limited": rec.processed < args.events, "state_cache_users": settings.state_cache_users,
            "stages": stage_breakdown(rec.stage_start, rec.stage_end), **window_fields(rec.opened, rec.closed)}


# -- command line ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streams.dev.bench_modes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("passthrough", "naive", "profilestream"))
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True, help="the preloaded events topic")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--events", type=int, required=True, help="stop after this many events")
    p.add_argument("--seconds", type=float, default=600.0, help="...or after this long processing")
    p.add_argument("--name", required=True, help="group / app id / output topic prefix of this run")
    p.add_argument("--mode-label", default="profilestream", help="the result's 'mode' (profilestream only)")
    p.add_argument("--data-dir", default=".profilestream-bench", help="RocksDB directory (workers)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--embedded", type=int, default=1, help="1: apply the embedded broker's workarounds")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds of latencies to leave out")
    p.add_argument("--linger-ms", type=int, default=0, help="producer linger (passthrough)")
    p.add_argument("--fetch-max-bytes", type=int, default=52_428_800)
    p.add_argument("--max-partition-fetch-bytes", type=int, default=1_048_576)
    # "info", the service's default: at warning or above faust's start-up spinner sets the root
    # logger to DEBUG for good, and every aiokafka debug record is then built (a visible CPU share).
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.mode == "passthrough":
        result = asyncio.run(_passthrough(args))
    elif args.mode == "naive":
        result = _naive(args)
    else:
        result = _profilestream(args)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
