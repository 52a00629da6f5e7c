"""Start a ProfileStream worker: load the model, make sure the topics exist, run faust."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import Counter
from typing import Callable

import faust
import torch

from models import ProfileModel, default_checkpoint_path

from ..kafka.topics import ensure_topics
from ..pipeline.model_guard import ModelMismatchError, mismatch_message
from ..settings import Settings
from ..state import codec as state_codec
from ..state.changelog import newest_values
from .app import ProfileStreamApp, build_app

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


async def preflight(settings: Settings, fingerprint: str) -> None:
    """Refuse to start (ModelMismatchError) if the newest stored states belong to another model."""
    found = Counter(state_codec.decode(v).fingerprint for v in await newest_values(settings))
    others = {fp: n for fp, n in found.items() if fp != fingerprint}
    if not others:
        return
    stored = ", ".join(sorted(others))
    if settings.on_model_mismatch == "reset":
        log.warning("stored states of model(s) %s will be discarded at first contact "
                    "(PROFILESTREAM_ON_MODEL_MISMATCH=reset); this worker runs model %s", stored, fingerprint)
        return
    raise ModelMismatchError(mismatch_message(stored, fingerprint))


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
    # Everything loaded so far (torch, faust, the model) lives as long as the process.
    # Left in the collected generations, each full collection walked it, stalling the
    # batch in progress: the latency tail (docs/performance.md).
    gc.freeze()
    # A batch keeps its events, features and new states alive until it ends (and, while
    # the worker is behind, the next batch's are alive too: streams/kafka/fetcher.py), so
    # every young collection walked tens of thousands of live objects and freed almost
    # nothing.  Those objects hold no cycles and die by refcount, so at GC_YOUNG_THRESHOLD
    # (net allocations) a young collection comes only when that many objects have piled
    # up, at no cost in peak memory (docs/performance.md).
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    if service.health.error is not None:
        raise SystemExit(f"worker stopped after a fatal error: {service.health.error!r}")
