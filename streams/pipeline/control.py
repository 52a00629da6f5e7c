"""Control records on the events topic: a header, not an event, asks the owning worker to act.

Two kinds: the forget request (streams/ops/forget.py sends it) and the TTL's
expire request (streams/service/ttl.py); the processor applies both in
partition order with the user's events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.events import MAX_ID_CHARS, EventError

from .source_record import SourceRecord

if TYPE_CHECKING:
    from models import UserState

#: Header that marks a control record on the events topic, and its known values.
CONTROL_HEADER = "profilestream.control"
FORGET = b"forget"
EXPIRE = b"expire"
#: Header of an expire request: the idle cut-off, epoch milliseconds in ASCII digits.
IDLE_BEFORE_HEADER = "profilestream.expire.idle_before_ms"

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """What a control record asks: erase ``user_id`` -- unconditionally (forget), or only if the
    user's last applied event is older than ``idle_before_ms`` (expire)."""

    user_id: str
    idle_before_ms: int | None = None

    @property
    def cause(self) -> str:
        """The ``cause`` label of ``profilestream_users_forgotten_total``."""
        return "request" if self.idle_before_ms is None else "ttl"


def forget_headers() -> Headers:
    return [(CONTROL_HEADER, FORGET)]


def expire_headers(idle_before_ms: int) -> Headers:
    return [(CONTROL_HEADER, EXPIRE), (IDLE_BEFORE_HEADER, str(idle_before_ms).encode())]


def is_control(record: SourceRecord) -> bool:
    """Whether a record is a control record rather than an event (decided by header alone)."""
    return any(name == CONTROL_HEADER for name, _ in record.headers)


def control_request(record: SourceRecord) -> ControlRequest:
    """The request a control record makes, or :class:`EventError` with the reason."""
    kinds = [value for name, value in record.headers if name == CONTROL_HEADER]
    if kinds not in ([FORGET], [EXPIRE]):
        raise EventError("unknown_control", f"control header {CONTROL_HEADER} is {kinds!r}, "
                                            f"not [b'forget'] or [b'expire']")
    if record.value is not None:
        raise EventError("unknown_control", "a control record carries no value")
    idle_before_ms = None
    if kinds == [EXPIRE]:
        cutoffs = [value for name, value in record.headers if name == IDLE_BEFORE_HEADER]
        if len(cutoffs) != 1 or not cutoffs[0].isdigit():
            raise EventError("unknown_control", f"an expire request needs one {IDLE_BEFORE_HEADER} header "
                                                f"of ASCII digits, got {cutoffs!r}")
        idle_before_ms = int(cutoffs[0])
    if record.key is None:
        raise EventError("bad_key", "control record has no key; the key must be the user_id")
    try:
        user_id = record.key.decode("utf-8")
    except UnicodeDecodeError:
        raise EventError("bad_key", "key is not valid UTF-8") from None
    if not user_id or len(user_id) > MAX_ID_CHARS:
        raise EventError("bad_key", f"key must be 1..{MAX_ID_CHARS} characters")
    return ControlRequest(user_id, idle_before_ms)


def is_idle(state: UserState, cutoff_ms: int) -> bool:
    """Whether a state's last applied event is older than ``cutoff_ms`` (the TTL's rule, for the
    sweep that finds idle users and for the owner that applies an expire request)."""
    return state.last_timestamp_ms < cutoff_ms
