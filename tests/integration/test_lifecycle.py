"""Model lifecycle end to end: backfill, model upgrades, snapshot and restore.

Real broker, real worker processes, real RocksDB, the real model; the
lifecycle commands run as `profilestream` subprocesses, as an operator would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from models import ProfileModel, default_checkpoint_path
from models.checkpoint import load_checkpoint, save_checkpoint
from models.events import Event, event_to_dict
from streams.state import codec as state_codec
from streams.dev.embedded_broker import EmbeddedBroker
from streams.pipeline.partitioning import partition_for
from streams.ops.snapshot import STATES, _read_states

from ..harness import (REPO, TOL, Deployment, assert_matches_replay, expected_last, latest_profiles,
                      metric_sum, stream_through, synthetic, wait_for, wait_for_counts)

HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default checkpoint with one weight nudged: a different model (fingerprint) of the same shape."""
    config, weights, _ = load_checkpoint(default_checkpoint_path())
    weights["profile_head.bias"] = weights["profile_head.bias"] + 0.05
    path = tmp_path_factory.mktemp("models") / "other.pt"
    save_checkpoint(path, config, weights)
    return path


def cli(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a `profilestream` command against the deployment; fail the test with its output if it fails."""
    proc = subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=REPO, text=True, capture_output=True,
                          env=dep.env(dep.tmp / "unused", 0), timeout=240)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def write_jsonl(path: Path, events: list[Event]) -> Path:
    path.write_text("".join(json.dumps(event_to_dict(e)) + "\n" for e in events))
    return path


def snapshot_states(path: Path) -> dict[bytes, state_codec.StateRecord]:
    return {key: state_codec.decode(value) for _, key, value in _read_states(path / STATES)}


def test_partition_for_matches_the_producers_partitioner(deployment: Deployment) -> None:
    events = synthetic(200, users=50, seed=2)
    deployment.produce(events)
    placed = {(r.key, r.partition) for r in deployment.read(deployment.settings.events_topic)}
    assert len({p for _, p in placed}) == deployment.partitions
    assert all(partition_for(key, deployment.partitions) == p for key, p in placed)


def test_backfill_equals_streaming_and_live_events_continue(
        broker: EmbeddedBroker, deployment: Deployment, tmp_path: Path, model: ProfileModel) -> None:
    history = synthetic(1500, users=120, seed=11)
    live = synthetic(400, users=150, seed=12, start_ms=history[-1].timestamp_ms + HOUR_MS)
    counts = Counter(e.user_id for e in history)

    streamed = stream_through(deployment, history)

    warm = Deployment(broker.bootstrap_servers, tmp_path / "warm")
    warm.tmp.mkdir()
    warm.create_topics()
    cli(warm, "backfill", "--model", str(default_checkpoint_path()), "--device", "cpu",
        "--data", str(write_jsonl(tmp_path / "history.jsonl", history)), "--format", "jsonl")
    backfilled = latest_profiles(warm.read(warm.settings.profiles_topic))
    assert set(backfilled) == set(streamed)
    worst = 0.0
    for user, prof in streamed.items():
        got = backfilled[user]
        assert got["event_count"] == prof["event_count"] and got["top_categories"] == prof["top_categories"]
        assert got["last_event_timestamp"] == prof["last_event_timestamp"]
        worst = max(worst, float(np.abs(np.array(got["profile"]) - np.array(prof["profile"])).max()))
    assert worst <= TOL, f"backfilled vs streamed profiles differ by {worst}"

    # The history is also in Kafka (the usual overlap of a log export and the topic's
    # retention); the worker must skip it and apply only the live events.
    worker = warm.worker().start()
    try:
        user = history[-1].user_id
        status, body = worker.http(f"/users/{user}/profile")
        assert status == 200 and json.loads(body)["event_count"] == counts[user]  # warm before any event
        warm.produce(history + live)
        published = wait_for_counts(warm, Counter(e.user_id for e in history + live))
        metrics = worker.http("/metrics")[1].decode()
    finally:
        worker.stop()
    assert_matches_replay(published, expected_last(model, history + live))
    assert metric_sum(metrics, "profilestream_events_consumed_total") == len(live)
    assert metric_sum(metrics, "profilestream_events_skipped_total", reason="backfilled") == len(history)


def test_worker_with_another_model_refuses_or_resets(
        deployment: Deployment, other_checkpoint: Path, model: ProfileModel) -> None:
    first = synthetic(300, users=30, seed=21)
    worker = deployment.worker().start()
    try:
        deployment.produce(first)
        wait_for_counts(deployment, Counter(e.user_id for e in first))
    finally:
        worker.stop()
    other = ProfileModel.load(other_checkpoint, device="cpu")

    log_text = deployment.worker(PROFILESTREAM_MODEL_PATH=str(other_checkpoint)).refusal_log()
    assert model.fingerprint in log_text and other.fingerprint in log_text
    assert "PROFILESTREAM_ON_MODEL_MISMATCH=reset" in log_text and "profilestream backfill" in log_text

    second = synthetic(200, users=30, seed=22, start_ms=first[-1].timestamp_ms + HOUR_MS)
    resetting = deployment.worker(PROFILESTREAM_MODEL_PATH=str(other_checkpoint),
                                  PROFILESTREAM_ON_MODEL_MISMATCH="reset").start()
    try:
        deployment.produce(second)
        published = wait_for_counts(deployment, Counter(e.user_id for e in second))
    finally:
        resetting.stop()
    # Reset users start afresh: their profiles are the new model's replay of the new events only.
    fresh = expected_last(other, second)
    assert_matches_replay({u: published[u] for u in fresh}, fresh)


def test_restore_then_catch_up_equals_the_live_state(deployment: Deployment, tmp_path: Path,
                                                     model: ProfileModel) -> None:
    before = synthetic(600, users=60, seed=31)
    after = synthetic(400, users=80, seed=32, start_ms=before[-1].timestamp_ms + 60_000)
    worker = deployment.worker().start()
    try:
        deployment.produce(before)
        wait_for_counts(deployment, Counter(e.user_id for e in before))
        cli(deployment, "snapshot", "-o", str(tmp_path / "snap"))
        deployment.produce(after)
        wait_for_counts(deployment, Counter(e.user_id for e in before + after))
    finally:
        assert worker.stop() == 0
    manifest = json.loads((tmp_path / "snap" / "manifest.json").read_text())
    assert manifest["count"] == len({e.user_id for e in before}) and len(manifest["events_offsets"]) == 4
    cli(deployment, "snapshot", "-o", str(tmp_path / "live"))

    cli(deployment, "restore", "--yes", "--from", str(tmp_path / "snap"))
    restored = deployment.worker().start()  # same RocksDB directory: recovery must apply the restore
    try:
        wait_for(lambda: metric_sum(restored.http("/metrics")[1].decode(),
                                    "profilestream_events_consumed_total") >= len(after), 120, what="catch-up")
        time.sleep(2.0)  # let the last changelog records and offset commit land
        metrics = restored.http("/metrics")[1].decode()
    finally:
        assert restored.stop() == 0
    # The events after the snapshot were applied again -- possible only if the state went back.
    assert metric_sum(metrics, "profilestream_events_consumed_total") == len(after)
    cli(deployment, "snapshot", "-o", str(tmp_path / "again"))
    live, again = snapshot_states(tmp_path / "live"), snapshot_states(tmp_path / "again")
    assert set(again) == set(live)
    for key, rec in live.items():
        got = again[key]
        assert (got.last_offset, got.recent_event_ids) == (rec.last_offset, rec.recent_event_ids), key
        a, b = model.decode_state(got.model_state), model.decode_state(rec.model_state)
        assert a.n_events == b.n_events and a.last_timestamp_ms == b.last_timestamp_ms
        assert np.abs(a.h - b.h).max() <= TOL and np.abs(a.c - b.c).max() <= TOL
