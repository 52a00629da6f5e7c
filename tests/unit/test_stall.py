"""The fetch-stall watchdog's decisions (streams/kafka/stall.py), over offsets and fetch time."""

from __future__ import annotations

from streams.kafka.stall import RESEEK, UNHEALTHY, FetchStallWatch, fetched_through

TP = ("events", 0)
OTHER = ("events", 1)


def watching(limit_s: float = 30.0) -> FetchStallWatch[tuple[str, int]]:
    watch: FetchStallWatch[tuple[str, int]] = FetchStallWatch(limit_s)
    watch.progressed([TP, OTHER])  # positioned for the assignment
    return watch


def test_records_waiting_and_none_fetched_for_the_limit_asks_for_a_reseek_then_unhealthy() -> None:
    watch = watching()
    watch.fetched(29.0)
    assert watch.check(TP, 100, 150) is None  # not yet
    watch.fetched(1.0)
    assert watch.stalled_s(TP) == 30.0
    assert watch.check(TP, 100, 150) == RESEEK
    assert watch.check(TP, 100, 150) is None  # the re-seek gets a whole period
    watch.fetched(29.0)
    assert watch.check(TP, 100, 160) is None
    watch.fetched(1.0)
    assert watch.check(TP, 100, 160) == UNHEALTHY
    watch.fetched(300.0)
    assert watch.check(TP, 100, 200) is None  # asked once; the worker is already unhealthy


def test_a_record_handed_on_restarts_the_clock() -> None:
    watch = watching()
    watch.fetched(25.0)
    watch.progressed([TP])
    watch.fetched(25.0)
    assert watch.check(TP, 120, 150) is None
    assert watch.check(OTHER, 7, 9) == RESEEK  # the other partition got nothing for 50 s


def test_progress_after_a_reseek_starts_a_new_stall_at_reseek() -> None:
    watch = watching()
    watch.fetched(30.0)
    assert watch.check(TP, 100, 150) == RESEEK
    watch.progressed([TP])  # the re-seek worked
    watch.fetched(30.0)
    assert watch.check(TP, 200, 250) == RESEEK


def test_a_caught_up_partition_is_not_stalled_however_long_it_waits() -> None:
    watch = watching()
    watch.fetched(3600.0)
    assert watch.check(TP, 100, 100) is None  # nothing to read: an idle topic
    watch.fetched(5.0)
    # A record arrives after an idle hour: the clock started when the partition was seen caught up.
    assert watch.check(TP, 100, 101) is None
    watch.fetched(25.0)
    assert watch.check(TP, 100, 101) == RESEEK


def test_time_not_spent_fetching_does_not_count() -> None:
    """Only fetch waits advance the clocks: a long batch (the loop waits for the processor) is no fetch stall."""
    watch = watching()
    watch.fetched(10.0)
    assert watch.check(TP, 100, 5000) is None
    assert watch.stalled_s(TP) == 10.0


def test_unknown_positions_and_ends_and_a_zero_limit_give_no_verdict() -> None:
    watch = watching()
    watch.fetched(100.0)
    assert watch.check(TP, None, 150) is None  # not positioned for this assignment yet
    assert watch.check(TP, 100, None) is None
    off = watching(0.0)
    off.fetched(1000.0)
    assert off.check(TP, 100, 150) is None


def test_a_partition_first_seen_by_check_starts_its_clock_there() -> None:
    watch: FetchStallWatch[tuple[str, int]] = FetchStallWatch(30.0)
    watch.fetched(100.0)
    assert watch.check(TP, 100, 150) is None
    watch.fetched(30.0)
    assert watch.check(TP, 100, 150) == RESEEK


def test_a_revoked_partition_is_forgotten() -> None:
    watch = watching()
    watch.fetched(30.0)
    watch.forget([TP])
    assert watch.stalled_s(TP) == 0.0
    assert watch.check(TP, 100, 150) is None  # reassigned later: its clock starts afresh


def test_a_client_at_the_end_with_nothing_held_has_fetched_through() -> None:
    """After a re-seek, a client at the end offset with nothing paused or buffered found no
    records in the offsets it passed (transaction markers): not a stall.  Anything else is one."""
    at_end = {"assigned": True, "position": 151, "paused": False, "highwater": 151, "buffered": None}
    assert fetched_through(at_end, 151)
    assert not fetched_through({**at_end, "position": 100}, 151)  # the soak: stuck at the next offset
    assert not fetched_through({**at_end, "paused": True}, 151)  # paused behind faust's back
    assert not fetched_through({**at_end, "buffered": "FetchResult"}, 151)  # records not handed over
    assert not fetched_through({**at_end, "position": None}, 151)  # awaiting an offset reset
    assert not fetched_through({"assigned": False}, 151)
    assert not fetched_through({"unreadable": "TimeoutError()"}, 151)
