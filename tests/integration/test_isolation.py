"""Record isolation on a running worker: no record, however hostile, stops it.

Real worker processes, the embedded broker, RocksDB and the shipped model.  Hostile
records are interleaved with a real-looking log (the real Taobao log when
PROFILESTREAM_SHARED_DATA is set, synthetic sessions otherwise); the worker must stay
up, dead-letter each hostile record with its reason, and publish for every user
exactly what an offline replay of the good events gives.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from aiokafka import AIOKafkaProducer

from models import ProfileModel
from models.events import Event
from models.loaders import load_events
from streams.pipeline.partitioning import partition_for
from streams.dev.demo import encode_event
from streams.pipeline.control import forget_headers
from streams.kafka.publisher import headers_dict

from ..harness import (START_MS, TOL, Deployment, assert_matches_replay, expected_last, metric_sum, synthetic,
                      wait_for, wait_for_counts)

PARTITIONS = 4
#: The worker's producer batches in these tests: dead letters above 12 KiB (the batch less
#: the headroom for headers) must go out cut.
BATCH_BYTES = 16384


@dataclass(frozen=True)
class Outgoing:
    """One record to produce: its bytes, headers, and the partition it is sent to (None: murmur2's)."""

    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None


def event_value(user: str, **fields: object) -> bytes:
    """A valid event of ``user`` unless ``fields`` break it."""
    return json.dumps({"event_id": f"{user}-0", "user_id": user, "type": "view", "item_id": "i1",
                       "category_id": "c1", "timestamp": START_MS, **fields}).encode()


def wrong_partition(key: bytes) -> int:
    return (partition_for(key, PARTITIONS) + 1) % PARTITIONS


def hostile_records(victim: str) -> list[tuple[str, Outgoing]]:
    """(expected dead-letter reason, record): each a way a buggy or hostile producer breaks the contract.

    ``victim`` is a user with good events: a forget request for them on the wrong
    partition must be dead-lettered, and must not erase them.
    """
    def keyed(user: str, value: bytes | None, **kw: object) -> Outgoing:
        return Outgoing(user.encode(), value, **kw)  # type: ignore[arg-type]

    deep = event_value("h-deep")[:-1] + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    return [
        ("bad_encoding", keyed("h-surrogate", event_value("h-surrogate", category_id="\ud800"))),
        ("bad_encoding", keyed("h-surrogate-id", event_value("h-surrogate-id", item_id="a\udfffb"))),
        ("bad_encoding", keyed("h-raw-surrogate", event_value("h-raw-surrogate", item_id="X").replace(
            b'"X"', b'"\xed\xa0\x80"'))),
        ("bad_encoding", keyed("h-bom", b"\xef\xbb\xbf" + event_value("h-bom"))),
        ("bad_encoding", keyed("h-utf16", event_value("h-utf16").decode().encode("utf-16"))),
        ("bad_encoding", keyed("h-latin1", event_value("h-latin1", item_id="caf\u00e9").decode(
            "unicode_escape").encode("latin-1"))),
        ("duplicate_key", keyed("h-dup", event_value("h-dup")[:-1] + b', "type": "purchase"}')),
        ("duplicate_key", keyed("h-dup-nested", event_value("h-dup-nested", x={"a": 1})[:-2] + b', "a": 2}}')),
        ("too_deep", keyed("h-deep", deep)),
        ("number_out_of_range", keyed("h-1e400", event_value("h-1e400")[:-1] + b', "price": 1e400}')),
        ("number_out_of_range", keyed("h-bigint", event_value("h-bigint", price=10 ** 400))),
        ("oversized", keyed("h-oversized", event_value("h-oversized", pad="x" * 40_000))),
        ("bad_key", Outgoing(b"k" * 20_000, event_value("h-longkey"))),
        ("bad_key", Outgoing(None, event_value("h-nokey"), partition=0)),
        ("wrong_partition", Outgoing(b"h-wrongpart", event_value("h-wrongpart"),
                                     partition=wrong_partition(b"h-wrongpart"))),
        ("wrong_partition", Outgoing(victim.encode(), None, tuple(forget_headers()),
                                     partition=wrong_partition(victim.encode()))),
        ("bad_id", keyed(" ", event_value(" "))),
        ("bad_id", keyed("h-ctrl", event_value("h-ctrl", item_id="i\u0007"))),
        ("bad_id", keyed("h-c1", event_value("h-c1", session_id="s\u0085"))),
        ("bad_timestamp", keyed("h-iso", event_value("h-iso", timestamp="20251009T085320Z"))),
        ("bad_timestamp", keyed("h-noseconds", event_value("h-noseconds", timestamp="2025-10-09T08:53Z"))),
        ("wrong_type", keyed("h-nan", event_value("h-nan", timestamp=float("nan")))),
        ("malformed_json", keyed("h-trunc", event_value("h-trunc")[:-5])),
        ("missing_value", keyed("h-null", None)),
        ("key_mismatch", keyed("h-mismatch", event_value("someone-else"))),
    ]


def produce(bootstrap: str, topic: str, records: Sequence[Outgoing]) -> list[tuple[int, int]]:
    """Send ``records`` in order; the (partition, offset) each got."""
    async def go() -> list[tuple[int, int]]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2, max_request_size=4 * 1024 * 1024)
        await producer.start()
        try:
            futures = [await producer.send(topic, r.value, key=r.key, headers=list(r.headers) or None,
                                           partition=r.partition) for r in records]
            return [(meta.partition, meta.offset) for meta in await asyncio.gather(*futures)]
        finally:
            await producer.stop()
    return asyncio.run(go())


def good_log(shared_data: Path | None) -> list[Event]:
    """The real Taobao log's first 60 users in time order when it is there, synthetic sessions otherwise."""
    if shared_data is None:
        return synthetic(2000, users=150, seed=11)
    events = load_events(shared_data / "taobao_userbehavior_dev.csv", "taobao").events
    users = list(dict.fromkeys(e.user_id for e in events))[:60]
    keep = set(users)
    return sorted((e for e in events if e.user_id in keep), key=lambda e: e.timestamp_ms)


def test_hostile_records_in_a_real_log_are_dead_lettered_and_the_rest_equals_replay(
        deployment: Deployment, model: ProfileModel, shared_data: Path | None) -> None:
    good = good_log(shared_data)
    hostile = hostile_records(victim=good[0].user_id)
    stream: list[tuple[str | None, Outgoing]] = [(None, Outgoing(*encode_event(e))) for e in good]
    rng = random.Random(17)
    for reason, record in hostile:
        stream.insert(rng.randrange(len(stream) + 1), (reason, record))
    worker = deployment.worker(PROFILESTREAM_PRODUCER_BATCH_BYTES=str(BATCH_BYTES)).start()
    try:
        placed = produce(deployment.bootstrap, deployment.settings.events_topic, [r for _, r in stream])
        published = wait_for_counts(deployment, Counter(e.user_id for e in good), timeout=240)
        dead = wait_for(lambda: (r := deployment.read(deployment.settings.dlq_topic)) and len(r) >= len(hostile)
                        and r, 120, what="dead letters")
        metrics = wait_for(lambda: (text := worker.http("/metrics")[1].decode()) and metric_sum(
            text, "profilestream_events_invalid_total") >= len(hostile) and text, 30, what="invalid counters")
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert "stopping the worker" not in worker.log_tail(10_000), worker.log_tail(matching="CRITICAL|ERROR")

    expected = {where: (reason, record) for (reason, record), where in zip(stream, placed) if reason is not None}
    got = {(int(h["profilestream.dlq.partition"]), int(h["profilestream.dlq.offset"])): (h, rec)
           for rec in dead for h in [headers_dict(rec.headers)]}
    assert len(dead) == len(hostile) and set(got) == set(expected), (sorted(got), sorted(expected))
    for where, (reason, record) in expected.items():
        head, rec = got[where]
        assert head["profilestream.dlq.reason"] == reason, (record.key, head)
        size = len(record.key or b"") + len(record.value or b"")
        if size <= BATCH_BYTES - 4096:
            assert (rec.key, rec.value) == (record.key, record.value)
            assert "profilestream.dlq.cut" not in head
            continue
        # Too large for the producer: cut, and the headers identify the original.
        cut = head["profilestream.dlq.cut"].split(",")
        for part, original, kept in (("key", record.key, rec.key), ("value", record.value, rec.value)):
            if part in cut:
                assert original is not None and kept is not None and original.startswith(kept)
                assert int(head[f"profilestream.dlq.{part}_size"]) == len(original) > len(kept)
                assert head[f"profilestream.dlq.{part}_sha256"] == hashlib.sha256(original).hexdigest()
            else:
                assert kept == original
    by_reason = Counter(reason for reason, _ in hostile)
    for reason, n in by_reason.items():
        assert metric_sum(metrics, "profilestream_events_invalid_total", reason=reason) == n, reason
    # The good events -- the victim's too -- are applied exactly once, as replay has them.
    assert_matches_replay(published, expected_last(model, good))
    print(f"\nhostile run: {len(stream)} records sent ({len(good)} good, {len(hostile)} hostile), "
          f"dead-lettered {dict(sorted(by_reason.items()))}, worker restarts 0")


def test_a_record_failing_deep_in_the_pipeline_is_isolated(deployment: Deployment, model: ProfileModel) -> None:
    """A record whose event makes featurisation raise (injected into the real stage, see
    tests/fault_worker.py) is dead-lettered ``unprocessable``; the rest of its batch -- its own
    user's other events included -- is applied exactly once, and no output of a failed attempt
    is ever published."""
    events = synthetic(900, users=40, seed=23)
    per_user: dict[str, list[Event]] = {}
    for e in events:
        per_user.setdefault(e.user_id, []).append(e)
    busy = sorted((u for u, evs in per_user.items() if len(evs) >= 6), key=lambda u: -len(per_user[u]))[:3]
    culprits = {per_user[u][len(per_user[u]) // 2].event_id for u in busy}  # mid-sequence: context matters
    good = [e for e in events if e.event_id not in culprits]
    deployment.produce(events)  # before the worker starts: the culprits sit in large batches
    worker = deployment.worker(module="tests.fault_worker",
                               PROFILESTREAM_TEST_FAIL_EVENTS=",".join(sorted(culprits))).start()
    try:
        published = wait_for_counts(deployment, Counter(e.user_id for e in good), timeout=180)
        dead = wait_for(lambda: (r := deployment.read(deployment.settings.dlq_topic)) and len(r) >= 3 and r,
                        60, what="dead letters")
        metrics = worker.http("/metrics")[1].decode()
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert_matches_replay(published, expected_last(model, good))
    assert len(dead) == 3  # one dead letter per culprit: nothing of a failed attempt went out
    source = {(r.partition, r.offset): r for r in deployment.read(deployment.settings.events_topic)}
    for rec in dead:
        head = headers_dict(rec.headers)
        assert head["profilestream.dlq.reason"] == "unprocessable"
        assert head["profilestream.dlq.exception"] == "builtins.ValueError"
        assert head["profilestream.dlq.error"].startswith("ValueError: injected failure for event ")
        original = source[(int(head["profilestream.dlq.partition"]), int(head["profilestream.dlq.offset"]))]
        assert (rec.key, rec.value) == (original.key, original.value)
        assert json.loads(rec.value)["event_id"] in culprits
    assert metric_sum(metrics, "profilestream_events_invalid_total", reason="unprocessable") == 3
    # Every profile ever published for the culprits' users is replay's after that many good
    # events: none came from an attempt that included a culprit.
    replayed: dict[str, list[list[float]]] = {}
    for event, _, _, profile in model.replay(good):
        replayed.setdefault(event.user_id, []).append(profile)
    for rec in deployment.read(deployment.settings.profiles_topic):
        user = rec.key.decode()
        if user in busy:
            message = json.loads(rec.value)
            want = replayed[user][message["event_count"] - 1]
            assert float(np.abs(np.array(message["profile"]) - np.array(want)).max()) <= TOL, user
