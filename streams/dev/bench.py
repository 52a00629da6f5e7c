"""`profilestream bench`: ProfileStream against a passthrough ceiling and a naive faust agent.

One run, one embedded broker, one preloaded events topic (the demo's realistic
synthetic mix), and four measurements, each in a process of its own and with a
consumer group of its own reading the topic from the beginning:

a. passthrough  -- plain aiokafka consume -> JSON decode -> encode -> produce,
                   per event, no model: the ceiling of any Python consumer here;
b. naive        -- a textbook faust agent: per event ``table[key]`` get, one
                   batch-1 model step, ``table[key]`` set, publish (time-boxed:
                   it is slow);
c. profilestream -- the real worker (``run_worker``) on the same topic;
d. latency      -- a fresh worker on a fresh topic, fed by a rate-limited
                   producer at half of (c)'s rate: event->profile p50/p99/p99.9;
                   then the same at lower fractions of (c) (``--latency-loads``),
                   and the highest of them at which p99 met the 100 ms target:
                   the worker's latency envelope, relative to (c) of the same
                   run, so it compares across days whose machine speed differs.

Rates are over each mode's processing window (first record in to last record
done), so start-up is not counted.  RSS is sampled in the worker at 25/50/75/100%
of the events, next to the number of users in its state store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .bench_modes import READY_LINE, RESULT_PREFIX
from ..pipeline.partitioning import partition_for
from ..kafka.record_batches import send_records

log = logging.getLogger("profilestream.bench")

REPO = Path(__file__).resolve().parents[2]
#: The event->profile p99 target at half of (c)'s rate (issue 4), which the report checks.
P99_TARGET_MS = 100.0


@dataclass
class BenchOptions:
    events: int = 300_000
    users: int = 10_000
    partitions: int = 8
    naive_seconds: float = 25.0
    latency_seconds: float = 20.0
    #: Offered loads of the latency runs, as fractions of (c), run in this order; 0.5 is the target's load.
    latency_loads: tuple[float, ...] = (0.5, 0.25, 0.125, 0.0625)
    latency_rate: float | None = None
    device: str = "cpu"
    modes: tuple[str, ...] = ("passthrough", "naive", "profilestream", "latency")
    seed: int = 7
    workdir: Path | None = None
    verbose: bool = False


# -- producing ------------------------------------------------------------------


def make_messages(n: int, users: int, seed: int, start_ms: int, gap_ms: float = 1.0) -> list[tuple[bytes, bytes]]:
    """``n`` encoded (key, value) events of the demo's synthetic traffic."""
    from .demo import encode_event
    from .traffic import SyntheticTraffic
    traffic = SyntheticTraffic(users=users, seed=seed)
    out: list[tuple[bytes, bytes]] = []
    chunk = 50_000
    while len(out) < n:
        k = min(chunk, n - len(out))
        out.extend(encode_event(e) for e in traffic.events(k, start_ms + int(len(out) * gap_ms), gap_ms))
    return out


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def preload(bootstrap: str, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> float:
    """Produce everything as fast as possible; returns events/s.

    This producer batches (the embedded broker's end-offset quirk only affects
    readers that stop at end offsets; every bench mode counts records instead).
    """
    from aiokafka import AIOKafkaProducer
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    started = time.perf_counter()
    try:
        for key, value in messages:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()
    return len(messages) / (time.perf_counter() - started)


async def produce_at_rate(bootstrap: str, topic: str, messages: Sequence[tuple[bytes, bytes]],
                          rate: float) -> float:
    """Send ``messages`` at ``rate`` events/s in 10 ms ticks; record timestamps are the send time.

    Each tick's records go out as one record batch per partition, as a
    website's producers with ``linger.ms`` >= 10 would send them.  The
    generator shares this machine's two cores with the broker and the worker
    under test: one ``send`` per record cost it CPU time per record and the
    broker a produce request per record (see streams/kafka/record_batches.py).
    """
    from aiokafka import AIOKafkaProducer
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        count = len(await producer.partitions_for(topic))
        targets = [partition_for(key, count) for key, _ in messages]
        started = time.monotonic()
        sent = 0
        tick = 0.01
        while sent < len(messages):
            due = min(len(messages), int((time.monotonic() - started) * rate) + 1)
            by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
            for i in range(sent, due):
                by_partition.setdefault(targets[i], []).append(messages[i])
            for partition, records in by_partition.items():
                await send_records(producer, topic, partition, records)
            sent = due
            await asyncio.sleep(tick)
        await producer.flush()
        return sent / (time.monotonic() - started)
    finally:
        await producer.stop()


# -- running modes ----------------------------------------------------------------


class ModeProcess:
    """``python -m streams.dev.bench_modes ...`` with its stdout watched for the ready and result lines."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.result: dict[str, Any] | None = None
        self.ready = threading.Event()
        with open(log_path, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "streams.dev.bench_modes", *args], cwd=REPO,
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "a") as out:  # the worker logs to stdout (faust's default)
            for line in self.proc.stdout:
                out.write(line)
                self._parse(line)

    def _parse(self, line: str) -> None:
        # Markers are searched for, not expected at the start of a line: faust may write
        # terminal control codes to stdout too.
        if RESULT_PREFIX in line:
            self.result = json.loads(line[line.index(RESULT_PREFIX) + len(RESULT_PREFIX):])
        elif READY_LINE in line:
            self.ready.set()

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"bench mode timed out after {timeout:.0f}s:\n{self.log_tail()}") from None
        self._reader.join(timeout=5)
        if self.proc.returncode != 0 or self.result is None:
            raise RuntimeError(f"bench mode exited {self.proc.returncode} without a result:\n{self.log_tail()}")
        return self.result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"


def mode_args(mode: str, bootstrap: str, topic: str, events: int, name: str, workdir: Path,
              opts: BenchOptions, **extra: Any) -> list[str]:
    args = [mode, "--bootstrap", bootstrap, "--topic", topic, "--events", str(events), "--name", name,
            "--partitions", str(opts.partitions), "--data-dir", str(workdir / name), "--device", opts.device]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def run_mode(args: list[str], workdir: Path, timeout: float) -> dict[str, Any]:
    proc = ModeProcess(args, workdir / f"{args[args.index('--name') + 1]}.log")
    try:
        return proc.wait(timeout)
    finally:
        proc.kill()


# -- the whole bench ----------------------------------------------------------------


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    from .embedded_broker import EmbeddedBroker

    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="profilestream-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    keep = opts.workdir is not None
    report: dict[str, Any] = {
        "config": {"events": opts.events, "users": opts.users, "partitions": opts.partitions,
                   "device": opts.device, "naive_seconds": opts.naive_seconds,
                   "latency_seconds": opts.latency_seconds,
                   "latency_loads": None if opts.latency_rate else list(opts.latency_loads),
                   "batch_max": int(os.environ.get("PROFILESTREAM_BATCH_MAX", "0")) or None,
                   "cpus": os.cpu_count(), "python": platform.python_version(),
                   "broker": "embedded (Tansu, memory)"},
    }
    try:
        with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
            bootstrap = broker.bootstrap_servers
            topic = "bench.events"
            now_ms = int(time.time() * 1000)
            messages = make_messages(opts.events, opts.users, opts.seed, now_ms - opts.events)
            asyncio.run(create_topic(bootstrap, topic, opts.partitions))
            report["preload_events_per_s"] = round(asyncio.run(preload(bootstrap, topic, messages)), 1)
            del messages
            log.info("preloaded %d events (%d users) at %.0f/s", opts.events, opts.users,
                     report["preload_events_per_s"])
            budget = max(120.0, opts.events / 500.0)
            if "passthrough" in opts.modes:
                report["passthrough"] = run_mode(mode_args("passthrough", bootstrap, topic, opts.events,
                                                           "bench-pass", workdir, opts, linger_ms=5),
                                                 workdir, budget)
                log.info("passthrough: %.0f events/s", report["passthrough"]["events_per_s"])
            if "naive" in opts.modes:
                report["naive"] = run_mode(mode_args("naive", bootstrap, topic, opts.events, "bench-naive",
                                                     workdir, opts, seconds=opts.naive_seconds),
                                           workdir, opts.naive_seconds + 180)
                log.info("naive agent: %.0f events/s", report["naive"]["events_per_s"])
            if "profilestream" in opts.modes:
                report["profilestream"] = run_mode(mode_args("profilestream", bootstrap, topic, opts.events,
                                                             "bench-ps", workdir, opts), workdir, budget)
                log.info("profilestream: %.0f events/s", report["profilestream"]["events_per_s"])
            if "latency" in opts.modes:
                curve = run_latency_curve(bootstrap, workdir, opts,
                                          report.get("profilestream", {}).get("events_per_s", 2000.0))
                report["latency"] = half_load_run(curve) or curve[0]
                report["latency_curve"] = curve
                report["latency_target"] = latency_target(curve)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    ps, pt, nv = (report.get(k, {}).get("events_per_s") for k in ("profilestream", "passthrough", "naive"))
    report["ratios"] = {"profilestream_vs_passthrough": round(ps / pt, 3) if ps and pt else None,
                        "profilestream_vs_naive": round(ps / nv, 1) if ps and nv else None}
    return report


def run_latency_curve(bootstrap: str, workdir: Path, opts: BenchOptions, max_rate: float) -> list[dict[str, Any]]:
    """One latency run per offered load (``--latency-rate``, or each ``latency_loads`` fraction of
    ``max_rate``), in order; each result carries its ``load`` (None for an explicit rate)."""
    loads: Sequence[float | None] = [None] if opts.latency_rate else opts.latency_loads
    curve = []
    for i, load in enumerate(loads):
        rate = opts.latency_rate if load is None else load * max_rate
        result = run_latency(bootstrap, workdir, opts, rate, f"bench-live-{i}")
        result["load"] = load
        result["profiles_per_event"] = round(result["outputs"] / max(result["events"], 1), 3)
        log.info("latency at %.0f events/s: %s", rate, result["latency"])
        curve.append(result)
    return curve


def half_load_run(curve: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run at half of (c), the target's load, if the curve has one."""
    return next((run for run in curve if run["load"] == 0.5), None)


def latency_target(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """The p99 target at half load (None without a half-load run), and the highest load that met it."""
    met = [r for r in curve if r["latency"]["p99_ms"] is not None and r["latency"]["p99_ms"] <= P99_TARGET_MS]
    half = half_load_run(curve)
    best = max(met, key=lambda r: r["offered_events_per_s"], default=None)
    return {"p99_ms": P99_TARGET_MS, "met_at_half_load": None if half is None else half in met,
            "highest_load_met": None if best is None else best["load"],
            "highest_rate_met": None if best is None else best["offered_events_per_s"]}


def run_latency(bootstrap: str, workdir: Path, opts: BenchOptions, rate: float, name: str) -> dict[str, Any]:
    """A fresh worker on a fresh topic (both called ``name``), traffic at ``rate`` events/s for
    ``latency_seconds``."""
    topic = name.replace("-", ".")
    n = max(1, int(rate * opts.latency_seconds))
    asyncio.run(create_topic(bootstrap, topic, opts.partitions))
    messages = make_messages(n, opts.users, opts.seed + 1, int(time.time() * 1000), 1000.0 / max(rate, 1.0))
    proc = ModeProcess(mode_args("profilestream", bootstrap, topic, n, name, workdir, opts,
                                 mode_label="latency", warmup=1.0),
                       workdir / f"{name}.log")
    try:
        if not proc.ready.wait(timeout=120):
            raise RuntimeError(f"latency worker not ready in 120s:\n{proc.log_tail()}")
        achieved = asyncio.run(produce_at_rate(bootstrap, topic, messages, rate))
        result = proc.wait(opts.latency_seconds + 120)
    finally:
        proc.kill()
    result["offered_events_per_s"] = round(rate, 1)
    result["achieved_offered_events_per_s"] = round(achieved, 1)
    return result


# -- report ---------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def format_report(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [f"profilestream bench: {c['events']} events, {c['users']} users, {c['partitions']} partitions, "
             f"device {c['device']}, {c['cpus']} CPUs, {c['broker']}",
             f"  preload                 {r.get('preload_events_per_s', 0):>10,.0f} events/s", ""]
    lines.append(f"  {'mode':<24}{'events/s':>10}{'events':>10}{'outputs':>10}{'seconds':>9}{'peak RSS':>10}")
    for key, label in (("passthrough", "(a) passthrough"),
                       ("naive", "(b) naive faust agent"),
                       ("profilestream", "(c) ProfileStream")):
        m = r.get(key)
        if m:
            lines.append(f"  {label:<24}{m['events_per_s']:>10,.0f}{m['events']:>10}{m['outputs']:>10}"
                         f"{m['seconds']:>9.1f}{_mib(m['peak_rss_bytes']):>10}"
                         + ("  (time-boxed)" if m.get("time_limited") else ""))
    ratios = r.get("ratios", {})
    if ratios.get("profilestream_vs_passthrough") is not None:
        lines.append(f"  c/a = {ratios['profilestream_vs_passthrough']:.2f}  (target >= 0.50)")
    if ratios.get("profilestream_vs_naive") is not None:
        lines.append(f"  c/b = {ratios['profilestream_vs_naive']:.1f}x  (target >= 10x)")
    ps = r.get("profilestream")
    if ps:
        lines.append(f"  ProfileStream batches: {ps['batches']}, mean {ps['mean_batch']:.0f} events/batch")
    curve = r.get("latency_curve")
    if curve:
        lines += ["", f"  event->profile latency, live rate-limited traffic for {c['latency_seconds']:.0f} s per row "
                      f"(target: p99 <= {P99_TARGET_MS:.0f} ms at 50% of c; busy: share of the run spent on batches):",
                  f"    {'load':>6}{'offered/s':>11}{'achieved/s':>12}{'mean batch':>12}{'profiles/event':>16}"
                  f"{'busy':>6}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'max ms':>9}"]
        for lat in curve:
            q = lat["latency"]
            load = "-" if lat["load"] is None else f"{lat['load'] * 100:g}%"
            lines.append(f"    {load:>6}{lat['offered_events_per_s']:>11,.0f}{lat['achieved_offered_events_per_s']:>12,.0f}"
                         f"{lat['mean_batch']:>12,.0f}{lat['profiles_per_event']:>16.2f}"
                         f"{lat['busy_s'] / max(lat['seconds'], 1e-9):>6.0%}{q['p50_ms']!s:>9}"
                         f"{q['p99_ms']!s:>9}{q['p999_ms']!s:>10}{q['max_ms']!s:>9}")
        t = r["latency_target"]
        if t["highest_rate_met"] is None:
            lines.append(f"    p99 <= {t['p99_ms']:.0f} ms at none of these loads")
        else:
            where = "" if t["highest_load_met"] is None else f"{t['highest_load_met'] * 100:g}% of c, "
            lines.append(f"    p99 <= {t['p99_ms']:.0f} ms up to {where}{t['highest_rate_met']:,.0f} events/s offered "
                         "(the highest of these loads that met it)")
        if t["met_at_half_load"] is not None:
            lines.append(f"    target at 50% of c: {'met' if t['met_at_half_load'] else 'NOT met'}")
    if ps and ps.get("rss"):
        lines += ["", "  memory of the ProfileStream worker (c):"]
        for s in ps["rss"]:
            lines.append(f"    {s['fraction']:>4.0%} of events ({s['events']:>8}): RSS {_mib(s['rss_bytes']):>9}, "
                         f"users cached {s['users_cached']}")
        flat = rss_growth(ps["rss"])
        if flat is not None:
            lines.append(f"    RSS change from 50% to 100% of events: {flat / 2**20:+.1f} MiB")
        lines.append(f"    peak RSS {_mib(ps['peak_rss_bytes'])}")
    return "\n".join(lines)


def rss_growth(samples: list[dict[str, Any]]) -> int | None:
    by = {s["fraction"]: s["rss_bytes"] for s in samples}
    if 0.5 in by and 1.0 in by:
        return by[1.0] - by[0.5]
    return None


# -- command ----------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    opts = BenchOptions(events=args.events, users=args.users, partitions=args.partitions,
                        naive_seconds=args.naive_seconds, latency_seconds=args.latency_seconds,
                        latency_loads=tuple(args.latency_loads), latency_rate=args.latency_rate,
                        device=args.device, modes=tuple(args.modes.split(",")),
                        workdir=args.workdir)
    report = run_bench(opts)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def _loads(text: str) -> list[float]:
    """``--latency-loads``: fractions in (0, 1], comma-separated."""
    try:
        loads = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not loads or any(not 0 < load <= 1 for load in loads):
        raise argparse.ArgumentTypeError(f"loads must be fractions in (0, 1], got {text!r}")
    return loads


def add_bench_command(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="throughput vs passthrough and a naive faust agent, latency, memory")
    p.add_argument("--events", type=int, default=300_000, help="events to preload and process")
    p.add_argument("--users", type=int, default=10_000, help="synthetic user population")
    p.add_argument("--partitions", type=int, default=8, help="partitions of the events topic")
    p.add_argument("--naive-seconds", type=float, default=25.0, help="time box of the naive agent")
    p.add_argument("--latency-seconds", type=float, default=20.0, help="duration of each latency run")
    p.add_argument("--latency-loads", type=_loads, default=BenchOptions.latency_loads,
                   help="offered loads of the latency runs, as comma-separated fractions of ProfileStream's "
                        "measured rate; 0.5 is the target's load (default: 0.5,0.25,0.125,0.0625)")
    p.add_argument("--latency-rate", type=float, default=None,
                   help="one latency run at this many events/s instead of --latency-loads")
    p.add_argument("--device", default="cpu", help="torch device of the workers")
    p.add_argument("--modes", default="passthrough,naive,profilestream,latency",
                   help="comma-separated subset to run")
    p.add_argument("--workdir", type=Path, default=None, help="keep logs and state here (default: temp, removed)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_bench)
