"""The client side on the real embedded broker with real kafka-python clients: the event
producer, `profilestream produce`, the profile subscriber, and -- against a running
worker -- the HTTP profile lookup and the published JSON Schemas.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import numpy as np
import pytest

from models.events import Event, EventError
from streams.dev.embedded_broker import EmbeddedBroker
from streams.dev import produce as produce_cli
from streams.dev.produce import add_produce_command, cmd_produce, paced
from streams.clients.producer import DeliveryError, EventProducer
from streams.pipeline.profile_message import profile_message
from streams.cli_common import EXIT_USAGE, CliError
from streams.settings import Settings
from streams.clients.subscriber import ProfileSubscriber
from streams.dev.traffic import SyntheticTraffic
from streams.pipeline.validate import check_message

from ..harness import REPO, Deployment, WorkerProcess, exact_end_offsets, produce_raw, wait_for

SCHEMAS = REPO / "streams" / "schemas"
EVENT_SCHEMA = json.loads((SCHEMAS / "event.schema.json").read_text())
PROFILE_SCHEMA = json.loads((SCHEMAS / "profile.schema.json").read_text())
TOKEN = "s3cret-token"


def now_ms() -> int:
    return int(time.time() * 1000)


def good(**overrides: Any) -> dict[str, Any]:
    return {"event_id": "e1", "user_id": "u1", "type": "cart", "item_id": "i1", "category_id": "c1",
            "price": 9.5, "timestamp": now_ms() - 1000, **overrides}


# -- producer -----------------------------------------------------------------


def test_producer_refuses_invalid_events_with_their_reason_before_sending(deployment: Deployment) -> None:
    cases: list[tuple[Event | dict[str, Any], str]] = [
        ({k: v for k, v in good().items() if k != "user_id"}, "missing_field"),
        (good(user_id=7), "wrong_type"),
        (good(type="wishlist"), "unknown_type"),
        (good(timestamp=now_ms() + 3 * 86_400_000), "future_timestamp"),
        (good(price=float("nan")), "bad_price"),
        (good(note="x" * 20_000), "oversized"),
        (good(extra={1, 2}), "wrong_type"),  # not JSON-serialisable
        (Event("u1", "view", "i1", "c1", 1_500_000_000, event_id="e2"), "bad_timestamp"),  # seconds, not ms
        (Event("u" * 200, "view", "i1", "c1", now_ms(), event_id="e3"), "field_too_long"),
        (good(user_id="u\ud800"), "bad_id"),  # the worker's rules: a lone surrogate cannot be UTF-8
        (good(item_id="  "), "bad_id"),
        (good(category_id="c\x00"), "bad_id"),
        (good(price=10 ** 400), "number_out_of_range"),
        (good(extra=[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]), "too_deep"),
        (good(timestamp="2025-10-09 08:53:20+00:00"), "bad_timestamp"),
    ]
    with EventProducer(deployment.settings) as producer:
        for event, reason in cases:
            with pytest.raises(EventError) as info:
                producer.send(event)
            assert info.value.reason == reason, (event, info.value)
    assert sum(exact_end_offsets(deployment.bootstrap, deployment.settings.events_topic).values()) == 0


def test_produced_messages_are_keyed_by_user_and_decode_to_the_contract(deployment: Deployment) -> None:
    events = SyntheticTraffic(users=7, seed=3).events(40, now_ms() - 60_000, mean_gap_ms=100.0)
    as_dict = good(event_id="extra-1", user_id="u-dict", schema_hint="kept")  # unknown fields travel along
    with EventProducer(deployment.settings) as producer:
        futures = [producer.send(e) for e in events] + [producer.send(as_dict)]
        producer.flush()
    metadata = [f.get(timeout=5) for f in futures]
    assert all(m.topic == deployment.settings.events_topic for m in metadata)

    records = deployment.read(deployment.settings.events_topic)
    assert len(records) == len(events) + 1
    by_id = {e.event_id: e for e in events}
    partitions: dict[str, set[int]] = {}
    for rec in records:
        event = check_message(rec.key, rec.value)  # the worker's own acceptance rule
        assert rec.key == event.user_id.encode()
        jsonschema.validate(json.loads(rec.value), EVENT_SCHEMA)
        partitions.setdefault(event.user_id, set()).add(rec.partition)
        if event.event_id == "extra-1":
            assert json.loads(rec.value)["schema_hint"] == "kept"
        else:
            assert event == by_id[event.event_id]
    assert all(len(p) == 1 for p in partitions.values())  # keyed: one partition per user
    assert sum(exact_end_offsets(deployment.bootstrap, deployment.settings.events_topic).values()) == len(records)


def test_delivery_failures_reach_the_future_and_flush(tmp_path: Path) -> None:
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as broker:
        settings = Settings.from_env({}, bootstrap_servers=broker.bootstrap_servers, embedded_broker=True,
                                     events_topic="failing.events")
        producer = EventProducer(settings, request_timeout_ms=500, delivery_timeout_ms=1000, retry_backoff_ms=50)
        producer.send(good(event_id="ok"))
        producer.flush(10)
        broker.pause()
        try:
            future = producer.send(good(event_id="lost"))
            with pytest.raises(DeliveryError) as info:
                producer.flush(10)
            assert [f.event_id for f in info.value.failures] == ["lost"]
            assert future.failed()
        finally:
            broker.resume()
            producer.close(5)


# -- produce command ----------------------------------------------------------

JSONL = "\n".join(json.dumps(e) for e in [
    good(event_id="j1", user_id="ua", type="view", timestamp=1_700_000_000_000),
    good(event_id="j2", user_id="ub", type="click", timestamp=1_700_000_001_000),
    good(event_id="j3", user_id="ua", type="cart", timestamp=1_700_000_002_000),
    good(event_id="j4", user_id="ub", timestamp=now_ms() + 3 * 86_400_000),  # refused by the producer
]) + "\n{broken\n"
TAOBAO = """1,100,7,pv,1511544070
1,101,7,cart,1511544080
2,200,9,pv,1511544090
2,200,9,buy,1511544100
3,300,9,wat,1511544110
"""


def run_produce(dep: Deployment, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """`profilestream produce ...` in-process, configured by env vars like the real command."""
    for name in list(os.environ):
        if name.startswith(("PROFILESTREAM_", "KAFKA_")):
            monkeypatch.delenv(name)
    for name, value in dep.env(dep.tmp / "unused", 0).items():
        if name.startswith(("PROFILESTREAM_", "KAFKA_")):
            monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_produce_command(parser.add_subparsers())
    args = parser.parse_args(["produce", *argv])
    return int(args.func(args))


@pytest.mark.parametrize("fmt, text, expected", [
    ("jsonl", JSONL, {"j1": "ua", "j2": "ub", "j3": "ua"}),
    ("taobao", TAOBAO, {"taobao:1": "1", "taobao:2": "1", "taobao:3": "2", "taobao:4": "2"}),
])
def test_produce_replays_a_log(deployment: Deployment, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                               fmt: str, text: str, expected: dict[str, str]) -> None:
    path = tmp_path / f"log.{fmt}"
    path.write_text(text)
    assert run_produce(deployment, monkeypatch, "--data", str(path), "--format", fmt,
                       "--preserve-timing", "--speedup", "1000") == 0
    records = deployment.read(deployment.settings.events_topic)
    got = {check_message(r.key, r.value).event_id: r.key.decode() for r in records}
    assert got == expected


def test_produce_synthetic(deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_produce(deployment, monkeypatch, "--synthetic", "30", "--rate", "2000", "--users", "5") == 0
    records = deployment.read(deployment.settings.events_topic)
    assert len(records) == 30
    assert len({check_message(r.key, r.value).event_id for r in records}) == 30


def test_produce_synthetic_forever_until_sigterm(deployment: Deployment) -> None:
    """The docker-compose traffic service: `produce --synthetic N --rate R --forever` goes past
    N, stamps events with the wall clock, and stops cleanly (flushed, exit 0) on SIGTERM."""
    started_ms = now_ms()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "produce", "--synthetic", "40", "--rate", "400", "--users", "5",
         "--forever"], cwd=REPO, env=deployment.env(deployment.tmp / "unused", 0),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: sum(exact_end_offsets(deployment.bootstrap, deployment.settings.events_topic).values()) > 100,
                 60, what="more than two rounds of 40 events")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    records = deployment.read(deployment.settings.events_topic)
    events = [check_message(r.key, r.value) for r in records]
    assert len(events) > 100 and len({e.event_id for e in events}) == len(events)
    assert all(started_ms - 1000 <= e.timestamp_ms <= now_ms() + 1000 for e in events)


def test_produce_forever_needs_synthetic(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_produce_command(parser.add_subparsers())
    args = parser.parse_args(["produce", "--data", str(tmp_path / "log.jsonl"), "--forever"])
    with pytest.raises(CliError, match="--forever only applies with --synthetic") as raised:
        cmd_produce(args)
    assert raised.value.code == EXIT_USAGE


def test_synthetic_events_forever_restamps_each_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_800_000_000.0]
    monkeypatch.setattr(produce_cli, "SYNTHETIC_CHUNK", 10)
    monkeypatch.setattr(produce_cli.time, "time", lambda: clock[0])
    stream = produce_cli.synthetic_events(25, users=3, mean_gap_ms=5.0, forever=True)
    first = [next(stream) for _ in range(10)]
    clock[0] += 3600.0  # the broker was gone for an hour: the next chunk is stamped from now, not stale
    later = [next(stream) for _ in range(60)]
    assert first[0].timestamp_ms >= 1_800_000_000_000 and first[-1].timestamp_ms < 1_800_000_001_000
    assert later[0].timestamp_ms >= 1_800_003_600_000
    assert len({e.event_id for e in first + later}) == 70  # past N=25: it goes on
    finite = list(produce_cli.synthetic_events(25, users=3, mean_gap_ms=5.0))
    assert len(finite) == 25


def test_pacing_by_rate_and_by_the_logs_own_timing() -> None:
    clock = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(round(s, 6))
        clock[0] += s

    events = [Event("u", "view", "i", "c", 1_700_000_000_000 + gap) for gap in (0, 4000, 4000, 10_000)]
    assert list(paced(events, speedup=2.0, clock=lambda: clock[0], sleep=sleep)) == events
    assert sleeps == [2.0, 3.0]
    sleeps.clear()
    list(paced(events, rate=4.0, clock=lambda: clock[0], sleep=sleep))
    assert sleeps == [0.25, 0.25, 0.25]


def test_profilestream_cli_has_the_produce_command() -> None:
    from streams.cli import build_parser
    args = build_parser().parse_args(["produce", "--synthetic", "5"])
    assert args.func is cmd_produce


# -- subscriber ---------------------------------------------------------------


def profile(user: str, count: int) -> bytes:
    return profile_message(user, "test-v1", now_ms(), count, now_ms() - 5, np.full(4, 0.5),
                           np.array([0.5, 0.2, 0.1, 0.1, 0.1]), [f"c{count}"])


def test_subscriber_follows_updates_and_tombstones(deployment: Deployment) -> None:
    topic = deployment.settings.profiles_topic
    produce_raw(deployment.bootstrap, topic, [
        (b"a", profile("a", 1)), (b"b", profile("b", 1)), (b"a", profile("a", 2)),
        (b"c", profile("c", 1)), (b"b", None),
    ])
    updates: list[tuple[str, int | None]] = []
    with ProfileSubscriber(deployment.settings,
                           on_update=lambda u, p: updates.append((u, p and p["event_count"]))) as sub:
        assert sub.wait_until_caught_up(20)
        assert set(sub.profiles()) == {"a", "c"}
        assert sub.get("a")["event_count"] == 2 and sub.get("b") is None
        many = sub.get_many(["a", "b", "c", "zz", "a"])
        assert list(many) == ["a", "b", "c", "zz"] and many["b"] is None and many["zz"] is None
        assert (many["a"]["event_count"], many["c"]["event_count"]) == (2, 1)
        jsonschema.validate(sub.get("a"), PROFILE_SCHEMA)

        produce_raw(deployment.bootstrap, topic, [(b"d", profile("d", 1)), (b"a", None), (b"c", profile("c", 5))])
        wait_for(lambda: sub.get("a") is None and sub.get("d") and sub.get("c")["event_count"] == 5, 20,
                 interval=0.05, what="live updates")
        assert len(sub) == 2
    assert not sub._thread.is_alive()
    assert Counter(u for u, _ in updates) == {"a": 3, "b": 2, "c": 2, "d": 1}
    assert ("b", None) in updates and updates[-3:] == [("d", 1), ("a", None), ("c", 5)]


def test_subscriber_waits_for_a_missing_topic_and_closes_promptly(broker: EmbeddedBroker) -> None:
    settings = Settings.from_env({}, bootstrap_servers=broker.bootstrap_servers, profiles_topic="not.there.yet")
    sub = ProfileSubscriber(settings).start()
    assert not sub.wait_until_caught_up(1.0)
    started = time.monotonic()
    sub.close()
    assert not sub._thread.is_alive() and time.monotonic() - started < 3


# -- against a running worker -------------------------------------------------


def http_get(worker: WorkerProcess, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    return worker.request(path, token=token, timeout=10)


@dataclasses.dataclass
class Running:
    dep: Deployment
    worker: WorkerProcess
    counts: Counter[str]
    published: dict[str, dict]


@pytest.fixture(scope="module")
def running(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One worker (with a lookup token) that has processed synthetic traffic sent by the producer client."""
    dep = Deployment(broker.bootstrap_servers, tmp_path_factory.mktemp("clients"))
    dep.create_topics()
    worker = dep.worker(PROFILESTREAM_LOOKUP_TOKEN=TOKEN).start()
    try:
        events = SyntheticTraffic(users=12, categories=30, seed=5).events(150, now_ms() - 600_000, 1000.0)
        with EventProducer(dep.settings) as producer:
            for event in events:
                producer.send(event)
        counts = Counter(e.user_id for e in events)
        with ProfileSubscriber(dep.settings) as sub:
            wait_for(lambda: all((sub.get(u) or {}).get("event_count") == n for u, n in counts.items()), 120,
                     what="profiles of every user")
            published = sub.profiles()
        yield Running(dep, worker, counts, published)
    finally:
        worker.stop()


def test_worker_messages_match_the_published_schemas(running: Running) -> None:
    events = running.dep.read(running.dep.settings.events_topic)
    assert events
    for rec in events:
        jsonschema.validate(json.loads(rec.value), EVENT_SCHEMA)
    profiles = running.dep.read(running.dep.settings.profiles_topic)
    assert {r.key.decode() for r in profiles} == set(running.counts)
    for rec in profiles:
        jsonschema.validate(json.loads(rec.value), PROFILE_SCHEMA)
    assert running.dep.read(running.dep.settings.dlq_topic) == []


def test_lookup_returns_the_current_profile_and_requires_the_token(running: Running) -> None:
    user = next(iter(running.counts))
    path = f"/users/{user}/profile"
    assert http_get(running.worker, path)[0] == 401
    assert http_get(running.worker, path, token="wrong")[0] == 401
    status, headers, body = http_get(running.worker, path, token=TOKEN)
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    got = json.loads(body)
    jsonschema.validate(got, PROFILE_SCHEMA)
    last = running.published[user]
    assert got["event_count"] == last["event_count"] == running.counts[user]
    assert got["top_categories"] == last["top_categories"]
    np.testing.assert_allclose(got["profile"], last["profile"], atol=1e-5)
    np.testing.assert_allclose([got["intent"][t] for t in last["intent"]], list(last["intent"].values()),
                               atol=1e-5)
    status, _, body = http_get(running.worker, "/users/nobody-here/profile", token=TOKEN)
    assert status == 404 and json.loads(body)["error"] == "unknown_user"


@pytest.mark.slow
def test_lookup_on_any_worker_is_forwarded_to_the_owner(running: Running) -> None:
    """Runs last in this module: the second worker takes over half of the partitions."""
    second = running.dep.worker(1, PROFILESTREAM_LOOKUP_TOKEN=TOKEN).start()
    try:
        workers = [running.worker, second]
        for w in workers:
            w.wait_ready()

        def all_answered() -> set[str] | None:
            served = set()
            for user, n in running.counts.items():
                for w in workers:
                    status, headers, body = http_get(w, f"/users/{user}/profile", token=TOKEN)
                    if status != 200 or json.loads(body)["event_count"] != n:
                        return None
                    served.add(headers["X-ProfileStream-Served-By"])
            return served

        served = wait_for(all_answered, 90, interval=1.0, what="every user from both workers")
        assert served == {f"http://127.0.0.1:{w.web_port}" for w in workers}
    finally:
        second.stop()
