"""Every private name of a third-party library that ProfileStream uses, and the only module that does.

faust has no public hook for batch delivery, the fetch wait, its producer's
Kafka client or its RocksDB partitions, and prometheus-client none for adding
many observations at once; the worker's throughput rests on those.  Keeping
each reach-in here, named in :data:`PRIVATE_NAMES` with the versions it was
written against, lets tests/unit/test_internals.py fail on an upgrade that
removes or renames one, and lets the rest of the code use plain public names.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import monotonic
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Set, TypeVar

import aiokafka
import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from faust.types.tuples import ack_lock
from mode import ServiceT
from mode.utils.futures import notify
from prometheus_client import Histogram

T = TypeVar("T")

#: The versions every name below was checked against (pyproject.toml pins them).
PINNED = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0", "mode-streaming": "0.7.1",
          "prometheus-client": "0.26.0"}


@dataclass(frozen=True)
class PrivateName:
    """One private name we use: where it is defined, and whether it is set per instance."""

    owner: str
    name: str
    per_instance: bool = False


PRIVATE_NAMES: tuple[PrivateName, ...] = (
    # Consumer thread: the fetch wait is set on the aiokafka consumer faust builds.
    PrivateName("faust.transport.drivers.aiokafka.AIOKafkaConsumerThread", "_create_worker_consumer"),
    PrivateName("aiokafka.AIOKafkaConsumer", "_fetch_max_wait_ms", per_instance=True),
    # Consumer: overridden to deliver batches and guard commits.
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_new_consumer_thread"),
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_getmany"),
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_commit_offsets"),
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_drain_messages"),
    # Consumer: the fetch loop's state and helpers the batch fetch loop reuses.
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_wait_next_records"),
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_add_gap"),
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_to_message"),
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_buffered_partitions", per_instance=True),
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_read_offset", per_instance=True),
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_committed_offset", per_instance=True),
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_acked", per_instance=True),
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_acked_index", per_instance=True),
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_unacked_messages", per_instance=True),
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_waiting_for_ack", per_instance=True),
    PrivateName("mode.Service", "_stopped", per_instance=True),
    # Fetch-stall watchdog (streams/kafka/stall.py): faust's paused partitions, and the aiokafka
    # consumer in faust's consumer thread -- its fetch position and buffered records for the
    # warning, and a pause behind faust's back to undo.
    PrivateName("faust.transport.drivers.aiokafka.Consumer", "_paused_partitions", per_instance=True),
    PrivateName("faust.transport.drivers.aiokafka.AIOKafkaConsumerThread", "_ensure_consumer"),
    PrivateName("aiokafka.AIOKafkaConsumer", "_subscription", per_instance=True),
    PrivateName("aiokafka.AIOKafkaConsumer", "_fetcher", per_instance=True),
    PrivateName("aiokafka.consumer.fetcher.Fetcher", "_records", per_instance=True),
    # Embedded broker: the fetch wait of a running client, raised when a stall shows it too short.
    PrivateName("aiokafka.consumer.fetcher.Fetcher", "_fetch_max_wait_ms", per_instance=True),
    # Monitor: when a partition's stream last took a record; faust's stall check reads it.
    PrivateName("faust.sensors.monitor.Monitor", "stream_inbound_time", per_instance=True),
    # Producer: the aiokafka client inside faust's, for record batches.
    PrivateName("faust.transport.drivers.aiokafka.Producer", "_ensure_producer"),
    # Table store: one RocksDB per table partition.
    PrivateName("faust.stores.rocksdb.Store", "_db_for_partition"),
    PrivateName("faust.stores.rocksdb.Store", "_dbs", per_instance=True),
    # Histogram: bucket bounds, per-bucket counts and sum, for bulk observations.
    PrivateName("prometheus_client.Histogram", "_upper_bounds", per_instance=True),
    PrivateName("prometheus_client.Histogram", "_buckets", per_instance=True),
    PrivateName("prometheus_client.Histogram", "_sum", per_instance=True),
)


class FetchWaitConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's consumer thread with a configurable ``fetch_max_wait_ms``.

    faust 0.15.3 hard-codes 1500 ms.  Apache Kafka answers a fetch as soon as
    one byte is there, so the value only bounds idle long-polls; the embedded
    broker holds every fetch for a share of it even when records are waiting
    (docs/embedded-broker.md).
    """

    fetch_max_wait_ms: int = 1500

    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this when start() builds its fetcher, i.e. after this returns.
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer


class FetchWaitConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer on a :class:`FetchWaitConsumerThread`."""

    thread_class: type[FetchWaitConsumerThread] = FetchWaitConsumerThread

    def _new_consumer_thread(self) -> FetchWaitConsumerThread:
        #: The thread that owns the aiokafka consumer (faust keeps it as a private attribute).
        self.client_thread = self.thread_class(self, loop=self.loop, beacon=self.beacon)
        return self.client_thread


class ConsumerHooks(FetchWaitConsumer):
    """faust's consumer with its private hooks and state under public names.

    Subclasses override :meth:`fetch_partitions`, :meth:`commit_offsets` and
    :meth:`drain_records` instead of faust's ``_getmany``, ``_commit_offsets``
    and ``_drain_messages``; the defaults are faust's own behaviour.
    """

    async def _getmany(self, active_partitions: Optional[Set[TP]], timeout: float) -> Any:
        return await self.fetch_partitions(active_partitions, timeout)

    async def fetch_partitions(self, active_partitions: Optional[Set[TP]], timeout: float) -> Any:
        """One fetch from the client for ``active_partitions`` (faust's ``_getmany``)."""
        return await super()._getmany(active_partitions, timeout)

    async def _commit_offsets(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        return await self.commit_offsets(offsets, start_new_transaction)

    async def commit_offsets(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        """Commit ``offsets`` (faust's ``_commit_offsets``); every commit comes here."""
        return await super()._commit_offsets(offsets, start_new_transaction)

    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover - run by faust
        await self.drain_records(fetcher)

    async def drain_records(self, fetcher: ServiceT) -> None:  # pragma: no cover - run by faust
        """The fetch loop faust's fetcher runs (faust's ``_drain_messages``)."""
        await super()._drain_messages(fetcher)

    async def wait_next_records(self, timeout: float) -> tuple[Any, Optional[Set[TP]]]:
        """The client's next records and the partitions active when they were fetched."""
        return await self._wait_next_records(timeout)

    def is_paused(self, tp: TP) -> bool:
        """Whether faust has paused ``tp`` (recovery, flow control): it is then not fetched on purpose."""
        return tp in self._paused_partitions

    async def in_client(self, fun: Callable[[aiokafka.AIOKafkaConsumer], T]) -> T:
        """``fun(client)`` run in faust's consumer thread, which owns the aiokafka consumer (its
        event loop; pausing or resuming from another thread would touch futures of that loop)."""
        thread = self.client_thread

        async def call() -> T:
            return fun(thread._ensure_consumer())
        return await thread.call_thread(call)

    def is_buffered(self, tp: TP) -> bool:
        """Whether faust still buffers records of ``tp`` (delivered even while it is paused)."""
        return tp in self._buffered_partitions

    @property
    def read_offsets(self) -> dict[TP, Optional[int]]:
        """Partition -> offset of the last record handed on in this generation (faust's, shared)."""
        return self._read_offset

    @property
    def committed_offsets(self) -> Mapping[TP, Optional[int]]:
        """Partition -> the offset last committed (where processing resumes)."""
        return self._committed_offset

    def forget_committed(self, tp: TP) -> None:
        """Drop faust's record of ``tp``'s commit (one beyond the partition's end): while it
        stands, no offset below it is acked or committed."""
        self._committed_offset[tp] = None

    async def add_gap(self, tp: TP, start: int, end: int) -> None:
        """Mark offsets ``start..end`` of ``tp`` as absent, so commits can pass them."""
        await self._add_gap(tp, start, end)

    def to_message(self, tp: TP, record: Any) -> Message:
        """faust's ``Message`` for one client record."""
        return self._to_message(tp, record)

    def track_unacked(self, message: Message) -> None:
        """Make rebalances and shutdown wait until ``message`` is acked (faust's ``wait_empty``)."""
        self._unacked_messages.add(message)

    def ack_offsets(self, offsets: Mapping[TP, Iterable[int]], pending: Message) -> None:
        """faust's per-record ``ack`` bookkeeping for many offsets at once; releases ``pending``.

        Records the offsets faust commits: those at or past the committed
        offset, once each.  Also stamps each partition as processed now in
        faust's monitor, as its per-event stream does: faust's stall check
        (``verify_event_path``) logs "Stream has not started processing" at
        ERROR every few seconds for a partition with lag and no stamp, once
        the worker has run for ``stream_processing_timeout`` (5 minutes).
        """
        inbound, now = self.app.monitor.stream_inbound_time, monotonic()
        for tp in offsets:
            inbound[tp] = now
        with ack_lock:
            for tp, tp_offsets in offsets.items():
                committed = self._committed_offset[tp]
                index = self._acked_index[tp]
                new = [o for o in tp_offsets if (committed is None or o >= committed) and o not in index]
                index.update(new)
                self._acked[tp].extend(new)
            self._unacked_messages.discard(pending)
            notify(self._waiting_for_ack)


def client_fetch_state(client: aiokafka.AIOKafkaConsumer, tp: TP) -> dict[str, Any]:
    """What the aiokafka consumer knows of ``tp``'s fetching, for a diagnosis (call it in the
    consumer's thread, :meth:`ConsumerHooks.in_client`): its fetch position (None: awaiting a
    reset), whether it is paused in the client, the highwater of its last fetch response, and
    whether fetched records (or an error) wait in the client's buffer."""
    subscriptions = client._subscription
    if not subscriptions.is_assigned(tp):
        return {"assigned": False}
    state = subscriptions.subscription.assignment.state_value(tp)
    buffered = client._fetcher._records.get(tp) if client._fetcher is not None else None
    return {"assigned": True, "position": state.position if state.has_valid_position else None,
            "paused": state.paused, "highwater": state.highwater,
            "buffered": None if buffered is None else type(buffered).__name__}


def raise_fetch_wait(client: aiokafka.AIOKafkaConsumer, ceiling_ms: int) -> tuple[int, int] | None:
    """Double the running client's fetch wait, up to ``ceiling_ms``: (old, new), or None at the
    ceiling (call it in the consumer's thread).  aiokafka reads it for every fetch request."""
    fetcher = client._fetcher
    old = fetcher._fetch_max_wait_ms
    if old >= ceiling_ms:
        return None
    fetcher._fetch_max_wait_ms = min(ceiling_ms, max(1, old) * 2)
    return old, fetcher._fetch_max_wait_ms


def stop_requested(service: ServiceT) -> Callable[[], bool]:
    """A cheap check of whether ``service`` is stopping (mode's stop event, read per fetch)."""
    return service._stopped.is_set  # type: ignore[attr-defined]


def producer_client(producer: faust.types.ProducerT) -> aiokafka.AIOKafkaProducer:
    """The aiokafka producer inside faust's (faust has no public accessor for it)."""
    return producer._ensure_producer()  # type: ignore[attr-defined]


def partition_db(table: faust.Table, partition: int) -> Any:
    """The RocksDB (a ``rocksdict.Rdict``) holding one partition of a ``rocksdb://`` table."""
    return table.data._db_for_partition(partition)  # type: ignore[attr-defined]


def open_partitions(table: faust.Table) -> list[int]:
    """The table partitions whose RocksDB this worker has open."""
    return list(table.data._dbs)  # type: ignore[attr-defined]


def histogram_bounds(histogram: Histogram) -> Sequence[float]:
    """A histogram's bucket upper bounds, the last being +Inf."""
    return histogram._upper_bounds


def histogram_add(histogram: Histogram, counts: Sequence[int], total: float) -> None:
    """Add per-bucket counts (non-cumulative, one per bound) and their sum to ``histogram``.

    What ``observe()`` does for one value, for many; tests/unit/test_metrics.py
    checks the exposition equals observing the values one at a time.
    """
    for bucket, n in zip(histogram._buckets, counts, strict=True):
        if n:
            bucket.inc(n)
    histogram._sum.inc(total)
