"""Ranking metrics for next-event prediction."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half); NaN without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid_ranks = np.cumsum(counts) - (counts - 1) / 2.0      # average 1-based rank of each distinct score
    rank_sum = mid_ranks[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def recall_mrr(ranked: Sequence[Sequence[str]], targets: Sequence[str], k: int) -> tuple[float, float]:
    """(recall@k, MRR@k) of one true item per query against a best-first list."""
    if not targets:
        return float("nan"), float("nan")
    hits = 0
    reciprocal = 0.0
    for lst, target in zip(ranked, targets):
        try:
            rank = list(lst[:k]).index(target)
        except ValueError:
            continue
        hits += 1
        reciprocal += 1.0 / (rank + 1)
    return hits / len(targets), reciprocal / len(targets)
