"""Where a small batch's time goes, the processor alone: ``python -m streams.dev.stage_budget``.

Issue 19's per-batch budget is about the fixed cost of a small batch (20
events: the stream at moderate load), which the worker's bench measures
only among the broker's and the fetch loop's noise.  This runs the real
processor (shipped model, RocksDB per partition, the write-behind cache)
on synthetic traffic in batches of ``--batch`` events, flushes the cache
about once a second's worth of batches as a commit would, and prints the
mean microseconds per batch of each stage (streams/pipeline/stages.py).
``--write-through --threaded`` is the path before the cache and the inline
step, for a before/after in one checkout.  Figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import rocksdict
from prometheus_client import CollectorRegistry

from models import ProfileModel, default_checkpoint_path

from ..pipeline.processor import BatchProcessor
from ..pipeline.source_record import SourceRecord
from ..pipeline.stages import STAGES
from ..pipeline.validate import Rejection
from ..service.metrics import Metrics
from ..state.store import write_atomically
from .demo import encode_event
from .traffic import SyntheticTraffic

__all__ = ["LocalStateStore", "NullPublisher", "measure"]

#: Batches between two flushes: about a second of 20-event batches at ~3 ms each.
BATCHES_PER_FLUSH = 350


class LocalStateStore:
    """The processor's state backend on one RocksDB per partition, as a worker keeps it, minus faust
    and the changelog (nothing here recovers from one)."""

    def __init__(self, root: Path, partitions: int) -> None:
        options = rocksdict.Options(raw_mode=True)
        self.dbs = {p: rocksdict.Rdict(str(root / f"p{p}"), options=options) for p in range(partitions)}

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        return list(self.dbs[partition][list(keys)]) if keys else []

    def write_local(self, partition: int, items: Sequence[tuple[bytes, bytes | None]]) -> None:
        write_atomically(self.dbs[partition], items)

    async def send_changelog(self, partition: int, items: Sequence[tuple[bytes, bytes | None]]) -> None:
        """No changelog: the worker's store (streams/state/store.py) sends one."""

    def close(self) -> None:
        for db in self.dbs.values():
            db.close()


class NullPublisher:
    """Publishes nothing: the measurement is the processor's, not a broker's."""

    async def profiles(self, items: Sequence[tuple[str, bytes]]) -> None:
        return None

    async def tombstone(self, user_id: str) -> None:
        return None

    async def dead_letter(self, rejection: Rejection) -> asyncio.Future:
        delivered = asyncio.get_running_loop().create_future()
        delivered.set_result(None)
        return delivered


async def _no_end(partition: int) -> int:
    """No log here: every offset the run uses lies below its partition's end."""
    return 2**63 - 1


def records(n: int, users: int, partitions: int, seed: int) -> list[SourceRecord]:
    """``n`` synthetic events of the last few hours as the fetch loop hands them over."""
    now_ms = int(time.time() * 1000)
    events = SyntheticTraffic(users=users, categories=60, seed=seed).events(n, now_ms - n * 50, mean_gap_ms=50.0)
    next_offset = [0] * partitions
    out = []
    for event in events:
        key, value = encode_event(event)
        partition = sum(key) % partitions
        out.append(SourceRecord("events", partition, next_offset[partition], now_ms, key, value, ()))
        next_offset[partition] += 1
    return out


async def measure(batch: int, users: int, events: int, write_through: bool, threaded: bool,
                  partitions: int = 8, seed: int = 3) -> tuple[int, dict[str, float]]:
    """(batches measured, mean seconds per batch of each stage) over the second half of the events."""
    model = ProfileModel.load(default_checkpoint_path(), device="cpu")
    with tempfile.TemporaryDirectory(prefix="profilestream-stages-") as root:
        store = LocalStateStore(Path(root), partitions)
        try:
            processor = BatchProcessor(model, store, NullPublisher(), Metrics(CollectorRegistry()), _no_end,
                                       "events", cache_users=0 if write_through else 20_000,
                                       thread_min_events=1 if threaded else batch + 1)
            recs = records(events, users, partitions, seed)
            chunks = [recs[i:i + batch] for i in range(0, len(recs), batch)]
            warm = len(chunks) // 2  # users' states exist and the cache is full, as in a running worker
            for chunk in chunks[:warm]:
                await processor.apply(processor.prepare(chunk))
            await processor.flush()
            start_batches, start = processor.clock.snapshot()
            for i, chunk in enumerate(chunks[warm:], 1):
                await processor.apply(processor.prepare(chunk))
                if i % BATCHES_PER_FLUSH == 0:
                    await processor.flush()
            await processor.flush()  # the commit after the last batch: every batch's states written
            end_batches, end = processor.clock.snapshot()
        finally:
            store.close()
    n = end_batches - start_batches
    return n, {stage: (end[stage] - start[stage]) / max(n, 1) for stage in STAGES}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m streams.dev.stage_budget", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=20, help="events per batch")
    p.add_argument("--users", type=int, default=10_000, help="synthetic user population")
    p.add_argument("--events", type=int, default=40_000, help="events in all (the first half warms up)")
    p.add_argument("--write-through", action="store_true", help="no state cache (PROFILESTREAM_STATE_CACHE_USERS=0)")
    p.add_argument("--threaded", action="store_true", help="every model step in the model thread")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the worker's default (PROFILESTREAM_TORCH_THREADS)
    n, stages = asyncio.run(measure(args.batch, args.users, args.events, args.write_through, args.threaded))
    print(f"{n} batches of {args.batch} events, {args.users:,} users, "
          f"{'write-through' if args.write_through else 'write-behind cache'}, "
          f"model step {'in the model thread' if args.threaded else 'inline'}:")
    for stage in STAGES:
        print(f"  {stage:<13}{stages[stage] * 1e6:>9,.0f} us per batch")
    rest = float(np.sum([s for name, s in stages.items() if name not in ("model_step", "handoff")]))
    print(f"  all but the model step: {rest * 1e3:.2f} ms per batch (budget 1 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
