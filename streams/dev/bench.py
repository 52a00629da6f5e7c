"""`profilestream bench`: ProfileStream against a passthrough ceiling and a naive faust agent.

Every measured run gets an embedded broker of its own (started, topic created,
preloaded if the run reads a backlog, run, stopped): Tansu's memory storage
slows as it fills, so a broker shared by all runs would make the later ones
pay for the earlier ones' records.  Each run is a process of its own:

a. passthrough  -- plain aiokafka consume -> JSON decode -> encode -> produce,
                   per event, no model: the ceiling of any Python consumer here;
b. naive        -- a textbook faust agent: per event ``table[key]`` get, one
                   batch-1 model step, ``table[key]`` set, publish (time-boxed:
                   it is slow);
c. profilestream -- the real worker (``run_worker``);
d. latency      -- the worker on an empty topic fed by a rate-limited producer
                   at fractions of (c)'s rate (``--latency-loads``):
                   event->profile p50/p99/p99.9 per load, and the highest load
                   at which p99 met the 100 ms target -- the worker's latency
                   envelope, relative to (c) of the same run, so it compares
                   across days whose machine speed differs;
e. scale        -- (a) and (c) again with ``--scale-users`` synthetic users.

(a), (b) and (c) read the same preloaded events; each run reports its rate
over its processing window (first record in to last record done, so start-up
is not counted), its own CPU share and the broker's over that window (share
of one core; the broker is sampled every 50 ms from here), and the broker's RSS
at the end.  The worker's RSS is sampled at 25/50/75/100% of the events, next
to the number of users in its state store, and the worker reports where its
batches' time went per pipeline stage (streams/pipeline/stages.py); the report
prints that breakdown for the 25% load latency run.  The report ends with the
envelope: issue 19's targets, each met or not.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
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
from types import TracebackType
from typing import Any, Callable, Sequence

from .bench_modes import READY_LINE, RESULT_PREFIX
from .proc_stats import ProcSample, cpu_share, sample
from ..pipeline.partitioning import partition_for
from ..pipeline.stages import STAGES
from ..kafka.record_batches import send_records

log = logging.getLogger("profilestream.bench")

REPO = Path(__file__).resolve().parents[2]
#: The event->profile p99 target (issue 4), which the report checks at each load.
P99_TARGET_MS = 100.0
#: Issue 19's envelope: p99 <= P99_TARGET_MS up to at least this fraction of (c)'s rate...
LATENCY_LOAD_TARGET = 0.5
#: ...c/a at the default population (and the moonshot)...
C_OVER_A_TARGET = 0.65
C_OVER_A_MOONSHOT = 0.8
#: ...and c/a at the scale population.
C_OVER_A_SCALE_TARGET = 0.5
#: Issue 19's budget for a batch's cost outside the model step (ms), which the stage table checks.
STAGE_BUDGET_MS = 1.0
#: The latency run whose stage breakdown is printed (the others' are in the JSON).
STAGE_TABLE_LOAD = 0.25
#: Every run's events topic (each run has a broker of its own).
TOPIC = "bench.events"


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
    #: Users of the scale row's (a) and (c); 0 skips it.
    scale_users: int = 1_000_000
    #: PROFILESTREAM_STATE_CACHE_USERS for the workers (None: the setting's default).
    state_cache_users: int | None = None
    device: str = "cpu"
    modes: tuple[str, ...] = ("passthrough", "naive", "profilestream", "latency", "scale")
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

    Whole record batches per partition (streams/kafka/record_batches.py), all
    partitions at once (the client keeps one batch in flight per partition):
    every run preloads a broker of its own, and one ``send`` per record costs
    the producer a future and the accumulator's bookkeeping per record.  (The
    embedded broker's end-offset quirk only affects readers that stop at end
    offsets; every bench mode counts records instead.)
    """
    from aiokafka import AIOKafkaProducer
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1024 * 1024)
    await producer.start()
    started = time.perf_counter()
    try:
        count = len(await producer.partitions_for(topic))
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, value in messages:
            by_partition.setdefault(partition_for(key, count), []).append((key, value))
        await asyncio.gather(*(send_records(producer, topic, partition, records)
                               for partition, records in by_partition.items()))
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


class ProcessSampler:
    """A process's CPU seconds and RSS every ``interval_s``, on a thread of its own, while the context lasts.

    The broker's CPU share is wanted over a mode's processing window, which
    only the mode process knows (and reports when it is over): the samples
    that bracket it give the share over that window and up to one interval
    either side.
    """

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[ProcSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _take(self) -> None:
        s = sample(self.pid)
        if s is not None:
            self.samples.append(s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def __enter__(self) -> "ProcessSampler":
        self._take()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def share(self, window: Sequence[float] | None) -> float | None:
        """CPU share of one core over ``window`` (monotonic start, end), or over all samples without one."""
        if not self.samples:
            return None
        if window is None:
            return cpu_share(self.samples[0], self.samples[-1])
        times = [s.at_s for s in self.samples]
        first = max(bisect.bisect_right(times, window[0]) - 1, 0)
        last = min(bisect.bisect_left(times, window[1]), len(times) - 1)
        return cpu_share(self.samples[first], self.samples[last])

    @property
    def last_rss_bytes(self) -> int | None:
        return self.samples[-1].rss_bytes if self.samples else None


class ModeProcess:
    """``python -m streams.dev.bench_modes ...`` with its stdout watched for the ready and result lines."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self.result: dict[str, Any] | None = None
        self.ready = threading.Event()
        with open(log_path, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "streams.dev.bench_modes", *args], cwd=REPO,
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=env)
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


def mode_env(opts: BenchOptions) -> dict[str, str]:
    """The mode processes' environment: this one, and the state cache size when the bench sets it."""
    env = dict(os.environ)
    if opts.state_cache_users is not None:
        env["PROFILESTREAM_STATE_CACHE_USERS"] = str(opts.state_cache_users)
    return env


def run_measured(mode: str, name: str, events: int, workdir: Path, opts: BenchOptions, timeout: float,
                 messages: Sequence[tuple[bytes, bytes]] | None = None,
                 live: Callable[[str], dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """One mode process on a fresh embedded broker: start it, create the topic, preload ``messages``
    (if given), run the mode -- calling ``live(bootstrap)`` once it is ready, if given -- and stop.

    The mode's result gains the broker's CPU share over the mode's processing window and its
    RSS at the end (None off Linux), and the preload's rate.
    """
    from .embedded_broker import EmbeddedBroker

    with EmbeddedBroker(log_path=workdir / f"{name}.broker.log") as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(create_topic(bootstrap, TOPIC, opts.partitions))
        added: dict[str, Any] = {}
        if messages is not None:
            added["preload_events_per_s"] = round(asyncio.run(preload(bootstrap, TOPIC, messages)), 1)
        args = mode_args(mode, bootstrap, TOPIC, events, name, workdir, opts, **extra)
        with ProcessSampler(broker.pid) as broker_stats:
            proc = ModeProcess(args, workdir / f"{name}.log", mode_env(opts))
            try:
                if live is not None:
                    if not proc.ready.wait(timeout=120):
                        raise RuntimeError(f"{name}: worker not ready in 120s:\n{proc.log_tail()}")
                    added.update(live(bootstrap))
                result = proc.wait(timeout)
            finally:
                proc.kill()
    share = broker_stats.share(result.get("window_monotonic"))
    result.update(added)
    result["broker_cpu"] = None if share is None else round(share, 3)
    result["broker_rss_bytes"] = broker_stats.last_rss_bytes
    return result


# -- the whole bench ----------------------------------------------------------------


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="profilestream-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    keep = opts.workdir is not None
    report: dict[str, Any] = {
        "config": {"events": opts.events, "users": opts.users, "partitions": opts.partitions,
                   "device": opts.device, "naive_seconds": opts.naive_seconds,
                   "latency_seconds": opts.latency_seconds,
                   "latency_loads": None if opts.latency_rate else list(opts.latency_loads),
                   "scale_users": opts.scale_users if "scale" in opts.modes else 0,
                   "state_cache_users": opts.state_cache_users,
                   "batch_max": int(os.environ.get("PROFILESTREAM_BATCH_MAX", "0")) or None,
                   "cpus": os.cpu_count(), "python": platform.python_version(),
                   "broker": "embedded (Tansu, memory), a fresh one per run"},
    }
    try:
        budget = max(120.0, opts.events / 500.0)
        runs = [("passthrough", "bench-pass", budget, {"linger_ms": 5}),
                ("naive", "bench-naive", opts.naive_seconds + 180, {"seconds": opts.naive_seconds}),
                ("profilestream", "bench-ps", budget, {})]
        if any(mode in opts.modes for mode, *_ in runs):
            messages = make_messages(opts.events, opts.users, opts.seed, int(time.time() * 1000) - opts.events)
            report["config"]["distinct_users"] = len({key for key, _ in messages})
            for mode, name, timeout, extra in runs:
                if mode in opts.modes:
                    report[mode] = run_measured(mode, name, opts.events, workdir, opts, timeout, messages, **extra)
                    log.info("%s: %.0f events/s", mode, report[mode]["events_per_s"])
                    report.setdefault("preload_events_per_s", report[mode]["preload_events_per_s"])
            del messages
        if "latency" in opts.modes:
            curve = run_latency_curve(workdir, opts, report.get("profilestream", {}).get("events_per_s", 2000.0))
            report["latency"] = half_load_run(curve) or curve[0]
            report["latency_curve"] = curve
            report["latency_target"] = latency_target(curve)
        if "scale" in opts.modes and opts.scale_users > 0:
            report["scale"] = run_scale(workdir, opts, budget)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    ps, pt, nv = (report.get(k, {}).get("events_per_s") for k in ("profilestream", "passthrough", "naive"))
    report["ratios"] = {"profilestream_vs_passthrough": ratio(ps, pt, 3),
                        "profilestream_vs_naive": ratio(ps, nv, 1)}
    report["envelope"] = envelope(report)
    return report


def ratio(a: float | None, b: float | None, digits: int) -> float | None:
    return round(a / b, digits) if a and b else None


def run_scale(workdir: Path, opts: BenchOptions, budget: float) -> dict[str, Any]:
    """(a) and (c) again on the same number of events drawn from ``scale_users`` users."""
    messages = make_messages(opts.events, opts.scale_users, opts.seed, int(time.time() * 1000) - opts.events)
    scale: dict[str, Any] = {"users": opts.scale_users, "distinct_users": len({key for key, _ in messages})}
    scale["passthrough"] = run_measured("passthrough", "bench-scale-pass", opts.events, workdir, opts, budget,
                                        messages, linger_ms=5)
    scale["profilestream"] = run_measured("profilestream", "bench-scale-ps", opts.events, workdir, opts,
                                          budget, messages)
    scale["profilestream_vs_passthrough"] = ratio(scale["profilestream"]["events_per_s"],
                                                  scale["passthrough"]["events_per_s"], 3)
    log.info("scale (%d users): c/a %s", opts.scale_users, scale["profilestream_vs_passthrough"])
    return scale


def run_latency_curve(workdir: Path, opts: BenchOptions, max_rate: float) -> list[dict[str, Any]]:
    """One latency run per offered load (``--latency-rate``, or each ``latency_loads`` fraction of
    ``max_rate``), in order; each result carries its ``load`` (None for an explicit rate)."""
    loads: Sequence[float | None] = [None] if opts.latency_rate else opts.latency_loads
    curve = []
    for i, load in enumerate(loads):
        rate = opts.latency_rate if load is None else load * max_rate
        result = run_latency(workdir, opts, rate, f"bench-live-{i}")
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


def run_latency(workdir: Path, opts: BenchOptions, rate: float, name: str) -> dict[str, Any]:
    """A fresh broker and worker, traffic at ``rate`` events/s for ``latency_seconds``."""
    n = max(1, int(rate * opts.latency_seconds))
    messages = make_messages(n, opts.users, opts.seed + 1, int(time.time() * 1000), 1000.0 / max(rate, 1.0))

    def live(bootstrap: str) -> dict[str, Any]:
        achieved = asyncio.run(produce_at_rate(bootstrap, TOPIC, messages, rate))
        return {"offered_events_per_s": round(rate, 1), "achieved_offered_events_per_s": round(achieved, 1)}

    return run_measured("profilestream", name, n, workdir, opts, opts.latency_seconds + 120, live=live,
                        mode_label="latency", warmup=1.0)


def envelope(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 19's targets, each with its value in this run and whether it was met (None: not measured)."""
    out: dict[str, dict[str, Any]] = {}
    c_rate = r.get("profilestream", {}).get("events_per_s")
    target = r.get("latency_target")
    load: float | None = None
    if target is not None:
        load = target["highest_load_met"]
        if load is None and target["highest_rate_met"] is not None and c_rate:
            load = round(target["highest_rate_met"] / c_rate, 3)  # an explicit --latency-rate
    out["latency_load"] = {
        "what": f"highest load with p99 event->profile <= {P99_TARGET_MS:.0f} ms, as a fraction of (c)",
        "target": LATENCY_LOAD_TARGET, "value": load,
        "met": None if target is None else load is not None and load >= LATENCY_LOAD_TARGET}
    c_a = r["ratios"]["profilestream_vs_passthrough"]
    out["c_over_a"] = {"what": f"c/a at {r['config']['users']:,} users", "target": C_OVER_A_TARGET,
                       "moonshot": C_OVER_A_MOONSHOT, "value": c_a,
                       "met": None if c_a is None else c_a >= C_OVER_A_TARGET,
                       "moonshot_met": None if c_a is None else c_a >= C_OVER_A_MOONSHOT}
    scale = r.get("scale")
    c_a_scale = None if scale is None else scale["profilestream_vs_passthrough"]
    out["c_over_a_at_scale"] = {
        "what": f"c/a at {r['config']['scale_users']:,} users", "target": C_OVER_A_SCALE_TARGET, "value": c_a_scale,
        "met": None if c_a_scale is None else c_a_scale >= C_OVER_A_SCALE_TARGET}
    return out


# -- report ---------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _cpu(share: float | None) -> str:
    return "-" if share is None else f"{share:.2f}"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "NOT met"


def _mode_row(label: str, m: dict[str, Any]) -> str:
    return (f"  {label:<28}{m['events_per_s']:>10,.0f}{m['events']:>10}{m['outputs']:>10}{m['seconds']:>9.1f}"
            f"{_mib(m['peak_rss_bytes']):>10}{_cpu(m.get('worker_cpu')):>12}{_cpu(m.get('broker_cpu')):>12}"
            f"{_mib(m.get('broker_rss_bytes')):>12}" + ("  (time-boxed)" if m.get("time_limited") else ""))


def format_report(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [f"profilestream bench: {c['events']} events, {c['users']} users, {c['partitions']} partitions, "
             f"device {c['device']}, {c['cpus']} CPUs, {c['broker']}",
             f"  preload                 {r.get('preload_events_per_s', 0):>10,.0f} events/s", "",
             "  (CPU: share of one core over the run's processing window; broker RSS: at the end of the run)",
             f"  {'mode':<28}{'events/s':>10}{'events':>10}{'outputs':>10}{'seconds':>9}{'peak RSS':>10}"
             f"{'worker CPU':>12}{'broker CPU':>12}{'broker RSS':>12}"]
    for key, label in (("passthrough", "(a) passthrough"),
                       ("naive", "(b) naive faust agent"),
                       ("profilestream", "(c) ProfileStream")):
        if r.get(key):
            lines.append(_mode_row(label, r[key]))
    scale = r.get("scale")
    if scale:
        lines.append(_mode_row(f"(a) at {scale['users']:,} users", scale["passthrough"]))
        lines.append(_mode_row(f"(c) at {scale['users']:,} users", scale["profilestream"]))
    ratios = r.get("ratios", {})
    if ratios.get("profilestream_vs_passthrough") is not None:
        lines.append(f"  c/a = {ratios['profilestream_vs_passthrough']:.2f}  "
                     f"(target >= {C_OVER_A_TARGET:.2f}, moonshot {C_OVER_A_MOONSHOT:.2f})")
    if ratios.get("profilestream_vs_naive") is not None:
        lines.append(f"  c/b = {ratios['profilestream_vs_naive']:.1f}x  (target >= 10x)")
    if scale and scale["profilestream_vs_passthrough"] is not None:
        lines.append(f"  c/a at {scale['users']:,} users = {scale['profilestream_vs_passthrough']:.2f}  "
                     f"(target >= {C_OVER_A_SCALE_TARGET:.2f}; {scale['distinct_users']:,} of them in the events)")
    ps = r.get("profilestream")
    if ps:
        lines.append(f"  ProfileStream batches: {ps['batches']}, mean {ps['mean_batch']:.0f} events/batch")
    curve = r.get("latency_curve")
    if curve:
        lines += ["", f"  event->profile latency, live rate-limited traffic for {c['latency_seconds']:.0f} s per row "
                      f"(target: p99 <= {P99_TARGET_MS:.0f} ms at 50% of c; busy: share of the run spent on batches):",
                  f"    {'load':>6}{'offered/s':>11}{'achieved/s':>12}{'mean batch':>12}{'profiles/event':>16}"
                  f"{'busy':>6}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'max ms':>9}"
                  f"{'worker CPU':>12}{'broker CPU':>12}{'broker RSS':>12}"]
        for lat in curve:
            q = lat["latency"]
            load = "-" if lat["load"] is None else f"{lat['load'] * 100:g}%"
            lines.append(f"    {load:>6}{lat['offered_events_per_s']:>11,.0f}{lat['achieved_offered_events_per_s']:>12,.0f}"
                         f"{lat['mean_batch']:>12,.0f}{lat['profiles_per_event']:>16.2f}"
                         f"{lat['busy_s'] / max(lat['seconds'], 1e-9):>6.0%}{q['p50_ms']!s:>9}"
                         f"{q['p99_ms']!s:>9}{q['p999_ms']!s:>10}{q['max_ms']!s:>9}"
                         f"{_cpu(lat.get('worker_cpu')):>12}{_cpu(lat.get('broker_cpu')):>12}"
                         f"{_mib(lat.get('broker_rss_bytes')):>12}")
        t = r["latency_target"]
        if t["highest_rate_met"] is None:
            lines.append(f"    p99 <= {t['p99_ms']:.0f} ms at none of these loads")
        else:
            where = "" if t["highest_load_met"] is None else f"{t['highest_load_met'] * 100:g}% of c, "
            lines.append(f"    p99 <= {t['p99_ms']:.0f} ms up to {where}{t['highest_rate_met']:,.0f} events/s offered "
                         "(the highest of these loads that met it)")
        if t["met_at_half_load"] is not None:
            lines.append(f"    target at 50% of c: {'met' if t['met_at_half_load'] else 'NOT met'}")
        row = stage_table_run(curve)
        if row is not None and row.get("stages"):
            lines += ["", *format_stages(row)]
    if ps and ps.get("rss"):
        lines += ["", "  memory of the ProfileStream worker (c):"]
        for s in ps["rss"]:
            lines.append(f"    {s['fraction']:>4.0%} of events ({s['events']:>8}): RSS {_mib(s['rss_bytes']):>9}, "
                         f"users in RocksDB {s['users_cached']:>8}, in the state cache {s.get('users_in_cache')!s:>8}")
        flat = rss_growth(ps["rss"])
        if flat is not None:
            lines.append(f"    RSS change from 50% to 100% of events: {flat / 2**20:+.1f} MiB")
        lines.append(f"    peak RSS {_mib(ps['peak_rss_bytes'])}")
    lines += ["", *format_envelope(r["envelope"])]
    return "\n".join(lines)


def stage_table_run(curve: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latency run whose stage breakdown is printed: the 25% load, or the load nearest it."""
    return min(curve, key=lambda run: abs((run["load"] or 0.0) - STAGE_TABLE_LOAD), default=None)


def format_stages(run: dict[str, Any]) -> list[str]:
    s = run["stages"]
    load = "an explicit rate" if run["load"] is None else f"{run['load'] * 100:g}% of c"
    lines = [f"  where a batch's time goes at {load} ({run['offered_events_per_s']:,.0f} events/s offered; "
             f"{s['batches']} batches after the warm-up, {s['events_per_batch']:,.1f} events each):",
             f"    {'stage':<14}{'us/batch':>10}{'share':>8}"]
    total = s["sum_us"]
    for stage in STAGES:
        if stage in s["us_per_batch"]:
            us = s["us_per_batch"][stage]
            lines.append(f"    {stage:<14}{us:>10,.1f}{us / total if total else 0.0:>8.0%}")
    lines += [f"    {'sum':<14}{total:>10,.1f}   (batch wall time {s['batch_us']:,.1f} us, "
              f"{s['overlap_us']:,.1f} us of it beside the next batch's preparation; handoff is outside it)",
              f"    all but model_step: {s['all_but_model_step_us'] / 1000:.2f} ms per batch "
              f"(budget {STAGE_BUDGET_MS:g} ms)"]
    f = s["flush"]
    if f["commits"]:
        lines.append(f"    flush, per commit and not in the sum above: {f['commits']} commits, "
                     f"{f['us_per_commit'] / 1000:.2f} ms each, {f['ms_per_s']:.2f} ms per second")
    else:
        lines.append("    flush: no commit in the window")
    return lines


def format_envelope(env: dict[str, dict[str, Any]]) -> list[str]:
    lat, ca, scale = env["latency_load"], env["c_over_a"], env["c_over_a_at_scale"]
    reach = ("none of the loads" if lat["value"] is None else f"{lat['value'] * 100:g}% of c")
    lines = ["  envelope (issue 19 targets):",
             f"    (i)   p99 event->profile <= {P99_TARGET_MS:.0f} ms up to {reach} "
             f"(target >= {lat['target'] * 100:g}% of c): {_verdict(lat['met'])}"]
    value = "-" if ca["value"] is None else f"{ca['value']:.2f}"
    lines.append(f"    (ii)  {ca['what']}: {value} (target >= {ca['target']:.2f}): {_verdict(ca['met'])}; "
                 f"moonshot >= {ca['moonshot']:.2f}: {_verdict(ca['moonshot_met'])}")
    value = "-" if scale["value"] is None else f"{scale['value']:.2f}"
    lines.append(f"    (iii) {scale['what']}: {value} (target >= {scale['target']:.2f}): {_verdict(scale['met'])}")
    return lines


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
                        scale_users=args.scale_users, state_cache_users=args.state_cache_users,
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


def _count(text: str) -> int:
    """A count >= 0."""
    try:
        n = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return n


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
    p.add_argument("--scale-users", type=_count, default=BenchOptions.scale_users,
                   help="user population of the scale row, (a) and (c) again on --events events "
                        "(default: 1000000; 0 skips it)")
    p.add_argument("--state-cache-users", type=_count, default=None,
                   help="PROFILESTREAM_STATE_CACHE_USERS of the workers, 0 = write-through "
                        "(default: the setting's own)")
    p.add_argument("--device", default="cpu", help="torch device of the workers")
    p.add_argument("--modes", default="passthrough,naive,profilestream,latency,scale",
                   help="comma-separated subset to run")
    p.add_argument("--workdir", type=Path, default=None, help="keep logs and state here (default: temp, removed)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_bench)
