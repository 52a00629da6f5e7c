"""Which of a user's new events may be applied to their state: the effectively-once rules.

Kafka delivers at least once: after a crash or a rebalance a worker re-reads
events it may already have applied.  Every state record remembers the source
offset of the last event it applied and the ids of its last few events, so

* an event at or below that offset is a redelivery and is skipped;
* an event whose ``event_id`` was already applied (a producer retry that
  landed twice under different offsets) is skipped as a duplicate;
* an event older than the user's last applied event by more than
  ``max_lateness_ms`` is rejected as ``out_of_order`` -- it is almost always a
  replayed or mis-stamped event, and applying it would rewrite history the
  profile has already published.  Smaller disorder (clock skew between web
  servers) is applied in arrival order with a zero time gap.

A state loaded by ``profilestream backfill`` (streams/ops/backfill.py) has no
Kafka source offset: its record carries :data:`BACKFILLED` instead, and the
timestamp of the user's last backfilled event is the *cut-over*.  While the
record is so marked, an event stamped at or before the cut-over is skipped as
``backfilled`` (it is part of the history the backfill already applied); the
first event past the cut-over ends the marking, and the source-offset rule
takes over from there.  The backfilled record also carries the ids of the
last few history events, so an overlap event re-sent after the cut-over has
ended is still caught as a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..state.cache import StoredState
from ..state.codec import BACKFILLED, RECENT_EVENT_IDS, StateRecord, event_id_hash, legacy_event_id_hash
from .validate import Accepted, Rejection

#: Default tolerance for events older than the user's last applied event.
DEFAULT_MAX_LATENESS_MS = 3_600_000


@dataclass(slots=True)
class Admission:
    """The outcome for one user's events in one batch."""

    apply: list[Accepted] = field(default_factory=list)
    redelivered: int = 0
    duplicates: int = 0
    backfilled: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    recent_ids: tuple[int, ...] = ()
    #: What is left of a format-1 record's ids (streams/state/codec.py), to store again.
    legacy_ids: tuple[int, ...] = ()
    last_offset: int = -1


def admit(items: list[Accepted], stored: StoredState | StateRecord | None, last_timestamp_ms: int | None,
          max_lateness_ms: int = DEFAULT_MAX_LATENESS_MS) -> Admission:
    """Apply the rules above to one user's events (oldest first)."""
    out = Admission()
    last_offset = stored.last_offset if stored else -1
    recent = list(stored.recent_event_ids) if stored else []
    legacy = list(stored.legacy_event_ids) if stored else []
    newest_ts = last_timestamp_ms
    cutover = last_timestamp_ms if stored is not None and stored.last_offset == BACKFILLED else None
    for item in items:
        if item.record.offset <= last_offset:
            out.redelivered += 1
            continue
        if cutover is not None:
            if item.event.timestamp_ms <= cutover:
                out.backfilled += 1
                continue
            cutover = None
        id_hash = event_id_hash(item.event.event_id)
        if id_hash in recent or (legacy and legacy_event_id_hash(item.event.event_id) in legacy):
            out.duplicates += 1
            last_offset = item.record.offset
            continue
        ts = item.event.timestamp_ms
        if newest_ts is not None and ts < newest_ts - max_lateness_ms:
            out.rejected.append(Rejection(
                item.record, "out_of_order",
                f"event is {newest_ts - ts} ms older than the user's last applied event "
                f"(tolerance {max_lateness_ms} ms)"))
            last_offset = item.record.offset
            continue
        out.apply.append(item)
        recent.append(id_hash)
        del recent[:-RECENT_EVENT_IDS]
        del legacy[:len(legacy) - max(0, RECENT_EVENT_IDS - len(recent))]  # the oldest ids go first
        last_offset = item.record.offset
        newest_ts = ts if newest_ts is None else max(newest_ts, ts)
    out.recent_ids = tuple(recent)
    out.legacy_ids = tuple(legacy)
    out.last_offset = last_offset
    return out
