"""Event producer client (kafka-python): validated, keyed, batched events onto the events topic.

Invalid events are refused with :class:`~models.events.EventError` *before*
anything is sent, by the worker's own acceptance rule
(:func:`streams.pipeline.validate.check_message`), so a dead-letter record can only
come from a producer that bypassed this class.  Delivery is asynchronous:
``send`` returns kafka-python's per-record future, and :meth:`EventProducer.flush`
raises :class:`DeliveryError` for every send that failed since the last flush,
so failures cannot go unnoticed even by callers that ignore the futures.

The producer does not create topics (a broker may auto-create them with the
wrong partition count); workers and ``profilestream produce`` do.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Mapping

from kafka import KafkaProducer
from kafka.producer.future import FutureRecordMetadata

from models.events import Event, EventError, event_from_dict, event_to_dict

from ..kafka.client_config import kafka_python_options
from ..settings import Settings
from ..pipeline.validate import check_message

#: Batching defaults: wait up to 10 ms to fill batches of up to 64 KiB (~300 events).
DEFAULT_OPTIONS: dict[str, Any] = {"linger_ms": 10, "batch_size": 64 * 1024, "acks": "all"}


@dataclass(frozen=True, slots=True)
class DeliveryFailure:
    """One event the broker never acknowledged."""

    event_id: str
    user_id: str
    error: BaseException


class DeliveryError(RuntimeError):
    """Sends failed after leaving the producer; ``failures`` lists each event and its error."""

    def __init__(self, failures: list[DeliveryFailure]) -> None:
        first = failures[0]
        super().__init__(f"{len(failures)} event(s) were not delivered; first: event {first.event_id!r} "
                         f"of user {first.user_id!r}: {first.error!r}")
        self.failures = failures


def encode_checked(event: Event | Mapping[str, Any]) -> tuple[bytes, bytes, Event]:
    """(key, value) of the message for ``event``, and the event the worker will read from it;
    :class:`EventError` with the worker's reason if it would reject the message."""
    obj = event_to_dict(event) if isinstance(event, Event) else event
    # The contract first, so a bad user_id is reported as such rather than as the key it makes.
    key = event_from_dict(obj).user_id.encode()
    try:
        value = json.dumps(obj, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise EventError("wrong_type", f"event is not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise EventError("too_deep", "event nests too deeply to serialise") from None
    return key, value, check_message(key, value)  # the worker's rule: adds the size limit


class EventProducer:
    """Sends website events to ``settings.events_topic``, keyed by ``user_id``.

    ``kafka_options`` are extra :class:`kafka.KafkaProducer` arguments (e.g.
    ``linger_ms``, ``compression_type``); connection and security come from
    ``settings``.  Thread-safe, like the KafkaProducer underneath.
    """

    def __init__(self, settings: Settings, **kafka_options: Any) -> None:
        self.topic = settings.events_topic
        options = {**DEFAULT_OPTIONS, **kafka_options, **kafka_python_options(settings)}
        self._producer = KafkaProducer(**options)
        self._lock = threading.Lock()
        self._failures: list[DeliveryFailure] = []

    def send(self, event: Event | Mapping[str, Any]) -> FutureRecordMetadata:
        """Validate and enqueue one event; the future resolves to its RecordMetadata.

        A mapping is sent as given (fields this version does not know are
        kept, as the contract allows); an :class:`Event` in canonical form.
        Raises :class:`EventError` (nothing sent) if the worker would reject it.
        """
        key, value, checked = encode_checked(event)
        future = self._producer.send(self.topic, value=value, key=key)
        future.add_errback(self._failed, checked.event_id, checked.user_id)
        return future

    def _failed(self, event_id: str, user_id: str, error: BaseException) -> None:
        """Errback, run on kafka-python's sender thread."""
        with self._lock:
            self._failures.append(DeliveryFailure(event_id, user_id, error))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every sent event is acknowledged or failed.

        Raises :class:`DeliveryError` for the failures since the previous
        flush, and kafka-python's ``KafkaTimeoutError`` if ``timeout`` passes first.
        """
        self._producer.flush(timeout)
        with self._lock:
            failures, self._failures = self._failures, []
        if failures:
            raise DeliveryError(failures)

    def close(self, timeout: float | None = None) -> None:
        """Flush (raising :class:`DeliveryError` if sends failed), then release the connections."""
        try:
            self.flush(timeout)
        finally:
            self._producer.close(timeout)

    def __enter__(self) -> "EventProducer":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
