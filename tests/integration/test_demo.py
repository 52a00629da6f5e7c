"""`profilestream demo`, the README's first command, and the soak built on it, run for real as subprocesses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import jsonschema

from models.events import event_to_dict
from streams.dev.traffic import SyntheticTraffic

from ..harness import REPO

PROFILE_SCHEMA = json.loads((REPO / "streams" / "schemas" / "profile.schema.json").read_text())


def demo_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("profilestream-demo-*"))


def run_demo(*argv: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", "demo", *argv], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def test_synthetic_demo_prints_summaries_dumps_profiles_and_cleans_up(tmp_path: Path) -> None:
    before = demo_dirs()
    dump = tmp_path / "profiles.jsonl"
    done = run_demo("--duration", "20", "--rate", "300", "--users", "200", "--summary-every", "3",
                    "--keep-profiles", "30", "--output", str(dump))
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-3000:]
    summaries = [line for line in logs.splitlines() if "events/s | event->profile p50" in line]
    assert len(summaries) >= 2, logs[-3000:]
    assert re.search(r"\| broker [\d,]+ MiB \|", summaries[-1])
    assert "next: view=" in summaries[-1]  # one user's intent
    profiles = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(profiles) == 30  # 6,000 events reach far more of the 200 users: the demo keeps 30
    assert len({p["user_id"] for p in profiles}) == 30
    for p in profiles:
        jsonschema.validate(p, PROFILE_SCHEMA)
    assert demo_dirs() == before  # its temporary broker log and RocksDB state are gone


def test_the_demo_stops_cleanly_when_the_broker_outgrows_its_limit(tmp_path: Path) -> None:
    """Any running broker holds more than 1 MiB: the guard stops the demo at its first check."""
    before = demo_dirs()
    dump = tmp_path / "profiles.jsonl"
    started = time.monotonic()
    done = run_demo("--duration", "120", "--rate", "300", "--users", "200", "--max-broker-mib", "1",
                    "--output", str(dump))
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-3000:]
    assert time.monotonic() - started < 90, "the guard did not stop the demo before --duration"
    (stop,) = [line for line in logs.splitlines() if "stopping the demo:" in line]
    assert "WARNING" in stop and "over the 1 MiB limit" in stop and "--max-broker-mib raises the limit" in stop
    assert dump.exists()  # the same stop as Ctrl-C: the dump is written
    assert demo_dirs() == before


def test_demo_replays_a_log_completely(tmp_path: Path) -> None:
    events = SyntheticTraffic(users=40, categories=60, seed=11).events(600, 1_700_000_000_000, 500.0)
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(event_to_dict(e)) + "\n" for e in events))
    dump = tmp_path / "profiles.jsonl"
    done = run_demo("--data", str(log), "--format", "jsonl", "--rate", "400", "--duration", "20",
                    "--output", str(dump))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    profiles = {p["user_id"]: p for p in map(json.loads, dump.read_text().splitlines())}
    assert {u: p["event_count"] for u, p in profiles.items()} == Counter(e.user_id for e in events)


def run_soak(*argv: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.dev.soak", *argv], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def test_soak_prints_and_writes_a_row_per_interval(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = run_soak("--minutes", "0.5", "--sample-every", "10", "--rate", "300", "--users", "500",
                    "-o", str(out))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert len(rows) == 3 and report["stopped_by_limit"] is None
    assert [line.split()[0] for line in done.stdout.splitlines()[:1]] == ["min"]  # the table's header
    assert len(done.stdout.splitlines()) == 1 + 3 + 1  # header, a row per sample, where the JSON went
    for row in rows:
        assert 9 < row["seconds"] < 20 and row["events"] > 0 and row["p50_ms"] <= row["p99_ms"]
        assert row["demo_rss_mib"] > 100 and row["broker_rss_mib"] > 1 and row["available_mib"] > 0
        assert row["broker_cpu"] is not None and row["demo_cpu"] > 0
    assert rows[-1]["events_per_s"] > 200  # at the offered 300/s once the worker is up
    assert report["options"]["rate"] == 300 and report["command"].startswith("python -m streams.dev.soak")


def test_soak_records_a_memory_limit_that_stopped_it(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = run_soak("--minutes", "2", "--sample-every", "60", "--rate", "300", "--users", "500",
                    "--max-broker-mib", "1", "-o", str(out))
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert "--max-broker-mib" in report["stopped_by_limit"] and report["rows"] == []
    assert "stopped early:" in done.stderr
