"""The model-upgrade rule: a worker never applies events to another model's state.

A state's (h, c) only mean something to the weights that wrote them, so a
worker whose checkpoint fingerprint differs from the stored states' must not
read them.  ``PROFILESTREAM_ON_MODEL_MISMATCH`` (or ``worker --reset-state``)
decides what happens instead:

* ``refuse`` (default): the worker does not start -- its preflight (streams/service/worker.py) probes
  the newest record of every changelog partition before the worker joins the
  group, and the processor checks every state it reads, so a mismatch found
  later (a mixed changelog) stops the worker too.  The message names both
  fingerprints and the remedies.
* ``reset``: mismatched states are discarded at first contact; those users
  start afresh with the new model.

The other remedy is ``profilestream backfill`` with the new model, which
rewrites the states from history (docs/lifecycle.md).
"""

from __future__ import annotations

POLICIES = ("refuse", "reset")


class ModelMismatchError(RuntimeError):
    """Stored state was written by another model; applying events to it would be wrong."""


def mismatch_message(stored: str, running: str) -> str:
    return (f"stored state was written by model {stored}, this worker runs model {running}. "
            f"Remedies: run `profilestream backfill` with the new model first, or start the worker with "
            f"PROFILESTREAM_ON_MODEL_MISMATCH=reset (or `profilestream worker --reset-state`) to discard "
            f"that model's states, or start the worker with model {stored} again (see docs/lifecycle.md)")
