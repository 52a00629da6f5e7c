"""`profilestream status`: every worker's partitions, readiness, lag, recovery progress and events/s.

Sources, all live: each worker's ``GET /status`` (streams/service/status.py) -- the
first worker named tells the URLs of all the others, as the group's assignor
knows them -- and Kafka: the group's committed offsets and the events topic's
end offsets, so partitions whose owner is down still show their backlog.
Events/s is the change of each worker's events-consumed counter over
``--sample-seconds``.

Exit status: 0 every worker answered and is ready and every partition has an
owner; 1 a worker is not ready (recovering, rebalancing) or a partition has no
owner; 3 a worker or Kafka could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError

from ..cli_common import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, add_json_flag, emit
from ..kafka.client_config import aiokafka_options
from ..kafka.end_offsets import end_offsets
from ..kafka.group_offsets import committed_offsets
from ..settings import Settings


class WorkerUnavailable(Exception):
    """A worker's /status could not be read; the message says why in one line."""


def fetch_status(url: str, token: str, timeout_s: float) -> dict[str, Any]:
    """One worker's ``/status`` body."""
    request = urllib.request.Request(f"{url}/status", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        hint = ": set PROFILESTREAM_LOOKUP_TOKEN to the workers' token" if exc.code == 401 else ""
        raise WorkerUnavailable(f"HTTP {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:  # refused, unresolvable, timed out
        raise WorkerUnavailable(str(getattr(exc, "reason", exc))) from None
    except json.JSONDecodeError:
        raise WorkerUnavailable("answered with something that is not JSON: is this a ProfileStream worker?") from None
    return body


def discover(seeds: list[str], token: str, timeout_s: float) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """(url -> /status body (or ``{"error": ...}``), url -> when it was read (monotonic s)) of the seeds
    and every worker they know of; the times let a second reading divide by each worker's own interval."""
    found: dict[str, dict[str, Any]] = {}
    read_at: dict[str, float] = {}
    pending = [seed.rstrip("/") for seed in seeds]
    asked: set[str] = set()
    while pending:
        url = pending.pop(0)
        if url in asked:
            continue
        asked.add(url)
        try:
            status = fetch_status(url, token, timeout_s)
        except WorkerUnavailable as exc:
            found[url] = {"url": url, "error": str(exc)}
            continue
        own = status["url"].rstrip("/")  # a seed may name the worker differently (localhost, a Service)
        asked.add(own)
        found[own] = status
        read_at[own] = time.monotonic()
        pending += [worker.rstrip("/") for worker in status["workers"]]
    return found, read_at


async def kafka_offsets(settings: Settings) -> dict[int, tuple[int, int]]:
    """partition -> (group's committed offset, end offset) on the events topic."""
    committed = await committed_offsets(settings)
    consumer = AIOKafkaConsumer(**aiokafka_options(settings), enable_auto_commit=False)
    try:
        await consumer.start()
        tps = [TopicPartition(settings.events_topic, p) for p in sorted(committed)]
        ends = await end_offsets(consumer, tps, settings)
    finally:
        await consumer.stop()
    return {tp.partition: (committed[tp.partition], ends[tp]) for tp in tps}


def collect(settings: Settings, seeds: list[str], timeout_s: float, sample_s: float) -> dict[str, Any]:
    """The report `status --json` prints."""
    token = settings.lookup_token
    statuses, read_at = discover(seeds, token, timeout_s)
    started = min(read_at.values(), default=time.monotonic())
    kafka_error = None
    try:
        offsets = asyncio.run(kafka_offsets(settings))
    except (KafkaConnectionError, RuntimeError, TimeoutError) as exc:  # RuntimeError: no events topic
        offsets, kafka_error = {}, f"{settings.bootstrap_servers}: {exc}"
    rates: dict[str, float | None] = {}
    if sample_s > 0:
        time.sleep(max(0.0, sample_s - (time.monotonic() - started)))
        for url, first in statuses.items():
            rates[url] = None
            if "error" not in first:
                try:
                    second = fetch_status(url, token, timeout_s)
                except WorkerUnavailable:
                    continue
                elapsed = time.monotonic() - read_at[url]
                rates[url] = round((second["events_consumed_total"] - first["events_consumed_total"]) / elapsed, 1)
    workers = [_worker_row(url, status, rates.get(url)) for url, status in sorted(statuses.items())]
    owners = {p: w["url"] for w in workers for p in w.get("partitions", [])}
    lag_seconds = {p: status["lag"][str(p)]["seconds"] for status in statuses.values()
                   for p in status.get("partitions", [])}
    partitions = [{"partition": p, "owner": owners.get(p), "committed": committed, "end": end,
                   "lag_events": max(0, end - committed), "lag_seconds": lag_seconds.get(p)}
                  for p, (committed, end) in sorted(offsets.items())]
    unreachable = any("error" in w for w in workers) or kafka_error is not None
    degraded = any(not w.get("ready") for w in workers) or any(p["owner"] is None for p in partitions)
    return {"group": settings.app_id, "events_topic": settings.events_topic, "workers": workers,
            "partitions": partitions, "kafka_error": kafka_error,
            "exit_code": EXIT_UNAVAILABLE if unreachable else EXIT_FAILURE if degraded else EXIT_OK}


def _worker_row(url: str, status: dict[str, Any], rate: float | None) -> dict[str, Any]:
    if "error" in status:
        return {"url": url, "error": status["error"]}
    lags = list(status["lag"].values())
    events = [lag["events"] for lag in lags if lag["events"] is not None]
    seconds = [lag["seconds"] for lag in lags if lag["seconds"] is not None]
    return {"url": url, "ready": status["ready"], "recovered": status["recovered"],
            "rebalancing": status["rebalancing"], "partitions": status["partitions"],
            "lag_events": int(sum(events)) if events else None, "lag_seconds": max(seconds) if seconds else None,
            "recovery_remaining": status["recovery_remaining"], "events_per_second": rate}


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def format_report(report: dict[str, Any]) -> str:
    rows = []
    for w in report["workers"]:
        if "error" in w:
            rows.append([w["url"], "unreachable", None, None, None, None, None])
            continue
        remaining = w["recovery_remaining"]["active"]
        recovery = "done" if w["recovered"] else f"{remaining} left"
        state = "yes" if w["ready"] else "rebalancing" if w["rebalancing"] else "no"
        rows.append([w["url"], state, ",".join(map(str, w["partitions"])) or "none", w["lag_events"],
                     w["lag_seconds"], recovery, w["events_per_second"]])
    out = [_table(["WORKER", "READY", "PARTITIONS", "LAG EVENTS", "LAG S", "RECOVERY", "EVENTS/S"], rows)]
    out += [f"{w['url']}: {w['error']}" for w in report["workers"] if "error" in w]
    if report["kafka_error"] is not None:
        out.append(f"Kafka: {report['kafka_error']}")
    else:
        out.append("")
        out.append(_table(["PARTITION", "OWNER", "COMMITTED", "END", "LAG EVENTS", "LAG S"],
                          [[p["partition"], p["owner"] or "NONE", p["committed"], p["end"], p["lag_events"],
                            p["lag_seconds"]] for p in report["partitions"]]))
    return "\n".join(out)


def cmd_status(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # its group-coordinator chatter says nothing here
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
    seeds = args.worker or [f"http://localhost:{settings.web_port}"]
    report = collect(settings, seeds, args.timeout, args.sample_seconds)
    emit(args, report, format_report(report))
    return int(report["exit_code"])


def add_status_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="every worker's partitions, readiness, lag, recovery and events/s",
                              description=__doc__)
    p.add_argument("--worker", action="append", metavar="URL",
                   help="a worker's base URL; the others are found through it; repeat to name more "
                        "(default: http://localhost:$PROFILESTREAM_WEB_PORT)")
    p.add_argument("--sample-seconds", type=float, default=1.0,
                   help="measure events/s over this long (0: skip the rate)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each worker's answer")
    add_json_flag(p)
    p.set_defaults(func=cmd_status)
