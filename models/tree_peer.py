"""The tree peer: gradient-boosted trees over features a stream could keep per user.

It is what an ML engineer would try before a recurrent model, so the model
must beat it, not only the simple baselines.  Every feature of a user's
prefix (events up to t) is a counter, a last-seen time or a flag that a
stream can update in O(1) per event -- no look-ahead, nothing from other
users.  Two scikit-learn ``HistGradientBoostingClassifier`` s are fit on the
training users' next-event pairs:

* intent: multiclass over the next event's type (its class probabilities are
  the intent scores);
* category: binary "is this candidate the next category?" over the user's
  :data:`CANDIDATES` most recently used categories (a pointwise ranker, so it
  can only name categories the user already used, like the recency baseline).

scikit-learn is an evaluation dependency (the ``eval`` extra): it is imported
only when a peer is fitted, so the worker never needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from models.events import EVENT_TYPES, TYPE_INDEX, Event
from models.features import N_TYPES, RECENT_DECAY, SESSION_GAP_MS

#: Value of a time feature with nothing to measure from (no earlier event / type never seen): below
#: every real value (logs of non-negative numbers), so one split separates it.  Not NaN: a column
#: that is NaN throughout (a type the log never has) makes scikit-learn 1.9's binning fail.
NEVER = -1.0
#: Most recently used categories scored per prefix by the category ranker.
CANDIDATES = 30

INTENT_FEATURES: tuple[str, ...] = (
    "log_n_events", *(f"count_{t}" for t in EVENT_TYPES), *(f"share_{t}" for t in EVENT_TYPES),
    *(f"recent_share_{t}" for t in EVENT_TYPES), "type", "prev_type", "log_gap",
    "session_len", *(f"session_{t}" for t in EVENT_TYPES),
    *(f"log_s_since_{t}" for t in EVENT_TYPES),
    "item_repeats", *(f"item_had_{t}" for t in EVENT_TYPES), "cat_repeats", *(f"cat_had_{t}" for t in EVENT_TYPES),
    "hour", "weekday",
)
CATEGORY_FEATURES: tuple[str, ...] = (
    "recency_rank", "log_count", "share", "log_events_since", "log_s_since", "session_count", "is_current",
    *(f"had_{t}" for t in EVENT_TYPES), "log_n_events",
)


@dataclass
class PrefixFeatures:
    """Features after every event of some users (user-major rows) and the category candidates."""

    intent: np.ndarray              # float32 [N, len(INTENT_FEATURES)]
    cand_rows: np.ndarray           # int64 [R]: the prefix (row of ``intent``) each candidate belongs to
    cand: np.ndarray                # float32 [R, len(CATEGORY_FEATURES)]
    cand_names: list[str]           # [R] the candidates' category ids


def prefix_features(sequences: Sequence[Sequence[Event]]) -> PrefixFeatures:
    """One streaming pass per user: the features after each event, from that user's events so far only."""
    intent_rows: list[list[float]] = []
    cand_rows: list[int] = []
    cand: list[list[float]] = []
    names: list[str] = []
    for seq in sequences:
        counts = [0] * N_TYPES
        recent = [0.0] * N_TYPES
        session = [0] * N_TYPES
        last_of_type: list[int | None] = [None] * N_TYPES
        items: dict[str, list[int]] = {}      # item -> [count, type bit set]
        cats: dict[str, list[int]] = {}       # category -> [count, bit set, last index, last ts, session count]
        prev_type, prev_ts = -1, None
        for i, e in enumerate(seq):
            kind, ts = TYPE_INDEX[e.type], e.timestamp_ms
            gap = None if prev_ts is None else max(ts - prev_ts, 0)
            if gap is None or gap > SESSION_GAP_MS:
                session = [0] * N_TYPES
                for entry in cats.values():
                    entry[4] = 0
            counts[kind] += 1
            session[kind] += 1
            recent = [r * RECENT_DECAY for r in recent]
            recent[kind] += 1.0
            last_of_type[kind] = ts
            item = items.setdefault(e.item_id, [0, 0])
            item[0] += 1
            item[1] |= 1 << kind
            cat = cats.setdefault(e.category_id, [0, 0, 0, 0, 0])
            cat[0] += 1
            cat[1] |= 1 << kind
            cat[2], cat[3] = i, ts
            cat[4] += 1
            n = i + 1
            recent_total = sum(recent)
            intent_rows.append([
                math.log(n), *counts, *(c / n for c in counts), *(r / recent_total for r in recent),
                kind, prev_type, NEVER if gap is None else math.log1p(gap / 1000.0),
                sum(session), *session,
                *(NEVER if t is None else math.log1p((ts - t) / 1000.0) for t in last_of_type),
                item[0], *(float(item[1] >> j & 1) for j in range(N_TYPES)),
                cat[0], *(float(cat[1] >> j & 1) for j in range(N_TYPES)),
                (ts // 3_600_000) % 24, (ts // 86_400_000) % 7,
            ])
            row = len(intent_rows) - 1
            ranked = sorted(cats.items(), key=lambda kv: -kv[1][2])[:CANDIDATES]
            for rank, (name, (count, bits, last_i, last_ts, in_session)) in enumerate(ranked):
                cand_rows.append(row)
                names.append(name)
                cand.append([rank, math.log(count), count / n, math.log1p(i - last_i),
                             math.log1p((ts - last_ts) / 1000.0), in_session, float(name == e.category_id),
                             *(float(bits >> j & 1) for j in range(N_TYPES)), math.log(n)])
            prev_type, prev_ts = kind, ts
    return PrefixFeatures(np.array(intent_rows, dtype=np.float32).reshape(-1, len(INTENT_FEATURES)),
                          np.array(cand_rows, dtype=np.int64), np.array(cand, dtype=np.float32).reshape(
                              -1, len(CATEGORY_FEATURES)), names)


def _next_targets(sequences: Sequence[Sequence[Event]]) -> tuple[np.ndarray, list[str | None]]:
    """Next type (-1 at a user's last event) and next category (None there) of every prefix."""
    types: list[int] = []
    cats: list[str | None] = []
    for seq in sequences:
        types += [TYPE_INDEX[e.type] for e in seq[1:]] + [-1]
        cats += [e.category_id for e in seq[1:]] + [None]
    return np.array(types, dtype=np.int64), cats


#: Columns of INTENT_FEATURES that are type codes, not magnitudes.
_CATEGORICAL = (INTENT_FEATURES.index("type"), INTENT_FEATURES.index("prev_type"))


def _intent_matrix(feats: PrefixFeatures) -> np.ndarray:
    """The intent features with type codes shifted to be non-negative (sklearn's categorical
    encoding needs that; "no previous type" -1 becomes 0)."""
    x = feats.intent.copy()
    x[:, list(_CATEGORICAL)] += 1
    return x


class TreePeer:
    """Fitted intent and category trees; :meth:`predict` gives what the evaluation scores."""

    def __init__(self, intent_model: Any, category_model: Any) -> None:
        self.intent_model = intent_model
        self.category_model = category_model

    @classmethod
    def fit(cls, sequences: Sequence[Sequence[Event]], seed: int = 0) -> "TreePeer":
        """Fit on the training users' next-event pairs (default-ish settings, early stopping on 10% of pairs)."""
        try:
            from sklearn.ensemble import HistGradientBoostingClassifier
        except ImportError as err:
            raise RuntimeError("the tree peer needs scikit-learn: pip install 'profilestream[eval]'") from err
        feats = prefix_features(sequences)
        next_type, next_cat = _next_targets(sequences)
        has_next = next_type >= 0
        intent_x = _intent_matrix(feats)
        intent_model = HistGradientBoostingClassifier(categorical_features=list(_CATEGORICAL), random_state=seed,
                                                      early_stopping=True, validation_fraction=0.1)
        intent_model.fit(intent_x[has_next], next_type[has_next])
        keep = has_next[feats.cand_rows]
        labels = np.array([next_cat[r] == name for r, name in zip(feats.cand_rows, feats.cand_names)])
        category_model = HistGradientBoostingClassifier(random_state=seed, early_stopping=True,
                                                        validation_fraction=0.1)
        category_model.fit(feats.cand[keep], labels[keep])
        return cls(intent_model, category_model)

    def predict(self, seq: Sequence[Event], k: int) -> tuple[np.ndarray, list[list[str]]]:
        """After every event of one user: intent [n, types] and the top-k categories, best first."""
        feats = prefix_features([seq])
        proba = self.intent_model.predict_proba(_intent_matrix(feats))
        intent = np.zeros((len(seq), N_TYPES))
        intent[:, self.intent_model.classes_] = proba   # types never seen in training keep score 0
        score = self.category_model.predict_proba(feats.cand)[:, list(self.category_model.classes_).index(True)]
        ranked: list[list[str]] = [[] for _ in seq]
        order = np.lexsort((-score, feats.cand_rows))
        for j in order:
            row = ranked[feats.cand_rows[j]]
            if len(row) < k:
                row.append(feats.cand_names[j])
        return intent, ranked
