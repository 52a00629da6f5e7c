"""Stop before committing past output the broker never took.

The worker hands its outputs -- state changelog records, profiles, dead
letters, tombstones -- to the Kafka client without waiting for each delivery,
and faust flushes the client before every offset commit.  A flush waits for
deliveries; it does not fail when one failed (the client gave up after its
retries and ``PROFILESTREAM_PRODUCER_REQUEST_TIMEOUT_S``, or the broker refused
the batch).  Committing then would cover events whose changelog record or
profile may never have reached the broker (a timed-out request can still be
appended; a refused one never is): the changelog would miss state a restart
recovers from, and subscribers would keep a stale profile.

So every delivery is watched here.  The first failure is logged and reported
(the worker stops itself), and from then on the consumer refuses to commit
(streams/kafka/fetcher.py): the events are read again after the restart,
admission skips them as redelivered, and their stored state and profile are
written again -- the same path that heals a crash mid-batch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Callable

log = logging.getLogger(__name__)


class DeliveryGuard:
    """Watches the worker's delivery futures; remembers the first one that failed."""

    def __init__(self, on_failure: Callable[[BaseException], None]) -> None:
        #: Called once, with the first failure (the worker stops itself there).
        self.on_failure = on_failure
        self.failure: BaseException | None = None
        self._pending: set[asyncio.Future] = set()

    def watch(self, delivery: asyncio.Future, what: str) -> None:
        """Report ``delivery`` if it fails; ``what`` names the records for the log."""
        self._pending.add(delivery)
        delivery.add_done_callback(functools.partial(self._on_done, what))

    async def commit_allowed(self) -> bool:
        """Whether offsets may be committed: waits for every delivery watched so far, then
        answers whether all succeeded.  (A future runs its callbacks in the order they were
        added, so each delivery has been judged before the wait here sees it done.)"""
        if self._pending:
            await asyncio.wait(list(self._pending))
        return self.failure is None

    def _on_done(self, what: str, delivery: asyncio.Future) -> None:
        self._pending.discard(delivery)
        if delivery.cancelled():
            return  # only when the client is closed, after the last commit
        error = delivery.exception()
        if error is None:
            return
        log.error("%s not delivered: %r; no offsets are committed from now on", what, error)
        if self.failure is None:
            self.failure = error
            self.on_failure(error)
