"""The worker end to end on the real embedded broker, real RocksDB and the real model.

Ground truth everywhere is offline `replay` of the same events: the last
profile the worker published for a user must equal replay's output after
that user's last event.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Iterable

import numpy as np

from models import ProfileModel
from models.events import EVENT_TYPES, Event, event_to_dict
from streams.publish import headers_dict
from streams.traffic import SyntheticTraffic

from .harness import Deployment, latest_profiles, produce_raw, wait_for

START_MS = 1_760_000_000_000
TOL = 1e-5


def synthetic(n: int, users: int, seed: int = 1, start_ms: int = START_MS) -> list[Event]:
    return SyntheticTraffic(users=users, categories=60, seed=seed).events(n, start_ms, mean_gap_ms=50.0)


def expected_last(model: ProfileModel, events: Iterable[Event]) -> dict[str, dict]:
    """Replay's outputs after each user's last event."""
    last: dict[str, dict] = {}
    for event, intent, top, profile in model.replay(events):
        last[event.user_id] = {"intent": intent, "top_categories": top, "profile": profile}
    return last


def wait_for_counts(dep: Deployment, counts: Counter[str], timeout: float = 120.0) -> dict[str, dict]:
    """Read profiles until every user's latest one reflects all of their events."""
    def caught_up() -> dict[str, dict] | None:
        latest = latest_profiles(dep.read(dep.settings.profiles_topic))
        done = all(latest.get(u, {}).get("event_count") == n for u, n in counts.items())
        return latest if done else None
    return wait_for(caught_up, timeout, interval=1.0, what="all users' profiles")


def assert_matches_replay(published: dict[str, dict], expected: dict[str, dict]) -> None:
    assert set(published) == set(expected)
    worst = 0.0
    for user, exp in expected.items():
        got = published[user]
        worst = max(worst, float(np.abs(np.array(got["profile"]) - np.array(exp["profile"])).max()))
        worst = max(worst, max(abs(got["intent"][t] - exp["intent"][t]) for t in EVENT_TYPES))
        assert got["top_categories"] == exp["top_categories"], user
    assert worst <= TOL, f"max abs diff {worst}"


def test_published_profiles_equal_replay(deployment: Deployment, model: ProfileModel) -> None:
    events = synthetic(3000, users=300)
    counts = Counter(e.user_id for e in events)
    worker = deployment.worker().start()
    try:
        deployment.produce(events)
        published = wait_for_counts(deployment, counts)
    finally:
        worker.stop()
    assert len(counts) >= 200
    assert_matches_replay(published, expected_last(model, events))
    for user, prof in published.items():
        assert prof["model_version"] == model.version
        assert prof["last_event_timestamp"] == max(e.timestamp_ms for e in events if e.user_id == user)


def test_events_of_one_user_in_one_batch_keep_their_order(deployment: Deployment, model: ProfileModel) -> None:
    # Produced before the worker starts, so its first fetch holds all of them:
    # each user's whole sequence goes through one multi-event model call.
    kinds = ["view", "click", "cart", "view", "purchase", "favorite", "view", "cart"]
    events = [Event(f"o{u}", kind, f"i{i}", f"c{(u + i) % 5}", START_MS + 1000 * i, None, f"o{u}-{i}")
              for u in range(20) for i, kind in enumerate(kinds)]
    deployment.produce(events)
    worker = deployment.worker().start()
    try:
        published = wait_for_counts(deployment, Counter(e.user_id for e in events))
    finally:
        worker.stop()
    assert_matches_replay(published, expected_last(model, events))
    # The check can tell orders apart: the reversed sequence gives another profile.
    reordered = expected_last(model, [Event(e.user_id, e.type, e.item_id, e.category_id, e.timestamp_ms,
                                            e.price, e.event_id)
                                      for e in sorted(events, key=lambda e: (e.user_id, kinds.index(e.type)))])
    assert any(np.abs(np.array(published[u]["profile"]) - np.array(reordered[u]["profile"])).max() > 1e-3
               for u in published)


def test_invalid_messages_go_to_dead_letter_topic_and_valid_ones_are_processed(
        deployment: Deployment, model: ProfileModel) -> None:
    good = synthetic(200, users=30, seed=3)
    good_msgs = [(e.user_id.encode(), json.dumps(event_to_dict(e)).encode()) for e in good]
    bad_msgs = [
        (b"u1", b"{broken json"),
        (b"u1", json.dumps({"user_id": "u1", "type": "view"}).encode()),
        (b"u1", json.dumps({**event_to_dict(good[0]), "type": "teleport", "user_id": "u1"}).encode()),
        (b"u2", json.dumps({**event_to_dict(good[0]), "user_id": "u1"}).encode()),
        (b"\xff\xfe", json.dumps(event_to_dict(good[0])).encode()),
        (b"u1", b"x" * (17 * 1024)),
    ]
    mixed = good_msgs[:100] + bad_msgs + good_msgs[100:]
    worker = deployment.worker().start()
    try:
        produce_raw(deployment.bootstrap, deployment.settings.events_topic, mixed)
        published = wait_for_counts(deployment, Counter(e.user_id for e in good))
        dlq = wait_for(lambda: (r := deployment.read(deployment.settings.dlq_topic)) and len(r) >= 6 and r,
                       60, what="dead letters")
        status, body = worker.http("/metrics")
    finally:
        worker.stop()
    assert_matches_replay(published, expected_last(model, good))
    reasons = [headers_dict(r.headers)["profilestream.dlq.reason"] for r in dlq]
    assert sorted(reasons) == sorted(["malformed_json", "missing_field", "unknown_type", "key_mismatch",
                                      "bad_key", "oversized"])
    source = {(r.partition, r.offset): (r.key, r.value) for r in deployment.read(deployment.settings.events_topic)}
    for rec in dlq:
        head = headers_dict(rec.headers)
        assert head["profilestream.dlq.topic"] == deployment.settings.events_topic and head["profilestream.dlq.error"]
        # The original bytes, untouched, and the exact place they came from.
        where = (int(head["profilestream.dlq.partition"]), int(head["profilestream.dlq.offset"]))
        assert source[where] == (rec.key, rec.value)
        assert (rec.key, rec.value) in set(bad_msgs)
    assert status == 200
    text = body.decode()
    assert 'profilestream_events_invalid_total{reason="malformed_json"} 1.0' in text


def test_restarted_worker_continues_from_its_rocksdb_state(deployment: Deployment, model: ProfileModel) -> None:
    events = synthetic(1200, users=80, seed=5)
    first, second = events[:700], events[700:]
    worker = deployment.worker()
    worker.start()
    try:
        deployment.produce(first)
        wait_for_counts(deployment, Counter(e.user_id for e in first))
    finally:
        assert worker.stop() == 0
    deployment.produce(second)
    restarted = deployment.worker()  # same index -> same RocksDB directory
    restarted.start()
    try:
        published = wait_for_counts(deployment, Counter(e.user_id for e in events))
        applied = metric_sum(restarted.http("/metrics")[1].decode(), "profilestream_events_consumed_total")
    finally:
        restarted.stop()
    # Only the second half was applied after the restart, yet the profiles equal
    # replay of everything: the first half's effect came from the stored state.
    assert applied == len(second)
    assert_matches_replay(published, expected_last(model, events))


def metric_sum(exposition: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    return sum(s.value for fam in text_string_to_metric_families(exposition)
               for s in fam.samples if s.name == name)
