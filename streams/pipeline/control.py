"""Control records on the events topic: a header, not an event, asks the owning worker to act.

The one kind today is the forget request (streams/ops/forget.py sends it); the
processor applies it in partition order with the user's events.
"""

from __future__ import annotations

from models.events import MAX_ID_CHARS, EventError

from .source_record import SourceRecord

#: Header that marks a control record on the events topic, and its one known value.
CONTROL_HEADER = "profilestream.control"
FORGET = b"forget"


def forget_headers() -> list[tuple[str, bytes]]:
    return [(CONTROL_HEADER, FORGET)]


def is_control(record: SourceRecord) -> bool:
    """Whether a record is a control record rather than an event (decided by header alone)."""
    return any(name == CONTROL_HEADER for name, _ in record.headers)


def forget_target(record: SourceRecord) -> str:
    """The user id a control record asks to forget, or :class:`EventError` with the reason."""
    kinds = [value for name, value in record.headers if name == CONTROL_HEADER]
    if kinds != [FORGET]:
        raise EventError("unknown_control", f"control header {CONTROL_HEADER} is {kinds!r}, not [b'forget']")
    if record.value is not None:
        raise EventError("unknown_control", "a forget request carries no value")
    if record.key is None:
        raise EventError("bad_key", "forget request has no key; the key must be the user_id")
    try:
        user_id = record.key.decode("utf-8")
    except UnicodeDecodeError:
        raise EventError("bad_key", "key is not valid UTF-8") from None
    if not user_id or len(user_id) > MAX_ID_CHARS:
        raise EventError("bad_key", f"key must be 1..{MAX_ID_CHARS} characters")
    return user_id
