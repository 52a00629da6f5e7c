"""train -> checkpoint -> evaluate, through the real CLI commands, on synthetic funnel data."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from models import ProfileModel
from models.cli import add_commands
from models.data import group_by_user, select_users, split_of
from models.evaluate import LOWER_IS_BETTER, METRICS, evaluate, fit_intent_temperature
from models.events import event_to_dict
from models.synthetic import funnel_events
from models.tree_peer import TreePeer, prefix_features


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained by the real `train` command on a JSONL funnel log."""
    root = tmp_path_factory.mktemp("train")
    data = root / "events.jsonl"
    events = funnel_events(n_users=60, events_per_user=(10, 40), seed=5)
    data.write_text("".join(json.dumps(event_to_dict(e)) + "\n" for e in events) + "{broken\n")
    ckpt = root / "tiny.pt"
    train_tiny(data, ckpt)
    return events, data, ckpt


def train_tiny(data, out, *extra: str) -> None:
    assert run_cli("train", "--data", str(data), "--format", "jsonl", "--out", str(out), "--epochs", "2",
                   "--hidden", "16", "--profile-dim", "8", "--cat-buckets", "64", "--val-frac", "0.2",
                   "--test-frac", "0.2", "--device", "cpu", *extra) == 0


def test_split_is_deterministic_and_disjoint() -> None:
    split = {"salt": "s", "val_frac": 0.2, "test_frac": 0.2}
    names = [split_of(f"user{i}", split) for i in range(2000)]
    assert names == [split_of(f"user{i}", split) for i in range(2000)]
    shares = {s: names.count(s) / len(names) for s in ("train", "val", "test")}
    assert abs(shares["test"] - 0.2) < 0.04 and abs(shares["val"] - 0.2) < 0.04


def test_train_writes_a_loadable_checkpoint_with_its_history(trained) -> None:
    _, _, ckpt = trained
    model = ProfileModel.load(ckpt, device="cpu")
    info = model.config.training
    assert info["format"] == "jsonl" and info["malformed_rows"] == 1
    assert 1 <= info["best_epoch"] <= info["epochs_run"] <= 2
    assert set(METRICS) <= set(info["history"][0])
    assert model.config.vocab and len(model.config.baselines["markov"]) == 5


def test_evaluate_reports_model_and_every_baseline(trained, capsys) -> None:
    events, data, ckpt = trained
    model = ProfileModel.load(ckpt, device="cpu")
    test_users = select_users(group_by_user(events), model.config.split, "test")
    peer = TreePeer.fit(list(select_users(group_by_user(events), model.config.split, "train").values()))
    report = evaluate(model, list(test_users.values()), peer)
    assert report["n_pairs"] == sum(len(s) - 1 for s in test_users.values())
    results = report["results"]
    assert set(results) == {"model", "counts", "markov", "cat_recency", "cat_frequency", "tree_peer"}
    for name in ("model", "counts", "markov", "tree_peer"):
        assert 0.0 <= results[name]["auc_cart"] <= 1.0
    for name in ("model", "cat_recency", "cat_frequency", "tree_peer"):
        assert 0.0 < results[name]["recall@20"] <= 1.0 and 0.0 < results[name]["mrr@20"] <= 1.0

    assert run_cli("evaluate", "--model", str(ckpt), "--data", str(data), "--format", "jsonl",
                   "--users", "test", "--json", "--device", "cpu") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["results"] == json.loads(json.dumps(results))
    assert printed["model"] == model.fingerprint
    assert run_cli("evaluate", "--model", str(ckpt), "--data", str(data), "--format", "jsonl") == 0
    table = capsys.readouterr().out
    assert "cat_recency" in table and "auc_purchase" in table


def test_evaluate_over_several_splits_reports_mean_and_worst(trained, tmp_path, capsys) -> None:
    """One checkpoint per split salt; each is scored on its own test users against a peer fit on its own
    training users, then the mean and worst split of every figure."""
    _, data, ckpt = trained
    other = tmp_path / "other_salt.pt"
    train_tiny(data, other, "--salt", "second")
    assert ProfileModel.load(other, device="cpu").config.split["salt"] == "second"
    capsys.readouterr()  # train's own line
    assert run_cli("evaluate", "--model", str(ckpt), "--model", str(other), "--data", str(data),
                   "--format", "jsonl", "--users", "test", "--json", "--device", "cpu") == 0
    printed = json.loads(capsys.readouterr().out)
    splits = printed["splits"]
    assert [s["split"] for s in splits] == ["profilestream", "second"]
    for name in ("model", "tree_peer", "counts", "cat_recency"):
        for metric, mean in printed["mean"][name].items():
            values = [s["results"][name][metric] for s in splits]
            worst = max(values) if metric in LOWER_IS_BETTER else min(values)
            assert mean == pytest.approx(sum(values) / 2) and printed["worst"][name][metric] == worst
    assert run_cli("evaluate", "--model", str(ckpt), "--model", str(other), "--data", str(data),
                   "--format", "jsonl", "--users", "test", "--device", "cpu", "--no-tree-peer") == 0
    table = capsys.readouterr().out
    assert "worst over 2 splits" in table and "tree_peer" not in table


def test_tree_peer_features_see_only_the_prefix() -> None:
    """Row t of a user's features must not change when later events arrive (no look-ahead)."""
    seq = [e for e in funnel_events(n_users=3, events_per_user=(30, 30), seed=2) if e.user_id == "u1"]
    full = prefix_features([seq])
    head = prefix_features([seq[:12]])
    assert np.array_equal(full.intent[:12], head.intent)
    keep = full.cand_rows < 12
    assert np.array_equal(full.cand[keep], head.cand) and np.array_equal(full.cand_rows[keep], head.cand_rows)
    # candidates are the user's own categories so far, at most 30 per prefix
    for row, name in zip(full.cand_rows, full.cand_names):
        assert name in {e.category_id for e in seq[:row + 1]}


def test_evaluate_calibrate_scores_the_model_scaled_by_a_temperature_from_validation_users(trained, capsys) -> None:
    events, data, ckpt = trained
    model = ProfileModel.load(ckpt, device="cpu")
    everyone = group_by_user(events)
    test_users = list(select_users(everyone, model.config.split, "test").values())
    same = evaluate(model, test_users, temperature=1.0)["results"]
    assert same["model_t"] == pytest.approx({m: same["model"][m] for m in same["model_t"]})
    assert set(same["model"]) >= {"logloss", "ece_cart"} and set(same["counts"]) >= {"logloss", "ece_cart"}

    assert run_cli("evaluate", "--model", str(ckpt), "--data", str(data), "--format", "jsonl", "--users", "test",
                   "--calibrate", "--no-tree-peer", "--json", "--device", "cpu") == 0
    printed = json.loads(capsys.readouterr().out)
    expected = fit_intent_temperature(model, list(select_users(everyone, model.config.split, "val").values()))
    assert printed["temperature"] == pytest.approx(expected) and expected != pytest.approx(1.0)
    scaled = printed["results"]["model_t"]
    assert scaled == pytest.approx(evaluate(model, test_users, temperature=expected)["results"]["model_t"])
    assert scaled["logloss"] != pytest.approx(printed["results"]["model"]["logloss"])
