"""Checkpoints: weights-only loading, fingerprints, and clear errors for files that cannot be used."""

from __future__ import annotations

import json

import pytest
import torch

from models import CheckpointError, ProfileModel
from models.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from models.synthetic import funnel_events
from tests.unit.test_model import make_model


@pytest.fixture()
def saved(tmp_path):
    model = make_model(tmp_path, funnel_events(n_users=8))
    path = tmp_path / "model0.pt"
    return model, path


def test_round_trip_keeps_fingerprint_and_loads_weights_only(saved) -> None:
    model, path = saved
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"config_json", "state_dict", "fingerprint"}
    assert blob["fingerprint"] == model.fingerprint
    again = ProfileModel.load(path, device="cpu")
    assert again.fingerprint == model.fingerprint and again.version == "test"
    assert again.device == torch.device("cpu")


def test_fingerprint_changes_with_weights_and_config(saved, tmp_path) -> None:
    model, _ = saved
    weights = {k: v.clone() for k, v in model.net.state_dict().items()}
    weights["intent_head.bias"][0] += 1e-3
    assert save_checkpoint(tmp_path / "w.pt", model.config, weights) != model.fingerprint
    model.config.top_k = 7
    assert save_checkpoint(tmp_path / "c.pt", model.config, model.net.state_dict()) != model.fingerprint


def _rewrite(path, **changes) -> None:
    blob = torch.load(path, weights_only=True)
    blob.update(changes)
    torch.save(blob, path)


def test_clear_errors(saved, tmp_path) -> None:
    _, path = saved
    with pytest.raises(CheckpointError, match="does not exist"):
        ProfileModel.load(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        ProfileModel.load(junk)

    blob = torch.load(path, weights_only=True)
    tampered = dict(blob["state_dict"])
    tampered["h0"] = tampered["h0"] + 1
    _rewrite(path, state_dict=tampered)
    with pytest.raises(CheckpointError, match="corrupt: fingerprint"):
        ProfileModel.load(path)

    config = json.loads(blob["config_json"])
    _rewrite(path, config_json=json.dumps({**config, "format": CHECKPOINT_FORMAT + 1}))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(path)
    _rewrite(path, config_json=json.dumps({**config, "dense_features": ["log_gap"]}))
    with pytest.raises(CheckpointError, match="dense_features"):
        load_checkpoint(path)

    wrong = {**config, "dims": {**config["dims"], "hidden": config["dims"]["hidden"] + 1}}
    wrong_json = json.dumps(wrong)
    from models.checkpoint import fingerprint
    torch.save({"config_json": wrong_json, "state_dict": blob["state_dict"],
                "fingerprint": fingerprint(wrong_json, blob["state_dict"])}, path)
    with pytest.raises(CheckpointError, match="does not match its config"):
        ProfileModel.load(path)
