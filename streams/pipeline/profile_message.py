"""The profile message: the JSON value the worker publishes for a user, and the lookup serves.

Kept apart from the Kafka publisher so the pipeline, the lookup view and the
tests build the same bytes without a Kafka client.
"""

from __future__ import annotations

import numpy as np
import orjson

from models.events import EVENT_TYPES

#: Version of the profile message schema (streams/schemas/profile.schema.json).
PROFILE_SCHEMA_VERSION = 1


def profile_message(
    user_id: str, model_version: str, updated_at_ms: int, event_count: int,
    last_event_timestamp_ms: int, profile: np.ndarray, intent: np.ndarray, top_categories: list[str],
) -> bytes:
    """The JSON value of one profile message (schema: streams/schemas/profile.schema.json).

    orjson writes the float32 vector with float32's shortest round-trip digits:
    faster and smaller than ``json.dumps(profile.tolist())`` (docs/performance.md),
    and a reader parsing it back to float32 gets exactly the model's values.
    """
    return orjson.dumps({
        "user_id": user_id,
        "model_version": model_version,
        "schema_version": PROFILE_SCHEMA_VERSION,
        "updated_at": updated_at_ms,
        "event_count": event_count,
        "last_event_timestamp": last_event_timestamp_ms,
        "profile": np.ascontiguousarray(profile, dtype=np.float32),
        "intent": dict(zip(EVENT_TYPES, intent.tolist())),
        "top_categories": top_categories,
    }, option=orjson.OPT_SERIALIZE_NUMPY)
