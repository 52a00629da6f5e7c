"""The model half of ProfileStream: events in, per-user LSTM state and profile/intent out.

Plain torch + numpy; knows nothing of Kafka.  The stream uses:

    from models import ProfileModel, UserState, StepResult, CheckpointError, StateError, default_checkpoint_path

The names are imported on first use (PEP 562), so ``models.events`` -- the event
contract the producer client validates with -- loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "ProfileModel": "models.inference",
    "StepResult": "models.inference",
    "default_checkpoint_path": "models.inference",
    "UserState": "models.state",
    "StateError": "models.state",
    "CheckpointError": "models.checkpoint",
}

__all__ = ["ProfileModel", "UserState", "StepResult", "CheckpointError", "StateError", "default_checkpoint_path"]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
