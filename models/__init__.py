"""The model half of ProfileStream: events in, per-user LSTM state and profile/intent out.

Plain torch + numpy; knows nothing of Kafka.  The stream uses:

    from models import ProfileModel, UserState, StepResult, CheckpointError, StateError, default_checkpoint_path
"""

from models.checkpoint import CheckpointError
from models.inference import ProfileModel, StepResult, default_checkpoint_path
from models.state import StateError, UserState

__all__ = ["ProfileModel", "UserState", "StepResult", "CheckpointError", "StateError", "default_checkpoint_path"]
