"""Step 1 of the pipeline: raw Kafka records -> valid events or rejections with a reason.

The event contract itself (fields, types, timestamps) is
:func:`models.events.event_from_dict`, shared with the producer client and the
JSONL loader; this module adds what only exists on the wire: the key, the
payload size and the JSON encoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from models.events import MAX_ID_CHARS, Event, EventError, event_from_dict

from .records import SourceRecord

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


def validate_record(record: SourceRecord, now_ms: int) -> Accepted | Rejection:
    """Check one record against the wire rules and the event contract."""
    value = record.value
    if value is None:
        return Rejection(record, "missing_value", "record has no value (tombstone?)")
    if len(value) > MAX_VALUE_BYTES:
        return Rejection(record, "oversized", f"value is {len(value)} bytes, limit {MAX_VALUE_BYTES}")
    key = record.key
    if key is None:
        return Rejection(record, "bad_key", "record has no key; the key must be the user_id")
    try:
        key_text = key.decode("utf-8")
    except UnicodeDecodeError:
        return Rejection(record, "bad_key", "key is not valid UTF-8")
    if len(key_text) > MAX_ID_CHARS:
        return Rejection(record, "bad_key", f"key is longer than {MAX_ID_CHARS} characters")
    try:
        obj = json.loads(value)
    except (UnicodeDecodeError, ValueError) as exc:
        return Rejection(record, "malformed_json", f"value is not UTF-8 JSON: {exc}")
    try:
        event = event_from_dict(obj, now_ms=now_ms)
    except EventError as exc:
        return Rejection(record, exc.reason, str(exc))
    if event.user_id != key_text:
        return Rejection(record, "key_mismatch", f"key {key_text!r} differs from user_id {event.user_id!r}")
    return Accepted(record, event)


def validate_batch(records: Sequence[SourceRecord], now_ms: int) -> tuple[list[Accepted], list[Rejection]]:
    """Split a micro-batch into accepted events and rejections, keeping order."""
    accepted: list[Accepted] = []
    rejected: list[Rejection] = []
    for record in records:
        outcome = validate_record(record, now_ms)
        (accepted if isinstance(outcome, Accepted) else rejected).append(outcome)  # type: ignore[arg-type]
    return accepted, rejected
