"""Lookup throughput and latency on the embedded stack: ``python -m streams.dev.lookup_bench``.

Starts the embedded broker and two workers (``profilestream worker``
subprocesses with a lookup token, each on its own port), loads ``--events``
synthetic events of ``--users`` users and waits until both workers have
applied them all.  Then, per batch size (default 1, 100 and 1,000 users per
request), ``--clients`` threads send ``POST /users/profiles`` requests of
random known users to both workers for ``--seconds``: about half of each
request's users live on the other worker and are forwarded.  It reports
requests/s, users/s and the p50/p99 of a request's round trip.

Last, it measures whether lookups starve batch processing: the same number
of new events is produced once with no lookups and once while the clients
send batches of the largest size, and the time until both workers have
applied them is compared.  docs/performance.md has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .bench import create_topic, make_messages, preload
from .embedded_broker import EmbeddedBroker, free_port

REPO = Path(__file__).resolve().parents[2]
TOKEN = "lookup-bench"
PARTITIONS = 8


class Worker:
    """One ``profilestream worker`` subprocess, logging to a file."""

    def __init__(self, bootstrap: str, workdir: Path, index: int, topic_prefix: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PROFILESTREAM_", "KAFKA_"))}
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "PROFILESTREAM_APP_ID": f"{topic_prefix}-app",
            "PROFILESTREAM_EVENTS_TOPIC": f"{topic_prefix}.events",
            "PROFILESTREAM_PROFILES_TOPIC": f"{topic_prefix}.profiles",
            "PROFILESTREAM_DLQ_TOPIC": f"{topic_prefix}.dlq", "PROFILESTREAM_PARTITIONS": str(PARTITIONS),
            "PROFILESTREAM_DATA_DIR": str(workdir / f"worker{index}"), "PROFILESTREAM_WEB_PORT": str(self.port),
            "PROFILESTREAM_EMBEDDED_BROKER": "1", "PROFILESTREAM_LOOKUP_TOKEN": TOKEN,
        })
        self.log = open(workdir / f"worker{index}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], cwd=REPO, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def handled(self) -> float:
        """Events this worker is done with: applied, skipped (the synthetic traffic repeats some
        event ids) or dead-lettered."""
        status, body = self.get("/metrics")
        found = re.findall(rb"^profilestream_events_(?:consumed|skipped|invalid)_total\{[^}]*\} (\S+)$", body, re.M)
        return sum(float(v) for v in found) if status == 200 else 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


def produce_and_apply(bootstrap: str, topic: str, messages: Sequence[tuple[bytes, bytes]],
                      workers: Sequence[Worker], total: float, timeout: float = 600) -> float:
    """Seconds from the first event sent until the workers together have applied ``total`` events."""
    started = time.perf_counter()
    asyncio.run(preload(bootstrap, topic, messages))
    wait_until(lambda: sum(w.handled() for w in workers) >= total, timeout, f"{total:.0f} events applied")
    return time.perf_counter() - started


def lookup(url: str, user_ids: list[str]) -> tuple[int, float, int]:
    """(HTTP status, seconds, users found) of one batch request."""
    body = json.dumps({"user_ids": user_ids}).encode()
    request = urllib.request.Request(url + "/users/profiles", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            payload = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, time.perf_counter() - t0, 0
    seconds = time.perf_counter() - t0
    found = sum(r["status"] == "found" for r in json.loads(payload)["results"])
    return status, seconds, found


def run_clients(urls: Sequence[str], users: Sequence[str], batch: int, clients: int,
                seconds: float, stop: threading.Event | None = None) -> dict[str, Any]:
    """``clients`` threads sending batches of ``batch`` random users round-robin to ``urls``
    for ``seconds``, or until ``stop`` is set."""
    stop = stop or threading.Event()
    samples: list[list[tuple[int, float, int]]] = [[] for _ in range(clients)]

    def client(i: int) -> None:
        rng = random.Random(i)
        n = 0
        while not stop.is_set():
            samples[i].append(lookup(urls[(i + n) % len(urls)], rng.sample(users, batch)))
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    flat = [s for per in samples for s in per]
    ok = np.array([sec for status, sec, _ in flat if status == 200])
    return {
        "batch": batch, "clients": clients, "requests": len(flat), "ok": len(ok),
        "status_503": sum(status == 503 for status, _, _ in flat),
        "requests_per_s": len(ok) / elapsed, "users_per_s": sum(f for _, _, f in flat) / elapsed,
        "asked_users_per_s": len(ok) * batch / elapsed,
        "p50_ms": float(np.percentile(ok, 50) * 1000) if len(ok) else None,
        "p99_ms": float(np.percentile(ok, 99) * 1000) if len(ok) else None,
    }


def model_cost_ms(batches: Sequence[int], repeats: int = 5) -> dict[int, float]:
    """Milliseconds of :func:`~streams.service.lookup.current_profiles` (state decoding, model call, JSON) for
    ``batch`` stored states, in this process on one torch thread: the lookup thread's work per request."""
    import torch

    from models import ProfileModel, default_checkpoint_path

    from ..state import codec as state_record
    from ..service.lookup import current_profiles
    from .traffic import SyntheticTraffic

    torch.set_num_threads(1)
    model = ProfileModel.load(default_checkpoint_path(), device="cpu")
    users = max(batches)
    by_user: dict[str, list[Any]] = {}
    for event in SyntheticTraffic(users=users, seed=1).events(20 * users, int(time.time() * 1000) - 3_600_000, 1.0):
        by_user.setdefault(event.user_id, []).append(event)
    ids = list(by_user)
    states = model.advance([None] * len(ids), [by_user[u] for u in ids]).states
    stored = [state_record.encode(state_record.StateRecord(model.fingerprint, 0, (), blob))
              for blob in model.encode_states(states)]
    cost = {}
    for batch in batches:
        n = min(batch, len(ids))
        started = time.perf_counter()
        for _ in range(repeats):
            current_profiles(model, ids[:n], stored[:n])
        cost[n] = (time.perf_counter() - started) / repeats * 1000
    return cost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="events loaded before measuring (default: %(default)s)")
    parser.add_argument("--users", type=int, default=10_000, help="distinct users (default: %(default)s)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 100, 1000],
                        help="users per request, one run each (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per run (default: %(default)s)")
    parser.add_argument("--starve-events", type=int, default=50_000,
                        help="events produced with and without lookups (0: skip; default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    cost = model_cost_ms(args.batches)

    with tempfile.TemporaryDirectory(prefix="lookup-bench-") as tmp, EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        workdir = Path(tmp)
        prefix = f"lb{int(time.time())}"
        topic = f"{prefix}.events"
        asyncio.run(create_topic(broker.bootstrap_servers, topic, PARTITIONS))
        workers = [Worker(broker.bootstrap_servers, workdir, i, prefix) for i in range(2)]
        try:
            wait_until(lambda: all(w.get("/readyz")[0] == 200 for w in workers), 180, "both workers ready")
            start_ms = int(time.time() * 1000) - 3_600_000
            messages = make_messages(args.events, args.users, seed=1, start_ms=start_ms, gap_ms=1.0)
            bootstrap = broker.bootstrap_servers
            produce_and_apply(bootstrap, topic, messages, workers, len(messages))
            users = sorted({key.decode() for key, _ in messages})
            urls = [w.url for w in workers]
            runs = [run_clients(urls, users, min(batch, len(users)), args.clients, args.seconds)
                    for batch in args.batches]
            result: dict[str, Any] = {"events": len(messages), "users": len(users), "runs": runs,
                                      "cpus": os.cpu_count(), "lookup_thread_ms": cost}
            if args.starve_events:
                applied = len(messages)
                # Two fresh sets of events, later than everything before (not duplicates, not out of order).
                more = make_messages(args.starve_events, args.users, seed=2, start_ms=start_ms + args.events)
                flood_events = make_messages(args.starve_events, args.users, seed=3,
                                             start_ms=start_ms + args.events + args.starve_events)
                quiet_s = produce_and_apply(bootstrap, topic, more, workers, applied + len(more))
                flood: dict[str, Any] = {}
                done = threading.Event()
                flooding = threading.Thread(target=lambda: flood.update(run_clients(
                    urls, users, min(max(args.batches), len(users)), args.clients, 3600, done)), daemon=True)
                flooding.start()
                time.sleep(1.0)  # the clients are at full speed
                flood_s = produce_and_apply(bootstrap, topic, flood_events, workers, applied + 2 * len(more))
                done.set()
                flooding.join()
                result["starvation"] = {"events": len(more), "no_lookups_events_per_s": len(more) / quiet_s,
                                        "with_lookups_events_per_s": len(more) / flood_s, "lookups": flood}
        finally:
            for w in workers:
                w.stop()
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['events']} events, {result['users']} users, 2 workers, {args.clients} clients, {result['cpus']} CPUs")
    print(f"{'batch':>6} {'req/s':>8} {'users/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'503s':>6}")
    for r in runs:
        print(f"{r['batch']:>6} {r['requests_per_s']:>8.1f} {r['users_per_s']:>9.0f} {r['p50_ms'] or 0:>8.1f} "
              f"{r['p99_ms'] or 0:>8.1f} {r['status_503']:>6}")
    print("lookup thread per request (decode, model, JSON; in-process, 1 torch thread): "
          + ", ".join(f"{n} users {ms:.1f} ms" for n, ms in cost.items()))
    if "starvation" in result:
        s = result["starvation"]
        print(f"{s['events']} new events applied at {s['no_lookups_events_per_s']:.0f} events/s without lookups, "
              f"{s['with_lookups_events_per_s']:.0f} events/s while the clients sent {s['lookups']['requests_per_s']:.1f} "
              f"batches/s of {s['lookups']['batch']} (p99 {s['lookups']['p99_ms'] or 0:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
