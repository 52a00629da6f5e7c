"""A small, deterministic shopping-funnel generator: events with real structure, no files needed.

Each user has a few favourite categories and a personal propensity to cart
and to favourite; views lead to carts, carts to purchases (of the carted
item, often shortly after).  Users' events are interleaved by time, as a
stream would deliver them.  Tests and demos use it where real logs are absent.
"""

from __future__ import annotations

import numpy as np

from models.events import Event

START_MS = 1_700_000_000_000


def funnel_events(n_users: int = 50, events_per_user: tuple[int, int] = (5, 60), n_categories: int = 40,
                  seed: int = 0, with_prices: bool = True) -> list[Event]:
    """``n_users`` users' events, interleaved in timestamp order (ties keep user order)."""
    rng = np.random.default_rng(seed)
    events: list[Event] = []
    for u in range(n_users):
        favourites = rng.choice(n_categories, size=3, replace=False)
        cart_rate, fav_rate = rng.uniform(0.02, 0.25), rng.uniform(0.0, 0.1)
        ts = START_MS + int(rng.integers(0, 3_600_000))
        carted: list[tuple[str, str, float]] = []
        for _ in range(int(rng.integers(*events_per_user, endpoint=True))):
            ts += int(rng.exponential(60_000)) + 1000
            if carted and rng.random() < 0.3:
                item, cat, price = carted.pop(int(rng.integers(len(carted))))
                kind = "purchase"
            else:
                cat = str(rng.choice(favourites) if rng.random() < 0.8 else rng.integers(n_categories))
                item = f"{cat}-{int(rng.integers(30))}"
                price = round(float(rng.lognormal(3, 1)), 2)
                r = rng.random()
                kind = "cart" if r < cart_rate else "favorite" if r < cart_rate + fav_rate else "view"
                if kind == "cart":
                    carted.append((item, cat, price))
            events.append(Event(user_id=f"u{u}", type=kind, item_id=item, category_id=cat, timestamp_ms=ts,
                                price=price if with_prices else None, event_id=f"synthetic:{len(events)}"))
    order = sorted(range(len(events)), key=lambda i: (events[i].timestamp_ms, i))
    return [events[i] for i in order]
