"""Step 1 of the pipeline: raw Kafka records -> valid events or rejections with a reason.

The event contract itself (fields, types, timestamps) is
:func:`models.events.event_from_dict`, shared with the producer client and the
JSONL loader; this module adds what only exists on the wire: the key, the
payload size and the JSON encoding.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import orjson

from models.events import MAX_ID_CHARS, Event, EventError, event_from_dict

from .partitioning import partition_for
from .source_record import SourceRecord

log = logging.getLogger(__name__)

#: Largest accepted message value; bigger ones are rejected unparsed.
MAX_VALUE_BYTES = 16 * 1024
#: Deepest JSON nesting accepted (the event object itself is level 1).  An event is
#: flat; fields producers add may nest a little, but a 16 KiB value could nest
#: thousands of levels, and the standard library's parser recurses per level.
MAX_JSON_DEPTH = 16
_BOM = b"\xef\xbb\xbf"
#: Digits of the largest float (1.8e308): a longer integer literal is out of range unread.
_MAX_INT_DIGITS = 309
_FLOAT_MAX = sys.float_info.max


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that cannot be applied, and why (``reason`` is a stable code)."""

    record: SourceRecord
    reason: str
    message: str
    #: ``unprocessable`` only: the class of the exception the record caused.
    exception: str = ""


@dataclass(frozen=True, slots=True)
class Accepted:
    record: SourceRecord
    event: Event


def decode_json(value: bytes) -> Any:
    """The JSON document of a value, or :class:`EventError` with the reason.

    A document is accepted only if it means one thing to every JSON reader:
    UTF-8 without BOM, no lone UTF-16 surrogate, no key twice in an object,
    numbers within float range, at most :data:`MAX_JSON_DEPTH` levels.
    orjson (much faster than ``json.loads``: decoding is the largest share of validation)
    enforces all of that but the last two (it keeps the last of duplicate keys).
    Whatever it refuses, and a float timestamp (orjson reads integers beyond
    64 bits as floats), the standard library decodes instead, with hooks that
    enforce the same rules and say which one was broken.  ``NaN`` and
    ``Infinity`` literals pass here; the event contract refuses them where
    they stand (a timestamp or a price).
    """
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return _decode_strictly(value)
    if isinstance(obj, dict):
        if type(obj.get("timestamp")) is float:
            return _decode_strictly(value)
        # The common case in two byte counts: every member has a ':' of its own in the text, so
        # if the text has no more colons than the object has members, no member was dropped
        # (nor has any nested object members), and fewer brackets than the limit bound the depth.
        if value.count(b":") == len(obj) and value.count(b"{") + value.count(b"[") <= MAX_JSON_DEPTH:
            return obj
    depth, members, colons = _shape(obj)
    if depth > MAX_JSON_DEPTH:
        raise EventError("too_deep", f"JSON nesting is {depth} levels deep, limit {MAX_JSON_DEPTH}")
    # Duplicate keys in general: ':' appears in the text once per member and elsewhere only in
    # strings, so a document whose colons are all accounted for by its decoded members and
    # strings has no member that decoding dropped.  Only an escaped colon (\u003a) can add a
    # colon the text does not show; then, or when the count differs, the exact check decides.
    if value.count(b":") != members + colons or b"\\u003a" in value or b"\\u003A" in value:
        return _decode_strictly(value)
    return obj


def _decode_strictly(value: bytes) -> Any:
    """The standard library's decoding with every rule of :func:`decode_json` checked exactly."""
    if value.startswith(_BOM):
        raise EventError("bad_encoding", "value starts with a byte order mark; send UTF-8 without BOM")
    try:
        text = value.decode("utf-8")  # strict: no surrogates, unlike json.loads(bytes), and no UTF-16/32
    except UnicodeDecodeError as exc:
        raise EventError("bad_encoding", f"value is not UTF-8: {exc}") from None
    try:
        obj = json.loads(text, parse_int=_int_in_range, parse_float=_float_in_range,
                         object_pairs_hook=_object_without_duplicates)
    except RecursionError:
        raise EventError("too_deep", f"JSON nesting is deeper than {MAX_JSON_DEPTH} levels") from None
    except EventError:
        raise
    except ValueError as exc:
        raise EventError("malformed_json", f"value is not JSON: {exc}") from None
    depth, _, _ = _shape(obj)
    if depth > MAX_JSON_DEPTH:
        raise EventError("too_deep", f"JSON nesting is {depth} levels deep, limit {MAX_JSON_DEPTH}")
    surrogate = _lone_surrogate(obj)
    if surrogate is not None:
        raise EventError("bad_encoding", f"the string {surrogate[:64]!r} holds a lone UTF-16 surrogate, "
                                         "which UTF-8 cannot encode")
    return obj


def _int_in_range(literal: str) -> int:
    if len(literal.lstrip("-")) > _MAX_INT_DIGITS or abs(number := int(literal)) > _FLOAT_MAX:
        raise EventError("number_out_of_range", f"integer {literal[:32]}... is beyond the float range")
    return number


def _float_in_range(literal: str) -> float:
    number = float(literal)
    if number in (float("inf"), float("-inf")):
        raise EventError("number_out_of_range", f"number {literal[:32]} is beyond the float range")
    return number


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise EventError("duplicate_key", f"key {twice[:64]!r} appears twice in one object")
    return obj


def _shape(obj: Any) -> tuple[int, int, int]:
    """(nesting depth, object members, ':' characters inside keys and strings) of a decoded document."""
    depth = members = colons = 0
    stack = [(obj, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            members += len(node)
            values = node.values()
            for key in node:
                colons += key.count(":")
        elif isinstance(node, list):
            values = node
        else:
            if isinstance(node, str):
                colons += node.count(":")
            continue
        depth = max(depth, level)
        for child in values:
            if isinstance(child, (dict, list)):
                stack.append((child, level + 1))
            elif isinstance(child, str):
                colons += child.count(":")
    return depth, members, colons


def _lone_surrogate(obj: Any) -> str | None:
    """The first key or string that holds a lone surrogate, if any."""
    stack = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and not node.isascii():
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return node
    return None


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
    event = event_from_dict(decode_json(value), now_ms=now_ms)
    if event.user_id != key_text:
        raise EventError("key_mismatch", f"key {key_text!r} differs from user_id {event.user_id!r}")
    return event


def validate_record(record: SourceRecord, now_ms: int, partitions: int | None = None) -> Accepted | Rejection:
    """Check one record against the wire rules and the event contract, and, given the topic's
    partition count, that its key is on the partition Kafka's default partitioner gives it.

    Never raises: an exception the checks did not foresee is the record's, not the
    worker's, so the record is dead-lettered as ``unprocessable`` (see docs/reliability.md).
    """
    try:
        event = check_message(record.key, record.value, now_ms)
        if partitions is not None:
            check_partition(record, partitions)
        return Accepted(record, event)
    except EventError as exc:
        return Rejection(record, exc.reason, str(exc))
    except Exception as exc:  # noqa: BLE001 - isolation: one record's failure must not stop the worker
        return unprocessable(record, exc)


def unprocessable(record: SourceRecord, exc: BaseException) -> Rejection:
    """The rejection of a record that raised ``exc`` where no rule foresaw it (logged with its traceback)."""
    log.warning("%s[%d]@%d is unprocessable, dead-lettering it: %r", record.topic, record.partition,
                record.offset, exc, exc_info=exc)
    return Rejection(record, "unprocessable", f"{type(exc).__name__}: {exc}",
                     f"{type(exc).__module__}.{type(exc).__qualname__}")


@functools.lru_cache(maxsize=1 << 16)
def _key_partition(key: bytes, partitions: int) -> int:
    """:func:`~streams.pipeline.partitioning.partition_for`, cached: murmur2 is pure Python and user keys repeat."""
    return partition_for(key, partitions)


def check_partition(record: SourceRecord, partitions: int) -> None:
    """:class:`EventError` ``wrong_partition`` unless the record's key hashes to its partition.

    A user's state lives with the partition Kafka's default partitioner
    (murmur2) gives the user's key; a record another partitioner put elsewhere
    would build a second, diverging state for the user on another worker.
    """
    expected = _key_partition(record.key or b"", partitions)
    if record.partition != expected:
        raise EventError("wrong_partition", f"key belongs on partition {expected} of {partitions} (Kafka's "
                                            f"murmur2 partitioner), not {record.partition}")


def validate_batch(records: Sequence[SourceRecord], now_ms: int,
                   partitions_of: Callable[[str], int | None] = lambda topic: None,
                   ) -> tuple[list[Accepted], list[Rejection]]:
    """Split a micro-batch into accepted events and rejections, keeping order.

    ``partitions_of(topic)`` is the topic's partition count (None: not checked).
    """
    accepted: list[Accepted] = []
    rejected: list[Rejection] = []
    counts: dict[str, int | None] = {}  # asked once per topic and batch, not per event
    for record in records:
        if record.topic not in counts:
            counts[record.topic] = partitions_of(record.topic)
        outcome = validate_record(record, now_ms, counts[record.topic])
        (accepted if isinstance(outcome, Accepted) else rejected).append(outcome)  # type: ignore[arg-type]
    return accepted, rejected
