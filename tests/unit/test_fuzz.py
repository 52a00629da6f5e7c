"""Property-based: whatever bytes a record holds, the path validate -> featurise -> model step ->
state encode ends in *accepted* (and then runs through without an exception) or *rejected with a
known reason* -- never an exception, and never ``unprocessable`` (that code is for failures no
rule foresaw: a fuzz case reaching it is a validator gap).

Three sources of cases (hypothesis): arbitrary bytes, arbitrary JSON values, and event-shaped
objects whose fields are valid, arbitrary JSON or hostile text, each serialised several ways
(ASCII escapes, raw UTF-8 with surrogates passed through, a duplicated key, a BOM).  The model is
the shipped checkpoint, the state codec the worker's.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import ProfileModel
from models.events import EVENT_TYPES, EventError
from streams.clients.producer import encode_checked
from streams.pipeline.partitioning import partition_for
from streams.pipeline.profile_message import profile_message
from streams.pipeline.source_record import SourceRecord
from streams.pipeline.validate import Accepted, validate_record
from streams.service.metrics import INVALID_REASONS
from streams.state import codec as state_codec
from streams.state.codec import StateRecord

NOW = 1_760_000_000_000
PARTITIONS = 4
#: Validation's own codes (admission's out_of_order needs a stored state, unprocessable is a gap).
VALIDATION_REASONS = set(INVALID_REASONS) - {"out_of_order", "unknown_control", "unprocessable"}
#: Cases per property; the report's fuzz case count is their sum.
EXAMPLES = {"bytes": 600, "json": 600, "event": 1800, "producer": 1000}
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

outcomes: Counter[str] = Counter()

#: Any code point, lone surrogates and control characters included.
any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10 ** 400), max_value=10 ** 400)
    | st.floats() | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=30)
valid_ids = st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=20)
valid_events = st.fixed_dictionaries(
    {"event_id": valid_ids, "user_id": valid_ids, "type": st.sampled_from(EVENT_TYPES), "item_id": valid_ids,
     "category_id": valid_ids, "timestamp": st.integers(min_value=NOW - 10 ** 11, max_value=NOW + 10 ** 7)},
    optional={"price": st.one_of(st.none(), st.floats(min_value=0, max_value=1e9)), "session_id": valid_ids,
              "extra": json_values})
hostile_values = st.one_of(
    any_text, st.text(min_size=120, max_size=140), json_values, st.floats(),
    st.integers(min_value=-(10 ** 400), max_value=10 ** 400), st.integers(),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                 timezones=st.just(timezone(timedelta(hours=5, minutes=30)))).map(lambda d: d.isoformat()),
    st.datetimes(timezones=st.just(timezone.utc)).map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")))
#: A valid event with up to two fields (or new ones) replaced by hostile values: most cases stay
#: close enough to valid to reach the model.
events = st.tuples(valid_events, st.lists(st.tuples(
    st.sampled_from(["event_id", "user_id", "type", "item_id", "category_id", "timestamp", "price", "session_id",
                     "extra"]), hostile_values), max_size=2)).map(lambda pair: {**pair[0], **dict(pair[1])})
encodings = st.sampled_from(["ascii", "utf-8", "duplicate", "bom"])


def serialise(obj: Any, encoding: str) -> bytes:
    """``obj`` as JSON the way a producer might write it (``json`` may write NaN and Infinity)."""
    if encoding == "ascii":
        return json.dumps(obj).encode()
    raw = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if encoding == "duplicate" and raw.startswith(b"{") and raw != b"{}":
        return raw[:-1] + b', "type": "view"}'
    return b"\xef\xbb\xbf" + raw if encoding == "bom" else raw


def key_of(obj: Any) -> bytes | None:
    user = obj.get("user_id") if isinstance(obj, dict) else None
    return user.encode("utf-8", "surrogatepass") if isinstance(user, str) else None


def run_pipeline(model: ProfileModel, key: bytes | None, value: bytes | None, partition: int | None = None) -> str:
    """One record through the worker's steps; its outcome ("accepted" or the rejection reason)."""
    if partition is None:
        partition = partition_for(key or b"", PARTITIONS)
    out = validate_record(SourceRecord("events", partition, 7, NOW, key, value), NOW, PARTITIONS)
    if not isinstance(out, Accepted):
        assert out.reason in VALIDATION_REASONS, (out.reason, out.message, key, value)
        assert out.message
        outcomes[out.reason] += 1
        return out.reason
    event = out.event
    result = model.prepare_advance([None], [[event]])()  # featurise, then the torch step
    state = result.states[0]
    blob = model.encode_state(state)
    assert model.decode_state(blob).n_events == 1
    stored = state_codec.encode(StateRecord(model.fingerprint, 7, (state_codec.event_id_hash(event.event_id),), blob))
    assert state_codec.decode(stored).model_state == blob
    profile = profile_message(event.user_id, model.version, NOW, state.n_events, state.last_timestamp_ms,
                              result.profile[0], result.intent[0], result.top_categories[0])
    assert json.loads(profile)["user_id"] == event.user_id
    outcomes["accepted"] += 1
    return "accepted"


@settings(FUZZ, max_examples=EXAMPLES["bytes"])
@given(key=st.one_of(st.none(), st.binary(max_size=200)), value=st.one_of(st.none(), st.binary(max_size=20_000)),
       partition=st.integers(0, PARTITIONS - 1))
def test_arbitrary_bytes_are_accepted_or_rejected(model: ProfileModel, key: bytes | None, value: bytes | None,
                                                  partition: int) -> None:
    run_pipeline(model, key, value, partition)


@settings(FUZZ, max_examples=EXAMPLES["json"])
@given(obj=json_values, encoding=encodings)
def test_arbitrary_json_values_are_accepted_or_rejected(model: ProfileModel, obj: Any, encoding: str) -> None:
    run_pipeline(model, key_of(obj), serialise(obj, encoding))


@settings(FUZZ, max_examples=EXAMPLES["event"])
@given(obj=events, encoding=encodings)
def test_event_shaped_objects_are_accepted_or_rejected(model: ProfileModel, obj: dict[str, Any],
                                                       encoding: str) -> None:
    run_pipeline(model, key_of(obj), serialise(obj, encoding))


@settings(FUZZ, max_examples=EXAMPLES["producer"])
@given(obj=events)
def test_the_producer_client_accepts_or_refuses_with_a_reason(obj: dict[str, Any]) -> None:
    """The producer client's check (streams/clients/producer.py) on the Python object: the message, or an
    EventError with one of the worker's reasons -- never another exception."""
    try:
        key, value, event = encode_checked(obj)
    except EventError as exc:
        assert exc.reason in VALIDATION_REASONS, exc.reason
        return
    assert isinstance(validate_record(SourceRecord("events", 0, 0, NOW, key, value), event.timestamp_ms), Accepted)


def test_fuzzing_reached_acceptance_and_the_new_rules() -> None:
    """The properties above ran deep: events were accepted and went through the model, and the
    new rules fired (a fuzzer that only ever produced malformed JSON would prove little)."""
    if not outcomes:
        pytest.fail("run with the property tests above (same module)")
    assert outcomes["accepted"] >= 300, outcomes
    for reason in ("bad_encoding", "duplicate_key", "bad_id", "malformed_json", "wrong_type"):
        assert outcomes[reason] > 0, (reason, outcomes)
    print(f"\nfuzz: {sum(outcomes.values())} cases: {dict(outcomes.most_common())}")
