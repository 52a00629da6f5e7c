"""`profilestream bench` runs every mode end to end and reports consistent figures.

Only that it works and what it reports hangs together is tested here: speed
targets are for the benchmark's printed figures (docs/performance.md), never for a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streams.pipeline.stages import STAGES

from ..harness import REPO

CPUS = os.cpu_count() or 1


def check_cpu(run: dict[str, Any], broker_busy: bool) -> None:
    """The run's own CPU share over its window, and the broker's beside it (Linux: read from /proc)."""
    assert 0 < run["worker_cpu"] <= CPUS * 1.1, run
    if sys.platform == "linux":
        assert 0 <= run["broker_cpu"] <= CPUS * 1.1 and run["broker_rss_bytes"] > 0, run
        if broker_busy:
            assert run["broker_cpu"] > 0, run


def check_stages(stages: dict[str, Any]) -> None:
    """Per-batch stage means that add up, and stay within the batch's own wall time."""
    per_batch = stages["us_per_batch"]
    assert set(per_batch) == set(STAGES) - {"flush"}  # flush is per commit, reported apart
    assert stages["batches"] >= 1 and stages["events_per_batch"] > 0
    assert all(us >= 0 for us in per_batch.values()) and per_batch["model_step"] > 0, stages
    assert stages["sum_us"] == pytest.approx(sum(per_batch.values()), abs=1.5)
    assert stages["all_but_model_step_us"] == pytest.approx(stages["sum_us"] - per_batch["model_step"], abs=0.2)
    # Every stage but the hand-off runs while a batch is prepared or applied; with overlap two run at once.
    inside = stages["sum_us"] - per_batch["handoff"]
    assert 0.5 * stages["batch_us"] <= inside <= stages["batch_us"] + stages["overlap_us"] + 2.0, stages
    flush = stages["flush"]
    assert flush["commits"] >= 0 and (flush["commits"] == 0 or flush["us_per_commit"] > 0), flush


def test_bench_runs_every_mode_and_reports_ratios_latency_memory_cpu_and_stages(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streams.cli", "bench", "--events", "3000", "--users", "300",
         "--naive-seconds", "3", "--latency-seconds", "4", "--latency-loads", "0.5,0.25",
         "--scale-users", "3000", "--state-cache-users", "100", "--workdir", str(tmp_path), "--json"],
        # Several batches: a worker's rate window opens when its first batch is done.
        env={**os.environ, "PROFILESTREAM_BATCH_MAX": "500"},
        cwd=REPO, text=True, capture_output=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # A broker of its own for every measured run.
    assert sorted(p.name for p in tmp_path.glob("*.broker.log")) == sorted(
        f"{name}.broker.log" for name in ("bench-pass", "bench-naive", "bench-ps", "bench-live-0", "bench-live-1",
                                          "bench-scale-pass", "bench-scale-ps"))
    for mode in ("passthrough", "profilestream"):
        assert report[mode]["events"] == 3000 and report[mode]["events_per_s"] > 0, report[mode]
    assert 0 < report["naive"]["events"] <= 3000
    for mode in ("passthrough", "naive", "profilestream"):
        assert report[mode]["preload_events_per_s"] > 0
        check_cpu(report[mode], broker_busy=False)
    ps = report["profilestream"]
    assert ps["state_cache_users"] == 100 == report["config"]["state_cache_users"]
    # Outputs are coalesced: at most one profile per user per batch.
    assert 0 < ps["outputs"] <= 3000 and ps["batches"] >= 1
    # The next batch is fetched and validated while the one before is in its model step.
    assert 0 < ps["overlap_s"] < ps["busy_s"], ps
    check_stages(ps["stages"])
    ratios = report["ratios"]
    assert ratios["profilestream_vs_passthrough"] == round(ps["events_per_s"] / report["passthrough"]["events_per_s"], 3)
    assert ratios["profilestream_vs_naive"] == round(ps["events_per_s"] / report["naive"]["events_per_s"], 1)
    # One latency run per load, each offered its fraction of (c)'s rate; the half-load run is "latency".
    curve = report["latency_curve"]
    assert [run["load"] for run in curve] == [0.5, 0.25] and report["latency"] == curve[0]
    for run in curve:
        assert run["offered_events_per_s"] == round(run["load"] * ps["events_per_s"], 1)
        lat = run["latency"]
        assert run["latency_samples"] > 0
        assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["p999_ms"] <= lat["max_ms"]
        assert 0 < run["profiles_per_event"] <= 1
        check_cpu(run, broker_busy=True)  # the broker takes the live producer's records throughout
        check_stages(run["stages"])
    target = report["latency_target"]
    met = [run for run in curve if run["latency"]["p99_ms"] <= 100]
    assert target["met_at_half_load"] == (curve[0] in met)
    assert target["highest_rate_met"] == max((run["offered_events_per_s"] for run in met), default=None)
    assert [s["fraction"] for s in ps["rss"]] == [0.25, 0.5, 0.75, 1.0]
    assert all(s["rss_bytes"] > 0 for s in ps["rss"])
    # 300 users through a cache of 100: evicted ones are in RocksDB, the cache stays within its bound.
    assert ps["rss"][-1]["users_cached"] > 0 and all(0 < s["users_in_cache"] <= 100 for s in ps["rss"])
    assert ps["peak_rss_bytes"] >= max(s["rss_bytes"] for s in ps["rss"])
    # The scale row: (a) and (c) again over the scale population.
    scale = report["scale"]
    assert scale["users"] == 3000 and 0 < scale["distinct_users"] <= 3000
    for mode in ("passthrough", "profilestream"):
        assert scale[mode]["events"] == 3000 and scale[mode]["peak_rss_bytes"] > 0
        check_cpu(scale[mode], broker_busy=False)
    assert scale["profilestream_vs_passthrough"] == round(
        scale["profilestream"]["events_per_s"] / scale["passthrough"]["events_per_s"], 3)
    # The envelope restates those figures against issue 19's targets.
    env = report["envelope"]
    assert env["latency_load"]["value"] == target["highest_load_met"]
    assert env["latency_load"]["met"] == (target["highest_load_met"] is not None and target["highest_load_met"] >= 0.5)
    c_a = ratios["profilestream_vs_passthrough"]
    assert (env["c_over_a"]["value"], env["c_over_a"]["met"], env["c_over_a"]["moonshot_met"]) == (
        c_a, c_a >= 0.65, c_a >= 0.8)
    scale_c_a = scale["profilestream_vs_passthrough"]
    assert (env["c_over_a_at_scale"]["value"], env["c_over_a_at_scale"]["met"]) == (scale_c_a, scale_c_a >= 0.5)
