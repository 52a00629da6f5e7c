"""Step 2: group a micro-batch's accepted events by user, keeping partition order.

A user's events all live in one partition (the key is the user id), so keeping
arrival order within the group keeps the user's order.  The model then advances
every user in one call, each by all of their new events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .validate import Accepted


@dataclass(slots=True)
class UserBatch:
    """One user's new events in this micro-batch, oldest first."""

    partition: int
    user_id: str
    items: list[Accepted] = field(default_factory=list)

    @property
    def key(self) -> bytes:
        return self.user_id.encode()


def group_by_user(accepted: Iterable[Accepted]) -> dict[int, list[UserBatch]]:
    """Partition -> users with new events, in order of each user's first event."""
    users: dict[tuple[int, str], UserBatch] = {}
    for item in accepted:
        slot = (item.record.partition, item.event.user_id)
        group = users.get(slot)
        if group is None:
            group = users[slot] = UserBatch(item.record.partition, item.event.user_id)
        group.items.append(item)
    by_partition: dict[int, list[UserBatch]] = {}
    for group in users.values():
        by_partition.setdefault(group.partition, []).append(group)
    return by_partition
