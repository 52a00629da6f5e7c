"""Calibration metrics of the intent probabilities (log loss, ECE) and the temperature fitted on other users."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.evaluate import LOWER_IS_BETTER, summarize
from models.metrics import calibration_error, fit_temperature, log_loss, temperature_scale


def sample(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), and the probabilities softmax(z / temperature) of a model that is
    off by that temperature (over-confident for T < 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, 5))
    true = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    labels = (rng.random(n)[:, None] > np.cumsum(true, axis=1)).sum(axis=1)
    return temperature_scale(true, temperature), labels


def test_log_loss_of_known_predictions() -> None:
    labels = np.array([0, 3, 4, 1])
    assert log_loss(np.full((4, 5), 0.2), labels) == pytest.approx(math.log(5))
    assert log_loss(np.eye(5)[labels], labels) == pytest.approx(0.0, abs=1e-6)
    # a zero on the true class is clipped, not infinite
    assert math.isfinite(log_loss(np.eye(5)[[1, 0, 0, 0]], labels))


def test_calibration_error_of_known_predictions() -> None:
    labels = np.array([1, 0, 1, 0] * 25, dtype=bool)
    assert calibration_error(np.full(100, 0.5), labels) == pytest.approx(0.0)
    assert calibration_error(np.full(100, 0.8), labels) == pytest.approx(0.3)
    # two bins, each off by 0.1 the other way: the errors do not cancel
    scores = np.r_[np.full(50, 0.1), np.full(50, 0.9)]
    truth = np.r_[np.arange(50) < 10, np.arange(50) < 40]
    assert calibration_error(scores, truth) == pytest.approx(0.1)


def test_temperature_scale_keeps_the_argmax_and_t1_is_identity() -> None:
    probs, _ = sample(200, 1.0)
    assert np.allclose(temperature_scale(probs, 1.0), probs)
    hot = temperature_scale(probs, 3.0)
    assert np.allclose(hot.sum(axis=1), 1.0) and np.array_equal(hot.argmax(axis=1), probs.argmax(axis=1))
    assert hot.max(axis=1).mean() < probs.max(axis=1).mean()


@pytest.mark.parametrize("off_by", [0.4, 1.0, 2.5])
def test_fitted_temperature_undoes_a_known_miscalibration(off_by: float) -> None:
    probs, labels = sample(40_000, off_by)
    fitted = fit_temperature(probs, labels)
    assert fitted == pytest.approx(1.0 / off_by, rel=0.08)
    assert log_loss(temperature_scale(probs, fitted), labels) <= log_loss(probs, labels) + 1e-9


def test_worst_split_of_a_lower_is_better_metric_is_the_highest() -> None:
    reports = [{"results": {"model": {"auc_cart": a, "logloss": l, "ece_cart": e}}}
               for a, l, e in [(0.70, 0.9, 0.02), (0.66, 1.1, 0.01)]]
    summary = summarize(reports)
    assert summary["worst"]["model"] == {"auc_cart": 0.66, "logloss": 1.1, "ece_cart": 0.02}
    assert summary["mean"]["model"]["logloss"] == pytest.approx(1.0)
    assert {"logloss", "ece_cart"} <= LOWER_IS_BETTER and "auc_cart" not in LOWER_IS_BETTER
