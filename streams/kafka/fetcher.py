"""The hot path: hand each fetched batch of input records to the processor at once.

faust delivers records one by one: per record its fetch loop awaits a
``wait_first`` of two futures, the conductor routes it, a stream wraps it in
an Event, and ``take_events`` buffers it again: a fraction of what a plain
aiokafka consumer reads before any work is done (docs/performance.md).  This
consumer keeps faust's fetch loop, flow
control (pause during rebalances, generation checks), gap tracking, acking and
offset commits, and changes one thing: records of the *batch topics* are
collected per fetch, as :class:`~streams.pipeline.source_record.SourceRecord` s built straight
from the client's records (skipping faust's per-record ``Message``, end-offset update and
round-robin scheduling), handed to
``batch_handler`` as one list, then acked in one step
(:meth:`BatchingConsumer._ack_batch`).
Records of every other topic still take faust's normal route.

The handler runs inside the fetch loop, in two parts.  Called with a batch,
it prepares it (validation and grouping: nothing that reads state); the
awaitable it returns applies it (state, model, publish).  While the worker is
behind -- a fetch returned at least ``overlap_min_events`` records
(PROFILESTREAM_OVERLAP_MIN_EVENTS) -- that awaitable runs as a task while the
loop fetches and prepares the next batch, so one batch's model step (torch,
in a thread of its own, which releases the GIL) overlaps the next batch's
fetch and validation.  A smaller batch is awaited before the next fetch: a
batch fetched early waits for the one in flight, which raised the median
latency when every batch overlapped.  At most one batch is in flight and the
next is applied only after it has been applied and acked, so batches apply in
offset order, a batch is acked only once applied -- at-least-once exactly as
with an agent -- and faust's rebalance code still waits for unacked records
before revoking: the record that makes it wait is registered when the batch
is fetched.

Offsets are committed by faust's commit timer (PROFILESTREAM_COMMIT_INTERVAL_S),
on rebalance and at shutdown, not also every N records from inside this loop as
faust's own loop does: a commit first flushes the write-behind state cache
(streams/state/cache.py), which from a task of its own runs between batches
instead of holding up the ones behind it.

Records of a batch topic are handed over strictly in offset order from the
committed offset on: per partition, only the record at the next expected
offset is processed.  Admission (streams/pipeline/admission.py) skips every event at or
below a user's last applied offset as redelivered, so one batch that started
*ahead* of unprocessed records would make them look applied for each user it
touched, and they would be lost.  faust 0.15.3 + aiokafka 0.14 can do exactly
that after a (re)start or rebalance: a fetch issued while only changelog
partitions are active returns after recovery has paused those too; faust's
active-partition set is shared with the fetch and is then empty, which aiokafka
reads as "every partition", so it hands over (and moves past) the records it
had prefetched for the paused event partitions, and faust's ``getmany`` drops
them; the partitions are resumed before ``perform_seek`` rewinds them to the
committed offset, so the next batch started past them.  Hence: nothing is
processed for a partition until ``perform_seek`` has positioned it for the
current assignment (recorded the offset processing resumes at, then sought
the consumer there), a jump past the expected offset rewinds the partition to
it, and fetches get a snapshot of the active partitions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence, Set

import faust
from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from mode import ServiceT

from ..internals import (ConsumerHooks, FetchWaitConsumer, FetchWaitConsumerThread, client_fetch_state,
                         raise_fetch_wait, stop_requested)
from ..pipeline.source_record import SourceRecord
from ..pipeline.stages import StageClock
from .delivery import DeliveryGuard
from .end_offsets import EndOffsetProbe
from .stall import RESEEK, UNHEALTHY, FetchStallWatch, Verdict, fetched_through

log = logging.getLogger(__name__)

#: Called with a batch; what it does before returning may run while the previous batch
#: is still being finished; the awaitable it returns finishes this one.
BatchHandler = Callable[[Sequence[SourceRecord]], Awaitable[None]]


@dataclass(frozen=True)
class StallReport:
    """One verdict of the fetch-stall watchdog, acted on (:meth:`BatchingConsumer.check_fetch_stalls`)."""

    tp: TP
    verdict: Verdict
    #: The facts logged with it: partition, offsets, the client's fetch state, seconds stalled.
    detail: str


class BatchingConsumer(ConsumerHooks):
    """faust's aiokafka consumer with batch delivery for selected topics."""

    #: Set by :func:`install` before the worker starts.
    batch_topics: frozenset[str] = frozenset()
    batch_handler: BatchHandler | None = None
    #: A batch of at least this many records means the worker is behind (see the module docstring).
    overlap_min_events: int = 1
    #: Set by :func:`install`: no offsets are committed once an output was not delivered.
    delivery_guard: DeliveryGuard | None = None
    #: Embedded broker only: corrects its end offsets (streams/kafka/end_offsets.py), which
    #: faust's changelog recovery and the lag monitor read through :meth:`highwaters`.
    end_offset_probe: EndOffsetProbe | None = None
    #: Set by :func:`install`: run before every commit (the state cache's flush); False refuses it.
    before_commit: Callable[[], Awaitable[bool]] | None = None
    #: Set by :func:`install`: where the hand-off from fetch to handler is timed.
    clock: StageClock | None = None
    #: Set by :func:`install`: the fetch-stall watchdog's clocks (streams/kafka/stall.py).
    stall_watch: FetchStallWatch[TP] | None = None
    #: Embedded broker only: the longest fetch wait a fetch stall may raise the client's to (see
    #: :meth:`check_fetch_stalls`); None leaves the wait alone.
    fetch_wait_ceiling_ms: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Batch-topic partition -> offset of the next record it may process; absent
        #: until perform_seek() has positioned the partition for the current assignment.
        self._next_offset: dict[TP, int] = {}
        #: Partition -> offset it was last rewound to (tells a real gap from a skip).
        self._rewound_to: dict[TP, int] = {}
        #: Partition -> end offset the client fetched through after a re-seek without a record
        #: (the fetch-stall watchdog counts the partition caught up to it; see check_fetch_stalls).
        self._no_records_to: dict[TP, int] = {}

    async def fetch_partitions(self, active_partitions: Optional[Set[TP]], timeout: float) -> Any:
        # faust passes its live set of active partitions, which pause/resume
        # mutate while the fetch waits; emptied, aiokafka returns every partition.
        snapshot = None if active_partitions is None else set(active_partitions)
        return await super().fetch_partitions(snapshot, timeout)

    async def highwaters(self, *partitions: TP) -> Any:
        reported = await super().highwaters(*partitions)
        if self.end_offset_probe is None:
            return reported
        return await self.end_offset_probe.exact(reported)

    async def commit_offsets(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        """faust's commit, refused once an output was not delivered (streams/kafka/delivery.py).

        Every commit (periodic, on rebalance, on shutdown) comes here.  The
        state cache is flushed first (``before_commit``), so the committed
        records' states are in RocksDB and handed to the client like every
        other output of the batches being committed; the guard waits until
        each has been delivered or has failed before it decides (faust's own
        flush follows, for anything else).
        """
        if self.before_commit is not None and not await self.before_commit():
            log.error("not committing offsets %s: the state they cover could not be written", dict(offsets))
            return False
        guard = self.delivery_guard
        if guard is not None:
            if not await guard.commit_allowed():
                log.error("not committing offsets %s: an output was not delivered, so the events "
                          "are read again after the restart", dict(offsets))
                return False
        return await super().commit_offsets(offsets, start_new_transaction)

    async def on_stop(self) -> None:
        await super().on_stop()
        if self.end_offset_probe is not None:
            await self.end_offset_probe.close()

    async def on_partitions_revoked(self, revoked: Set[TP]) -> None:
        for tp in revoked:
            self._next_offset.pop(tp, None)
            self._rewound_to.pop(tp, None)
            self._no_records_to.pop(tp, None)
        if self.stall_watch is not None:
            self.stall_watch.forget(revoked)
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Set[TP], generation_id: int = 0) -> None:
        # Nothing is processed in the new generation before perform_seek().
        self._next_offset.clear()
        self._rewound_to.clear()
        self._no_records_to.clear()
        await super().on_partitions_assigned(assigned, generation_id)

    async def perform_seek(self) -> None:
        """faust's seek to the committed offsets; they are where batch processing resumes.

        Ends by seeking each partition again, to the offset just recorded: the
        fetch loop may have skipped records while this ran (its seek is made
        in the consumer thread, and records fetched from the new position can
        reach the loop before the offsets below are set), and aiokafka leaves
        a partition with nothing committed where it was.  A skipped record is
        otherwise noticed only when a later one arrives (a rewind); at the end
        of a burst none does, and the partition waited forever (seen in the
        rebalance fault test: 216 events unread after 120 s).
        """
        await super().perform_seek()
        tps = [tp for tp in self.assignment() if tp.topic in self.batch_topics]
        committed = {tp: self.committed_offsets.get(tp) for tp in tps}
        # A commit beyond the partition's end (the topic was recreated or truncated): the client
        # would reset to the log start, and every record below the commit would look processed.
        # Read from the start; the processor then meets the states that lie beyond the end
        # (streams/pipeline/model_guard.py).  faust's record of the commit goes too: it would keep
        # every offset below it from being acked and committed.
        with_commit = [tp for tp, offset in committed.items() if offset]
        ends = await self.highwaters(*with_commit) if with_commit else {}
        for tp, end in ends.items():
            if committed[tp] > end:
                log.warning("%s: committed offset %d is beyond the partition's end %d (topic recreated or "
                            "truncated); reading it from its start", tp, committed[tp], end)
                committed[tp] = None
                self.forget_committed(tp)
        # Nothing committed (or 0): the consumer starts at the log start (auto_offset_reset=earliest).
        unknown = [tp for tp, offset in committed.items() if not offset]
        starts = await self.earliest_offsets(*unknown) if unknown else {}
        for tp, offset in committed.items():
            start = offset if offset else starts.get(tp)
            self._next_offset[tp] = start if start is not None else 0
            self._rewound_to.pop(tp, None)
        if tps:
            await self.seek_wait({tp: self._next_offset[tp] for tp in tps})
        if self.stall_watch is not None:
            self.stall_watch.progressed(tps)  # positioned: each stall clock starts now

    async def check_fetch_stalls(self, ends: Mapping[TP, int]) -> list[StallReport]:
        """Ask the watchdog about every positioned batch-topic partition, and act on its verdicts.

        ``ends`` are end offsets the caller has just read from the broker (the
        monitor's, for lag); the client's highwater from its last fetch
        response counts too, the larger wins.  Nothing is checked while the flow
        is stopped (a rebalance or table recovery) or for a partition faust has
        paused on purpose.  A re-seek first resumes the partition in the client
        if the client has it paused although faust does not (such a pause is
        never undone otherwise), then seeks it to the next offset to process as
        the rewind path does, which drops the client's fetch position and
        buffered records for it.

        On the embedded broker (``fetch_wait_ceiling_ms`` set) a re-seek also
        doubles the client's fetch wait, up to the ceiling: Tansu answers a
        fetch that takes longer than its wait with no records, and its fetches
        take longer as a partition grows (docs/embedded-broker.md), so the
        short wait the worker starts with (for latency) eventually stalls it.
        A partition re-seeked with a longer wait starts its escalation afresh:
        only a stall at the ceiling marks the worker unhealthy.

        A stall that outlives its re-seek while the client has fetched through
        to the end (:func:`~streams.kafka.stall.fetched_through`) is offsets
        without records, e.g. a transaction marker at the end of the
        partition: the partition counts as caught up to that end instead.
        """
        watch = self.stall_watch
        if watch is None or not watch.limit_s or not self.flow_active or self.app.rebalancing \
                or self.app.tables.recovery.in_recovery:
            return []
        reports = []
        raised: tuple[int, int] | None = None
        for tp in [tp for tp in self.assignment() if tp.topic in self.batch_topics]:
            if self.is_paused(tp) or self.is_buffered(tp):
                continue
            expected = self._next_offset.get(tp)
            end = max(ends.get(tp) or 0, self.highwater(tp) or 0)
            stalled_s = watch.stalled_s(tp)
            caught_up_to = expected if expected is None else max(expected, self._no_records_to.get(tp, expected))
            verdict = watch.check(tp, caught_up_to, end)
            if verdict is None or expected is None:
                continue
            try:
                client = await self.in_client(lambda c, tp=tp: client_fetch_state(c, tp))
            except Exception as exc:  # noqa: BLE001 - the diagnosis must not stop the watchdog
                client = {"unreadable": repr(exc)}
            if verdict == UNHEALTHY and fetched_through(client, end):
                log.warning("%s: after a re-seek the client fetched offsets %d-%d and found no record in "
                            "them (transaction markers or aborted records): not a stall, the partition is "
                            "caught up (client %s)", tp, expected, end - 1, client)
                self._no_records_to[tp] = end
                watch.progressed([tp])
                continue
            detail = (f"{tp.topic}[{tp.partition}]: next offset {expected}, end offset {end}, committed "
                      f"{self.committed_offsets.get(tp)}, client {client}, no record for {stalled_s:.0f} s "
                      "of fetching")
            if verdict == RESEEK:
                log.warning("fetch stall on %s; re-seeking the partition to %d", detail, expected)
                ceiling = self.fetch_wait_ceiling_ms
                if ceiling is not None and raised is None:
                    raised = await self.in_client(lambda c: raise_fetch_wait(c, ceiling))
                    if raised is not None:
                        log.warning("embedded broker: fetch wait raised from %d to %d ms (it answers a fetch "
                                    "slower than that with no records; docs/embedded-broker.md)", *raised)
                if raised is not None:
                    watch.progressed([tp])  # a longer wait: its escalation starts afresh
                try:
                    await self._reseek(tp, expected, bool(client.get("paused")))
                except Exception as exc:  # noqa: BLE001 - e.g. revoked meanwhile; the next check decides again
                    log.warning("%s: re-seek after a fetch stall failed: %r", tp, exc)
            else:
                log.error("fetch stall on %s, and a re-seek did not end it: marking the worker unhealthy so "
                          "that it is restarted (it resumes from the committed offsets)", detail)
            reports.append(StallReport(tp, verdict, detail))
        return reports

    async def _reseek(self, tp: TP, offset: int, paused_in_client: bool) -> None:
        """Resume ``tp`` in the client if it is paused there (not by faust), then seek it to ``offset``."""
        if paused_in_client:
            await self.in_client(lambda c: c.resume(TopicPartition(tp.topic, tp.partition)))
        if self._next_offset.get(tp) == offset:  # not revoked or positioned anew meanwhile
            await self.seek_wait({tp: offset})

    def _ack_batch(self, batch: Sequence[SourceRecord], pending: Message) -> None:
        """faust's per-record ``ack`` bookkeeping for a whole batch, once per partition.

        Per record it cost a lock, a weak-set discard and a sensor call; the
        offsets it records are what faust commits.  ``pending`` is the message
        that made rebalances and shutdown wait for the batch.
        """
        offsets: dict[TP, list[int]] = {}
        for record in batch:
            if self.app.topics.acks_enabled_for(record.topic):
                offsets.setdefault(TP(record.topic, record.partition), []).append(record.offset)
        self.ack_offsets(offsets, pending)

    async def _finish_batch(self, finish: Awaitable[None], batch: Sequence[SourceRecord], pending: Message) -> None:
        await finish
        self._ack_batch(batch, pending)

    async def _fetch(self, timeout: float) -> list[tuple[TP, list[Any]]]:
        """faust's ``getmany`` with its per-record work done once per partition.

        The same rules: nothing while the flow is suspended, only partitions
        that are active, and the end offset the lag monitor reads, tracked from
        the client's highwater.  One difference: faust's getmany also seeks
        every partition back to its committed offset when the flow is found
        suspended.  That is left to the seek faust's recovery ends every
        rebalance with (:meth:`perform_seek`), which positions batch processing
        too: the extra seek raced the rebalance under way -- it failed when the
        assignment changed beneath it (seen in the fault tests), and its
        offsets could land after that final seek -- and it kept the fetch loop
        waiting on broker round trips while the flow was stopped.
        """
        records, active_partitions = await self.wait_next_records(timeout)
        if records is None or self.should_stop or not self.flow_active:
            return []
        fetched = []
        for tp, tp_records in records.items():
            if active_partitions is None or tp in active_partitions or self.is_buffered(tp):
                self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                fetched.append((tp, tp_records))
        return fetched

    def _delivering(self, generation_id: int) -> bool:
        """Whether records fetched in ``generation_id`` may still be handed on (faust's getmany rule)."""
        return self.flow_active and self.app.consumer_generation_id == generation_id

    async def drain_records(self, fetcher: ServiceT) -> None:  # pragma: no cover - run by faust
        # Mirrors faust.transport.consumer.Consumer._drain_messages (0.15.3),
        # with the per-record delivery of batch topics replaced by one call.
        handler = self.batch_handler
        assert handler is not None, "install() sets the batch handler"
        batch_topics = self.batch_topics
        callback = self.callback
        consumer_should_stop = stop_requested(self)
        fetcher_should_stop = stop_requested(fetcher)
        get_read_offset = self.read_offsets.__getitem__
        set_read_offset = self.read_offsets.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        next_offset = self._next_offset
        rewound_to = self._rewound_to
        inflight: asyncio.Future[None] | None = None
        behind = self.overlap_min_events
        watch = self.stall_watch
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                batch: list[SourceRecord] = []
                last: tuple[TP, Any] | None = None
                rewind: dict[TP, int] = {}
                await self.sleep(0)
                if self.should_stop:
                    break
                fetch_started, flowing = time.perf_counter(), self.flow_active
                fetched = await self._fetch(timeout=1.0)
                fetched_at = time.perf_counter()
                if watch is not None and flowing:
                    watch.fetched(fetched_at - fetch_started)  # not the time waited for a suspended flow
                progressed: list[TP] = []
                generation_id = self.app.consumer_generation_id
                for tp, records in fetched:
                    if not self._delivering(generation_id):
                        break  # a rebalance began: faust's getmany stops delivering here too
                    topic = tp.topic
                    if topic in batch_topics:
                        handed = len(batch)
                        for record in records:
                            offset = record.offset
                            expected = next_offset.get(tp)
                            if expected is None or offset < expected or tp in rewind:
                                continue  # not positioned yet (perform_seek will), already processed, or rewinding
                            if offset > expected:
                                if rewound_to.get(tp) != expected:
                                    rewind[tp] = expected  # [expected, offset) were fetched but never handed to us
                                    continue
                                # Rewound there already and it still starts later: a real gap (e.g. transaction
                                # markers).
                                log.warning("%s: offsets %d-%d are missing from the topic; going on at %d",
                                            tp, expected, offset - 1, offset)
                                if acks_enabled_for(topic):
                                    await self.add_gap(tp, expected, offset - 1)
                                if not self._delivering(generation_id):
                                    break
                            next_offset[tp] = offset + 1
                            batch.append(SourceRecord(topic, tp.partition, offset, record.timestamp, record.key,
                                                      record.value, tuple(record.headers or ())))
                            last = (tp, record)
                            set_read_offset(tp, offset)
                        if len(batch) > handed:
                            progressed.append(tp)
                        continue
                    for record in records:
                        if not self._delivering(generation_id):
                            break
                        offset = record.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is not None and offset < r_offset:
                            continue  # already read in this generation
                        if r_offset and offset - r_offset > 1 and acks_enabled_for(topic):
                            await self.add_gap(tp, r_offset + 1, offset)
                        await self.wait_first(callback(self.to_message(tp, record)), self.suspend_flow.wait())
                        set_read_offset(tp, offset)
                if watch is not None and progressed:
                    watch.progressed(progressed)
                started: tuple[Awaitable[None], Message] | None = None
                if last is not None:
                    # One pending message makes faust's rebalance and shutdown wait for the
                    # batch (``wait_empty``), as tracking each record would, at a fraction of the cost.
                    pending = self.to_message(*last)
                    self.track_unacked(pending)
                    if self.clock is not None:
                        self.clock.add("handoff", time.perf_counter() - fetched_at)
                    started = (handler(batch), pending)  # its synchronous part overlaps the batch in flight
                if inflight is not None:
                    await inflight
                    inflight = None
                if started is not None:
                    inflight = asyncio.ensure_future(self._finish_batch(started[0], batch, started[1]))
                    if len(batch) < behind:
                        await inflight  # a small batch: latency before throughput
                        inflight = None
                for tp, offset in rewind.items():
                    if next_offset.get(tp) != offset:
                        continue  # revoked or re-seeked meanwhile
                    log.info("%s: rewinding to offset %d, records from there were skipped by the fetch", tp, offset)
                    rewound_to[tp] = offset
                    await self.seek_wait({tp: offset})
            if inflight is not None:
                await inflight  # stopping between batches: the batch in flight is finished first
                inflight = None
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            if inflight is not None and not inflight.done():
                inflight.cancel()  # cancelled mid-fetch: as an awaited handler would have been


def _use_consumer(app: faust.App, base: type[FetchWaitConsumer], fetch_max_wait_ms: int, **attrs: object) -> None:
    """Point ``app``'s transport at a subclass of ``base`` with ``attrs`` and the fetch wait."""
    thread_cls = type("AppConsumerThread", (FetchWaitConsumerThread,), {"fetch_max_wait_ms": fetch_max_wait_ms})
    consumer_cls = type("AppConsumer", (base,), {"thread_class": thread_cls, **attrs})
    transport_cls = type("AppTransport", (faust_aiokafka.Transport,), {"Consumer": consumer_cls})
    app.transport = transport_cls(app.conf.broker_consumer, app)


def install(app: faust.App, topics: Sequence[str], handler: BatchHandler, fetch_max_wait_ms: int,
            overlap_min_events: int, delivery_guard: DeliveryGuard, before_commit: Callable[[], Awaitable[bool]],
            clock: StageClock, stall_watch: FetchStallWatch[TP],
            end_offset_probe: EndOffsetProbe | None = None, fetch_wait_ceiling_ms: int | None = None) -> None:
    """Make ``app`` consume ``topics`` through :class:`BatchingConsumer` with ``handler``."""
    _use_consumer(app, BatchingConsumer, fetch_max_wait_ms, batch_topics=frozenset(topics),
                  batch_handler=staticmethod(handler), overlap_min_events=overlap_min_events,
                  delivery_guard=delivery_guard, end_offset_probe=end_offset_probe,
                  before_commit=staticmethod(before_commit), clock=clock, stall_watch=stall_watch,
                  fetch_wait_ceiling_ms=fetch_wait_ceiling_ms)


def install_fetch_wait(app: faust.App, fetch_max_wait_ms: int) -> None:
    """Only the fetch wait, for faust's own per-event delivery (the bench's naive agent)."""
    _use_consumer(app, FetchWaitConsumer, fetch_max_wait_ms)
