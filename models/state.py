"""Per-user state: the LSTM's (h, c) plus a small, bounded memory of the past.

The LSTM alone cannot name categories (it only sees hashed buckets), and it
remembers "was this exact item carted before?" poorly.  So next to (h, c) each
user keeps two tiny most-recent-first tables -- recent categories (with their
real ids, the candidates for ``top_categories``) and recent items (hash keys
only) -- with counts and which event types happened on them.  Both have a
fixed capacity, so the encoded state is bounded: about 1.1 KB for (h, c) at
hidden 128 plus ~35 bytes per remembered category and ~13 per item.  A few
fixed counters (type counts, decayed type counts, the last time of each type,
the current session's type counts) feed the features that trees find useful.

Tables are plain fixed-length Python lists: updating one per event is a few
list writes, and a batch of users turns into ``[B, capacity]`` arrays with a
single ``np.array`` call.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

import numpy as np

#: Encoded-state layout version; bump when the byte layout changes.
STATE_FORMAT = 2
_MAGIC = b"PS"
# magic, format, fingerprint(8 bytes), n_events, last_ts, 5 type counts, 5 decayed type counts,
# 5 last timestamps by type, 5 session type counts, hidden, cat cap, n_cats, item cap, n_items
_HEADER = struct.Struct("<2sB8sQq5I5d5q5IHBBBB")


class StateError(ValueError):
    """Encoded state bytes are corrupt or belong to another model.

    ``reason`` is ``"corrupt"`` or ``"model_mismatch"``; on a mismatch the
    stream should start the user afresh (the old h, c mean nothing to the new
    weights).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Recent:
    """A fixed-capacity, most-recent-first table of keyed counters (a tiny LRU).

    Column lists always have length ``capacity``; rows ``size..`` are padding.
    ``flags`` is a bit set of the event types seen on the key (bit = type index).
    """

    __slots__ = ("keys", "counts", "flags", "seen_at", "seen_ts", "labels", "size")

    def __init__(self, capacity: int, labelled: bool) -> None:
        self.keys = [0] * capacity
        self.counts = [0] * capacity
        self.flags = [0] * capacity
        self.seen_at = [0] * capacity      # the user's event count when last seen
        self.seen_ts = [0] * capacity      # timestamp (ms) when last seen
        self.labels: list[str] | None = [""] * capacity if labelled else None
        self.size = 0

    def copy(self) -> "Recent":
        other = Recent.__new__(Recent)
        other.keys, other.counts, other.flags = self.keys[:], self.counts[:], self.flags[:]
        other.seen_at, other.seen_ts = self.seen_at[:], self.seen_ts[:]
        other.labels = None if self.labels is None else self.labels[:]
        other.size = self.size
        return other

    def touch(self, key: int, label: str, type_bit: int, index: int, ts: int) -> tuple[int, int, int]:
        """Record one event on ``key``; return its (count, flags, seen_at) *before* this event.

        A new key evicts the least recent one when the table is full.
        """
        try:
            row = self.keys.index(key, 0, self.size)
        except ValueError:
            row = -1
        if row == 0:
            before = (self.counts[0], self.flags[0], self.seen_at[0])  # already the most recent: no move
        elif row > 0:
            before = (self.counts[row], self.flags[row], self.seen_at[row])
            for col in (self.keys, self.counts, self.flags, self.seen_at, self.seen_ts):
                col.insert(0, col.pop(row))
            if self.labels is not None:
                self.labels.insert(0, self.labels.pop(row))
        else:
            before = (0, 0, 0)
            for col in (self.keys, self.counts, self.flags, self.seen_at, self.seen_ts):
                col.pop()
                col.insert(0, 0)
            if self.labels is not None:
                self.labels.pop()
                self.labels.insert(0, label)
            self.size = min(self.size + 1, len(self.keys))
            self.keys[0] = key
        self.counts[0] += 1
        self.flags[0] |= type_bit
        self.seen_at[0] = index
        self.seen_ts[0] = ts
        return before


@dataclass(slots=True)
class UserState:
    """Everything the model remembers about one user (opaque to the stream,
    except ``n_events`` and ``last_timestamp_ms``)."""

    h: np.ndarray                      # float32 [hidden]
    c: np.ndarray                      # float32 [hidden]
    categories: Recent                 # recent categories (labelled with their real ids)
    items: Recent                      # recent items (hash keys only)
    n_events: int = 0
    last_timestamp_ms: int = 0
    type_counts: list[int] = field(default_factory=lambda: [0] * 5)
    recent_types: list[float] = field(default_factory=lambda: [0.0] * 5)   # type counts decayed per event
    type_last_ms: list[int] = field(default_factory=lambda: [0] * 5)       # last timestamp of each type, 0 = never
    session_types: list[int] = field(default_factory=lambda: [0] * 5)      # type counts of the current session

    def copy(self) -> "UserState":
        """A copy whose tables can be updated without touching this one (h, c are never mutated)."""
        return UserState(self.h, self.c, self.categories.copy(), self.items.copy(), self.n_events,
                         self.last_timestamp_ms, self.type_counts[:], self.recent_types[:], self.type_last_ms[:],
                         self.session_types[:])


@functools.lru_cache(maxsize=256)
def _table_struct(size: int, labelled: bool) -> struct.Struct:
    """keys u64, counts u32, flags u8, seen_at u32, seen_ts i64 (, label byte lengths u16), ``size`` each."""
    n = size
    return struct.Struct(f"<{n}Q{n}I{n}B{n}I{n}q" + (f"{n}H" if labelled else ""))


def _pack_table(table: Recent) -> bytes:
    n = table.size
    columns = (*table.keys[:n], *table.counts[:n], *table.flags[:n], *table.seen_at[:n], *table.seen_ts[:n])
    if table.labels is None:
        return _table_struct(n, False).pack(*columns)
    labels = [s.encode() for s in table.labels[:n]]
    return _table_struct(n, True).pack(*columns, *map(len, labels)) + b"".join(labels)


def _unpack_table(data: bytes, offset: int, capacity: int, size: int, labelled: bool) -> tuple[Recent, int]:
    layout = _table_struct(size, labelled)
    values = layout.unpack_from(data, offset)
    offset += layout.size
    table = Recent(capacity, labelled)
    table.size = size
    pad = [0] * (capacity - size)
    n = size
    table.keys, table.counts, table.flags = list(values[:n]) + pad, list(values[n:2 * n]) + pad, \
        list(values[2 * n:3 * n]) + pad
    table.seen_at, table.seen_ts = list(values[3 * n:4 * n]) + pad, list(values[4 * n:5 * n]) + pad
    if labelled:
        labels = []
        for length in values[5 * n:]:
            labels.append(data[offset:offset + length].decode())
            offset += length
        if offset > len(data):
            raise ValueError("labels run past the end of the state")
        table.labels = labels + [""] * (capacity - size)
    return table, offset


def encode_state(state: UserState, fingerprint: str) -> bytes:
    """Compact little-endian bytes: header, h, c, then the two tables."""
    header = _HEADER.pack(_MAGIC, STATE_FORMAT, bytes.fromhex(fingerprint), state.n_events,
                          state.last_timestamp_ms, *state.type_counts, *state.recent_types, *state.type_last_ms,
                          *state.session_types, state.h.shape[0],
                          len(state.categories.keys), state.categories.size,
                          len(state.items.keys), state.items.size)
    return b"".join((header, state.h.astype("<f4", copy=False).tobytes(),
                     state.c.astype("<f4", copy=False).tobytes(),
                     _pack_table(state.categories), _pack_table(state.items)))


def decode_state(data: bytes, fingerprint: str, hidden: int, cat_capacity: int, item_capacity: int) -> UserState:
    """Inverse of :func:`encode_state`; :class:`StateError` if the bytes do not fit this model."""
    try:
        fields = _HEADER.unpack_from(data, 0)
    except struct.error as err:
        raise StateError("corrupt", f"state too short to hold a header ({len(data)} bytes)") from err
    magic, fmt, fp, n_events, last_ts = fields[:5]
    type_counts, recent_types = list(fields[5:10]), list(fields[10:15])
    type_last_ms, session_types = list(fields[15:20]), list(fields[20:25])
    hid, cat_cap, n_cats, item_cap, n_items = fields[25:]
    if magic != _MAGIC or fmt != STATE_FORMAT:
        raise StateError("corrupt", f"not a ProfileStream state (magic {magic!r}, format {fmt})")
    if fp.hex() != fingerprint:
        raise StateError("model_mismatch", f"state was written by model {fp.hex()}, this is {fingerprint}")
    if (hid, cat_cap, item_cap) != (hidden, cat_capacity, item_capacity) or n_cats > cat_cap or n_items > item_cap:
        raise StateError("corrupt", "state dimensions do not match the model")
    try:
        offset = _HEADER.size
        h = np.frombuffer(data, "<f4", hidden, offset)
        c = np.frombuffer(data, "<f4", hidden, offset + 4 * hidden)
        offset += 8 * hidden
        categories, offset = _unpack_table(data, offset, cat_cap, n_cats, True)
        items, offset = _unpack_table(data, offset, item_cap, n_items, False)
    except (ValueError, UnicodeDecodeError, struct.error) as err:
        raise StateError("corrupt", f"state bytes are truncated or garbled: {err}") from err
    if offset != len(data):
        raise StateError("corrupt", f"{len(data) - offset} unexpected trailing bytes in state")
    return UserState(h, c, categories, items, n_events, last_ts, type_counts, recent_types, type_last_ms,
                     session_types)
