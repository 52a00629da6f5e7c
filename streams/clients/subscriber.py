"""Profile subscriber client (kafka-python): every user's latest profile, in memory.

The profile topic is compacted with key = user_id, so reading it from the
beginning rebuilds the latest profile of every user; a null value (tombstone)
means the user was forgotten.  The subscriber assigns itself all partitions
without a consumer group: each ranker replica needs every user, and there is
nothing to commit because it always starts from the beginning.

The consumer lives on one background thread (kafka-python consumers are not
thread-safe); readers get the shared map under a lock.
"""

from __future__ import annotations

import json
import logging
import threading
from types import TracebackType
from typing import Any, Callable, Iterable

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from ..kafka.client_config import kafka_python_options
from ..settings import Settings

log = logging.getLogger(__name__)

#: A decoded profile message (streams/schemas/profile.schema.json).
Profile = dict[str, Any]
#: Called on the subscriber thread after each change: (user_id, profile, or None when removed).
UpdateCallback = Callable[[str, Profile | None], None]


class ProfileSubscriber:
    """Follows ``settings.profiles_topic`` from the beginning on a background thread."""

    def __init__(self, settings: Settings, on_update: UpdateCallback | None = None,
                 poll_timeout_ms: int = 200) -> None:
        self.topic = settings.profiles_topic
        self._options = kafka_python_options(settings)
        # The embedded broker under-reports end offsets (streams/kafka/end_offsets.py): past
        # them, the rest of the last record batch may still sit in the consumer's buffer.
        self._confirm_with_empty_poll = settings.embedded_broker
        self._on_update = on_update
        self._poll_timeout_ms = poll_timeout_ms
        self._profiles: dict[str, Profile] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"profile-subscriber-{self.topic}", daemon=True)

    # -- reading ----------------------------------------------------------------

    def get(self, user_id: str) -> Profile | None:
        """The user's latest profile, or None if unknown or forgotten."""
        with self._lock:
            return self._profiles.get(user_id)

    def get_many(self, user_ids: Iterable[str]) -> dict[str, Profile | None]:
        """Each user's latest profile (None if unknown or forgotten), read under one lock acquisition."""
        with self._lock:
            return {user_id: self._profiles.get(user_id) for user_id in user_ids}

    def profiles(self) -> dict[str, Profile]:
        """A snapshot of all latest profiles (a copy; the subscriber keeps updating its own)."""
        with self._lock:
            return dict(self._profiles)

    def __len__(self) -> int:
        with self._lock:
            return len(self._profiles)

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> "ProfileSubscriber":
        self._thread.start()
        return self

    def wait_until_caught_up(self, timeout: float | None = None) -> bool:
        """Block until everything published before :meth:`start` has been applied.

        Returns False on timeout; re-raises the error that stopped the
        subscriber thread, if one did, rather than waiting for nothing.
        """
        caught_up = self._caught_up.wait(timeout)
        if self._error is not None:
            raise RuntimeError(f"profile subscriber on {self.topic!r} stopped") from self._error
        return caught_up

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (within one poll timeout) and close the consumer."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> "ProfileSubscriber":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            consumer = KafkaConsumer(**self._options, enable_auto_commit=False)
        except BaseException as exc:
            self._fail(exc)
            return
        try:
            partitions = self._wait_for_topic(consumer)
            if partitions is None:
                return
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            ends = consumer.end_offsets(partitions)
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=self._poll_timeout_ms)
                for records in polled.values():
                    self._apply(records)
                if self._caught_up.is_set() or (polled and self._confirm_with_empty_poll):
                    continue
                if all(consumer.position(tp) >= ends[tp] for tp in partitions):
                    log.info("profile subscriber caught up with %s: %d users", self.topic, len(self))
                    self._caught_up.set()
        except BaseException as exc:
            self._fail(exc)
        finally:
            consumer.close()

    def _fail(self, exc: BaseException) -> None:
        log.error("profile subscriber on %s stopped: %r", self.topic, exc, exc_info=exc)
        self._error = exc
        self._caught_up.set()  # wake waiters so they see the error

    def _wait_for_topic(self, consumer: KafkaConsumer) -> list[TopicPartition] | None:
        """The topic's partitions, waiting for the topic to exist (a ranker may start before the workers)."""
        warned = False
        while not self._stop.is_set():
            consumer.topics()  # a fresh metadata request; partitions_for_topic reads its cache
            partitions = consumer.partitions_for_topic(self.topic)
            if partitions:
                return [TopicPartition(self.topic, p) for p in sorted(partitions)]
            if not warned:
                log.warning("profile topic %s does not exist yet; waiting for it", self.topic)
                warned = True
            self._stop.wait(1.0)
        return None

    def _apply(self, records: list[ConsumerRecord]) -> None:
        for rec in records:
            if rec.key is None:
                log.warning("skipping profile record without key at %s[%d]@%d", rec.topic, rec.partition, rec.offset)
                continue
            user_id = rec.key.decode("utf-8", "replace")
            profile: Profile | None = None
            if rec.value is not None:
                try:
                    profile = json.loads(rec.value)
                except ValueError:
                    log.warning("skipping undecodable profile of %r at %s[%d]@%d", user_id, rec.topic,
                                rec.partition, rec.offset)
                    continue
            with self._lock:
                if profile is None:
                    self._profiles.pop(user_id, None)
                else:
                    self._profiles[user_id] = profile
            if self._on_update is not None:
                try:
                    self._on_update(user_id, profile)
                except Exception:  # a buggy callback must not stop the profiles from updating
                    log.exception("profile update callback failed for user %r", user_id)
