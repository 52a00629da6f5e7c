"""Group events into user sequences and split users deterministically.

The split hashes the user id (with a salt stored in the checkpoint), so it is
the same on every machine, independent of file order, and a user's events
never straddle training and evaluation.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterable

from models.events import Event

SPLITS = ("train", "val", "test")


def group_by_user(events: Iterable[Event]) -> dict[str, list[Event]]:
    """User id -> that user's events in input (arrival) order, as the stream sees them."""
    users: dict[str, list[Event]] = {}
    for event in events:
        users.setdefault(event.user_id, []).append(event)
    return users


def split_of(user_id: str, split: dict[str, Any]) -> str:
    """"train", "val" or "test" for a user, from ``{"salt", "val_frac", "test_frac"}``."""
    u = zlib.crc32(f"{split['salt']}:{user_id}".encode()) / 2**32
    if u < split["test_frac"]:
        return "test"
    if u < split["test_frac"] + split["val_frac"]:
        return "val"
    return "train"


def select_users(users: dict[str, list[Event]], split: dict[str, Any], which: str) -> dict[str, list[Event]]:
    """The users of one split ("all" = every user)."""
    if which == "all":
        return users
    return {u: seq for u, seq in users.items() if split_of(u, split) == which}
