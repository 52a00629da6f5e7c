"""The bad-input matrix at the validation step, the admission rules and the state record."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import jsonschema
import pytest

from models.events import Event, EventError, event_to_dict
from streams.pipeline import validate
from streams.pipeline.admission import admit
from streams.pipeline.partitioning import partition_for
from streams.pipeline.source_record import SourceRecord
from streams.pipeline.validate import MAX_VALUE_BYTES, Accepted, Rejection, decode_json, validate_record
from streams.state import codec as state_codec
from streams.state.codec import StateRecord, StateRecordError

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
    (b"\xff\xfe\x00", b"u1", "bad_encoding"),
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
    (b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), b"u1", "bad_encoding"),
    (json.dumps(GOOD).encode("utf-16"), b"u1", "bad_encoding"),
    (json.dumps({**GOOD, "category_id": "\ud800"}).encode(), b"u1", "bad_encoding"),
    (json.dumps({**GOOD, "x": ["\udfff"]}).encode(), b"u1", "bad_encoding"),
    (json.dumps({**GOOD, "item_id": "x"}).encode().replace(b'"x"', b'"\xed\xa0\x80"'), b"u1", "bad_encoding"),
    (json.dumps(GOOD).encode()[:-1] + b', "item_id": "i2"}', b"u1", "duplicate_key"),
    (json.dumps(GOOD).encode()[:-1] + b', "x": {"a": 1, "a": 2}}', b"u1", "duplicate_key"),
    (json.dumps(GOOD).encode()[:-1] + b', "x": "\\u003a", "x": 1}', b"u1", "duplicate_key"),
    (json.dumps({**GOOD, "x": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}).encode(), b"u1", "too_deep"),
    (json.dumps(GOOD).encode()[:-1] + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"u1", "too_deep"),
    (json.dumps(GOOD).encode()[:-1] + b', "price": 1e400}', b"u1", "number_out_of_range"),
    (json.dumps({**GOOD, "price": 10 ** 400}).encode(), b"u1", "number_out_of_range"),
    (json.dumps({**GOOD, "x": -10 ** 309}).encode(), b"u1", "number_out_of_range"),
    (json.dumps({**GOOD, "timestamp": 0}).encode().replace(b'"timestamp": 0', b'"timestamp": ' + b"9" * 5000),
     b"u1", "number_out_of_range"),
    (json.dumps({**GOOD, "user_id": " \t"}).encode(), b" \t", "bad_id"),
    (json.dumps({**GOOD, "event_id": "e\n1"}).encode(), b"u1", "bad_id"),
    (json.dumps({**GOOD, "item_id": "i\u0085"}).encode(), b"u1", "bad_id"),
    (json.dumps({**GOOD, "session_id": "\u0000"}).encode(), b"u1", "bad_id"),
    (json.dumps({**GOOD, "timestamp": "20251009T085320Z"}).encode(), b"u1", "bad_timestamp"),
    (json.dumps({**GOOD, "timestamp": "2025-10-09 08:53:20Z"}).encode(), b"u1", "bad_timestamp"),
    (json.dumps({**GOOD, "timestamp": "2025-W41-4T08:53:20Z"}).encode(), b"u1", "bad_timestamp"),
    (json.dumps({**GOOD, "timestamp": "2025-10-09T08:53Z"}).encode(), b"u1", "bad_timestamp"),
    (json.dumps({**GOOD, "timestamp": "2025-10-09T08:53:20"}).encode(), b"u1", "bad_timestamp"),
    (json.dumps({**GOOD, "timestamp": "2025-10-09T08:53:20+0200"}).encode(), b"u1", "bad_timestamp"),
    (json.dumps({**GOOD, "timestamp": " 2025-10-09T08:53:20Z"}).encode(), b"u1", "bad_timestamp"),
    (json.dumps({**GOOD, "timestamp": "2025-02-30T08:53:20Z"}).encode(), b"u1", "bad_timestamp"),
    (json.dumps({**GOOD, "timestamp": "2025-10-09T08:53:20+24:00"}).encode(), b"u1", "bad_timestamp"),
    (json.dumps({**GOOD, "timestamp": "0001-01-01T00:00:00+01:00"}).encode(), b"u1", "bad_timestamp"),
    (json.dumps({**GOOD, "timestamp": "9999-12-31T23:59:59-23:59"}).encode(), b"u1", "future_timestamp"),
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


@pytest.mark.parametrize("payload, outcome", [
    (b'{"timestamp": NaN}', {"timestamp": float("nan")}),
    (b'{"price": Infinity}', {"price": float("inf")}),
    (b'{"timestamp": 123456789012345678901234567890}', {"timestamp": 123456789012345678901234567890}),
    (b'{"timestamp": 1732000000000.0}', {"timestamp": 1732000000000.0}),
    (b'{"a": 18446744073709551616}', {"a": 18446744073709551616.0}),
    (b'[1, 2]', [1, 2]),
    (b'{"t": "2025-10-09T08:53:20Z", "u": "a:b", "v": {"w": ":"}}',
     {"t": "2025-10-09T08:53:20Z", "u": "a:b", "v": {"w": ":"}}),
    (b'{"a": "\\u003a"}', {"a": ":"}),
    (b'{"a": "caf\xc3\xa9"}', {"a": "caf\u00e9"}),
    (b'\xef\xbb\xbf{"a": 1}', "bad_encoding"),
    (b'{"user_id": "\\ud800"}', "bad_encoding"),
    (b'{"a": "\xff"}', "bad_encoding"),
    (b'{"a": 1, "a": 2}', "duplicate_key"),
    (b'{"a": 1, "b": {"c": 1, "c": 1}}', "duplicate_key"),
    (b'{"a": 1e400}', "number_out_of_range"),
    (b'{"a": -1e400}', "number_out_of_range"),
    (b'{"a": }', "malformed_json"),
    (b"[" * 17 + b"]" * 17, "too_deep"),
    (b"[" * 16 + b"]" * 16, [[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]),
])
def test_json_decoding_accepts_one_meaning_only(payload: bytes, outcome: object) -> None:
    """orjson is the fast path; the standard library decides what it refuses, under the same rules."""
    if isinstance(outcome, str):
        with pytest.raises(EventError) as err:
            decode_json(payload)
        assert err.value.reason == outcome
    else:
        assert repr(decode_json(payload)) == repr(outcome)


def test_key_on_another_partition_than_murmur2_gives_is_rejected() -> None:
    value = json.dumps(GOOD).encode()
    right = partition_for(b"u1", 8)
    assert isinstance(validate_record(SourceRecord("events", right, 0, NOW, b"u1", value), NOW, 8), Accepted)
    out = validate_record(SourceRecord("events", (right + 1) % 8, 0, NOW, b"u1", value), NOW, 8)
    assert isinstance(out, Rejection) and out.reason == "wrong_partition" and f"partition {right}" in out.message


def test_an_unforeseen_exception_makes_the_record_unprocessable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection into the real check: the record is rejected, never the worker stopped."""
    def explode(obj: object, *, now_ms: int | None = None) -> Event:
        raise KeyError("injected")
    monkeypatch.setattr(validate, "event_from_dict", explode)
    out = validate_record(rec(json.dumps(GOOD).encode()), NOW)
    assert isinstance(out, Rejection) and out.reason == "unprocessable"
    assert out.exception == "builtins.KeyError" and out.message == "KeyError: 'injected'"


def test_event_id_hash_is_64_bit_blake2b_and_format_1_records_still_catch_duplicates() -> None:
    ids = [f"e-{i}" for i in range(20_000)]
    hashes = {state_codec.event_id_hash(i) for i in ids}
    assert len(hashes) == len(ids) and max(hashes) >= 2 ** 60
    # The format-1 hash was two CRC32s of the same bytes: ids whose CRC32 collide collide in
    # both halves (CRC is linear), so it was a 32-bit hash; BLAKE2b keeps them apart.
    a, b = _crc32_collision()
    assert state_codec.legacy_event_id_hash(a) == state_codec.legacy_event_id_hash(b)
    assert state_codec.event_id_hash(a) != state_codec.event_id_hash(b)
    # A record written by format 1 (the old layout, built here byte by byte) decodes, and its
    # ids keep catching re-sent events until newer ids push them out.
    fp = b"abcdef0123456789"
    old_ids = [state_codec.legacy_event_id_hash(f"old-{i}") for i in range(8)]
    v1 = (struct.pack("<BB", 1, len(fp)) + fp + struct.pack("<qB", 41, 8) + struct.pack("<8Q", *old_ids)
          + b"model-state")
    stored = state_codec.decode(v1)
    assert stored == StateRecord(fp.decode(), 41, (), b"model-state", tuple(old_ids))
    out = admit([accepted(42, "old-7", NOW), accepted(43, "new-0", NOW), accepted(44, "old-1", NOW),
                 accepted(45, "new-1", NOW), accepted(46, "old-1", NOW)], stored, NOW)
    # Each new id pushes out the oldest legacy one (8 ids in all): old-1 is caught at 44 and,
    # pushed out by new-1, applied at 46 -- the documented 8-event window.
    assert [a.event.event_id for a in out.apply] == ["new-0", "new-1", "old-1"] and out.duplicates == 2
    assert out.legacy_ids == tuple(old_ids[3:]) and len(out.recent_ids) == 3
    again = state_codec.decode(state_codec.encode(StateRecord(fp.decode(), 46, out.recent_ids, b"m",
                                                                out.legacy_ids)))
    assert again.legacy_event_ids == tuple(old_ids[3:]) and again.recent_event_ids == out.recent_ids
    assert state_codec.encode(again)[0] == state_codec.FORMAT_VERSION == 2


def _crc32_collision() -> tuple[str, str]:
    """Two distinct event ids of equal length with equal CRC32 (a search of ~10^5 ids: the birthday bound)."""
    seen: dict[int, str] = {}
    i = 0
    while True:
        event_id = f"evt-{i:08d}"
        crc = zlib.crc32(event_id.encode())
        if crc in seen:
            return seen[crc], event_id
        seen[crc] = event_id
        i += 1


def test_partitioner_is_kafkas_murmur2() -> None:
    """The pipeline's own murmur2 places keys exactly where aiokafka and kafka-python producers do."""
    import random

    from aiokafka.partitioner import murmur2 as aiokafka_murmur2
    from kafka.partitioner.default import murmur2 as kafka_python_murmur2

    from streams.pipeline.partitioning import murmur2

    rng = random.Random(7)
    keys = [b"", b"u", b"u4", b"u42", b"u423", "ü-€".encode()] + [rng.randbytes(rng.randrange(64)) for _ in range(500)]
    for key in keys:
        assert murmur2(key) == aiokafka_murmur2(key) == kafka_python_murmur2(key), key
