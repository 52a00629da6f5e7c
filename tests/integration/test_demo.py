"""`profilestream demo`, the README's first command, run for real as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
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
                    "--output", str(dump))
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-3000:]
    summaries = [line for line in logs.splitlines() if "events/s | event->profile p50" in line]
    assert len(summaries) >= 2, logs[-3000:]
    assert "next: view=" in summaries[-1]  # one user's intent
    profiles = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(profiles) > 20
    for p in profiles:
        jsonschema.validate(p, PROFILE_SCHEMA)
    assert demo_dirs() == before  # its temporary broker log and RocksDB state are gone


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
