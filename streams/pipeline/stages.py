"""Where a batch's time goes: wall seconds per pipeline stage, summed over batches.

A small batch (the stream at moderate load) pays a fixed cost per stage that a
backlog batch amortises; this clock is how that cost is found and watched.
The bench prints it per batch (docs/performance.md), and the worker exports it
as ``profilestream_stage_seconds_total{stage}``.  Reading ``time.perf_counter``
twice per stage costs well under a microsecond, so it is always on.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

__all__ = ["STAGES", "StageClock"]

#: The stages, in pipeline order.  ``model_thread`` is the hand-off to the model thread and
#: back (the executor's wall time less the step's own); ``flush`` is the write-behind cache's
#: write to RocksDB and the changelog, run at commits, not per batch.
STAGES = ("handoff", "prepare", "lookup", "admission", "featurise", "model_thread", "model_step", "heads",
          "state", "profiles", "publish", "metrics", "flush")


class StageClock:
    """Cumulative seconds per stage and the number of batches they were spent on."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.batches = 0

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - started

    def snapshot(self) -> tuple[int, dict[str, float]]:
        """(batches, seconds per stage) so far; the difference of two is a window's breakdown."""
        return self.batches, dict(self.seconds)
