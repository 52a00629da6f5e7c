"""Start a ProfileStream worker: load the model, make sure the topics exist, run faust."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import Counter
from typing import Callable

import faust
import torch
from aiokafka import AIOKafkaConsumer, TopicPartition

from models import ProfileModel, default_checkpoint_path

from ..kafka.client_config import aiokafka_options
from ..kafka.end_offsets import end_offsets
from ..kafka.group_offsets import committed_offsets
from ..kafka.topics import PartitionCountError, check_partitions, ensure_topics
from ..pipeline.model_guard import (
    ModelMismatchError, StateAheadOfLogError, StoredStateError, ahead_message, mismatch_message)
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


async def events_end_offsets(settings: Settings) -> dict[int, int]:
    """partition -> end offset of the events topic (exact, also on the embedded broker)."""
    consumer = AIOKafkaConsumer(**aiokafka_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(settings.events_topic, p)
               for p in sorted(consumer.partitions_for_topic(settings.events_topic) or ())]
        return {tp.partition: end for tp, end in (await end_offsets(consumer, tps, settings)).items()}
    finally:
        await consumer.stop()


async def preflight(settings: Settings, fingerprint: str) -> None:
    """Refuse to start (a :class:`StoredStateError`) if the newest stored states belong to another
    model, or they or the group's committed offsets lie beyond the events topic's end
    (the rule: streams/pipeline/model_guard.py)."""
    newest = {p: state_codec.decode(v) for p, v in (await newest_values(settings)).items()}
    reset = settings.on_model_mismatch == "reset"
    found = Counter(record.fingerprint for record in newest.values())
    others = {fp: n for fp, n in found.items() if fp != fingerprint}
    if others:
        stored = ", ".join(sorted(others))
        if not reset:
            raise ModelMismatchError(mismatch_message(stored, fingerprint))
        log.warning("stored states of model(s) %s will be discarded at first contact "
                    "(PROFILESTREAM_ON_MODEL_MISMATCH=reset); this worker runs model %s", stored, fingerprint)
    ends = await events_end_offsets(settings)
    committed = await committed_offsets(settings)
    ahead = [ahead_message("the newest stored state", settings.events_topic, p, record.last_offset, ends[p])
             for p, record in sorted(newest.items()) if p in ends and record.last_offset >= ends[p]]
    ahead += [ahead_message("the group's committed offset", settings.events_topic, p, offset, ends[p])
              for p, offset in sorted(committed.items()) if p in ends and offset > ends[p]]
    if not ahead:
        return
    if not reset:
        raise StateAheadOfLogError("; ".join(ahead))
    log.warning("%s. Such states are discarded at first contact (PROFILESTREAM_ON_MODEL_MISMATCH=reset); "
                "partitions committed beyond their end are read from their start", "; ".join(ahead))


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
