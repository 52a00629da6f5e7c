"""`profilestream bench` runs all four modes end to end and reports consistent figures.

Only that it works and what it reports hangs together is tested here: speed
targets are for the benchmark's printed figures (README), never for a unit test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..harness import REPO


def test_bench_runs_every_mode_and_reports_ratios_latency_and_memory() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streams.cli", "bench", "--events", "3000", "--users", "300",
         "--naive-seconds", "4", "--latency-seconds", "4", "--latency-loads", "0.5,0.2", "--json"],
        # Several batches: a worker's rate window opens when its first batch is done.
        env={**os.environ, "PROFILESTREAM_BATCH_MAX": "500"},
        cwd=REPO, text=True, capture_output=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for mode in ("passthrough", "profilestream"):
        assert report[mode]["events"] == 3000 and report[mode]["events_per_s"] > 0, report[mode]
    assert 0 < report["naive"]["events"] <= 3000
    ps = report["profilestream"]
    # Outputs are coalesced: at most one profile per user per batch.
    assert 0 < ps["outputs"] <= 3000 and ps["batches"] >= 1
    # The next batch is fetched and validated while the one before is in its model step.
    assert 0 < ps["overlap_s"] < ps["busy_s"], ps
    ratios = report["ratios"]
    assert ratios["profilestream_vs_passthrough"] == round(ps["events_per_s"] / report["passthrough"]["events_per_s"], 3)
    assert ratios["profilestream_vs_naive"] == round(ps["events_per_s"] / report["naive"]["events_per_s"], 1)
    # One latency run per load, each offered its fraction of (c)'s rate; the half-load run is "latency".
    curve = report["latency_curve"]
    assert [run["load"] for run in curve] == [0.5, 0.2] and report["latency"] == curve[0]
    for run in curve:
        assert run["offered_events_per_s"] == round(run["load"] * ps["events_per_s"], 1)
        lat = run["latency"]
        assert run["latency_samples"] > 0
        assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["p999_ms"] <= lat["max_ms"]
        assert 0 < run["profiles_per_event"] <= 1
    target = report["latency_target"]
    met = [run for run in curve if run["latency"]["p99_ms"] <= 100]
    assert target["met_at_half_load"] == (curve[0] in met)
    assert target["highest_rate_met"] == max((run["offered_events_per_s"] for run in met), default=None)
    assert [s["fraction"] for s in ps["rss"]] == [0.25, 0.5, 0.75, 1.0]
    assert all(s["rss_bytes"] > 0 and s["users_cached"] > 0 for s in ps["rss"])
    assert ps["peak_rss_bytes"] >= max(s["rss_bytes"] for s in ps["rss"])
