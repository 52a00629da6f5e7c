"""Erasing users: `profilestream forget` (a control record the owning worker applies) and the idle TTL.

End to end against a running worker: the state is gone (the next event starts
a fresh state, equal to replay of that event alone), the compacted profile
topic carries a tombstone, and a subscriber drops the user.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from models import ProfileModel
from models.events import Event, EventError
from streams.clients.subscriber import ProfileSubscriber
from streams.kafka.publisher import headers_dict
from streams.pipeline.control import (CONTROL_HEADER, IDLE_BEFORE_HEADER, ControlRequest, control_request,
                                      expire_headers, forget_headers, is_control)
from streams.pipeline.source_record import SourceRecord
from streams.service.ttl import DAY_MS, idle_users

from ..harness import (REPO, Deployment, assert_matches_replay, expected_last, latest_profiles, metric_sum,
                      produce_raw, synthetic, wait_for, wait_for_counts)


def control(key: bytes | None, headers: list[tuple[str, bytes]], value: bytes | None = None) -> SourceRecord:
    return SourceRecord("events", 0, 5, 0, key, value, tuple(headers))


def test_control_records_are_recognised_by_their_header_and_checked() -> None:
    assert control_request(control(b"u1", forget_headers())) == ControlRequest("u1")
    assert control_request(control(b"u1", expire_headers(1234))) == ControlRequest("u1", 1234)
    assert not is_control(control(b"u1", []))  # a plain tombstone stays a missing_value dead letter
    for record, reason in [
        (control(b"u1", [(CONTROL_HEADER, b"rewind")]), "unknown_control"),
        (control(b"u1", forget_headers(), value=b"{}"), "unknown_control"),
        (control(b"u1", [(CONTROL_HEADER, b"expire")]), "unknown_control"),
        (control(b"u1", [(CONTROL_HEADER, b"expire"), (IDLE_BEFORE_HEADER, b"-5")]), "unknown_control"),
        (control(b"u1", expire_headers(1) + [(IDLE_BEFORE_HEADER, b"2")]), "unknown_control"),
        (control(None, forget_headers()), "bad_key"),
        (control(b"\xff", expire_headers(1)), "bad_key"),
    ]:
        assert is_control(record)
        with pytest.raises(EventError) as info:
            control_request(record)
        assert info.value.reason == reason


def test_idle_users_are_those_whose_last_event_is_older_than_the_cutoff(model: ProfileModel) -> None:
    from streams.state import codec as state_codec
    now = int(time.time() * 1000)
    result = model.advance([None, None], [[Event("old", "view", "i", "c", now - 3 * DAY_MS, None, "e1")],
                                          [Event("new", "view", "i", "c", now - 1000, None, "e2")]])
    entries = [(user.encode(), state_codec.encode(state_codec.StateRecord(
        model.fingerprint, 0, (), model.encode_state(state)))) for user, state in zip(["old", "new"], result.states)]
    assert idle_users(entries, model, now - DAY_MS) == ["old"]
    assert idle_users(entries, model, now - 4 * DAY_MS) == []


def profile_records(dep: Deployment, user: str) -> list[dict | None]:
    """Every profile-topic value of one user, in order (None = tombstone)."""
    return [None if r.value is None else json.loads(r.value)
            for r in dep.read(dep.settings.profiles_topic) if r.key == user.encode()]


def forget_cli(dep: Deployment, *user_ids: str) -> None:
    """The real command, as an operator runs it."""
    subprocess.run([sys.executable, "-m", "streams.cli", "forget", "--yes", *user_ids], cwd=REPO, check=True,
                   env=dep.env(dep.tmp / "cli", 0), timeout=60)


def test_forget_applies_in_order_with_the_users_events(deployment: Deployment, model: ProfileModel) -> None:
    others = synthetic(300, users=40, seed=31)
    mine = [Event("fx", kind, f"i{i}", "c1", others[0].timestamp_ms + 1000 * i, None, f"fx-{i}")
            for i, kind in enumerate(["view", "cart", "purchase"])]
    topic = deployment.settings.events_topic
    deployment.produce(others[:150] + mine[:2])
    produce_raw(deployment.bootstrap, topic, [(b"fx", None)], headers=forget_headers())
    produce_raw(deployment.bootstrap, topic, [(b"fx", None)], headers=[(CONTROL_HEADER, b"rewind")])
    deployment.produce(mine[2:] + others[150:])
    worker = deployment.worker().start()  # everything is waiting: the forget lands mid-batch
    try:
        wait_for(lambda: [None if p is None else p["event_count"] for p in profile_records(deployment, "fx")][-2:]
                 == [None, 1], 60, what="fx erased, then one event")
        published = wait_for_counts(deployment, Counter([e.user_id for e in others] + ["fx"]))
        dlq = wait_for(lambda: deployment.read(deployment.settings.dlq_topic), 30, what="dead letter")
        metrics = worker.http("/metrics")[1].decode()
    finally:
        worker.stop()
    # fx was erased after its first two events: what is left is a fresh state plus the third.
    assert_matches_replay(published, {**expected_last(model, others), **expected_last(model, mine[2:])})
    history = profile_records(deployment, "fx")
    assert history[-2] is None and history[-1]["event_count"] == 1
    assert [headers_dict(r.headers)["profilestream.dlq.reason"] for r in dlq] == ["unknown_control"]
    assert metric_sum(metrics, "profilestream_users_forgotten_total", cause="request") == 1


def test_forget_command_erases_a_user_while_the_worker_runs(
        deployment: Deployment, model: ProfileModel) -> None:
    events = synthetic(400, users=30, seed=32)
    counts = Counter(e.user_id for e in events)
    victim, bystander = (u for u, _ in counts.most_common(2))
    worker = deployment.worker().start()
    subscriber = ProfileSubscriber(deployment.settings).start()
    try:
        deployment.produce(events)
        wait_for_counts(deployment, counts)
        assert subscriber.wait_until_caught_up(30)
        wait_for(lambda: subscriber.get(victim) is not None, 30, what="subscriber sees the user")
        assert worker.http(f"/users/{victim}/profile")[0] == 200

        forget_cli(deployment, victim)

        wait_for(lambda: victim not in latest_profiles(deployment.read(deployment.settings.profiles_topic)),
                 60, what="profile tombstone")
        wait_for(lambda: subscriber.get(victim) is None, 30, what="subscriber drops the user")
        assert worker.http(f"/users/{victim}/profile")[0] == 404
        assert subscriber.get(bystander) is not None

        again = Event(victim, "view", "i-new", "c-new", events[-1].timestamp_ms + 1000, None, "after-forget")
        deployment.produce([again])
        published = wait_for_counts(deployment, Counter({**counts, victim: 1}))
        metrics = worker.http("/metrics")[1].decode()
    finally:
        subscriber.close()
        worker.stop()
    assert profile_records(deployment, victim)[-2] is None
    expected = expected_last(model, events)
    expected[victim] = expected_last(model, [again])[victim]  # a fresh state: nothing of before survives
    assert_matches_replay(published, expected)
    assert metric_sum(metrics, "profilestream_users_forgotten_total", cause="request") == 1


def test_idle_ttl_erases_users_not_seen_for_longer_than_the_ttl(
        deployment: Deployment, model: ProfileModel) -> None:
    now = int(time.time() * 1000)
    stale = [Event("stale", "view", f"i{i}", "c1", now - 3 * DAY_MS + i, None, f"s{i}") for i in range(3)]
    fresh = [Event("fresh", "view", f"i{i}", "c1", now - 60_000 + i, None, f"f{i}") for i in range(2)]
    worker = deployment.worker(PROFILESTREAM_STATE_TTL_DAYS="1", PROFILESTREAM_STATE_TTL_SWEEP_S="1").start()
    try:
        deployment.produce(stale + fresh)
        wait_for(lambda: profile_records(deployment, "stale")[-1:] == [None], 60, what="TTL tombstone")
        latest = wait_for_counts(deployment, Counter({"fresh": 2}))
        assert worker.http("/users/stale/profile")[0] == 404
        assert worker.http("/users/fresh/profile")[0] == 200
        metrics = worker.http("/metrics")[1].decode()
    finally:
        worker.stop()
    assert [p["event_count"] for p in profile_records(deployment, "stale") if p is not None][-1] == 3
    assert "stale" not in latest
    assert_matches_replay(latest, expected_last(model, fresh))
    assert metric_sum(metrics, "profilestream_users_forgotten_total", cause="ttl") == 1
