"""Soak: the demo's pipeline for a long run, sampled once a minute.

``python -m streams.dev.soak --minutes 30 --rate 1500 --users 200000 -o soak.json``
runs exactly what `profilestream demo` runs (embedded broker, worker,
synthetic traffic, profile follower, memory limits) and every ``--sample-every``
seconds records the event->profile p50/p99 over that interval, the events
processed, the demo process's RSS and CPU, the broker's RSS and CPU, and the
memory left available.  A table row is printed per sample and the JSON written
at the end, also when a memory limit stopped the run early (``stopped_by_limit``;
exit code 1).  Method and figures: docs/performance.md "Soak".
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..cli_common import Parser
from ..service.app import ProfileStreamApp
from .demo import DemoOptions, DemoRun, LiveStats, run_demo
from .demo_limits import MIB, add_demo_memory_flags, limits_from_args
from .proc_stats import ProcSample, available_memory_bytes, cpu_share, sample

HEADER = (f"{'min':>6} {'events':>8} {'ev/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'demo MiB':>9} {'demo cpu':>8} "
          f"{'broker MiB':>10} {'broker cpu':>10} {'avail MiB':>9}")


@dataclass(frozen=True)
class SoakRow:
    """One sampling interval. CPU is a share of one core; None where /proc could not be read."""

    minute: float  # end of the interval, minutes since the worker was set up
    seconds: float  # length of the interval
    events: int
    events_per_s: float
    p50_ms: float | None  # None: no batch in the interval
    p99_ms: float | None
    demo_rss_mib: float | None  # the demo process: worker, traffic producer and follower
    demo_cpu: float | None
    broker_rss_mib: float | None
    broker_cpu: float | None
    available_mib: float | None

    def line(self) -> str:
        def f(value: float | None, width: int, digits: int = 0) -> str:
            return f"{'-':>{width}}" if value is None else f"{value:>{width},.{digits}f}"
        return (f"{self.minute:>6.2f} {self.events:>8,} {self.events_per_s:>7,.0f} {f(self.p50_ms, 8, 1)} "
                f"{f(self.p99_ms, 8, 1)} {f(self.demo_rss_mib, 9)} {f(self.demo_cpu, 8, 2)} "
                f"{f(self.broker_rss_mib, 10)} {f(self.broker_cpu, 10, 2)} {f(self.available_mib, 9)}")


def _mib(proc: ProcSample | None) -> float | None:
    return None if proc is None else proc.rss_bytes / MIB


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else seconds * 1000


class Sampler:
    """Turns the demo's batch reports and /proc readings into one :class:`SoakRow` per interval."""

    def __init__(self, broker_pid: int) -> None:
        self.broker_pid = broker_pid
        self.stats = LiveStats()
        self.started = time.monotonic()
        self.last_demo = sample(os.getpid())
        self.last_broker = sample(broker_pid)
        self.rows: list[SoakRow] = []

    def row(self) -> SoakRow:
        window = self.stats.take()
        demo, broker, available = sample(os.getpid()), sample(self.broker_pid), available_memory_bytes()
        row = SoakRow(
            minute=(time.monotonic() - self.started) / 60, seconds=window.seconds, events=window.events,
            events_per_s=window.rate, p50_ms=_ms(window.p50_s), p99_ms=_ms(window.p99_s),
            demo_rss_mib=_mib(demo), demo_cpu=cpu_share(self.last_demo, demo),
            broker_rss_mib=_mib(broker), broker_cpu=cpu_share(self.last_broker, broker),
            available_mib=None if available is None else available / MIB)
        self.last_demo, self.last_broker = demo, broker
        self.rows.append(row)
        return row


def run_soak(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run the demo for ``args.minutes`` and sample it; the report is also written to ``args.output``."""
    samples = max(1, round(args.minutes * 60 / args.sample_every))
    opts = DemoOptions(rate=args.rate, users=args.users, summary_every_s=None,
                       keep_profiles=args.keep_profiles, limits=limits_from_args(args))
    samplers: list[Sampler] = []

    def extend(service: ProfileStreamApp, run: DemoRun) -> None:
        sampler = Sampler(run.broker.pid)
        samplers.append(sampler)
        service.processor.listeners.append(sampler.stats.on_batch)
        print(HEADER, flush=True)

        @service.app.timer(args.sample_every)
        async def take_sample() -> None:
            if len(sampler.rows) < samples:
                print(sampler.row().line(), flush=True)
                if len(sampler.rows) == samples:
                    run.stop()

    started = time.time()
    run = run_demo(opts, extend)
    rows = samplers[0].rows if samplers else []
    report = {
        "command": command,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "options": {"minutes": args.minutes, "sample_every_s": args.sample_every, "rate": args.rate,
                    "users": args.users, "keep_profiles": args.keep_profiles,
                    "max_broker_mib": args.max_broker_mib, "min_available_mib": args.min_available_mib},
        "cpus": os.cpu_count(),
        "stopped_by_limit": run.stopped_by_limit,
        "rows": [asdict(r) for r in rows],
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m streams.dev.soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=30.0, help="how long to run, from the worker's start")
    p.add_argument("--sample-every", type=float, default=60.0, help="seconds between two samples (rows)")
    p.add_argument("--rate", type=float, default=1500.0, help="synthetic events per second")
    p.add_argument("--users", type=int, default=200_000, help="synthetic user population")
    p.add_argument("-o", "--output", type=Path, required=True, help="write the rows and options here (JSON)")
    add_demo_memory_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # Warnings only: the rows are the output, and a memory limit's reason is a warning.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    report = run_soak(args, shlex.join(["python", "-m", "streams.dev.soak", *argv]))
    print(f"{len(report['rows'])} rows written to {args.output}", flush=True)
    if report["stopped_by_limit"]:
        print(f"stopped early: {report['stopped_by_limit']}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
