"""Start a ProfileStream worker: load the model, make sure the topics exist, run faust."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Callable

import faust
import torch

from models import ProfileModel, default_checkpoint_path

from .app import ProfileStreamApp, build_app
from .model_guard import StoredStateError, preflight
from .settings import Settings
from .topics import PartitionCountError, check_partitions, ensure_topics

log = logging.getLogger(__name__)

#: Net allocations between young-generation collections (CPython's default: 700); see run_worker.
GC_YOUNG_THRESHOLD = 300_000


def load_model(settings: Settings) -> ProfileModel:
    path = settings.model_path or default_checkpoint_path()
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    model = ProfileModel.load(path, device=settings.device)
    log.info("model %s (fingerprint %s) on %s from %s", model.version, model.fingerprint, model.device, path)
    return model


def run_worker(settings: Settings, customize: Callable[[ProfileStreamApp], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM; ``customize`` may add tasks/timers (the demo does)."""
    try:
        settings.check_lookup_exposure()
    except ValueError as exc:
        log.critical("refusing to start: %s", exc)
        raise SystemExit(f"refusing to start: {exc}") from None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # faust runs on this loop too
    loop.run_until_complete(ensure_topics(settings))
    model = load_model(settings)
    try:
        loop.run_until_complete(check_partitions(settings))
        loop.run_until_complete(preflight(settings, model.fingerprint))
    except (PartitionCountError, StoredStateError) as exc:
        log.critical("refusing to start: %s", exc)
        raise SystemExit(f"refusing to start: {exc}") from None
    service = build_app(settings, model)
    if customize is not None:
        customize(service)
    worker = faust.Worker(service.app, loglevel=settings.log_level, loop=loop, quiet=True,
                          redirect_stdouts=False)
    # Everything loaded so far (torch, faust, the model: ~10^6 objects) lives as long as
    # the process.  Left in the collected generations, each full collection walked it for
    # 110-160 ms every ~5 s under load, stalling the batch in progress: the latency tail.
    gc.freeze()
    # A batch keeps its events, features and new states alive until it ends (and, while
    # the worker is behind, the next batch's are alive too: streams/batch_consumer.py), so
    # every young collection walked tens of thousands of live objects and freed almost
    # nothing: at CPython's 700, ~6 % of the processor's time in batches of 300; at 20,000,
    # 1.3 s of a 300k-event bench run (~10 %), in which GC freed only ~8.6k objects.  Those
    # objects hold no cycles and die by refcount, so at 300,000 (net allocations) a young
    # collection comes only when that many objects have piled up: 0.18 s in the same run,
    # start-up included (peak RSS 574 vs 580 MiB).
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    if service.health.error is not None:
        raise SystemExit(f"worker stopped after a fatal error: {service.health.error!r}")
