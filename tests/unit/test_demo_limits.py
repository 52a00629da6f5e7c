"""The demo's memory bounds: the limits that stop it and the follower's bounded profile map."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from streams.cli import build_parser
from streams.dev.demo import ProfileFollower
from streams.dev.demo_limits import (DEFAULT_KEEP_PROFILES, DEFAULT_MAX_BROKER_MIB, DEFAULT_MIN_AVAILABLE_MIB,
                                     MIB, MemoryLimits, limits_from_args)
from streams.dev.proc_stats import available_memory_bytes, sample

GIB = 1024 * MIB


def test_within_both_limits_the_demo_goes_on() -> None:
    limits = MemoryLimits()
    assert limits.breach(broker_rss_bytes=300 * MIB, available_bytes=6 * GIB) is None
    assert limits.breach(broker_rss_bytes=DEFAULT_MAX_BROKER_MIB * MIB, available_bytes=6 * GIB) is None


def test_a_broker_over_its_limit_stops_the_demo_and_names_the_option() -> None:
    reason = MemoryLimits(max_broker_mib=2048).breach(broker_rss_bytes=2049 * MIB, available_bytes=6 * GIB)
    assert reason is not None
    assert "2,049 MiB" in reason and "2,048 MiB" in reason
    assert "--max-broker-mib raises the limit" in reason


def test_too_little_memory_available_stops_the_demo_and_names_the_option() -> None:
    reason = MemoryLimits(min_available_mib=512).breach(broker_rss_bytes=300 * MIB, available_bytes=400 * MIB)
    assert reason is not None
    assert "400 MiB" in reason and "512 MiB" in reason
    assert "--min-available-mib lowers the floor" in reason


def test_zero_switches_a_limit_off() -> None:
    assert MemoryLimits(max_broker_mib=0).breach(broker_rss_bytes=64 * GIB, available_bytes=6 * GIB) is None
    assert MemoryLimits(min_available_mib=0).breach(broker_rss_bytes=MIB, available_bytes=0) is None


def test_a_missing_reading_never_stops_the_demo() -> None:
    """The broker already gone, or no /proc: the guard stops only on what it measured."""
    assert MemoryLimits(max_broker_mib=1, min_available_mib=10 ** 9).breach(None, None) is None


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        MemoryLimits(max_broker_mib=-1)
    with pytest.raises(ValueError):
        MemoryLimits(min_available_mib=-0.5)


def test_the_limits_decide_on_this_machines_real_readings() -> None:
    """A live process's RSS (this one, standing in for the broker) and the real MemAvailable."""
    me, available = sample(os.getpid()), available_memory_bytes()
    assert me is not None and available is not None  # Linux, where the demo's guard works
    rss_mib, available_mib = me.rss_bytes / MIB, available / MIB
    assert MemoryLimits(max_broker_mib=rss_mib / 2, min_available_mib=0).breach(me.rss_bytes, available)
    assert MemoryLimits(max_broker_mib=rss_mib * 2, min_available_mib=0).breach(me.rss_bytes, available) is None
    assert MemoryLimits(max_broker_mib=0, min_available_mib=available_mib * 2).breach(me.rss_bytes, available)
    assert MemoryLimits(max_broker_mib=0, min_available_mib=available_mib / 2).breach(me.rss_bytes,
                                                                                      available) is None


def test_the_demo_flags_build_the_limits() -> None:
    parser = build_parser()
    defaults = parser.parse_args(["demo"])
    assert limits_from_args(defaults) == MemoryLimits(DEFAULT_MAX_BROKER_MIB, DEFAULT_MIN_AVAILABLE_MIB)
    assert defaults.keep_profiles == DEFAULT_KEEP_PROFILES
    given = parser.parse_args(["demo", "--max-broker-mib", "4096", "--min-available-mib", "0",
                               "--keep-profiles", "50"])
    assert limits_from_args(given) == MemoryLimits(4096, 0) and given.keep_profiles == 50
    for bad in (["--max-broker-mib", "-1"], ["--min-available-mib", "-5"], ["--keep-profiles", "0"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["demo", *bad])
        assert exc.value.code == 2


def _profile(user: str, events: int) -> bytes:
    return json.dumps({"user_id": user, "event_count": events}).encode()


def test_the_follower_keeps_the_most_recently_updated_profiles() -> None:
    follower = ProfileFollower(keep=3)
    for offset, user in enumerate(["u1", "u2", "u3", "u1", "u4"]):
        follower.apply(0, offset, user.encode(), _profile(user, offset))
    # u2 was the least recently updated once u4 came: dropped; u1's update kept it and its newest profile.
    assert list(follower.latest) == ["u3", "u1", "u4"]
    assert follower.latest["u1"]["event_count"] == 3
    follower.apply(1, 7, b"u3", None)  # a tombstone (forget) drops the user
    assert list(follower.latest) == ["u1", "u4"]
    assert follower.positions == {0: 5, 1: 8}  # where a later read of each partition resumes


def test_the_follower_dumps_what_it_keeps(tmp_path: Path) -> None:
    follower = ProfileFollower(keep=2)
    for offset, user in enumerate(["a", "b", "c"]):
        follower.apply(0, offset, user.encode(), _profile(user, offset + 1))
    out = tmp_path / "profiles.jsonl"
    follower.dump(out)
    assert [json.loads(line)["user_id"] for line in out.read_text().splitlines()] == ["b", "c"]


def test_a_follower_keeps_at_least_one_profile() -> None:
    with pytest.raises(ValueError):
        ProfileFollower(keep=0)
