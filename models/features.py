"""Turn users' events into the model's numeric inputs.

One code path serves training, replay and the stream: :meth:`Featurizer.run`
walks each user's new events in order, reads the user's bounded memory
(:class:`models.state.Recent` tables) *before* each event to build that
event's inputs, updates the memory, and finally snapshots the category table
as candidates for ``top_categories``.  Only that walk is per-event Python
(string hashing and table updates cannot be vectorised); everything else is
numpy over the whole batch.

Hashing is stable across processes and machines (BLAKE2b of the UTF-8 id --
never Python's salted ``hash()``): a category's two hash buckets index two
embedding tables whose sum is the category vector, so two categories share a
vector only if they collide in both.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from models.events import EVENT_TYPES, TYPE_INDEX, Event
from models.state import Recent, UserState

HASH_SCHEME = "blake2b64"
N_TYPES = len(EVENT_TYPES)

#: Per-event dense inputs, in column order (stored in the checkpoint config so
#: a checkpoint built for other features refuses to load).
DENSE_FEATURES: tuple[str, ...] = (
    "log_gap", "first_event", "day_sin", "day_cos", "week_sin", "week_cos", "log_n_events",
    *(f"log_count_{t}" for t in EVENT_TYPES), *(f"recent_share_{t}" for t in EVENT_TYPES),
    "item_seen", "log_item_count", *(f"item_had_{t}" for t in EVENT_TYPES), "same_item",
    "cat_seen", "log_cat_count", *(f"cat_had_{t}" for t in EVENT_TYPES), "same_cat", "log_cat_events_since",
    *(f"log_s_since_{t}" for t in EVENT_TYPES), "new_session", "log_session_events",
)
#: Per-candidate features of a remembered category, after the latest event.
CANDIDATE_FEATURES: tuple[str, ...] = (
    "log_count", "log_events_since", "log_seconds_since", "share", *(f"had_{t}" for t in EVENT_TYPES),
)
#: The user's "wide" features after the latest event, read by the intent head beside h (the counters
#: and last-seen times a tree model would use; see models.tree_peer).
WIDE_FEATURES: tuple[str, ...] = (
    *(f"log_share_{t}" for t in EVENT_TYPES), *(f"log_recent_share_{t}" for t in EVENT_TYPES),
    *(f"had_{t}" for t in EVENT_TYPES), *(f"log_s_since_{t}" for t in EVENT_TYPES),
    *(f"log_session_{t}" for t in EVENT_TYPES), "log_session_events",
    "log_item_count", *(f"item_had_{t}" for t in EVENT_TYPES), "log_cat_count", *(f"cat_had_{t}" for t in EVENT_TYPES),
)
#: Integer inputs per event: type, category bucket (table A), category bucket (table B), item bucket, price bucket.
N_INT_INPUTS = 5

#: Per-event decay of ``UserState.recent_types``: a ~10-event memory of what the user is doing now.
RECENT_DECAY = 0.9
#: A gap longer than this starts a new session (the usual web-analytics cut; the logs have no session ids).
SESSION_GAP_MS = 30 * 60 * 1000
_DAY_S = 86_400.0
_WEEK_S = 7 * _DAY_S
_BITS = [1 << i for i in range(N_TYPES)]
#: Bit set of event types -> one float per type (a lookup beats five tests per event).
_FLAG_FLOATS = [tuple(float(flags & b > 0) for b in _BITS) for flags in range(1 << N_TYPES)]


@functools.lru_cache(maxsize=1 << 16)
def stable_hash(text: str) -> int:
    """64-bit hash of an id that is identical in every process (cached: ids repeat a lot)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def category_buckets(keys: np.ndarray, n_buckets: int) -> np.ndarray:
    """[..., 2] bucket pair of uint64 category keys (low and high 32 bits)."""
    keys = keys.astype(np.uint64, copy=False)
    low = (keys & np.uint64(0xFFFFFFFF)) % np.uint64(n_buckets)
    high = (keys >> np.uint64(32)) % np.uint64(n_buckets)
    return np.stack([low, high], axis=-1).astype(np.int64)


class Vocabulary:
    """The global candidate categories (most frequent training categories) and their hash keys."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.keys = np.array([stable_hash(n) for n in self.names], dtype=np.uint64)
        self._order = np.argsort(self.keys)
        self._sorted = self.keys[self._order]

    def index(self, keys: np.ndarray) -> np.ndarray:
        """Vocabulary index of each uint64 key, -1 where the category is not in the vocabulary."""
        if not self.names:
            return np.full(keys.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self._sorted, keys).clip(max=len(self._sorted) - 1)
        return np.where(self._sorted[pos] == keys, self._order[pos], -1)


def price_bucket(price: float | None, n_buckets: int) -> int:
    """0 = no price; else log2-spaced buckets 1..n_buckets-1 (prices of any currency scale alike)."""
    if price is None:
        return 0
    return 1 + min(int(math.log2(1.0 + price)), n_buckets - 2)


@dataclass
class Candidates:
    """What the heads read from the memory of M users/positions after the latest event:
    the remembered categories (the candidates) and the type shares."""

    keys: np.ndarray          # uint64 [M, C] remembered categories, most recent first
    features: np.ndarray      # float32 [M, C, len(CANDIDATE_FEATURES)]
    valid: np.ndarray         # bool [M, C]
    labels: list[list[str]]   # M lists of the real category ids, most recent first
    wide: np.ndarray          # float32 [M, len(WIDE_FEATURES)]: log smoothed type shares, all-time (the
                              # counts baseline's scores) and recent, time since each type, session counts,
                              # what the user did to the latest item and category


@dataclass
class FeatureBatch:
    """Inputs of B users' new events as flat rows, user-major (user 0's events in order, then user 1's...).

    Flat, not padded: one online batch mixes a heavy user's hundreds of events
    with hundreds of users' single events, so a [T, B] grid would be mostly
    padding.  :meth:`padded` builds the grid where a caller wants one.
    """

    ints: np.ndarray          # int64 [N, N_INT_INPUTS]
    dense: np.ndarray         # float32 [N, len(DENSE_FEATURES)]
    lengths: np.ndarray       # int64 [B], >= 1, summing to N
    candidates: Candidates    # after each user's last event, or after every event (user-major)
    cat_keys: np.ndarray      # uint64 [N], the events' category keys

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """(ints [T, B, 5], dense [T, B, F]) time-major and zero-padded, as ``nn.LSTM`` takes them."""
        t_idx, b_idx = padded_index(self.lengths)
        shape = (int(self.lengths.max()), len(self.lengths))
        ints = np.zeros(shape + self.ints.shape[1:], dtype=self.ints.dtype)
        ints[t_idx, b_idx] = self.ints
        dense = np.zeros(shape + self.dense.shape[1:], dtype=self.dense.dtype)
        dense[t_idx, b_idx] = self.dense
        return ints, dense


#: What :meth:`Featurizer._snapshot` keeps of a user: table size, the used rows' keys, counts,
#: seen_at, seen_ts and flags, then the user's numbers (:data:`_USER_COLUMNS`), labels.
_Snapshot = tuple[int, list[int], list[int], list[int], list[int], list[int], list[float], list[str]]


class Featurizer:
    """Builds :class:`FeatureBatch` es and keeps users' memories up to date."""

    def __init__(self, cat_buckets: int, item_buckets: int, price_buckets: int,
                 cat_capacity: int, item_capacity: int, type_prior: Sequence[float]) -> None:
        self.type_prior = np.asarray(type_prior, dtype=np.float64)
        self.cat_buckets = cat_buckets
        self.item_buckets = max(item_buckets, 1)
        self.price_buckets = price_buckets
        self.cat_capacity = cat_capacity
        self.item_capacity = item_capacity

    def empty_tables(self) -> tuple[Recent, Recent]:
        return Recent(self.cat_capacity, True), Recent(self.item_capacity, False)

    def _event(self, state: UserState, event: Event) -> tuple[tuple[int, ...], tuple[float, ...], int]:
        """Inputs of one event from the memory before it; updates the memory (in place).

        Returns the raw numbers :func:`dense_features` turns into the dense
        inputs (logs, ratios and clock angles are cheaper as numpy over the batch).
        """
        kind = TYPE_INDEX[event.type]
        bit = _BITS[kind]
        ts = event.timestamp_ms
        n = state.n_events
        cats, items = state.categories, state.items
        cat_key = stable_hash(event.category_id)
        item_key = stable_hash(event.item_id)
        same_item = items.size > 0 and items.keys[0] == item_key
        same_cat = cats.size > 0 and cats.keys[0] == cat_key
        item_count, item_flags, _ = items.touch(item_key, "", bit, n + 1, ts)
        cat_count, cat_flags, cat_seen_at = cats.touch(cat_key, event.category_id, bit, n + 1, ts)
        counts, recent, session = state.type_counts, state.recent_types, state.session_types
        gap = ts - state.last_timestamp_ms if n else 0
        if n == 0 or gap > SESSION_GAP_MS:
            session[:] = [0] * N_TYPES
        raw = (gap, n, ts, *counts, *recent,
               item_count, item_flags, same_item, cat_count, cat_flags, same_cat, n + 1 - cat_seen_at,
               *(ts - last if last else -1 for last in state.type_last_ms), sum(session))
        ints = (kind, cat_key & 0xFFFFFFFF, cat_key >> 32, item_key % self.item_buckets,
                price_bucket(event.price, self.price_buckets))

        counts[kind] += 1
        session[kind] += 1
        state.type_last_ms[kind] = ts
        for j in range(N_TYPES):
            recent[j] *= RECENT_DECAY
        recent[kind] += 1.0
        state.n_events = n + 1
        state.last_timestamp_ms = ts
        return ints, raw, cat_key

    @staticmethod
    def _snapshot(state: UserState) -> _Snapshot:
        """The used rows of the category table (most users remember a few of ``capacity``
        categories, so padding is left to numpy), then the user's type counts and time."""
        cats = state.categories
        n = cats.size
        items = state.items
        return (n, cats.keys[:n], cats.counts[:n], cats.seen_at[:n], cats.seen_ts[:n], cats.flags[:n],
                [*state.type_counts, *state.recent_types, *state.type_last_ms, *state.session_types,
                 items.counts[0], items.flags[0], cats.counts[0], cats.flags[0],
                 state.n_events, state.last_timestamp_ms],
                cats.labels[:n])  # type: ignore[index]

    def _candidates(self, snaps: list[_Snapshot]) -> Candidates:
        m, cap = len(snaps), self.cat_capacity
        sizes = np.fromiter((s[0] for s in snaps), np.int64, m)
        total = int(sizes.sum())
        rows = np.repeat(np.arange(m), sizes)
        slots = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)

        def column(i: int, dtype: type) -> np.ndarray:
            """Field ``i`` of the snapshots as [m, cap], zero in unused slots."""
            out = np.zeros((m, cap), dtype=dtype)
            out[rows, slots] = np.fromiter(itertools.chain.from_iterable(s[i] for s in snaps), dtype, total)
            return out

        keys, counts, seen_at = column(1, np.uint64), column(2, np.float64), column(3, np.float64)
        seen_ts, flags = column(4, np.float64), column(5, np.int64)
        user = np.fromiter(itertools.chain.from_iterable(s[6] for s in snaps), np.float64,
                           m * _USER_COLUMNS).reshape(m, -1)
        n_events, now_ts = user[:, -2], user[:, -1]
        valid = counts > 0
        features = np.empty((m, cap, len(CANDIDATE_FEATURES)), dtype=np.float32)
        features[..., 0] = np.log1p(counts) / 3
        features[..., 1] = np.log1p(np.maximum(n_events[:, None] - seen_at, 0)) / 3
        features[..., 2] = np.log1p(np.maximum(now_ts[:, None] - seen_ts, 0) / 1000.0) / 10
        features[..., 3] = counts / np.maximum(n_events[:, None], 1)
        for i, bit in enumerate(_BITS):
            features[..., 4 + i] = (flags & bit) > 0
        features[~valid] = 0.0
        return Candidates(keys, features, valid, [s[7] for s in snaps], self._wide(user))

    def _wide(self, user: np.ndarray) -> np.ndarray:
        """[M, user columns of a snapshot] -> [M, len(WIDE_FEATURES)] float32, in WIDE_FEATURES order."""
        m = len(user)
        type_counts = user[:, :2 * N_TYPES].reshape(m, 2, N_TYPES)
        share = np.log((type_counts + self.type_prior) / (type_counts.sum(axis=2, keepdims=True) + 1.0))
        last_ms, session = user[:, 2 * N_TYPES:3 * N_TYPES], user[:, 3 * N_TYPES:4 * N_TYPES]
        item_count, item_flags, cat_count, cat_flags = (user[:, 4 * N_TYPES + i] for i in range(4))
        had = last_ms > 0
        since = np.where(had, np.log1p(np.maximum(user[:, -1:] - last_ms, 0) / 1000.0) / 10, 0.0)
        columns = [share.reshape(m, 2 * N_TYPES), had, since, np.log1p(session) / 3,
                   np.log1p(session.sum(axis=1)) / 3, np.log1p(item_count) / 3,
                   _FLAG_TABLE[item_flags.astype(np.int64)], np.log1p(cat_count) / 3,
                   _FLAG_TABLE[cat_flags.astype(np.int64)]]
        return np.column_stack([c.reshape(m, -1) for c in columns]).astype(np.float32)

    def candidates(self, states: Sequence[UserState]) -> Candidates:
        """The memory of users as they are now (no new events)."""
        return self._candidates([self._snapshot(s) for s in states])

    def run(self, states: Sequence[UserState], events: Sequence[Sequence[Event]], every_event: bool) -> FeatureBatch:
        """Featurise each user's new events in order, updating ``states`` in place.

        ``every_event`` snapshots candidates after every event (replay,
        training) instead of only after each user's last one (the stream).
        """
        lengths = np.array([len(e) for e in events], dtype=np.int64)
        if len(lengths) == 0 or lengths.min() < 1:
            raise ValueError("every user needs at least one new event")
        ints, dense, cat_keys, snaps = [], [], [], []
        for state, user_events in zip(states, events):
            for event in user_events:
                i, d, k = self._event(state, event)
                ints.append(i)
                dense.append(d)
                cat_keys.append(k)
                if every_event:
                    snaps.append(self._snapshot(state))
            if not every_event:
                snaps.append(self._snapshot(state))

        ints_arr = np.array(ints, dtype=np.uint64)
        ints_arr[:, 1:3] %= np.uint64(self.cat_buckets)
        return FeatureBatch(ints_arr.astype(np.int64), dense_features(np.array(dense, dtype=np.float64)), lengths,
                            self._candidates(snaps), np.array(cat_keys, dtype=np.uint64))


#: Columns of the raw per-event numbers :meth:`Featurizer._event` returns.
_GAP, _N, _TS, _COUNTS, _RECENT = 0, 1, 2, slice(3, 3 + N_TYPES), slice(3 + N_TYPES, 3 + 2 * N_TYPES)
_ITEM_COUNT, _ITEM_FLAGS, _SAME_ITEM, _CAT_COUNT, _CAT_FLAGS, _SAME_CAT, _CAT_SINCE = range(3 + 2 * N_TYPES,
                                                                                      10 + 2 * N_TYPES)
_TYPE_SINCE = slice(10 + 2 * N_TYPES, 10 + 3 * N_TYPES)
_SESSION_EVENTS = 10 + 3 * N_TYPES
_FLAG_TABLE = np.array(_FLAG_FLOATS, dtype=np.float64)
#: Numbers per user in a snapshot: type counts, decayed counts, last time per type, session counts,
#: the latest item's count and flags, the latest category's count and flags, n_events, last timestamp.
_USER_COLUMNS = 4 * N_TYPES + 6


def dense_features(raw: np.ndarray) -> np.ndarray:
    """[N, raw columns] float64 -> [N, len(DENSE_FEATURES)] float32, in DENSE_FEATURES order."""
    t_s = raw[:, _TS] / 1000.0
    day = 2 * np.pi * (t_s % _DAY_S) / _DAY_S
    week = 2 * np.pi * (t_s % _WEEK_S) / _WEEK_S
    n = raw[:, _N]
    recent = raw[:, _RECENT]
    item_count, cat_count = raw[:, _ITEM_COUNT], raw[:, _CAT_COUNT]
    columns = [
        np.log1p(np.maximum(raw[:, _GAP], 0) / 1000.0) / 10, n == 0, np.sin(day), np.cos(day),
        np.sin(week), np.cos(week), np.log1p(n) / 5, np.log1p(raw[:, _COUNTS]) / 5,
        recent / (1.0 + recent.sum(axis=1, keepdims=True)),
        item_count > 0, np.log1p(item_count) / 3, _FLAG_TABLE[raw[:, _ITEM_FLAGS].astype(np.int64)],
        raw[:, _SAME_ITEM], cat_count > 0, np.log1p(cat_count) / 3,
        _FLAG_TABLE[raw[:, _CAT_FLAGS].astype(np.int64)], raw[:, _SAME_CAT],
        np.where(cat_count > 0, np.log1p(raw[:, _CAT_SINCE]) / 3, 0.0),
        np.where(raw[:, _TYPE_SINCE] >= 0, np.log1p(np.maximum(raw[:, _TYPE_SINCE], 0) / 1000.0) / 10, 0.0),
        raw[:, _SESSION_EVENTS] == 0, np.log1p(raw[:, _SESSION_EVENTS]) / 3,
    ]
    return np.column_stack([c.reshape(len(raw), -1) for c in columns]).astype(np.float32)


def padded_index(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(t, b) of every real event in user-major order, to scatter into / gather from [T, B]."""
    b_idx = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    t_idx = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    return t_idx, b_idx
