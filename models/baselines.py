"""The non-neural baselines the model must beat, on the same next-event pairs.

* ``counts``  -- the user's type counts so far, smoothed towards the training
  users' type frequencies: the additive profile of the classic approach.
* ``markov``  -- P(next type | this event's type), fitted on training users.
* ``cat_recency`` / ``cat_frequency`` -- the user's own categories so far
  (unbounded), most recent first / most frequent first (ties: more recent).

Each function returns predictions after *every* event of a sequence; the
evaluation drops the last one (it has no next event).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from models.events import EVENT_TYPES, TYPE_INDEX, Event

N_TYPES = len(EVENT_TYPES)


def fit_type_baselines(sequences: Sequence[Sequence[Event]], alpha: float = 1.0) -> dict[str, Any]:
    """Type prior and add-one-smoothed Markov matrix from training users (stored in the checkpoint)."""
    prior = np.ones(N_TYPES)
    markov = np.ones((N_TYPES, N_TYPES))
    for seq in sequences:
        kinds = [TYPE_INDEX[e.type] for e in seq]
        np.add.at(prior, kinds, 1.0)
        np.add.at(markov, (kinds[:-1], kinds[1:]), 1.0)
    return {"type_prior": (prior / prior.sum()).tolist(),
            "markov": (markov / markov.sum(axis=1, keepdims=True)).tolist(), "alpha": alpha}


def counts_intent(seq: Sequence[Event], params: dict[str, Any]) -> np.ndarray:
    """[n, types]: (counts so far + alpha * prior) / (events so far + alpha)."""
    onehot = np.zeros((len(seq), N_TYPES))
    onehot[np.arange(len(seq)), [TYPE_INDEX[e.type] for e in seq]] = 1.0
    alpha = params["alpha"]
    counts = np.cumsum(onehot, axis=0) + alpha * np.asarray(params["type_prior"])
    return counts / counts.sum(axis=1, keepdims=True)


def markov_intent(seq: Sequence[Event], params: dict[str, Any]) -> np.ndarray:
    """[n, types]: the Markov row of each event's type."""
    return np.asarray(params["markov"])[[TYPE_INDEX[e.type] for e in seq]]


def category_rankings(seq: Sequence[Event], k: int) -> tuple[list[list[str]], list[list[str]]]:
    """(recency, frequency) top-k category lists after every event."""
    last_seen: dict[str, int] = {}
    counts: dict[str, int] = {}
    recency, frequency = [], []
    for i, e in enumerate(seq):
        last_seen[e.category_id] = i
        counts[e.category_id] = counts.get(e.category_id, 0) + 1
        recency.append(sorted(last_seen, key=lambda c: -last_seen[c])[:k])
        frequency.append(sorted(counts, key=lambda c: (-counts[c], -last_seen[c]))[:k])
    return recency, frequency
