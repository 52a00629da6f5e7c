"""Test harness: real worker processes, a real broker, real topics.

Nothing here fakes Kafka: events are produced to the embedded Tansu broker,
workers are `profilestream worker` subprocesses, and outputs are read back from
the topics they wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import rocksdict
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from models import ProfileModel
from models.events import EVENT_TYPES, Event
from streams.dev.embedded_broker import free_port
from streams.dev.demo import DemoOptions, encode_event, produce_events
from streams.kafka.end_offsets import EndOffsetProbe
from streams.settings import Settings
from streams.kafka.topics import assign_whole_topic, caught_up, ensure_topics
from streams.dev.traffic import SyntheticTraffic

REPO = Path(__file__).resolve().parent.parent
#: Event time of the synthetic test traffic (2025-10-09).
START_MS = 1_760_000_000_000
#: Worker output vs offline replay: same model, same float32 maths, batched differently.
TOL = 1e-5


@dataclass
class Deployment:
    """One isolated set of topics + consumer group on the shared test broker."""

    bootstrap: str
    tmp: Path
    partitions: int = 4
    name: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}")

    def env(self, data_dir: Path, web_port: int, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PROFILESTREAM_", "KAFKA_"))}
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "PROFILESTREAM_APP_ID": f"{self.name}-app",
            "PROFILESTREAM_EVENTS_TOPIC": f"{self.name}.events",
            "PROFILESTREAM_PROFILES_TOPIC": f"{self.name}.profiles",
            "PROFILESTREAM_DLQ_TOPIC": f"{self.name}.dlq",
            "PROFILESTREAM_PARTITIONS": str(self.partitions),
            "PROFILESTREAM_REPLICATION_FACTOR": "1",  # the embedded broker is one node
            "PROFILESTREAM_DATA_DIR": str(data_dir),
            "PROFILESTREAM_WEB_PORT": str(web_port),
            "PROFILESTREAM_EMBEDDED_BROKER": "1",
            "PROFILESTREAM_LOG_LEVEL": "info",
        })
        env.update(extra)
        return env

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env(self.tmp / "unused", 0))

    def create_topics(self) -> None:
        asyncio.run(ensure_topics(self.settings))

    def worker(self, index: int = 0, module: str = "streams.cli", **extra: str) -> "WorkerProcess":
        """A worker process; ``module`` runs it (a test module may wrap a stage to inject a fault)."""
        return WorkerProcess(self, self.tmp / f"worker{index}", free_port(), extra, module)

    def produce(self, events: Iterable[Event]) -> int:
        return produce_raw(self.bootstrap, self.settings.events_topic, [encode_event(e) for e in events])

    def read(self, topic: str) -> list[ConsumerRecord]:
        return read_topic(self.bootstrap, topic)


def produce_raw(bootstrap: str, topic: str, messages: Sequence[tuple[bytes | None, bytes | None]],
                headers: Sequence[tuple[str, bytes]] | None = None) -> int:
    """Send (key, value) pairs in order."""
    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
        await producer.start()
        try:
            futures = [await producer.send(topic, value, key=key, headers=headers) for key, value in messages]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
    asyncio.run(go())
    return len(messages)


def exact_end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """partition -> end offset of ``topic``, probed exact (the embedded broker under-reports them)."""
    async def go() -> dict[int, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        probe = EndOffsetProbe({"bootstrap_servers": bootstrap})
        await consumer.start()
        try:
            await consumer.topics()
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            ends = await probe.exact(await consumer.end_offsets(tps)) if tps else {}
            return {tp.partition: end for tp, end in ends.items()}
        finally:
            await probe.close()
            await consumer.stop()
    return asyncio.run(go())


def state_databases(data_dir: Path, partitions: int) -> Iterator[tuple[int, rocksdict.Rdict]]:
    """(partition, read-only RocksDB) of each state partition a stopped (or killed) worker has on disk."""
    for partition in range(partitions):
        path = data_dir / "v1" / "tables" / f"user-state-{partition}.db"
        if not path.exists():
            continue
        db = rocksdict.Rdict(str(path), options=rocksdict.Options(raw_mode=True),
                             access_type=rocksdict.AccessType.read_only())
        try:
            yield partition, db
        finally:
            db.close()


def persisted_changelog_offsets(data_dir: Path, partitions: int) -> dict[int, int]:
    """Changelog offset recorded in each state partition's RocksDB (of a stopped worker), where present."""
    out: dict[int, int] = {}
    for partition, db in state_databases(data_dir, partitions):
        value = db.get(b"__faust\0offset__")
        if value is not None:
            out[partition] = int(value)
    return out


def read_topic(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    """Every record currently in ``topic``, all partitions, in partition-offset order."""
    async def go() -> list[ConsumerRecord]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = await assign_whole_topic(consumer, topic)
            probe = EndOffsetProbe({"bootstrap_servers": bootstrap})
            try:
                ends = await probe.exact(await consumer.end_offsets(tps))
            finally:
                await probe.close()
            out: list[ConsumerRecord] = []
            deadline = time.monotonic() + 30
            while not await caught_up(consumer, ends):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not read {topic} to its end")
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    out.extend(records)
            return out
        finally:
            await consumer.stop()
    return asyncio.run(go())


def latest_profiles(records: Iterable[ConsumerRecord]) -> dict[str, dict]:
    latest: dict[str, dict] = {}
    for rec in records:
        if rec.value is None:
            latest.pop(rec.key.decode(), None)
        else:
            latest[rec.key.decode()] = json.loads(rec.value)
    return latest


class WorkerProcess:
    """A `profilestream worker` subprocess with its own RocksDB directory and HTTP port."""

    def __init__(self, deployment: Deployment, data_dir: Path, web_port: int, extra: dict[str, str],
                 module: str = "streams.cli") -> None:
        self.deployment = deployment
        self.module = module
        self.data_dir = data_dir
        self.web_port = web_port
        self.extra = extra
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> "WorkerProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "worker"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env=self.deployment.env(self.data_dir, self.web_port, **self.extra))
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def http(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        status, _, body = self.request(path, timeout=timeout)
        return status, body

    def request(self, path: str, body: bytes | None = None, token: str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one HTTP request to this worker: GET, or POST with ``body``."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.web_port}{path}", data=body,
                                     method="POST" if body is not None else "GET", headers=headers or {})
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def refusal_log(self, timeout: float = 90.0) -> str:
        """Start a worker that must refuse to start; its log once it has exited (never ready)."""
        self.start(wait_ready=False)
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                assert self.http("/readyz")[0] != 200, "a refusing worker must never be ready"
            except OSError:
                pass
            time.sleep(0.2)
        assert self.proc.returncode not in (None, 0), self.log_tail()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.http("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60, matching: str | None = None) -> str:
        """The last ``n`` lines of the worker's log, or of its lines that match the regex ``matching``."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        if matching is not None:
            lines = [line for line in lines if re.search(matching, line)]
        return "\n".join(lines[-n:])

    def task_stacks(self, timeout_s: float = 20.0) -> str:
        """Where the worker's tasks that run our code, faust's recovery or the group protocol wait.

        mode's worker writes every thread's and task's stack, with each frame's
        local variables, to its log on SIGUSR1.  Kept: those tasks' ``File ...``
        lines, and the local variables of the batch consumer's and the processor's
        frames (offsets, the batch in flight), each cut to 300 characters -- so a CI log
        shows where a stalled worker is stuck and what it was waiting for.
        The dump takes seconds on a loaded machine (a fixed 2 s wait once read
        none of it), so this waits until the log has stopped growing for 1 s.
        """
        assert self.proc is not None
        start = size = self.log_path.stat().st_size
        self.proc.send_signal(signal.SIGUSR1)
        deadline = changed = time.monotonic()
        deadline += timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.log_path.stat().st_size
            if now != size:
                size, changed = now, time.monotonic()
            elif size > start and time.monotonic() - changed >= 1.0:
                break
        with open(self.log_path, "rb") as f:
            f.seek(start)
            dump = f.read().decode(errors="replace")
        kept = []
        for task in dump.split("\n  TASK ")[1:]:
            if "_run_module_as_main" in task or not re.search(
                    r"/streams/|recovery\.py|wait_empty|group_coordinator\.py", task):
                continue  # the main task only runs the worker
            lines = task.splitlines()
            kept.append("TASK " + lines[0])
            ours = False
            for line in lines:
                if line.startswith('  File "'):
                    ours = re.search(r"/streams/(kafka/fetcher|pipeline/processor)\.py", line) is not None
                    kept.append(line.strip())
                elif ours and re.match(r"    \w+ = ", line):
                    kept.append("    " + line.strip()[:300])
        return "\n".join(kept)

    def stop(self, timeout: float = 30.0) -> int:
        """Graceful stop (SIGTERM), as an orchestrator would."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def synthetic(n: int, users: int, seed: int = 1, start_ms: int = START_MS) -> list[Event]:
    return SyntheticTraffic(users=users, categories=60, seed=seed).events(n, start_ms, mean_gap_ms=50.0)


def expected_last(model: ProfileModel, events: Iterable[Event]) -> dict[str, dict]:
    """Replay's outputs after each user's last event: the ground truth of every worker test."""
    last: dict[str, dict] = {}
    for event, intent, top, profile in model.replay(events):
        last[event.user_id] = {"intent": intent, "top_categories": top, "profile": profile}
    return last


def wait_for_counts(dep: Deployment, counts: Counter[str], timeout: float = 120.0) -> dict[str, dict]:
    """Read profiles until every user's latest one reflects all of their events."""
    def caught_up() -> dict[str, dict] | None:
        latest = latest_profiles(dep.read(dep.settings.profiles_topic))
        done = all(latest.get(u, {}).get("event_count") == n for u, n in counts.items())
        return latest if done else None
    return wait_for(caught_up, timeout, interval=1.0, what="all users' profiles")


def stream_through(dep: Deployment, events: Sequence[Event]) -> dict[str, dict]:
    """Run one worker over ``events`` and return the last profile per user once all are in."""
    worker = dep.worker().start()
    try:
        dep.produce(events)
        return wait_for_counts(dep, Counter(e.user_id for e in events))
    finally:
        worker.stop()


def assert_matches_replay(published: dict[str, dict], expected: dict[str, dict]) -> None:
    assert set(published) == set(expected)
    worst = 0.0
    for user, exp in expected.items():
        got = published[user]
        worst = max(worst, float(np.abs(np.array(got["profile"]) - np.array(exp["profile"])).max()))
        worst = max(worst, max(abs(got["intent"][t] - exp["intent"][t]) for t in EVENT_TYPES))
        assert same_ranking(got["top_categories"], exp["top_categories"]), (user, got["top_categories"],
                                                                             exp["top_categories"])
    assert worst <= TOL, f"max abs diff {worst}"


def same_ranking(got: Sequence[str], want: Sequence[str]) -> bool:
    """The same categories, each at most one place from where replay has it.

    The LSTM run over another batch composition differs in the last float
    bits (within TOL), which can swap two neighbours whose scores tie that
    closely; a wrong state moves the profile and intent far past TOL as well.
    """
    if sorted(got) != sorted(want):
        return False
    rank = {c: i for i, c in enumerate(want)}
    return all(abs(rank[c] - i) <= 1 for i, c in enumerate(got))


def metric_sum(exposition: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` (with these label values) in a /metrics text."""
    return sum(s.value for fam in text_string_to_metric_families(exposition)
               for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class DemoTraffic:
    """The demo's endless synthetic traffic (:func:`streams.dev.demo.produce_events`), paced at
    ``rate`` events/s into the deployment's events topic from a background thread."""

    def __init__(self, deployment: Deployment, rate: float = 300.0, users: int = 500) -> None:
        self.settings = deployment.settings
        self.options = DemoOptions(rate=rate, users=users)
        self.error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    async def _main(self) -> None:
        sending = asyncio.ensure_future(produce_events(self.settings, None, self.options))
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({sending, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        sending.cancel()  # its finally: stops the producer
        try:
            await sending  # re-raises a send error, if that is why it ended
        except asyncio.CancelledError:
            pass

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            self._loop.close()

    def start(self) -> "DemoTraffic":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop sending; raises what made the traffic fail, if anything did."""
        try:
            self._loop.call_soon_threadsafe(self._stopping.set)
        except RuntimeError:  # the loop is closed: the traffic already ended (see self.error)
            pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("demo traffic did not stop")
        if self.error is not None:
            raise RuntimeError("demo traffic failed") from self.error

    def __enter__(self) -> "DemoTraffic":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def paced(n: int, rate: float, start_s: float = 0.0) -> list[float]:
    """Send times (seconds from the start) of ``n`` messages at ``rate`` per second."""
    return [start_s + i / rate for i in range(n)]


class BackgroundProducer:
    """Produces events on its own thread on a schedule, so faults hit a live stream."""

    def __init__(self, dep: Deployment, events: Sequence[Event], send_at: Sequence[float]) -> None:
        assert len(send_at) == len(events), "one send time per event"
        self.bootstrap = dep.bootstrap
        self.topic = dep.settings.events_topic
        self.messages = [encode_event(e) for e in events]
        self.send_at = send_at
        self.sent = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="background-producer", daemon=True)

    def start(self) -> "BackgroundProducer":
        self._thread.start()
        return self

    def join(self, timeout: float = 120.0) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"producer still running after {timeout}s ({self.sent} sent)")
        if self.error is not None:
            raise RuntimeError("background producer failed") from self.error

    def _run(self) -> None:
        try:
            asyncio.run(self._produce())
        except BaseException as exc:  # reported by join()
            self.error = exc

    async def _produce(self) -> None:
        # Long retries: the broker may be stalled (SIGSTOP) while we produce.
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=2,
                                    request_timeout_ms=60_000)
        await producer.start()
        try:
            started = time.monotonic()
            futures = []
            for i, ((key, value), at) in enumerate(zip(self.messages, self.send_at)):
                delay = started + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                futures.append(await producer.send(self.topic, value, key=key))
                self.sent = i + 1
            await asyncio.gather(*futures)
        finally:
            await producer.stop()


def count_errors(published: dict[str, dict], counts: Counter[str]) -> tuple[int, int]:
    """(events lost, events applied twice) judged by each user's published ``event_count``."""
    lost = twice = 0
    for user, n in counts.items():
        got = published.get(user, {}).get("event_count", 0)
        lost += max(0, n - got)
        twice += max(0, got - n)
    return lost, twice


def settle(dep: Deployment, counts: Counter[str], timeout: float = 120.0) -> dict[str, dict]:
    """Latest profiles once every user's count is reached -- or, on timeout, as they are.

    Unlike :func:`wait_for_counts` this never raises, so a fault test can
    report how many events were lost or applied twice instead of just timing out.
    """
    try:
        return wait_for_counts(dep, counts, timeout)
    except TimeoutError:
        return latest_profiles(dep.read(dep.settings.profiles_topic))
