"""One micro-batch through the whole pipeline, each step in its own module:

    records -> validate -> batch (group by user)            (prepare: reads no state)
            -> state lookup -> admission -> model step (one batched call)
            -> state write -> publish                        (apply)

``prepare`` and ``apply`` are separate so the consumer can prepare the next
batch while this one's model step runs in the model thread
(streams/kafka/fetcher.py).

Control records (forget and TTL expire requests, streams/pipeline/control.py) split a
batch: the events before one are applied, then the user is erased, then the
events after it are applied -- the order the partition has them in.  Erasing
happens only here, inside a batch, so it is committed like events and never
lands between a batch's state write and its profile publish.

Record isolation: no exception one record causes may stop the worker (it
would read the record again after the restart, and stop again).  So an
attempt at a batch first *stages* everything it would write -- state records,
changelog records, profiles, tombstones, dead letters -- in memory, reading
state through what the attempt itself staged, and only a staged attempt that
succeeded is emitted.  When a record-dependent step fails (admission,
featurisation, the model step, state encoding, profile messages), nothing has
been written: the records responsible are found by bisection (the shortest
failing prefix of the batch ends with one), dead-lettered as
``unprocessable`` with the exception, and the rest staged again and emitted.
A failure that is not any record's still stops the worker: reading state
(RocksDB, a corrupt or another model's state record), emitting (RocksDB, the
broker), and a model step that fails for a known-good canary event too
(docs/reliability.md lists which is which).

The processor knows the model only through its step API (``prepare_advance``,
``predict`` and the state codec) and Kafka only through
:class:`Publisher` (streams/kafka/publisher.py on Kafka), so the same code runs
behind the faust agent, the benchmark and the unit tests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol, Sequence

import numpy as np

from models import ProfileModel, StepResult, UserState
from models.events import MIN_TIMESTAMP_MS, Event, EventError

from ..state import codec as state_codec
from ..state.cache import StateBackend, StateCache, StoredState
from ..state.codec import StateRecord
from .admission import DEFAULT_MAX_LATENESS_MS, Admission, admit
from .control import ControlRequest, control_request, is_control, is_idle
from .grouping import UserBatch, group_by_user
from .model_guard import ModelMismatchError, StateAheadOfLogError, ahead_message, mismatch_message
from .profile_message import profile_message
from .source_record import SourceRecord
from .stages import StageClock
from .validate import Rejection, check_partition, unprocessable, validate_batch

if TYPE_CHECKING:  # the worker's Prometheus metrics import faust's side (streams/internals.py)
    from ..service.metrics import Metrics

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """Where the pipeline's outputs go; the pipeline imports no Kafka client."""

    async def profiles(self, items: Sequence[tuple[str, bytes]]) -> None: ...
    async def tombstone(self, user_id: str) -> None: ...
    async def dead_letter(self, rejection: Rejection) -> asyncio.Future: ...


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


@dataclass(slots=True)
class StagedRun:
    """What one run writes, in memory until its batch's attempt has succeeded (see the module docstring)."""

    #: Partition -> (user key, new state) to put, or (user key, None) to delete.
    states: dict[int, list[tuple[bytes, StoredState | None]]] = field(default_factory=dict)
    #: (user id, profile message), or (user id, None) for a tombstone, in publish order.
    profiles: list[tuple[str, bytes | None]] = field(default_factory=list)
    #: Erased users per partition and why (``request``, ``ttl``), for the log and metrics.
    erased: list[tuple[int, int, str]] = field(default_factory=list)


@dataclass(slots=True)
class StagedBatch:
    """A whole attempt at a batch: its runs' writes, its dead letters, and what to report."""

    runs: list[StagedRun] = field(default_factory=list)
    dead_letters: list[Rejection] = field(default_factory=list)
    report: BatchReport = field(default_factory=BatchReport)
    type_counts: Counter[str] = field(default_factory=Counter)
    step_seconds: float = 0.0
    #: Source timestamps (ms) of the applied events: their latency is taken when emitted.
    source_ts: list[np.ndarray] = field(default_factory=list)
    #: (partition, user key) -> state staged by an earlier run (None: deleted).
    overlay: dict[tuple[int, bytes], StoredState | None] = field(default_factory=dict)


class RecordFailure(Exception):
    """A record-dependent step raised ``cause``: the batch's records are searched for the culprit."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(repr(cause))
        self.cause = cause


#: A known-good event, run through the model when a batch fails, to tell a record's failure
#: from the model's own (docs/reliability.md).
CANARY_EVENT = Event("profilestream-canary", "view", "canary-item", "canary-category", MIN_TIMESTAMP_MS,
                     None, "canary")


class BatchProcessor:
    """Applies micro-batches of raw records to user state and publishes profiles."""

    def __init__(self, model: ProfileModel, store: StateBackend, publisher: Publisher, metrics: Metrics,
                 events_end: Callable[[int], Awaitable[int]], events_topic: str,
                 max_lateness_ms: int = DEFAULT_MAX_LATENESS_MS, reset_mismatched: bool = False,
                 partitions_of: Callable[[str], int | None] = lambda topic: None,
                 cache_users: int = 0, thread_min_events: int = 1) -> None:
        self.model = model
        #: Users' decoded states, written behind to ``store`` (streams/state/cache.py).
        self.states = StateCache(store, self.decode_stored, self.encode_stored, cache_users)
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
        #: A run of fewer events steps the model inline: the thread only pays when the fetch loop
        #: prepares the next batch meanwhile (PROFILESTREAM_OVERLAP_MIN_EVENTS), and its hand-off
        #: and wake-up cost a third of a millisecond, a tenth of a small batch.
        self.thread_min_events = thread_min_events
        #: A topic's partition count, to catch keys on the wrong partition (None: not checked).
        self.partitions_of = partitions_of
        #: Where each batch's time goes (streams/pipeline/stages.py).
        self.clock = StageClock()

    def prepare(self, records: Sequence[SourceRecord]) -> PreparedBatch:
        """Validate and group a batch: the steps that read no state, so they may run while
        the previous batch is still in its model step (see streams/kafka/fetcher.py)."""
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        runs: list[Run] = []
        for control, group in itertools.groupby(records, key=is_control):
            run = Run(list(group), control)
            if not control:
                accepted, run.rejected = validate_batch(run.records, now_ms, self.partitions_of)
                run.users = [u for users in group_by_user(accepted).values() for u in users]
            runs.append(run)
        elapsed = time.perf_counter() - started
        self.clock.add("prepare", elapsed)
        return PreparedBatch(records, runs, elapsed)

    async def apply(self, batch: PreparedBatch) -> BatchReport:
        """The steps that read and write state, run by run in record order: staged, then emitted."""
        async with self.lock:
            started = time.perf_counter() - batch.prepare_seconds
            try:
                staged = await self._stage(batch.runs)
            except RecordFailure as failure:
                staged = await self._isolate(list(batch.records), failure)
            await self._emit(staged)
            metrics_started = time.perf_counter()
            report, records = staged.report, batch.records
            source_ts = np.concatenate(staged.source_ts) if staged.source_ts else np.zeros(0, np.int64)
            all_latencies = (time.time() * 1000 - source_ts) / 1000.0
            report.records = len(records)
            report.applied = sum(staged.type_counts.values())
            report.max_latency_s = float(all_latencies.max()) if all_latencies.size else 0.0
            self.metrics.observe_batch(
                type_counts=staged.type_counts, batch_size=len(records), step_seconds=staged.step_seconds,
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
            clock = self.clock
            clock.batches += 1
            clock.add("metrics", time.perf_counter() - metrics_started)
            for listener in self.listeners:
                listener(report, all_latencies)
            return report

    async def flush(self) -> None:
        """Write the cached states to RocksDB and the changelog: the consumer calls this before
        every offset commit, so a commit never covers a state the changelog may not get."""
        self.clock.add("flush", await self.states.flush())

    async def _stage(self, runs: list[Run]) -> StagedBatch:
        """One attempt at a batch, every output staged (nothing written); :class:`RecordFailure`
        if a record-dependent step raised."""
        staged = StagedBatch()
        for run in runs:
            if run.control:
                staged.runs.append(await self._stage_control(run.records, staged))
            else:
                staged.runs.append(await self._stage_events(run, staged))
        return staged

    async def _isolate(self, records: list[SourceRecord], failure: RecordFailure) -> StagedBatch:
        """Stage the batch without the records that make it fail, dead-lettered as ``unprocessable``.

        Staging is pure, so any subset can be tried.  A prefix of the batch
        that fails and is one record longer than one that succeeds ends with
        a culprit (it fails there in the context of the records before it);
        bisection finds the shortest such prefix, the culprit leaves, and the
        search goes on from there until the rest stages.  A model that fails
        on the canary event too is not failing because of a record: the
        worker stops.
        """
        if not await self._model_works():
            raise failure.cause
        culprits: list[Rejection] = []
        error, good = failure.cause, 0  # records[:good] stage; records as a whole do not
        while True:
            bad = len(records)
            while bad - good > 1:
                mid = (good + bad) // 2
                try:
                    await self._stage(self.prepare(records[:mid]).runs)
                    good = mid
                except RecordFailure as again:
                    bad, error = mid, again.cause
            culprits.append(unprocessable(records.pop(bad - 1), error))
            good = bad - 1
            try:
                staged = await self._stage(self.prepare(records).runs)
                break
            except RecordFailure as again:
                error = again.cause
        staged.dead_letters.extend(culprits)
        return staged

    async def _model_works(self) -> bool:
        """Whether the model still advances, encodes and describes a known-good user (the canary)."""
        try:
            step = self.model.prepare_advance([None], [[CANARY_EVENT]])
            result = await asyncio.get_running_loop().run_in_executor(self._model_thread, step)
            state = result.states[0]
            self.model.encode_state(state)
            profile_message(CANARY_EVENT.user_id, self.model.version, 0, state.n_events, state.last_timestamp_ms,
                            result.profile[0], result.intent[0], result.top_categories[0])
        except Exception as exc:  # noqa: BLE001 - the verdict: the batch's failure is the model's
            log.error("the model fails on the canary event too (%r): not a record's failure", exc, exc_info=exc)
            return False
        return True

    async def _emit(self, staged: StagedBatch) -> None:
        """Write what an attempt staged.  Dead letters go first and are awaited: a state
        written past a dead-lettered record (out_of_order, unprocessable) makes a redelivery
        skip that record, so its dead letter must be on the broker before."""
        clock = self.clock
        with clock.timing("publish"):
            await self._dead_letter(staged.dead_letters, staged.report)
        for run in staged.runs:
            await self._emit_run(run)
        with clock.timing("state"):
            await self.states.settle()

    async def _emit_run(self, run: StagedRun) -> None:
        with self.clock.timing("state"):
            for partition, items in run.states.items():
                self.states.put_many(partition, items)
        with self.clock.timing("publish"):
            profiles = [(user, value) for user, value in run.profiles if value is not None]
            if profiles:
                await self.publisher.profiles(profiles)  # type: ignore[arg-type]
            for user, value in run.profiles:
                if value is None:
                    await self.publisher.tombstone(user)
        for partition, n, cause in run.erased:
            self.metrics.count_forgotten(cause, n)
            log.info("erased %d users of partition %d (%s)", n, partition, cause)

    async def _stage_events(self, run: Run, staged: StagedBatch) -> StagedRun:
        """Stage the pipeline for a run of events: state records, profiles, dead letters, counts."""
        out = StagedRun()
        users, report, clock = run.users, staged.report, self.clock
        with clock.timing("lookup"):
            stored = self._lookup(users, staged.overlay)  # not the records': RocksDB, stored state (stops the worker)
        for i, user in enumerate(users):
            entry = stored[i]
            if entry is not None and entry.last_offset >= user.items[0].record.offset \
                    and await self._ahead_of_log(user.partition, entry.last_offset, f"user {user.user_id!r}"):
                stored[i] = None
        try:
            t0 = time.perf_counter()
            admissions = [self._admit(u, entry) for u, entry in zip(users, stored)]
            rejected = list(run.rejected)
            for adm in admissions:
                rejected.extend(adm.rejected)
                report.redelivered += adm.redelivered
                report.duplicates += adm.duplicates
                report.backfilled += adm.backfilled
            todo = [i for i, adm in enumerate(admissions) if adm.apply]
            t1 = time.perf_counter()
            clock.add("admission", t1 - t0)
            result = None
            if todo:
                step = self.model.prepare_advance([self._state_of(stored[i]) for i in todo],
                                                  [[a.event for a in admissions[i].apply] for i in todo])
                t2 = time.perf_counter()
                clock.add("featurise", t2 - t1)
                if len(run.records) >= self.thread_min_events:
                    # torch releases the GIL: while the step runs in the model thread, the fetch
                    # loop fetches and prepares the next batch.
                    result = await asyncio.get_running_loop().run_in_executor(self._model_thread, step)
                else:
                    result = step()
                elapsed = time.perf_counter() - t2
                staged.step_seconds += elapsed
                clock.add("model_step", result.step_seconds)
                clock.add("heads", result.heads_seconds)
                clock.add("model_thread", elapsed - result.step_seconds - result.heads_seconds)
            with clock.timing("state"):
                self._stage_states(out, staged.overlay, users, admissions, stored, todo, result)
            with clock.timing("profiles"):
                now_ms = int(time.time() * 1000)
                self._stage_profiles(out, [users[i].user_id for i in todo], result, now_ms)
                resend = [i for i, adm in enumerate(admissions)
                          if adm.redelivered and not adm.apply and stored[i] is not None]
                if resend:
                    self._stage_profiles(out, [users[i].user_id for i in resend],
                                         self.model.predict([self._state_of(stored[i]) for i in resend]), now_ms)
        except Exception as exc:
            if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
                raise  # the batch's size, not a record (torch names its CUDA/CPU OOM so)
            raise RecordFailure(exc) from exc
        staged.dead_letters.extend(rejected)
        report.users += len(todo)
        staged.type_counts.update(a.event.type for i in todo for a in admissions[i].apply)
        staged.source_ts.append(np.fromiter((a.record.timestamp_ms for i in todo for a in admissions[i].apply),
                                            dtype=np.int64))
        return out

    @staticmethod
    def _state_of(entry: StoredState | None) -> UserState | None:
        return None if entry is None else entry.state

    async def _stage_control(self, records: list[SourceRecord], staged: StagedBatch) -> StagedRun:
        """Stage the erasures a run of control records asks for, request by request, in order.

        A redelivered request (crash or rebalance before its offset was
        committed) must not erase what events *after* it built: if the user's
        state has applied an offset beyond the request's, it was honoured
        already.  An expire request spares a user whose last event is not
        older than its cut-off: events that waited in the log before it
        were applied first.  A user with no state is erased all the same, for
        its tombstones: a crash may have come between the local delete and them.
        """
        out = StagedRun()
        requests: dict[int, list[tuple[SourceRecord, ControlRequest]]] = {}
        for record in records:
            try:
                request = control_request(record)
                partitions = self.partitions_of(record.topic)
                if partitions is not None:
                    check_partition(record, partitions)
                requests.setdefault(record.partition, []).append((record, request))
            except EventError as exc:
                staged.dead_letters.append(Rejection(record, exc.reason, str(exc)))
            except Exception as exc:  # noqa: BLE001 - isolation: one record's failure must not stop the worker
                staged.dead_letters.append(unprocessable(record, exc))
        for partition, pending in requests.items():
            users = list(dict.fromkeys(request.user_id for _, request in pending))
            stored = dict(zip(users, self._get_many(partition, [user.encode() for user in users], staged.overlay)))
            doomed: dict[str, str] = {}
            for record, request in pending:
                entry = None if request.user_id in doomed else stored[request.user_id]
                if await self._honoured(partition, record, request, entry):
                    staged.report.redelivered += 1
                    continue
                if entry is not None and request.idle_before_ms is not None and not is_idle(
                        entry.state, request.idle_before_ms):
                    log.debug("user %r: active since the expire request's cut-off; kept", request.user_id)
                    continue
                doomed[request.user_id] = request.cause
            for cause in sorted(set(doomed.values())):
                erased = [user for user, c in doomed.items() if c == cause]
                self._stage_erase(out, staged.overlay, partition, erased, cause)
                staged.report.forgotten += len(erased)
        return out

    async def _honoured(self, partition: int, record: SourceRecord, request: ControlRequest,
                        entry: StoredState | None) -> bool:
        """Whether the user's state shows events after ``record`` applied: the request was applied before."""
        if entry is None:
            return False
        applied = entry.last_offset
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

    @staticmethod
    def _stage_erase(out: StagedRun, overlay: dict[tuple[int, bytes], StoredState | None], partition: int,
                     user_ids: list[str], cause: str) -> None:
        if not user_ids:
            return
        deletes = out.states.setdefault(partition, [])
        for user in user_ids:
            key = user.encode()
            deletes.append((key, None))
            overlay[(partition, key)] = None
            out.profiles.append((user, None))
        out.erased.append((partition, len(user_ids), cause))

    def _get_many(self, partition: int, keys: list[bytes],
                  overlay: dict[tuple[int, bytes], StoredState | None]) -> list[StoredState | None]:
        """States as this attempt sees them: what it staged, else the cache, else RocksDB (one multi-get)."""
        missing = [key for key in keys if (partition, key) not in overlay]
        found = dict(zip(missing, self.states.get_many(partition, missing))) if missing else {}
        return [overlay[(partition, key)] if (partition, key) in overlay else found[key] for key in keys]

    def _lookup(self, users: list[UserBatch], overlay: dict[tuple[int, bytes], StoredState | None]
                ) -> list[StoredState | None]:
        """State lookup: one cache read (and one multi-get of its misses) per partition."""
        by_partition: dict[int, list[int]] = {}
        for i, user in enumerate(users):
            by_partition.setdefault(user.partition, []).append(i)
        out: list[StoredState | None] = [None] * len(users)
        for partition, idxs in by_partition.items():
            for i, entry in zip(idxs, self._get_many(partition, [users[i].key for i in idxs], overlay)):
                out[i] = entry
        return out

    def decode_stored(self, key: bytes, value: bytes) -> StoredState | None:
        """A stored state record, decoded (None: another model's, discarded by the reset policy).

        Raises for a corrupt record, or another model's without the reset
        policy: the stored state is not any record's fault, so the worker stops.
        """
        record = state_codec.decode(value)
        if record.fingerprint != self.model.fingerprint:
            user = key.decode("utf-8", "replace")
            if not self.reset_mismatched:
                raise ModelMismatchError(f"user {user!r}: " + mismatch_message(record.fingerprint,
                                                                                self.model.fingerprint))
            log.info("user %r: discarding state of model %s, starting afresh with model %s",
                     user, record.fingerprint, self.model.fingerprint)
            return None
        return StoredState(record.last_offset, record.recent_event_ids, self.model.decode_state(record.model_state),
                           record.legacy_event_ids)

    def encode_stored(self, entry: StoredState) -> bytes:
        """The state record of ``entry`` as RocksDB and the changelog keep it."""
        return state_codec.encode(StateRecord(self.model.fingerprint, entry.last_offset, entry.recent_event_ids,
                                              self.model.encode_state(entry.state), entry.legacy_event_ids))

    def _admit(self, user: UserBatch, entry: StoredState | None) -> Admission:
        return admit(user.items, entry, entry.state.last_timestamp_ms if entry else None, self.max_lateness_ms)

    def _stage_states(self, out: StagedRun, overlay: dict[tuple[int, bytes], StoredState | None],
                      users: list[UserBatch], admissions: list[Admission], stored: list[StoredState | None],
                      todo: list[int], result: StepResult | None) -> None:
        """State write: new model state (or just the advanced offset) per user, one batch per partition.

        A user whose events were redelivered gets their stored record written
        again: it was applied before a crash, but its changelog record may
        never have reached the broker, and the offsets are about to be
        committed past it -- without this the next owner of the partition
        would recover a state that misses those events.  The same reason
        makes :meth:`_stage_events` publish their current profile again.
        """
        new_states: dict[int, UserState] = dict(zip(todo, result.states)) if result is not None else {}
        for i, (user, adm) in enumerate(zip(users, admissions)):
            entry = stored[i]
            if i in new_states:
                state = new_states[i]
            elif entry is not None and (adm.last_offset > entry.last_offset or adm.redelivered):
                state = entry.state  # only skipped/rejected events: remember the offset
            else:
                continue
            value = StoredState(adm.last_offset, adm.recent_ids, state, adm.legacy_ids)
            out.states.setdefault(user.partition, []).append((user.key, value))
            overlay[(user.partition, user.key)] = value

    async def _dead_letter(self, rejected: list[Rejection], report: BatchReport) -> None:
        """Send the dead letters and wait until the broker has them (see :meth:`_emit`)."""
        reasons: Counter[str] = Counter()
        deliveries = []
        for rejection in rejected:
            deliveries.append(await self.publisher.dead_letter(rejection))
            reasons[rejection.reason] += 1
        if deliveries:
            await asyncio.gather(*deliveries)
        report.rejected.update(reasons)
        for reason, n in reasons.items():
            self.metrics.count_invalid(reason, n)
            log.debug("dead-lettered %d records: %s", n, reason)

    def _stage_profiles(self, out: StagedRun, user_ids: list[str], result: StepResult | None, now_ms: int) -> None:
        """Stage the profile message of each user (row i of ``result``), stamped ``now_ms``."""
        if user_ids:
            version = self.model.version
            out.profiles.extend(
                (user_id, profile_message(user_id, version, now_ms, state.n_events, state.last_timestamp_ms,
                                          profile, intent, top))
                for user_id, state, profile, intent, top in zip(
                    user_ids, result.states, result.profile, result.intent, result.top_categories))
