"""One micro-batch through the whole pipeline, each step in its own module:

    records -> validate -> batch (group by user)            (prepare: reads no state)
            -> state lookup -> admission -> model step (one batched call)
            -> state write -> publish                        (apply)

``prepare`` and ``apply`` are separate so the consumer can prepare the next
batch while this one's model step runs in the model thread
(streams/batch_consumer.py).

Control records (forget and TTL expire requests, streams/forget.py) split a
batch: the events before one are applied, then the user is erased, then the
events after it are applied -- the order the partition has them in.  Erasing
happens only here, inside a batch, so it is committed like events and never
lands between a batch's state write and its profile publish.

The processor knows the model only through its step API (``prepare_advance``,
``predict`` and the state codec) and Kafka only through
:class:`~streams.publish.Publisher`, so the same code runs behind the faust
agent, the benchmark and the tests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol, Sequence

import numpy as np

from models import ProfileModel, StepResult, UserState
from models.events import EventError

from . import state_record
from .admission import DEFAULT_MAX_LATENESS_MS, Admission, admit
from .batching import UserBatch, group_by_user
from .forget import ControlRequest, control_request, is_control
from .metrics import Metrics
from .model_guard import ModelMismatchError, StateAheadOfLogError, ahead_message, mismatch_message
from .publish import Publisher, profile_message
from .records import SourceRecord
from .state_record import StateRecord
from .ttl import is_idle
from .validate import Rejection, validate_batch

log = logging.getLogger(__name__)


class StateStore(Protocol):
    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]: ...
    async def put_many(self, partition: int, items: Sequence[tuple[bytes, bytes]]) -> None: ...
    async def delete_many(self, partition: int, keys: Sequence[bytes]) -> None: ...


@dataclass(slots=True)
class Run:
    """Consecutive records of one kind: control records, or events (validated and grouped by user)."""

    records: list[SourceRecord]
    control: bool
    users: list[UserBatch] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


@dataclass(slots=True)
class PreparedBatch:
    """A batch after :meth:`BatchProcessor.prepare`, ready for :meth:`BatchProcessor.apply`."""

    records: Sequence[SourceRecord]
    runs: list[Run]
    prepare_seconds: float


@dataclass(slots=True)
class BatchReport:
    """What one batch did; the demo's live summary and the tests read it."""

    records: int = 0
    applied: int = 0
    users: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    redelivered: int = 0
    duplicates: int = 0
    backfilled: int = 0
    forgotten: int = 0
    max_latency_s: float = 0.0


class BatchProcessor:
    """Applies micro-batches of raw records to user state and publishes profiles."""

    def __init__(self, model: ProfileModel, store: StateStore, publisher: Publisher, metrics: Metrics,
                 events_end: Callable[[int], Awaitable[int]], events_topic: str,
                 max_lateness_ms: int = DEFAULT_MAX_LATENESS_MS, reset_mismatched: bool = False) -> None:
        self.model = model
        self.store = store
        self.publisher = publisher
        self.metrics = metrics
        self.max_lateness_ms = max_lateness_ms
        #: PROFILESTREAM_ON_MODEL_MISMATCH=reset: another model's state, or one ahead of its
        #: events partition's end, is discarded (the user starts afresh) instead of stopping the worker.
        self.reset_mismatched = reset_mismatched
        #: The current end offset of an events partition (asked only when a state claims
        #: an offset at or past a record's: see :meth:`_ahead_of_log`).
        self.events_end = events_end
        self.events_topic = events_topic
        #: Partition -> an end offset seen; states below it need no new question.
        self.known_end: dict[int, int] = {}
        #: Called after every batch with its report and latencies (the demo's live summary).
        self.listeners: list[Callable[[BatchReport, np.ndarray], None]] = []
        #: partition -> (offset, timestamp ms) of the last record processed (for lag).
        self.progress: dict[int, tuple[int, int]] = {}
        #: One batch at a time reads and writes state: the batch consumer keeps one in
        #: flight, and this makes it a property of the processor whoever calls it.
        self.lock = asyncio.Lock()
        #: Runs the model step, one at a time (see :meth:`prepare`).
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model-step")

    def prepare(self, records: Sequence[SourceRecord]) -> PreparedBatch:
        """Validate and group a batch: the steps that read no state, so they may run while
        the previous batch is still in its model step (see streams/batch_consumer.py)."""
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        runs: list[Run] = []
        for control, group in itertools.groupby(records, key=is_control):
            run = Run(list(group), control)
            if not control:
                accepted, run.rejected = validate_batch(run.records, now_ms)
                run.users = [u for users in group_by_user(accepted).values() for u in users]
            runs.append(run)
        return PreparedBatch(records, runs, time.perf_counter() - started)

    async def apply(self, batch: PreparedBatch) -> BatchReport:
        """The steps that read and write state, run by run in record order."""
        async with self.lock:
            started = time.perf_counter() - batch.prepare_seconds
            records = batch.records
            report = BatchReport(records=len(records))
            type_counts: Counter[str] = Counter()
            step_seconds = 0.0
            latencies = [np.zeros(0)]
            for run in batch.runs:
                if run.control:
                    await self._apply_control(run.records, report)
                    continue
                counts, seconds, lat = await self._apply(run, report)
                type_counts += counts
                step_seconds += seconds
                latencies.append(lat)
            all_latencies = np.concatenate(latencies)
            report.applied = sum(type_counts.values())
            report.max_latency_s = float(all_latencies.max()) if all_latencies.size else 0.0
            self.metrics.observe_batch(
                type_counts=type_counts, batch_size=len(records), step_seconds=step_seconds,
                batch_seconds=time.perf_counter() - started, latencies_s=all_latencies,
                profiles_published=report.users)
            if report.redelivered:
                self.metrics.count_skipped("redelivered", report.redelivered)
            if report.duplicates:
                self.metrics.count_skipped("duplicate_event", report.duplicates)
            if report.backfilled:
                self.metrics.count_skipped("backfilled", report.backfilled)
            for rec in records:
                self.progress[rec.partition] = (rec.offset, rec.timestamp_ms)
            for listener in self.listeners:
                listener(report, all_latencies)
            return report

    async def _apply(self, run: Run, report: BatchReport) -> tuple[Counter[str], float, np.ndarray]:
        """The pipeline for a run of events: (applied per type, model seconds, latencies)."""
        users, rejected = run.users, list(run.rejected)
        stored = self._lookup(users)
        for i, user in enumerate(users):
            record = stored[i][0]
            if record is not None and record.last_offset >= user.items[0].record.offset \
                    and await self._ahead_of_log(user.partition, record.last_offset, f"user {user.user_id!r}"):
                stored[i] = (None, None)
        admissions = [self._admit(u, rec, state) for u, (rec, state) in zip(users, stored)]
        for adm in admissions:
            rejected.extend(adm.rejected)
            report.redelivered += adm.redelivered
            report.duplicates += adm.duplicates
            report.backfilled += adm.backfilled

        todo = [i for i, adm in enumerate(admissions) if adm.apply]
        step_seconds = 0.0
        result = None
        if todo:
            t0 = time.perf_counter()
            step = self.model.prepare_advance([stored[i][1] for i in todo],
                                              [[a.event for a in admissions[i].apply] for i in todo])
            # torch releases the GIL: while the step runs in the model thread, the fetch
            # loop fetches and prepares the next batch.
            result = await asyncio.get_running_loop().run_in_executor(self._model_thread, step)
            step_seconds = time.perf_counter() - t0

        await self._write_state(users, admissions, stored, todo, result)
        await self._dead_letter(rejected, report)
        published_ms = await self._publish([users[i].user_id for i in todo], result)
        resend = [i for i, adm in enumerate(admissions)
                  if adm.redelivered and not adm.apply and stored[i][1] is not None]
        if resend:
            await self._publish([users[i].user_id for i in resend],
                                self.model.predict([stored[i][1] for i in resend]))
        report.users += len(todo)
        source_ts = np.fromiter((a.record.timestamp_ms for i in todo for a in admissions[i].apply),
                                dtype=np.int64)
        return (Counter(a.event.type for i in todo for a in admissions[i].apply), step_seconds,
                (published_ms - source_ts) / 1000.0)

    async def _apply_control(self, records: list[SourceRecord], report: BatchReport) -> None:
        """Erase the users a run of control records asks for, request by request, in order.

        A redelivered request (crash or rebalance before its offset was
        committed) must not erase what events *after* it built: if the user's
        state has applied an offset beyond the request's, it was honoured
        already.  An expire request spares a user whose last event is not
        older than its cut-off: events that waited in the log before it
        were applied first.  A user with no state is erased all the same, for
        its tombstones: a crash may have come between the local delete and them.
        """
        rejected: list[Rejection] = []
        requests: dict[int, list[tuple[SourceRecord, ControlRequest]]] = {}
        for record in records:
            try:
                requests.setdefault(record.partition, []).append((record, control_request(record)))
            except EventError as exc:
                rejected.append(Rejection(record, exc.reason, str(exc)))
        for partition, pending in requests.items():
            users = list(dict.fromkeys(request.user_id for _, request in pending))
            stored = dict(zip(users, self.store.get_many(partition, [user.encode() for user in users])))
            doomed: dict[str, str] = {}
            for record, request in pending:
                value = None if request.user_id in doomed else stored[request.user_id]
                if await self._honoured(partition, record, request, value):
                    report.redelivered += 1
                    continue
                if value is not None and request.idle_before_ms is not None and not is_idle(
                        state_record.decode(value), self.model, request.idle_before_ms):
                    log.debug("user %r: active since the expire request's cut-off; kept", request.user_id)
                    continue
                doomed[request.user_id] = request.cause
            for cause in sorted(set(doomed.values())):
                erased = [user for user, c in doomed.items() if c == cause]
                await self._erase(partition, erased, cause)
                report.forgotten += len(erased)
        await self._dead_letter(rejected, report)

    async def _honoured(self, partition: int, record: SourceRecord, request: ControlRequest,
                        value: bytes | None) -> bool:
        """Whether the user's state shows events after ``record`` applied: the request was applied before."""
        if value is None:
            return False
        applied = state_record.decode(value).last_offset
        return applied > record.offset and not await self._ahead_of_log(
            partition, applied, f"user {request.user_id!r}")

    async def _ahead_of_log(self, partition: int, applied: int, whose: str) -> bool:
        """Whether a state's applied offset lies at or beyond the events partition's end.

        Such a state was built from a topic that has since been recreated or
        truncated: its offset would make new events look redelivered.  With
        the reset policy it is discarded (True); otherwise the worker stops.
        """
        if applied < self.known_end.get(partition, 0):
            return False
        end = self.known_end[partition] = await self.events_end(partition)
        if applied < end:
            return False
        message = ahead_message(f"the stored state of {whose}", self.events_topic, partition, applied, end)
        if not self.reset_mismatched:
            raise StateAheadOfLogError(message)
        log.warning("%s; discarding it (PROFILESTREAM_ON_MODEL_MISMATCH=reset)", message)
        return True

    async def _erase(self, partition: int, user_ids: list[str], cause: str) -> None:
        """Delete the users' state (RocksDB + changelog tombstone) and tombstone their profiles."""
        if not user_ids:
            return
        await self.store.delete_many(partition, [user.encode() for user in user_ids])
        for user in user_ids:
            await self.publisher.tombstone(user)
        self.metrics.count_forgotten(cause, len(user_ids))
        log.info("erased %d users of partition %d (%s)", len(user_ids), partition, cause)

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
                if not self.reset_mismatched:
                    raise ModelMismatchError(f"user {user.user_id!r}: "
                                             + mismatch_message(record.fingerprint, self.model.fingerprint))
                log.info("user %r: discarding state of model %s, starting afresh with model %s",
                         user.user_id, record.fingerprint, self.model.fingerprint)
                out.append((None, None))
                continue
            out.append((record, self.model.decode_state(record.model_state)))
        return out

    def _admit(self, user: UserBatch, record: StateRecord | None, state: UserState | None) -> Admission:
        return admit(user.items, record, state.last_timestamp_ms if state else None, self.max_lateness_ms)

    async def _write_state(self, users: list[UserBatch], admissions: list[Admission],
                           stored: list[tuple[StateRecord | None, UserState | None]],
                           todo: list[int], result: object) -> None:
        """State write: new model state (or just the advanced offset) per user, one batch per partition.

        A user whose events were redelivered gets their stored record written
        again: it was applied before a crash, but its changelog record may
        never have reached the broker, and the offsets are about to be
        committed past it -- without this the next owner of the partition
        would recover a state that misses those events.  The same reason
        makes :meth:`_apply` publish their current profile again.
        """
        new_states: dict[int, UserState] = dict(zip(todo, result.states)) if result is not None else {}
        writes: dict[int, list[tuple[bytes, bytes]]] = {}
        for i, (user, adm) in enumerate(zip(users, admissions)):
            if i in new_states:
                model_state = self.model.encode_state(new_states[i])
            elif stored[i][0] is not None and (adm.last_offset > stored[i][0].last_offset or adm.redelivered):
                model_state = stored[i][0].model_state  # only skipped/rejected events: remember the offset
            else:
                continue
            value = state_record.encode(StateRecord(
                self.model.fingerprint, adm.last_offset, adm.recent_ids, model_state))
            writes.setdefault(user.partition, []).append((user.key, value))
        for partition, items in writes.items():
            await self.store.put_many(partition, items)

    async def _dead_letter(self, rejected: list[Rejection], report: BatchReport) -> None:
        reasons: Counter[str] = Counter()
        for rejection in rejected:
            await self.publisher.dead_letter(rejection)
            reasons[rejection.reason] += 1
        report.rejected.update(reasons)
        for reason, n in reasons.items():
            self.metrics.count_invalid(reason, n)
            log.debug("dead-lettered %d records: %s", n, reason)

    async def _publish(self, user_ids: list[str], result: StepResult | None) -> int:
        """Publish the profile of each user (row i of ``result``); returns the publish time in ms."""
        now_ms = int(time.time() * 1000)
        if user_ids:
            version = self.model.version
            await self.publisher.profiles([
                (user_id, profile_message(user_id, version, now_ms, state.n_events, state.last_timestamp_ms,
                                          profile, intent, top))
                for user_id, state, profile, intent, top in zip(
                    user_ids, result.states, result.profile, result.intent, result.top_categories)])
        return now_ms
