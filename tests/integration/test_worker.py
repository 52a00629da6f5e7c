"""The worker end to end on the real embedded broker, real RocksDB and the real model.

Ground truth everywhere is offline `replay` of the same events: the last
profile the worker published for a user must equal replay's output after
that user's last event.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from aiokafka.structs import ConsumerRecord

from models import ProfileModel
from models.events import Event, event_from_dict
from streams.dev.embedded_broker import EmbeddedBroker
from streams.dev.demo import encode_event
from streams.kafka.publisher import headers_dict

from ..harness import (START_MS, Deployment, assert_matches_replay, exact_end_offsets, expected_last, metric_sum,
                      persisted_changelog_offsets, produce_raw, stream_through, synthetic, wait_for, wait_for_counts)


def test_published_profiles_equal_replay(deployment: Deployment, model: ProfileModel) -> None:
    events = synthetic(3000, users=300)
    counts = Counter(e.user_id for e in events)
    published = stream_through(deployment, events)
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


def bad(user: str, **fields: object) -> tuple[bytes, bytes]:
    """A message keyed by ``user`` whose event is valid unless ``fields`` break it."""
    event = {"event_id": f"{user}-0", "user_id": user, "type": "view", "item_id": "i1", "category_id": "c1",
             "timestamp": START_MS, **fields}
    return user.encode(), json.dumps(event).encode()


FAR_FUTURE_MS = int(time.time() * 1000) + 30 * 86_400_000
#: (case, messages -- the last one is the case, any before it valid --, outcome): a dead-letter
#: reason, or "duplicate_event" for an event that is skipped, not dead-lettered.
BAD_INPUT: list[tuple[str, list[tuple[bytes, bytes | None]], str]] = [
    ("malformed JSON", [(b"bad-json", b"{broken json")], "malformed_json"),
    ("wrong type", [bad("bad-type", item_id=7)], "wrong_type"),
    ("missing field", [(b"bad-missing", json.dumps({"user_id": "bad-missing", "type": "view"}).encode())],
     "missing_field"),
    ("unknown event type", [bad("bad-unknown", type="teleport")], "unknown_type"),
    ("oversized payload", [(b"bad-big", b"x" * (17 * 1024))], "oversized"),
    ("non-UTF-8 key", [(b"\xff\xfe", bad("bad-key")[1])], "bad_key"),
    ("key/user_id mismatch", [(b"bad-mismatch", bad("someone-else")[1])], "key_mismatch"),
    ("NaN timestamp", [bad("bad-nan", timestamp=float("nan"))], "wrong_type"),
    ("far-future timestamp", [bad("bad-future", timestamp=FAR_FUTURE_MS)], "future_timestamp"),
    ("seconds, not ms", [bad("bad-seconds", timestamp=START_MS // 1000)], "bad_timestamp"),
    ("negative price", [bad("bad-price", price=-1)], "bad_price"),
    ("no value", [(b"bad-null", None)], "missing_value"),
    ("duplicate event_id", [bad("dup"), bad("dup", item_id="i2")], "duplicate_event"),
    (">1 h older than the user's last event",
     [bad("late", timestamp=START_MS + 10 * 3_600_000), bad("late", event_id="late-1")], "out_of_order"),
]


@dataclass
class BadInputRun:
    """One worker run over good traffic with every bad-input case mixed in."""

    deployment: Deployment
    applied: list[Event]
    published: dict[str, dict]
    dead_letters: list[ConsumerRecord]
    metrics: str

    def reasons(self, key: bytes) -> list[str]:
        return [headers_dict(r.headers)["profilestream.dlq.reason"] for r in self.dead_letters if r.key == key]


@pytest.fixture(scope="module")
def bad_input_run(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> BadInputRun:
    dep = Deployment(broker.bootstrap_servers, tmp_path_factory.mktemp("bad-input"))
    dep.create_topics()
    good = synthetic(200, users=30, seed=3)
    good_msgs = [encode_event(e) for e in good]
    valid_prelude = [event_from_dict(json.loads(value)) for _, msgs, _ in BAD_INPUT for _, value in msgs[:-1]]
    n_dead = sum(1 for *_, outcome in BAD_INPUT if outcome != "duplicate_event")
    worker = dep.worker().start()
    try:
        produce_raw(dep.bootstrap, dep.settings.events_topic,
                    good_msgs[:100] + [m for _, msgs, _ in BAD_INPUT for m in msgs] + good_msgs[100:])
        published = wait_for_counts(dep, Counter(e.user_id for e in good + valid_prelude))
        dead = wait_for(lambda: (r := dep.read(dep.settings.dlq_topic)) and len(r) >= n_dead and r,
                        60, what="dead letters")
        metrics = wait_for(lambda: (text := worker.http("/metrics")[1].decode()) and metric_sum(
            text, "profilestream_events_invalid_total") == n_dead and text, 30, what="invalid counters")
    finally:
        worker.stop()
    return BadInputRun(dep, good + valid_prelude, published, dead, metrics)


@pytest.mark.parametrize("case, messages, outcome", BAD_INPUT, ids=[case for case, *_ in BAD_INPUT])
def test_bad_input_is_dead_lettered_with_its_reason_or_deduplicated(
        bad_input_run: BadInputRun, case: str, messages: list[tuple[bytes, bytes | None]], outcome: str) -> None:
    key = messages[-1][0]
    if outcome == "duplicate_event":
        assert bad_input_run.reasons(key) == []
        assert bad_input_run.published[key.decode()]["event_count"] == 1
        assert metric_sum(bad_input_run.metrics, "profilestream_events_skipped_total", reason=outcome) == 1
        return
    assert bad_input_run.reasons(key) == [outcome]
    same_reason = sum(1 for *_, o in BAD_INPUT if o == outcome)
    assert metric_sum(bad_input_run.metrics, "profilestream_events_invalid_total", reason=outcome) == same_reason


def test_worker_keeps_going_and_dead_letters_keep_the_original_bytes(
        bad_input_run: BadInputRun, model: ProfileModel) -> None:
    assert_matches_replay(bad_input_run.published, expected_last(model, bad_input_run.applied))
    dep = bad_input_run.deployment
    source = {(r.partition, r.offset): (r.key, r.value) for r in dep.read(dep.settings.events_topic)}
    for rec in bad_input_run.dead_letters:
        head = headers_dict(rec.headers)
        assert head["profilestream.dlq.topic"] == dep.settings.events_topic and head["profilestream.dlq.error"]
        # The original bytes, untouched, and the exact place they came from.
        where = (int(head["profilestream.dlq.partition"]), int(head["profilestream.dlq.offset"]))
        assert source[where] == (rec.key, rec.value)


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
    # Each state partition records the changelog offset the broker acknowledged last: recovery
    # reads only what follows it, and it is never past what the changelog holds.
    recorded = persisted_changelog_offsets(deployment.tmp / "worker0", deployment.partitions)
    ends = exact_end_offsets(deployment.bootstrap, deployment.settings.changelog_topic)
    assert recorded and all(offset < ends[partition] for partition, offset in recorded.items()), (recorded, ends)
    assert sum(offset + 1 for offset in recorded.values()) == sum(ends.values())  # all acknowledged by the stop
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



def test_records_filling_a_producer_batch_leave_in_several(deployment: Deployment, model: ProfileModel) -> None:
    # 16 KB producer batches (the smallest allowed) hold about ten profiles or state records,
    # so each partition's records of a batch of ~30 users leave in several record batches.
    events = synthetic(1200, users=120, seed=7)
    deployment.produce(events)  # before the worker starts: its first batches are large
    worker = deployment.worker(PROFILESTREAM_PRODUCER_BATCH_BYTES="16384").start()
    try:
        published = wait_for_counts(deployment, Counter(e.user_id for e in events))
    finally:
        assert worker.stop() == 0
    assert_matches_replay(published, expected_last(model, events))
    recorded = persisted_changelog_offsets(deployment.tmp / "worker0", deployment.partitions)
    ends = exact_end_offsets(deployment.bootstrap, deployment.settings.changelog_topic)
    assert recorded == {partition: end - 1 for partition, end in ends.items() if end}, (recorded, ends)
