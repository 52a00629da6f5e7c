"""One micro-batch through the whole pipeline, each step in its own module:

    records -> validate -> batch (group by user) -> state lookup -> admission
            -> model step (one batched call) -> state write -> publish

The processor knows the model only through its step API (``advance`` and the
state codec) and Kafka only through :class:`~streams.publish.Publisher`, so the
same code runs behind the faust agent, the benchmark and the tests.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from models import ProfileModel, UserState

from . import state_record
from .admission import DEFAULT_MAX_LATENESS_MS, Admission, admit
from .batching import UserBatch, group_by_user
from .metrics import Metrics
from .publish import Publisher, profile_message
from .records import SourceRecord
from .state_record import StateRecord
from .validate import Rejection, validate_batch

log = logging.getLogger(__name__)


class StateStore(Protocol):
    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]: ...
    def put_many(self, partition: int, items: Sequence[tuple[bytes, bytes]]) -> None: ...


class ModelMismatchError(RuntimeError):
    """Stored state was written by another model; applying events to it would be wrong."""


@dataclass(slots=True)
class BatchReport:
    """What one batch did; the demo's live summary and the tests read it."""

    records: int = 0
    applied: int = 0
    users: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    redelivered: int = 0
    duplicates: int = 0
    max_latency_s: float = 0.0


class BatchProcessor:
    """Applies micro-batches of raw records to user state and publishes profiles."""

    def __init__(self, model: ProfileModel, store: StateStore, publisher: Publisher, metrics: Metrics,
                 max_lateness_ms: int = DEFAULT_MAX_LATENESS_MS) -> None:
        self.model = model
        self.store = store
        self.publisher = publisher
        self.metrics = metrics
        self.max_lateness_ms = max_lateness_ms
        #: Called after every batch with its report and latencies (the demo's live summary).
        self.listeners: list[Callable[[BatchReport, np.ndarray], None]] = []
        #: partition -> (offset, timestamp ms) of the last record processed (for lag).
        self.progress: dict[int, tuple[int, int]] = {}

    async def process(self, records: Sequence[SourceRecord]) -> BatchReport:
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        report = BatchReport(records=len(records))

        accepted, rejected = validate_batch(records, now_ms)
        users = [u for group in group_by_user(accepted).values() for u in group]
        stored = self._lookup(users)
        admissions = [self._admit(u, rec, state) for u, (rec, state) in zip(users, stored)]
        for adm in admissions:
            rejected.extend(adm.rejected)
            report.redelivered += adm.redelivered
            report.duplicates += adm.duplicates

        todo = [i for i, adm in enumerate(admissions) if adm.apply]
        step_seconds = 0.0
        result = None
        if todo:
            t0 = time.perf_counter()
            result = self.model.advance([stored[i][1] for i in todo],
                                        [[a.event for a in admissions[i].apply] for i in todo])
            step_seconds = time.perf_counter() - t0

        self._write_state(users, admissions, stored, todo, result)
        await self._dead_letter(rejected, report)
        latencies = await self._publish(users, admissions, todo, result, report)

        type_counts = Counter(a.event.type for i in todo for a in admissions[i].apply)
        report.applied = sum(type_counts.values())
        report.users = len(todo)
        self.metrics.observe_batch(
            type_counts=type_counts, batch_size=len(records), step_seconds=step_seconds,
            batch_seconds=time.perf_counter() - started, latencies_s=latencies,
            profiles_published=len(todo))
        if report.redelivered:
            self.metrics.count_skipped("redelivered", report.redelivered)
        if report.duplicates:
            self.metrics.count_skipped("duplicate_event", report.duplicates)
        for rec in records:
            self.progress[rec.partition] = (rec.offset, rec.timestamp_ms)
        for listener in self.listeners:
            listener(report, latencies)
        return report

    def _lookup(self, users: list[UserBatch]) -> list[tuple[StateRecord | None, UserState | None]]:
        """State lookup: one multi-get per partition, then decode envelope and model state."""
        out: list[tuple[StateRecord | None, UserState | None]] = []
        by_partition: dict[int, list[int]] = {}
        for i, user in enumerate(users):
            by_partition.setdefault(user.partition, []).append(i)
        raw: list[bytes | None] = [None] * len(users)
        for partition, idxs in by_partition.items():
            for i, value in zip(idxs, self.store.get_many(partition, [users[i].key for i in idxs])):
                raw[i] = value
        for user, value in zip(users, raw):
            if value is None:
                out.append((None, None))
                continue
            record = state_record.decode(value)
            if record.fingerprint != self.model.fingerprint:
                raise ModelMismatchError(
                    f"state of user {user.user_id!r} was written by model {record.fingerprint}, "
                    f"this worker runs {self.model.fingerprint}; see README 'Deploying a new model'")
            out.append((record, self.model.decode_state(record.model_state)))
        return out

    def _admit(self, user: UserBatch, record: StateRecord | None, state: UserState | None) -> Admission:
        return admit(user.items, record, state.last_timestamp_ms if state else None, self.max_lateness_ms)

    def _write_state(self, users: list[UserBatch], admissions: list[Admission],
                     stored: list[tuple[StateRecord | None, UserState | None]],
                     todo: list[int], result: object) -> None:
        """State write: new model state (or just the advanced offset) per user, one batch per partition."""
        new_states: dict[int, UserState] = dict(zip(todo, result.states)) if result is not None else {}
        writes: dict[int, list[tuple[bytes, bytes]]] = {}
        for i, (user, adm) in enumerate(zip(users, admissions)):
            if i in new_states:
                model_state = self.model.encode_state(new_states[i])
            elif stored[i][0] is not None and adm.last_offset > stored[i][0].last_offset:
                model_state = stored[i][0].model_state  # only skipped/rejected events: remember the offset
            else:
                continue
            value = state_record.encode(StateRecord(
                self.model.fingerprint, adm.last_offset, adm.recent_ids, model_state))
            writes.setdefault(user.partition, []).append((user.key, value))
        for partition, items in writes.items():
            self.store.put_many(partition, items)

    async def _dead_letter(self, rejected: list[Rejection], report: BatchReport) -> None:
        for rejection in rejected:
            await self.publisher.dead_letter(rejection)
            report.rejected[rejection.reason] += 1
        for reason, n in report.rejected.items():
            self.metrics.count_invalid(reason, n)
            log.debug("dead-lettered %d records: %s", n, reason)

    async def _publish(self, users: list[UserBatch], admissions: list[Admission], todo: list[int],
                       result: object, report: BatchReport) -> np.ndarray:
        """Publish one profile per updated user; return event->profile latencies in seconds."""
        if result is None:
            return np.zeros(0)
        now_ms = int(time.time() * 1000)
        for row, i in enumerate(todo):
            state = result.states[row]
            value = profile_message(
                users[i].user_id, self.model.version, now_ms, state.n_events, state.last_timestamp_ms,
                result.profile[row], result.intent[row], result.top_categories[row])
            await self.publisher.profile(users[i].user_id, value)
        source_ts = np.fromiter((a.record.timestamp_ms for i in todo for a in admissions[i].apply),
                                dtype=np.int64)
        latencies = (now_ms - source_ts) / 1000.0
        report.max_latency_s = float(latencies.max()) if latencies.size else 0.0
        return latencies
