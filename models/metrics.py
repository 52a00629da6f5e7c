"""Ranking and calibration metrics for next-event prediction."""

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


#: Probabilities are clipped here before the log: a predictor that gives a type zero (the tree peer for
#: a type absent from training) would otherwise make the log loss infinite on one pair.
_EPS = 1e-7


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class: [N, C] probabilities, [N] class indices."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        return float("nan")
    return float(-np.log(np.clip(probs[np.arange(len(probs)), labels], _EPS, 1.0)).mean())


def calibration_error(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of one-vs-rest probabilities: over ``bins`` equal-width bins of the
    score, |mean score - observed rate|, weighted by the bin's share of the pairs."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if len(scores) == 0:
        return float("nan")
    which = np.minimum((scores * bins).astype(np.int64), bins - 1)
    gap = np.bincount(which, scores - labels, minlength=bins)   # per bin: n * (mean score - rate)
    return float(np.abs(gap).sum() / len(scores))


def temperature_scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the same as dividing the logits by T (probabilities carry the logits up to a
    per-row constant, which softmax ignores)."""
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """The T in [lo, hi] that minimises the log loss of ``temperature_scale(probs, T)``.

    The log loss is convex in 1/T, so a golden-section search over 1/T finds the minimum.
    """
    ratio = (5 ** 0.5 - 1) / 2
    a, b = 1.0 / hi, 1.0 / lo
    for _ in range(60):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if log_loss(temperature_scale(probs, 1.0 / c), labels) <= log_loss(temperature_scale(probs, 1.0 / d), labels):
            b = d
        else:
            a = c
    return float(2.0 / (a + b))
