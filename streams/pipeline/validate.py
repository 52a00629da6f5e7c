"""Step 1 of the pipeline: raw Kafka records -> valid events or rejections with a reason.

The event contract itself (fields, types, timestamps) is
:func:`models.events.event_from_dict`, shared with the producer client and the
JSONL loader; this module adds what only exists on the wire: the key, the
payload size and the JSON encoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import orjson

from models.events import MAX_ID_CHARS, Event, EventError, event_from_dict

from .source_record import SourceRecord

#: Largest accepted message value; bigger ones are rejected unparsed.
MAX_VALUE_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that cannot be applied, and why (``reason`` is a stable code)."""

    record: SourceRecord
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Accepted:
    record: SourceRecord
    event: Event


def decode_json(value: bytes) -> Any:
    """``json.loads`` verdicts at orjson's speed (decoding is the largest share of validation).

    orjson is stricter than the standard library (NaN, Infinity, lone
    surrogates and a BOM are errors) and reads integers beyond 64 bits as
    floats.  Whenever it refuses a value, or returns a float timestamp, the
    standard library decodes it instead, so every record gets the same
    verdict and reason code as before; only valid events take the fast path.
    """
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return json.loads(value)
    if isinstance(obj, dict) and type(obj.get("timestamp")) is float:
        return json.loads(value)
    return obj


def check_message(key: bytes | None, value: bytes | None, now_ms: int | None = None) -> Event:
    """The event a (key, value) message carries, or :class:`EventError` with the reason.

    This is the worker's whole acceptance rule (wire checks, then the event
    contract); the producer client runs it before sending, so a message the
    producer lets through is one the worker accepts.
    """
    if value is None:
        raise EventError("missing_value", "record has no value (tombstone?)")
    if len(value) > MAX_VALUE_BYTES:
        raise EventError("oversized", f"value is {len(value)} bytes, limit {MAX_VALUE_BYTES}")
    if key is None:
        raise EventError("bad_key", "record has no key; the key must be the user_id")
    try:
        key_text = key.decode("utf-8")
    except UnicodeDecodeError:
        raise EventError("bad_key", "key is not valid UTF-8") from None
    if len(key_text) > MAX_ID_CHARS:
        raise EventError("bad_key", f"key is longer than {MAX_ID_CHARS} characters")
    try:
        obj = decode_json(value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise EventError("malformed_json", f"value is not UTF-8 JSON: {exc}") from None
    event = event_from_dict(obj, now_ms=now_ms)
    if event.user_id != key_text:
        raise EventError("key_mismatch", f"key {key_text!r} differs from user_id {event.user_id!r}")
    return event


def validate_record(record: SourceRecord, now_ms: int) -> Accepted | Rejection:
    """Check one record against the wire rules and the event contract."""
    try:
        return Accepted(record, check_message(record.key, record.value, now_ms))
    except EventError as exc:
        return Rejection(record, exc.reason, str(exc))


def validate_batch(records: Sequence[SourceRecord], now_ms: int) -> tuple[list[Accepted], list[Rejection]]:
    """Split a micro-batch into accepted events and rejections, keeping order."""
    accepted: list[Accepted] = []
    rejected: list[Rejection] = []
    for record in records:
        outcome = validate_record(record, now_ms)
        (accepted if isinstance(outcome, Accepted) else rejected).append(outcome)  # type: ignore[arg-type]
    return accepted, rejected
