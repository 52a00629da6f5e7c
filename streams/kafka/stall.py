"""Fetch-stall watchdog: notice an event partition the client stopped delivering, and act.

In the 30-minute soak (docs/performance.md "Soak", issue 19) the worker's
consumer stopped receiving records of its one events partition for good while
the broker had them: the fetch loop went on fetching, getting nothing, and
nothing was logged.  Whatever the cause, a stream processor must not sit on
records it could read.  :class:`FetchStallWatch` decides, from offsets and the
time the fetch loop spent waiting, when a partition counts as stalled and what
to do about it; the consumer (streams/kafka/fetcher.py) acts on its verdicts:
first a re-seek of the partition to the next offset to process, which drops
the client's fetch state for it, and if that does not help within another
period, the worker is marked unhealthy so that its orchestrator restarts it
(docs/reliability.md "Fetch stall").

Time is counted in seconds the fetch loop spent *waiting for fetches* since
the partition last made progress, not wall time: a long batch holds the loop
up without the client being at fault (that is NoProgressWithLag's case), and
every second the loop waits in a fetch while records lie beyond the next
offset is a second the client did not deliver them.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

P = TypeVar("P", bound=Hashable)

#: What the watchdog asks for, once per stall period; also the metric's ``action`` label.
Verdict = Literal["reseek", "unhealthy"]
RESEEK: Verdict = "reseek"
UNHEALTHY: Verdict = "unhealthy"
#: Every verdict, for the metric's label values.
VERDICTS: tuple[Verdict, ...] = (RESEEK, UNHEALTHY)


def fetched_through(client: Mapping[str, object], end_offset: int) -> bool:
    """Whether the client, by its fetch state (``client_fetch_state``), has fetched ``tp`` up to
    ``end_offset`` with nothing left to hand over: its position is at the end, it is not paused
    and holds nothing buffered.

    Asked after a re-seek did not end a stall: the client then read from the next offset to
    process through to the end and found no record, so those offsets hold none (transaction
    markers, aborted records) -- Apache Kafka counts them in the end offset, and the last records
    of a partition written by a transactional producer are such a marker.  Not a stall.
    """
    position = client.get("position")
    return (isinstance(position, int) and position >= end_offset and client.get("paused") is False
            and client.get("buffered") is None)


@dataclass
class _Partition:
    #: :attr:`FetchStallWatch.waited` when the partition last made progress (or was last acted on).
    mark: float
    #: Whether this stall was already answered with a re-seek (the next verdict is :data:`UNHEALTHY`).
    reseeked: bool = False
    #: Whether :data:`UNHEALTHY` was given (nothing more is asked until the partition progresses).
    given_up: bool = False


class FetchStallWatch(Generic[P]):
    """Per partition: seconds of fetching without a record while records wait, and the verdict.

    The fetch loop reports :meth:`fetched` (how long each fetch waited) and
    :meth:`progressed` (records of a partition handed to the processor, or the
    partition positioned for a new assignment); the monitor asks :meth:`check`
    with the partition's next offset to process and its end offset.
    ``limit_s`` of 0 turns the watchdog off.
    """

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        #: Cumulative seconds the fetch loop has spent waiting for fetches.
        self.waited = 0.0
        self._partitions: dict[P, _Partition] = {}

    def fetched(self, seconds: float) -> None:
        """The fetch loop waited ``seconds`` for one fetch (with or without records)."""
        self.waited += seconds

    def progressed(self, partitions: Iterable[P]) -> None:
        """Records of ``partitions`` were handed on (or they were positioned): their clocks restart."""
        for tp in partitions:
            self._partitions[tp] = _Partition(self.waited)

    def forget(self, partitions: Iterable[P]) -> None:
        """``partitions`` were revoked."""
        for tp in partitions:
            self._partitions.pop(tp, None)

    def stalled_s(self, tp: P) -> float:
        """Seconds of fetching since ``tp`` last made progress or was acted on (0 if not watched)."""
        state = self._partitions.get(tp)
        return 0.0 if state is None else self.waited - state.mark

    def check(self, tp: P, next_offset: int | None, end_offset: int | None) -> Verdict | None:
        """The verdict for ``tp``, whose next record to process is ``next_offset`` and whose end is ``end_offset``.

        Nothing while the partition is not positioned (``next_offset`` None) or
        its end is unknown; a partition seen caught up has made progress.  A
        verdict restarts the partition's clock, so a re-seek gets a whole
        period to work before :data:`UNHEALTHY` is asked for.
        """
        if self.limit_s <= 0 or next_offset is None or end_offset is None:
            return None
        state = self._partitions.get(tp)
        if state is None or end_offset <= next_offset:
            self.progressed([tp])  # first seen, or caught up: nothing waits
            return None
        if state.given_up or self.waited - state.mark < self.limit_s:
            return None
        state.mark = self.waited
        if not state.reseeked:
            state.reseeked = True
            return RESEEK
        state.given_up = True
        return UNHEALTHY
