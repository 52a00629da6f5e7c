"""The bad-input matrix at the validation step, the admission rules and the state record."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from models.events import Event, event_to_dict
from streams.state import codec as state_codec
from streams.pipeline.admission import admit
from streams.pipeline.source_record import SourceRecord
from streams.state.codec import StateRecord, StateRecordError
from streams.pipeline.validate import MAX_VALUE_BYTES, Accepted, Rejection, decode_json, validate_record

NOW = 1_760_000_000_000
SCHEMAS = Path(__file__).resolve().parents[2] / "streams" / "schemas"
GOOD = {"event_id": "e1", "user_id": "u1", "type": "cart", "item_id": "i1", "category_id": "c1",
        "price": 9.5, "timestamp": NOW - 1000}


def rec(value: bytes | None, key: bytes | None = b"u1", offset: int = 0) -> SourceRecord:
    return SourceRecord("events", 0, offset, NOW, key, value)


def check(obj: object, key: bytes | None = b"u1") -> Accepted | Rejection:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return validate_record(rec(raw, key), NOW)


def test_valid_event_is_accepted_and_matches_schema() -> None:
    out = check(GOOD)
    assert isinstance(out, Accepted)
    assert out.event == Event("u1", "cart", "i1", "c1", NOW - 1000, 9.5, "e1", None)
    jsonschema.validate(GOOD, json.loads((SCHEMAS / "event.schema.json").read_text()))


def test_rfc3339_timestamp() -> None:
    out = check({**GOOD, "timestamp": "2025-10-09T08:53:20Z"})
    assert isinstance(out, Accepted) and out.event.timestamp_ms == 1_760_000_000_000
    out = check({**GOOD, "timestamp": "2025-10-09T10:53:20.5+02:00"})
    assert isinstance(out, Accepted) and out.event.timestamp_ms == 1_760_000_000_500


@pytest.mark.parametrize("value, key, reason", [
    (b"{not json", b"u1", "malformed_json"),
    (b"\xff\xfe\x00", b"u1", "malformed_json"),
    (b"[1, 2]", b"u1", "wrong_type"),
    (json.dumps({**GOOD, "user_id": 7}).encode(), b"u1", "wrong_type"),
    (json.dumps({**GOOD, "timestamp": 1.5e12}).encode(), b"u1", "wrong_type"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "item_id"}).encode(), b"u1", "missing_field"),
    (json.dumps({**GOOD, "type": "wishlist"}).encode(), b"u1", "unknown_type"),
    (json.dumps(GOOD).encode() + b" " * MAX_VALUE_BYTES, b"u1", "oversized"),
    (json.dumps(GOOD).encode(), b"\xff\xfe", "bad_key"),
    (json.dumps(GOOD).encode(), None, "bad_key"),
    (json.dumps(GOOD).encode(), b"u2", "key_mismatch"),
    (b'{"event_id":"e1","user_id":"u1","type":"view","item_id":"i","category_id":"c","timestamp":NaN}',
     b"u1", "wrong_type"),
    (json.dumps({**GOOD, "price": float("nan")}).encode(), b"u1", "bad_price"),
    (json.dumps({**GOOD, "timestamp": NOW + 10 * 86_400_000}).encode(), b"u1", "future_timestamp"),
    (json.dumps({**GOOD, "timestamp": 1_500_000_000}).encode(), b"u1", "bad_timestamp"),
    (json.dumps({**GOOD, "timestamp": "yesterday"}).encode(), b"u1", "bad_timestamp"),
    (None, b"u1", "missing_value"),
])
def test_bad_input_is_rejected_with_its_reason(value: bytes | None, key: bytes | None, reason: str) -> None:
    out = validate_record(rec(value, key), NOW)
    assert isinstance(out, Rejection), out
    assert out.reason == reason
    assert out.message


def accepted(offset: int, event_id: str, ts: int) -> Accepted:
    event = Event("u1", "view", "i", "c", ts, None, event_id)
    return Accepted(rec(json.dumps(event_to_dict(event)).encode(), offset=offset), event)


def test_admission_skips_redelivered_and_duplicates_and_rejects_very_late() -> None:
    stored = StateRecord("fp", 10, (state_codec.event_id_hash("seen"),), b"")
    items = [accepted(9, "old", NOW), accepted(10, "old2", NOW), accepted(11, "seen", NOW),
             accepted(12, "new", NOW), accepted(13, "late", NOW - 2 * 3_600_000), accepted(14, "new2", NOW - 5)]
    out = admit(items, stored, last_timestamp_ms=NOW)
    assert [a.event.event_id for a in out.apply] == ["new", "new2"]
    assert out.redelivered == 2 and out.duplicates == 1
    assert [r.reason for r in out.rejected] == ["out_of_order"]
    assert out.last_offset == 14
    assert state_codec.event_id_hash("new2") == out.recent_ids[-1]


def test_admission_dedupes_within_one_batch() -> None:
    out = admit([accepted(1, "a", NOW), accepted(2, "a", NOW)], None, None)
    assert [a.record.offset for a in out.apply] == [1] and out.duplicates == 1


def test_state_record_round_trip_and_corruption() -> None:
    rec_ = StateRecord("abcdef0123456789", 42, (1, 2**63 + 5), b"\x00model-bytes")
    assert state_codec.decode(state_codec.encode(rec_)) == rec_
    with pytest.raises(StateRecordError):
        state_codec.decode(b"\x07garbage")
    with pytest.raises(StateRecordError):
        state_codec.decode(state_codec.encode(rec_)[:5])


@pytest.mark.parametrize("payload", [
    b'{"timestamp": NaN}', b'{"price": Infinity}', b'\xef\xbb\xbf{"a": 1}', b'{"user_id": "\\ud800"}',
    b'{"timestamp": 123456789012345678901234567890}', b'{"a": 1, "a": 2}', b'[1, 2]', b'{"a": 1e400}',
    b'{"timestamp": 1732000000000.0}', b'{"a": "\xff"}', b'{"a": }',
])
def test_fast_json_decoding_gives_the_standard_librarys_verdicts(payload: bytes) -> None:
    """orjson is the fast path; whatever it reads differently, the standard library decides."""
    try:
        expected: object = json.loads(payload)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        expected = type(exc)
    try:
        got: object = decode_json(payload)
    except ValueError as exc:
        got = type(exc)
    assert repr(got) == repr(expected)
