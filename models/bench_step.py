"""Micro-benchmark of the online path: ``advance`` (plus state decode/encode) at various batch sizes.

Users arrive with a warm state (20 past events, so their memories are
populated) and one new event each, as in the stream.  ``python -m
models.bench_step --device cuda`` prints one row per batch size.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Sequence

from models.inference import ProfileModel, default_checkpoint_path
from models.synthetic import funnel_events

_POOL_USERS = 256
_HISTORY = 20


def step_benchmark(batch_sizes: Sequence[int] = (1, 8, 64, 512, 2048, 8192), device: str = "auto",
                   model_path: str | None = None, min_seconds: float = 1.0) -> list[dict[str, Any]]:
    """Rows of {device, batch, users_per_s (advance only), users_per_s_with_state (decode+advance+encode)}."""
    model = ProfileModel.load(model_path or default_checkpoint_path(), device)
    pool: dict[str, list] = {}
    for e in funnel_events(n_users=_POOL_USERS, events_per_user=(_HISTORY + 1, _HISTORY + 1), n_categories=500):
        pool.setdefault(e.user_id, []).append(e)
    seqs = list(pool.values())
    warm = model.advance([None] * len(seqs), [s[:_HISTORY] for s in seqs]).states
    blobs = model.encode_states(warm)
    rows = []
    for batch in batch_sizes:
        states = [warm[i % len(seqs)] for i in range(batch)]
        state_bytes = [blobs[i % len(seqs)] for i in range(batch)]
        news = [[seqs[i % len(seqs)][_HISTORY]] for i in range(batch)]
        model.advance(states, news)  # warm-up (allocations, lazy CUDA init)
        rows.append({"device": str(model.device), "batch": batch,
                     "users_per_s": round(batch / _time(lambda: model.advance(states, news), min_seconds)),
                     "users_per_s_with_state": round(batch / _time(lambda: model.encode_states(
                         model.advance(model.decode_states(state_bytes), news).states), min_seconds))})
    return rows


def _time(fn, min_seconds: float) -> float:
    """Median seconds per call over at least ``min_seconds`` and 3 calls (robust to a busy shared machine)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 512, 2048, 8192])
    args = parser.parse_args()
    for row in step_benchmark(args.batch, args.device, args.model):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
