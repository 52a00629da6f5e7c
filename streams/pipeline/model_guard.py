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

* ``refuse`` (default): the worker does not start -- its preflight (streams/service/worker.py) probes
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

