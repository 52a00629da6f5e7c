"""Score the model and the baselines on the same next-event pairs.

A pair is (everything a user did up to event t, event t+1).  Intent is judged
by one-vs-rest AUC of "next event is a purchase / cart / favorite" over all
pairs; categories by whether the next event's category is in the top 20
(recall@20) and how high (MRR@20).  How far the intent probabilities can be
taken at face value (what a ranker or a threshold consuming them needs) is
the next type's log loss and the expected calibration error per type; AUC
ignores both.  Given a temperature fitted on other users
(:func:`fit_intent_temperature`), the model is also scored with its intent
scaled by it (``model_t``).

The tree peer (:mod:`models.tree_peer`), when given, is scored on the same
pairs.  With ~100 test users a split's figures move by a few points, so
:func:`summarize` reduces the reports of several user splits (one checkpoint
per split salt) to the mean and the worst split of every figure.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from models.baselines import category_rankings, counts_intent, markov_intent
from models.events import TYPE_INDEX, Event
from models.inference import ProfileModel
from models.metrics import auc, calibration_error, fit_temperature, log_loss, recall_mrr, temperature_scale
from models.tree_peer import TreePeer

AUC_TYPES = ("purchase", "cart", "favorite")
K = 20
METRICS = (*(f"auc_{t}" for t in AUC_TYPES), f"recall@{K}", f"mrr@{K}", "logloss", *(f"ece_{t}" for t in AUC_TYPES))
#: Metrics where lower is better (the worst split is the highest).
LOWER_IS_BETTER = frozenset({"logloss", *(f"ece_{t}" for t in AUC_TYPES)})


def _intent_metrics(intent: np.ndarray, next_types: np.ndarray) -> dict[str, float]:
    out = {f"auc_{t}": auc(intent[:, TYPE_INDEX[t]], next_types == TYPE_INDEX[t]) for t in AUC_TYPES}
    out["logloss"] = log_loss(intent, next_types)
    out.update({f"ece_{t}": calibration_error(intent[:, TYPE_INDEX[t]], next_types == TYPE_INDEX[t])
                for t in AUC_TYPES})
    return out


def _model_intent_pairs(model: ProfileModel, sequences: Sequence[Sequence[Event]]) -> tuple[np.ndarray, np.ndarray]:
    """The model's intent after every event but each user's last, and the type that came next."""
    sequences = [s for s in sequences if len(s) >= 2]
    outputs = model.sequence_outputs(sequences)
    intent = np.concatenate([out.intent[:-1] for out in outputs])
    return intent, np.array([TYPE_INDEX[e.type] for seq in sequences for e in seq[1:]])


def fit_intent_temperature(model: ProfileModel, sequences: Sequence[Sequence[Event]]) -> float:
    """The temperature that minimises the log loss of the model's next-type probabilities on ``sequences``
    (use users the figures are not computed on: the checkpoint's validation users)."""
    return fit_temperature(*_model_intent_pairs(model, sequences))


def _category_metrics(ranked: list[list[str]], next_cats: list[str]) -> dict[str, float]:
    recall, mrr = recall_mrr(ranked, next_cats, K)
    return {f"recall@{K}": recall, f"mrr@{K}": mrr}


def evaluate(model: ProfileModel, sequences: Sequence[Sequence[Event]], peer: TreePeer | None = None,
             progress: tqdm | None = None, temperature: float | None = None) -> dict[str, Any]:
    """Metrics of the model, every baseline and (if given) the tree peer:
    ``{"n_users", "n_pairs", "results": {name: {metric: value}}}``; with ``temperature``, also
    ``model_t`` (the model's intent scaled by it) and ``"temperature"``.

    ``progress`` counts the users, once through the model, then once through the baselines.
    """
    sequences = [s for s in sequences if len(s) >= 2]
    if progress is not None:
        progress.reset(total=len(sequences))
        progress.set_description("evaluate: model")
    outputs = model.sequence_outputs(sequences, progress)
    if progress is not None:
        progress.reset(total=len(sequences))
        progress.set_description("evaluate: baselines")
    params = model.config.baselines
    intents: dict[str, list[np.ndarray]] = {"model": [], "counts": [], "markov": []}
    ranked: dict[str, list[list[str]]] = {"model": [], "cat_recency": [], "cat_frequency": []}
    if peer is not None:
        intents["tree_peer"], ranked["tree_peer"] = [], []
    next_types, next_cats = [], []
    for seq, out in zip(sequences, outputs):
        next_types += [TYPE_INDEX[e.type] for e in seq[1:]]
        next_cats += [e.category_id for e in seq[1:]]
        intents["model"].append(out.intent[:-1])
        intents["counts"].append(counts_intent(seq, params)[:-1])
        intents["markov"].append(markov_intent(seq, params)[:-1])
        recency, frequency = category_rankings(seq[:-1], K)
        ranked["model"] += out.top_categories[:-1]
        ranked["cat_recency"] += recency
        ranked["cat_frequency"] += frequency
        if peer is not None:
            peer_intent, peer_ranked = peer.predict(seq, K)
            intents["tree_peer"].append(peer_intent[:-1])
            ranked["tree_peer"] += peer_ranked[:-1]
        if progress is not None:
            progress.update()
    types = np.array(next_types)
    if temperature is not None:
        intents["model_t"] = [temperature_scale(np.concatenate(intents["model"]), temperature)] if types.size else []
    results: dict[str, dict[str, float]] = {name: {} for name in dict.fromkeys([*intents, *ranked])}
    if len(types):
        for name, rows in intents.items():
            results[name].update(_intent_metrics(np.concatenate(rows), types))
        for name, lists in ranked.items():
            results[name].update(_category_metrics(lists, next_cats))
    report = {"n_users": len(sequences), "n_pairs": len(next_types), "results": results}
    if temperature is not None:
        report["temperature"] = temperature
    return report


def summarize(reports: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{"mean": {name: {metric}}, "worst": {...}}`` over the splits' reports (worst = lowest, or highest
    for :data:`LOWER_IS_BETTER`); a predictor or metric missing from a split is left out."""
    out: dict[str, dict[str, dict[str, float]]] = {"mean": {}, "worst": {}}
    for name in reports[0]["results"]:
        for m in METRICS:
            values = [r["results"].get(name, {}).get(m, math.nan) for r in reports]
            if any(math.isnan(v) for v in values):
                continue
            out["mean"].setdefault(name, {})[m] = float(np.mean(values))
            out["worst"].setdefault(name, {})[m] = float(max(values) if m in LOWER_IS_BETTER else min(values))
    return out


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width table, one row per predictor; "-" where a metric does not apply."""
    return _table(f"{report['n_pairs']} next-event pairs from {report['n_users']} users", report["results"])


def format_summary(reports: Sequence[dict[str, Any]]) -> str:
    """Every split's table, then the mean and the worst split of each figure."""
    summary = summarize(reports)
    parts = [format_table(r) if "split" not in r else f"split salt {r['split']}: " + format_table(r) for r in reports]
    parts += [_table(f"{which} over {len(reports)} splits", summary[which]) for which in ("mean", "worst")]
    return "\n\n".join(parts)


def _table(title: str, results: dict[str, dict[str, float]]) -> str:
    header = f"{'predictor':<14}" + "".join(f"{m:>13}" for m in METRICS)
    lines = [title, header, "-" * len(header)]
    for name, values in results.items():
        cells = []
        for m in METRICS:
            v = values.get(m)
            cells.append(f"{'-' if v is None or math.isnan(v) else f'{v:.4f}':>13}")
        lines.append(f"{name:<14}" + "".join(cells))
    return "\n".join(lines)
