"""The hot path: hand each fetched batch of input records to the processor at once.

faust delivers records one by one: per record its fetch loop awaits a
``wait_first`` of two futures, the conductor routes it, a stream wraps it in
an Event, and ``take_events`` buffers it again -- ~4.7k events/s on this
2-core machine before any work is done, while a plain aiokafka consumer reads
the same topic at >100k/s.  This consumer keeps faust's fetch loop, flow
control (pause during rebalances, generation checks), gap tracking, acking and
offset commits, and changes one thing: records of the *batch topics* are
collected per fetch and handed to ``batch_handler`` as one list, then acked.
Records of every other topic still take faust's normal route.

Because the handler runs inside the fetch loop, a batch is always processed
and acked before the next fetch -- at-least-once exactly as with an agent,
and faust's rebalance code still waits for unacked records before revoking.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Sequence

import aiokafka
import faust

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import Message
from mode import ServiceT

BatchHandler = Callable[[Sequence[Message]], Awaitable[None]]


class FetchWaitConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's consumer thread with a configurable ``fetch_max_wait_ms``.

    faust 0.15.3 hard-codes 1500 ms.  Apache Kafka answers a fetch as soon as
    one byte is there, so the value only bounds idle long-polls; the embedded
    broker (Tansu 0.6.0) holds every fetch for a share of it even when records
    are waiting: measured with a plain aiokafka consumer at 200 events/s,
    delivery p50/p99 was 410/750 ms at 1500 ms, 26/53 ms at 100 ms, 4/8 ms at 10 ms.
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
        return self.thread_class(self, loop=self.loop, beacon=self.beacon)


class BatchingConsumer(FetchWaitConsumer):
    """faust's aiokafka consumer with batch delivery for selected topics."""

    #: Set by :func:`install` before the worker starts.
    batch_topics: frozenset[str] = frozenset()
    batch_handler: BatchHandler | None = None

    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover - run by faust
        # Mirrors faust.transport.consumer.Consumer._drain_messages (0.15.3),
        # with the per-record delivery of batch topics replaced by one call.
        handler = self.batch_handler
        assert handler is not None, "install() sets the batch handler"
        batch_topics = self.batch_topics
        callback = self.callback
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set  # type: ignore[attr-defined]
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                batch: list[Message] = []
                ait = self.getmany(timeout=1.0)
                await self.sleep(0)
                if self.should_stop:
                    break
                async for tp, message in ait:
                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is not None and offset < r_offset:
                        continue  # already read in this generation
                    if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                        await self._add_gap(tp, r_offset + 1, offset)
                    if message.topic in batch_topics:
                        self.track_message(message)
                        batch.append(message)
                    else:
                        await self.wait_first(callback(message), self.suspend_flow.wait())
                    set_read_offset(tp, offset)
                if batch:
                    await handler(batch)
                    for message in batch:
                        self.ack(message)
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    await self.commit()
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise


def _use_consumer(app: faust.App, base: type[FetchWaitConsumer], fetch_max_wait_ms: int, **attrs: object) -> None:
    """Point ``app``'s transport at a subclass of ``base`` with ``attrs`` and the fetch wait."""
    thread_cls = type("AppConsumerThread", (FetchWaitConsumerThread,), {"fetch_max_wait_ms": fetch_max_wait_ms})
    consumer_cls = type("AppConsumer", (base,), {"thread_class": thread_cls, **attrs})
    transport_cls = type("AppTransport", (faust_aiokafka.Transport,), {"Consumer": consumer_cls})
    app.transport = transport_cls(app.conf.broker_consumer, app)


def install(app: faust.App, topics: Sequence[str], handler: BatchHandler, fetch_max_wait_ms: int) -> None:
    """Make ``app`` consume ``topics`` through :class:`BatchingConsumer` with ``handler``."""
    _use_consumer(app, BatchingConsumer, fetch_max_wait_ms, batch_topics=frozenset(topics),
                  batch_handler=staticmethod(handler))


def install_fetch_wait(app: faust.App, fetch_max_wait_ms: int) -> None:
    """Only the fetch wait, for faust's own per-event delivery (the bench's naive agent)."""
    _use_consumer(app, FetchWaitConsumer, fetch_max_wait_ms)
