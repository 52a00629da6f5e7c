"""The model-upgrade rule: a worker never applies events to another model's state -- nor to a
state its events topic no longer holds.

A state's (h, c) only mean something to the weights that wrote them, so a
worker whose checkpoint fingerprint differs from the stored states' must not
read them.  Likewise a state's applied source offset only means something to
the events partition it was read from: an offset at or beyond the
partition's current end means the topic was recreated or truncated since,
and the admission rule would skip every new event up to that offset as
"redelivered".  ``PROFILESTREAM_ON_MODEL_MISMATCH`` (or ``worker
--reset-state``) decides what happens in both cases:

* ``refuse`` (default): the worker does not start -- :func:`preflight` probes
  the newest record of every changelog partition and the group's committed
  offsets before the worker joins the group, and the processor checks every
  state it reads, so a mismatch found later (a mixed changelog, an older
  state of a truncated partition) stops the worker too.  The message names
  both fingerprints, or the offsets, and the remedies.
* ``reset``: mismatched states are discarded at first contact; those users
  start afresh with the new model.

The other remedy is ``profilestream backfill`` with the new model, which
rewrites the states from history (docs/lifecycle.md).
"""

from __future__ import annotations

import logging
from collections import Counter

from aiokafka import AIOKafkaConsumer, TopicPartition

from . import state_record
from .changelog import newest_values
from .end_offsets import end_offsets
from .group_offsets import committed_offsets
from .kafka_config import aiokafka_options
from .settings import Settings

log = logging.getLogger(__name__)

POLICIES = ("refuse", "reset")


class StoredStateError(RuntimeError):
    """Stored state (or the group's position) events must not be applied to; see the policies above."""


class ModelMismatchError(StoredStateError):
    """Stored state was written by another model; applying events to it would be wrong."""


class StateAheadOfLogError(StoredStateError):
    """A stored state (or committed offset) lies at or beyond its events partition's end."""


def mismatch_message(stored: str, running: str) -> str:
    return (f"stored state was written by model {stored}, this worker runs model {running}. "
            f"Remedies: run `profilestream backfill` with the new model first, or start the worker with "
            f"PROFILESTREAM_ON_MODEL_MISMATCH=reset (or `profilestream worker --reset-state`) to discard "
            f"that model's states, or start the worker with model {stored} again (see docs/lifecycle.md)")


def ahead_message(what: str, topic: str, partition: int, offset: int, end: int) -> str:
    """Why ``what`` (a state, the group's commit) at ``offset`` cannot go with ``topic[partition]`` ending at ``end``."""
    return (f"{what} of {topic}[{partition}] is at offset {offset}, but the partition ends at {end}: the events "
            f"topic was recreated or truncated since, so offsets up to {offset} would be skipped as already "
            f"applied. Remedies: start the worker with PROFILESTREAM_ON_MODEL_MISMATCH=reset (or `profilestream "
            f"worker --reset-state`) to discard such states (those users start afresh at their next event), or "
            f"`profilestream restore` a snapshot taken on the current topic (see docs/lifecycle.md)")


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
    model, or they or the group's committed offsets lie beyond the events topic's end."""
    newest = {p: state_record.decode(v) for p, v in (await newest_values(settings)).items()}
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
