"""Write the model's outputs after every input event as JSON lines (the ground truth).

One line per input event, in input order: ``{"user_id", "timestamp", "intent":
{type: prob}, "top_categories": [ids], "profile": [floats]}`` -- exactly what
the stream must publish for that event.  Floats are rounded to 7 decimals
(error < 1e-7, far inside the 1e-5 the stream is held to) to keep files small.
"""

from __future__ import annotations

import json
from typing import Iterable, TextIO

from tqdm import tqdm

from models.events import Event
from models.inference import ProfileModel

_DIGITS = 7


def write_replay(model: ProfileModel, events: Iterable[Event], out: TextIO, progress: bool = True) -> int:
    """Replay ``events`` through ``model`` into ``out``; returns the number of lines written."""
    events = list(events)
    n = 0
    rows = model.replay(events)
    for event, intent, top, profile in tqdm(rows, total=len(events), unit="event", disable=not progress):
        out.write(json.dumps({
            "user_id": event.user_id,
            "timestamp": event.timestamp_ms,
            "intent": {k: round(v, _DIGITS) for k, v in intent.items()},
            "top_categories": top,
            "profile": [round(x, _DIGITS) for x in profile],
        }, separators=(",", ":")) + "\n")
        n += 1
    return n
