"""Synthetic website traffic for the demo, the benchmark and the tests.

Users and categories are Zipf-distributed (a few heavy users and popular
categories, a long tail of both).  Each user browses in sessions that walk a
funnel -- view -> click -> cart -> purchase, with favourites on the side -- so
the model has real sequential signal to pick up: a user who just carted is
far more likely to purchase next than one who just landed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from models.events import Event

#: Next-action probabilities given the previous action inside a session.
FUNNEL: dict[str, dict[str, float]] = {
    "start": {"view": 1.0},
    "view": {"view": 0.55, "click": 0.35, "favorite": 0.04, "end": 0.06},
    "click": {"view": 0.45, "click": 0.15, "cart": 0.25, "favorite": 0.05, "end": 0.10},
    "cart": {"view": 0.35, "purchase": 0.40, "cart": 0.10, "end": 0.15},
    "purchase": {"view": 0.40, "end": 0.60},
    "favorite": {"view": 0.60, "click": 0.25, "end": 0.15},
}


def _zipf_weights(n: int, a: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    return w / w.sum()


@dataclass
class _Session:
    last: str = "start"
    category: int = 0
    item: int = 0
    number: int = 0


@dataclass
class SyntheticTraffic:
    """A deterministic (per seed) stream of funnel-shaped events."""

    users: int = 10_000
    categories: int = 500
    items_per_category: int = 40
    seed: int = 0
    zipf_a: float = 1.1
    _rng: np.random.Generator = field(init=False, repr=False)
    _sessions: dict[int, _Session] = field(init=False, repr=False, default_factory=dict)
    _ids: Iterator[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._user_p = _zipf_weights(self.users, self.zipf_a)
        self._cat_cdf = _zipf_weights(self.categories, self.zipf_a).cumsum()
        self._ids = itertools.count()
        self._steps = {k: (list(v), np.cumsum(list(v.values()))) for k, v in FUNNEL.items()}

    def _pick(self, cdf: np.ndarray) -> int:
        """Sample an index from a cumulative distribution (much cheaper than rng.choice(p=...))."""
        return min(int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right")), len(cdf) - 1)

    def events(self, n: int, start_ms: int, mean_gap_ms: float = 1.0) -> list[Event]:
        """``n`` events whose timestamps start at ``start_ms`` and advance by ~``mean_gap_ms``."""
        rng = self._rng
        users = rng.choice(self.users, size=n, p=self._user_p)
        gaps = rng.exponential(mean_gap_ms, size=n).cumsum()
        return [self._next(int(u), start_ms + int(g)) for u, g in zip(users, gaps)]

    def _next(self, user: int, ts_ms: int) -> Event:
        rng = self._rng
        s = self._sessions.get(user)
        if s is None:
            s = self._sessions[user] = _Session(category=self._pick(self._cat_cdf))
        names, cdf = self._steps[s.last]
        kind = names[self._pick(cdf)]
        if kind == "end":  # a new session: maybe another category
            s.last, kind = "start", "view"
            s.number += 1
            s.category = self._pick(self._cat_cdf)
        if kind == "view" or s.last == "start":
            s.item = int(rng.integers(self.items_per_category))
            if rng.random() < 0.2:
                s.category = self._pick(self._cat_cdf)
        s.last = kind
        price = round(float(rng.lognormal(3.0, 1.0)), 2) if kind in ("cart", "purchase") else None
        return Event(
            user_id=f"u{user}", type=kind, item_id=f"i{s.category}-{s.item}",
            category_id=f"c{s.category}", timestamp_ms=ts_ms, price=price,
            event_id=f"syn-{self.seed}-{next(self._ids)}", session_id=f"u{user}-s{s.number}",
        )
