"""When a long-running demo (or soak) must stop before it exhausts the machine.

The embedded broker (Tansu 0.6.0, memory storage) keeps every record it is
sent: it ignores ``retention.ms``, does not compact and drops the connection on
DeleteRecords (docs/embedded-broker.md), so its memory grows for as long as
traffic flows.  Nothing the demo can ask of the broker frees it; the demo stops
instead, through the same path as Ctrl-C.  The decision is kept apart from the
/proc readings so it can be tested on plain numbers.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = ["DEFAULT_KEEP_PROFILES", "DEFAULT_MAX_BROKER_MIB", "DEFAULT_MIN_AVAILABLE_MIB", "MIB", "MemoryLimits",
           "add_demo_memory_flags", "limits_from_args"]

MIB = 1024 * 1024
#: The broker's resident memory at which the demo stops: a size any development
#: machine can spare.  The broker grew ~70 MiB a minute at the demo's default rate
#: and ~180 at 1,500 events/s with 200,000 users (docs/performance.md "Soak"), so
#: this is about half an hour of the default demo, and about 11 minutes of the latter.
DEFAULT_MAX_BROKER_MIB = 2048
#: Memory the kernel must still see available (MemAvailable) for the demo to go
#: on: below it the next growth of the broker or the demo risks the OOM killer.
DEFAULT_MIN_AVAILABLE_MIB = 512
#: Profiles the demo's follower keeps: a parsed profile is a few KiB, so this
#: bounds the follower to tens of MiB whatever the user population.
DEFAULT_KEEP_PROFILES = 10_000


@dataclass(frozen=True)
class MemoryLimits:
    """The two bounds of a demo run, in MiB; 0 switches a bound off."""

    max_broker_mib: float = DEFAULT_MAX_BROKER_MIB
    min_available_mib: float = DEFAULT_MIN_AVAILABLE_MIB

    def __post_init__(self) -> None:
        if self.max_broker_mib < 0 or self.min_available_mib < 0:
            raise ValueError("memory limits are MiB >= 0 (0 switches a limit off)")

    def breach(self, broker_rss_bytes: int | None, available_bytes: int | None) -> str | None:
        """Why the demo must stop now, as a sentence for its log; None while both bounds hold.

        A reading of None (the broker already gone, or no /proc on this platform)
        never stops the demo: the guard stops only on what it has measured.
        """
        if self.max_broker_mib and broker_rss_bytes is not None \
                and broker_rss_bytes > self.max_broker_mib * MIB:
            return (f"the embedded broker holds {broker_rss_bytes / MIB:,.0f} MiB, over the "
                    f"{self.max_broker_mib:,.0f} MiB limit (Tansu's memory storage keeps every record "
                    f"it is sent); --max-broker-mib raises the limit (0: none)")
        if self.min_available_mib and available_bytes is not None \
                and available_bytes < self.min_available_mib * MIB:
            return (f"only {available_bytes / MIB:,.0f} MiB of memory is left available on this machine, "
                    f"under the {self.min_available_mib:,.0f} MiB floor; --min-available-mib lowers "
                    f"the floor (0: none)")
        return None


def _mib(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("a size in MiB >= 0 (0 switches the limit off)")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return value


def add_demo_memory_flags(parser: argparse.ArgumentParser) -> None:
    """--keep-profiles, --max-broker-mib, --min-available-mib: shared by `demo` and the soak."""
    parser.add_argument("--keep-profiles", type=_positive_int, default=DEFAULT_KEEP_PROFILES,
                        help="profiles the demo keeps, of the most recently updated users (and so writes "
                             "with -o)")
    parser.add_argument("--max-broker-mib", type=_mib, default=DEFAULT_MAX_BROKER_MIB,
                        help="stop once the embedded broker, which keeps every record, holds more than this "
                             "(0: no limit)")
    parser.add_argument("--min-available-mib", type=_mib, default=DEFAULT_MIN_AVAILABLE_MIB,
                        help="stop once the machine has less memory than this available (0: no limit)")


def limits_from_args(args: argparse.Namespace) -> MemoryLimits:
    return MemoryLimits(args.max_broker_mib, args.min_available_mib)
