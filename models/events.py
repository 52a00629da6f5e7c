"""Canonical behaviour events and the one validator of the event contract.

Every source of events -- the Kafka worker, the producer client, the JSONL
loader -- turns a JSON object into an :class:`Event` through
:func:`event_from_dict`, so "valid" means the same thing everywhere.  The
contract is also published as ``streams/schemas/event.schema.json``; the tests
keep the two in step.

Nothing here knows about Kafka: an event is plain data.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

#: The canonical event types, in the column order of every intent vector.
EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "purchase", "favorite")
TYPE_INDEX: dict[str, int] = {name: i for i, name in enumerate(EVENT_TYPES)}

MAX_ID_CHARS = 128
#: Events stamped further than this into the future are rejected: they would
#: poison the user's time-gap features for every later event.
MAX_FUTURE_SKEW_MS = 24 * 3600 * 1000
#: 2000-01-01T00:00:00Z; earlier stamps are almost always seconds sent as ms.
MIN_TIMESTAMP_MS = 946_684_800_000
#: RFC 3339 date-time (section 5.6), offset required: what every producer's ISO formatter writes,
#: without the ISO 8601 variants ``datetime.fromisoformat`` also takes (basic format, week dates,
#: no seconds, space separator) that a consumer in another language may read differently.
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
                      r"(?:([Zz])|([+-])(\d{2}):(\d{2}))", re.ASCII)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MILLISECOND = timedelta(milliseconds=1)
#: Unicode categories an id may not hold: control characters, and lone surrogates (not UTF-8 encodable).
_FORBIDDEN_ID_CATEGORIES = frozenset({"Cc", "Cs"})


@dataclass(frozen=True, slots=True)
class Event:
    """One user action on the website, in canonical form."""

    user_id: str
    type: str
    item_id: str
    category_id: str
    timestamp_ms: int
    price: float | None = None
    event_id: str = ""
    session_id: str | None = None


class EventError(ValueError):
    """An event breaks the contract.

    ``reason`` is a short, stable code (used as a metric label and in the
    dead-letter record); the message says what exactly was wrong.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _require_id(obj: dict[str, Any], field: str, *, optional: bool = False) -> str | None:
    if field not in obj or obj[field] is None:
        if optional:
            return None
        raise EventError("missing_field", f"field {field!r} is required")
    value = obj[field]
    if not isinstance(value, str):
        raise EventError("wrong_type", f"field {field!r} must be a string, got {type(value).__name__}")
    if not value:
        raise EventError("missing_field", f"field {field!r} must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise EventError("field_too_long", f"field {field!r} is longer than {MAX_ID_CHARS} characters")
    if not value.strip():
        raise EventError("bad_id", f"field {field!r} is blank")
    if not value.isprintable():  # the fast path: printable text holds no control character or surrogate
        for char in value:
            if unicodedata.category(char) in _FORBIDDEN_ID_CATEGORIES:
                raise EventError("bad_id", f"field {field!r} holds {char!r}: ids must be UTF-8 text "
                                           "without control characters")
    return value


def parse_timestamp_ms(value: Any) -> int:
    """Epoch milliseconds from an int (ms) or an RFC 3339 string with offset (sub-ms digits truncated).

    Floats are refused on purpose: a float epoch is ambiguous (s or ms?) and
    is how NaN and infinity sneak in.
    """
    if isinstance(value, bool):
        raise EventError("wrong_type", "timestamp must be epoch milliseconds (int) or an RFC 3339 string")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _RFC3339.fullmatch(value)
        if match is None:
            raise EventError("bad_timestamp", f"timestamp {value[:64]!r} is not RFC 3339 with a UTC offset "
                                              "(e.g. 2025-10-09T08:53:20.5+02:00)")
        year, month, day, hour, minute, second, fraction, utc, sign, off_h, off_m = match.groups()
        try:
            if not utc and (int(off_h) > 23 or int(off_m) > 59):
                raise ValueError(f"UTC offset {sign}{off_h}:{off_m} out of range")
            moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                              tzinfo=timezone.utc)
        except ValueError as exc:
            raise EventError("bad_timestamp", f"timestamp {value!r} is not a valid date-time: {exc}") from None
        offset_min = 0 if utc else (1 if sign == "+" else -1) * (int(off_h) * 60 + int(off_m))
        millis = int((fraction or "")[:3].ljust(3, "0"))
        return (moment - _EPOCH) // _MILLISECOND - offset_min * 60_000 + millis
    raise EventError("wrong_type", "timestamp must be epoch milliseconds (int) or an RFC 3339 string")


def event_from_dict(obj: Any, *, now_ms: int | None = None) -> Event:
    """Validate a decoded JSON object against the event contract.

    Raises :class:`EventError` with a reason code; never returns a half-valid
    event.  ``now_ms`` (default: wall clock) bounds future timestamps.
    Unknown extra fields are ignored so producers can add fields first.
    """
    if not isinstance(obj, dict):
        raise EventError("wrong_type", f"event must be a JSON object, got {type(obj).__name__}")
    event_id = _require_id(obj, "event_id")
    user_id = _require_id(obj, "user_id")
    item_id = _require_id(obj, "item_id")
    category_id = _require_id(obj, "category_id")
    session_id = _require_id(obj, "session_id", optional=True)

    if "type" not in obj:
        raise EventError("missing_field", "field 'type' is required")
    kind = obj["type"]
    if not isinstance(kind, str):
        raise EventError("wrong_type", "field 'type' must be a string")
    if kind not in TYPE_INDEX:
        raise EventError("unknown_type", f"type {kind!r} is not one of {', '.join(EVENT_TYPES)}")

    if "timestamp" not in obj:
        raise EventError("missing_field", "field 'timestamp' is required")
    ts = parse_timestamp_ms(obj["timestamp"])
    if ts < MIN_TIMESTAMP_MS:
        raise EventError("bad_timestamp", f"timestamp {ts} is before 2000-01-01 (seconds sent as ms?)")
    limit = (now_ms if now_ms is not None else int(time.time() * 1000)) + MAX_FUTURE_SKEW_MS
    if ts > limit:
        raise EventError("future_timestamp", f"timestamp {ts} is more than 24 h in the future")

    price = obj.get("price")
    if price is not None:
        if isinstance(price, bool) or not isinstance(price, (int, float)):
            raise EventError("wrong_type", "field 'price' must be a number or null")
        try:
            price = float(price)
        except OverflowError:
            raise EventError("number_out_of_range", "price is beyond the float range") from None
        if not math.isfinite(price) or price < 0:
            raise EventError("bad_price", f"price {price!r} must be a finite, non-negative number")

    return Event(
        user_id=user_id,  # type: ignore[arg-type]
        type=kind,
        item_id=item_id,  # type: ignore[arg-type]
        category_id=category_id,  # type: ignore[arg-type]
        timestamp_ms=ts,
        price=price,
        event_id=event_id,  # type: ignore[arg-type]
        session_id=session_id,
    )


def event_to_dict(event: Event) -> dict[str, Any]:
    """The contract's JSON form of an event (timestamp as epoch ms)."""
    out: dict[str, Any] = {
        "event_id": event.event_id,
        "user_id": event.user_id,
        "type": event.type,
        "item_id": event.item_id,
        "category_id": event.category_id,
        "price": event.price,
        "timestamp": event.timestamp_ms,
    }
    if event.session_id is not None:
        out["session_id"] = event.session_id
    return out
