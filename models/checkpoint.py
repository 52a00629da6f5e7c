"""Checkpoint file = weights + the JSON config that gives them meaning + a fingerprint.

One ``.pt`` file holds ``{"config_json": str, "state_dict": {...}, "fingerprint": str}``
and loads with ``torch.load(weights_only=True)`` (no pickled code runs).  The
config carries everything needed to rebuild the exact input pipeline: sizes,
the hashing scheme, the event types and feature lists (a checkpoint for other
features refuses to load instead of producing nonsense), the category
vocabulary, the user split and the baselines fitted on the training users.

The fingerprint is a hash of the config and the weights: stream state records
it, so state written by one model is never fed to another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from models.events import EVENT_TYPES
from models.features import CANDIDATE_FEATURES, DENSE_FEATURES, HASH_SCHEME, WIDE_FEATURES
from models.model import Dims

#: Bump when the meaning of a checkpoint changes incompatibly.
CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, corrupt, or made for other code."""


@dataclass
class ModelConfig:
    """Everything besides the weights that a checkpoint needs to mean the same thing everywhere."""

    dims: Dims = field(default_factory=Dims)
    item_capacity: int = 16
    top_k: int = 20
    vocab: list[str] = field(default_factory=list)   # global candidate categories, most frequent first
    version: str = "untrained"
    format: int = CHECKPOINT_FORMAT
    hash_scheme: str = HASH_SCHEME
    event_types: list[str] = field(default_factory=lambda: list(EVENT_TYPES))
    dense_features: list[str] = field(default_factory=lambda: list(DENSE_FEATURES))
    candidate_features: list[str] = field(default_factory=lambda: list(CANDIDATE_FEATURES))
    wide_features: list[str] = field(default_factory=lambda: list(WIDE_FEATURES))
    split: dict[str, Any] = field(default_factory=dict)       # how train/val/test users were chosen
    baselines: dict[str, Any] = field(default_factory=dict)   # type prior and Markov matrix (training users)
    training: dict[str, Any] = field(default_factory=dict)    # command, data, epochs, validation metrics

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        raw = json.loads(text)
        if raw.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint format {raw.get('format')!r} is not the format "
                                  f"{CHECKPOINT_FORMAT} this code reads; retrain or upgrade")
        raw["dims"] = Dims(**raw["dims"])
        return cls(**raw)

    def check_compatible(self) -> None:
        """Raise :class:`CheckpointError` unless this code computes the inputs the checkpoint expects."""
        expected = {"format": CHECKPOINT_FORMAT, "hash_scheme": HASH_SCHEME, "event_types": list(EVENT_TYPES),
                    "dense_features": list(DENSE_FEATURES), "candidate_features": list(CANDIDATE_FEATURES),
                    "wide_features": list(WIDE_FEATURES)}
        for name, want in expected.items():
            have = getattr(self, name)
            if have != want:
                raise CheckpointError(f"checkpoint {name} is {have!r}, this code needs {want!r}; "
                                      "retrain with `profilestream train` or use a matching version")


def fingerprint(config_json: str, state_dict: dict[str, torch.Tensor]) -> str:
    """16 hex chars that change whenever the config or any weight changes."""
    digest = hashlib.sha256(config_json.encode())
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(path: str | os.PathLike[str], config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """Write the checkpoint; returns its fingerprint."""
    config_json = config.to_json()
    weights = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    fp = fingerprint(config_json, weights)
    torch.save({"config_json": config_json, "state_dict": weights, "fingerprint": fp}, path)
    return fp


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """Read and verify a checkpoint: (config, CPU state_dict, fingerprint)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for garbage input
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is not a readable torch file: {err}") from err
    if not isinstance(blob, dict) or not {"config_json", "state_dict", "fingerprint"} <= blob.keys():
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} lacks config_json/state_dict/fingerprint")
    try:
        config = ModelConfig.from_json(blob["config_json"])
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} has an unreadable config: {err}") from err
    config.check_compatible()
    actual = fingerprint(blob["config_json"], blob["state_dict"])
    if actual != blob["fingerprint"]:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is corrupt: fingerprint {blob['fingerprint']} "
                              f"recorded, {actual} computed")
    return config, blob["state_dict"], actual
