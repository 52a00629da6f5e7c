"""Test harness: real worker processes, a real broker, real topics.

Nothing here fakes Kafka: events are produced to the embedded Tansu broker,
workers are `profilestream worker` subprocesses, and outputs are read back from
the topics they wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from models.events import Event
from streams.broker import free_port
from streams.demo import encode_event
from streams.settings import Settings
from streams.topics import assign_whole_topic, caught_up, ensure_topics

REPO = Path(__file__).resolve().parent.parent


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

    def worker(self, index: int = 0, **extra: str) -> "WorkerProcess":
        return WorkerProcess(self, self.tmp / f"worker{index}", free_port(), extra)

    def produce(self, events: Iterable[Event]) -> int:
        return produce_raw(self.bootstrap, self.settings.events_topic, [encode_event(e) for e in events])

    def read(self, topic: str) -> list[ConsumerRecord]:
        return read_topic(self.bootstrap, topic)


def produce_raw(bootstrap: str, topic: str, messages: Sequence[tuple[bytes | None, bytes | None]]) -> int:
    """Send (key, value) pairs in order, one record per batch (see kafka_config.py)."""
    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=1, linger_ms=2)
        await producer.start()
        try:
            futures = [await producer.send(topic, value, key=key) for key, value in messages]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
    asyncio.run(go())
    return len(messages)


def read_topic(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    """Every record currently in ``topic``, all partitions, in partition-offset order."""
    async def go() -> list[ConsumerRecord]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = await assign_whole_topic(consumer, topic)
            ends = await consumer.end_offsets(tps)
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

    def __init__(self, deployment: Deployment, data_dir: Path, web_port: int, extra: dict[str, str]) -> None:
        self.deployment = deployment
        self.data_dir = data_dir
        self.web_port = web_port
        self.extra = extra
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> "WorkerProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env=self.deployment.env(self.data_dir, self.web_port, **self.extra))
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def http(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}{path}", timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

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

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

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
