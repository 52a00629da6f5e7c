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
from .model_guard import ModelMismatchError, preflight
from .settings import Settings
from .topics import ensure_topics

log = logging.getLogger(__name__)

#: Net allocations between young-generation collections (CPython's default: 700); see run_worker.
GC_YOUNG_THRESHOLD = 20_000


def load_model(settings: Settings) -> ProfileModel:
    path = settings.model_path or default_checkpoint_path()
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    model = ProfileModel.load(path, device=settings.device)
    log.info("model %s (fingerprint %s) on %s from %s", model.version, model.fingerprint, model.device, path)
    return model


def run_worker(settings: Settings, customize: Callable[[ProfileStreamApp], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM; ``customize`` may add tasks/timers (the demo does)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # faust runs on this loop too
    loop.run_until_complete(ensure_topics(settings))
    model = load_model(settings)
    try:
        loop.run_until_complete(preflight(settings, model.fingerprint))
    except ModelMismatchError as exc:
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
    # A batch keeps its events, features and new states alive until it ends, so at 700
    # each batch of a few hundred events ran ~6 young collections that freed nothing and
    # promoted it all: ~6 % of the processor's time (0.54 s of GC per 90k events in batches
    # of 300, BatchProcessor with the real model).  Those objects hold no cycles and die by
    # refcount, so at 20,000 such a batch never triggers one; large batches still do, as
    # often in total as before (0.50 s vs 0.53 s at 2,000 events).
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    if service.health.error is not None:
        raise SystemExit(f"worker stopped after a fatal error: {service.health.error!r}")
