"""`replay` writes the ground truth: one line per input event, in input order, = advance's outputs."""

from __future__ import annotations

import json

import numpy as np

from models.events import EVENT_TYPES, event_to_dict
from models.synthetic import funnel_events
from tests.unit.test_model import make_model
from tests.unit.test_train import run_cli


def test_replay_cli_lines_follow_input_order_and_match_advance(tmp_path) -> None:
    events = funnel_events(n_users=12, events_per_user=(1, 25), seed=11)
    model = make_model(tmp_path, events)
    data = tmp_path / "events.jsonl"
    data.write_text("".join(json.dumps(event_to_dict(e)) + "\n" for e in events))
    out = tmp_path / "preds.jsonl"
    assert run_cli("replay", "--model", str(tmp_path / "model0.pt"), "--data", str(data), "--format", "jsonl",
                   "--output", str(out), "--device", "cpu") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(events)

    states: dict[str, object] = {}
    for event, row in zip(events, rows):
        assert set(row) == {"user_id", "timestamp", "intent", "top_categories", "profile"}
        assert (row["user_id"], row["timestamp"]) == (event.user_id, event.timestamp_ms)
        assert list(row["intent"]) == list(EVENT_TYPES)
        assert all(isinstance(c, str) for c in row["top_categories"])
        result = model.advance([states.get(event.user_id)], [[event]])
        states[event.user_id] = result.states[0]
        assert np.abs(np.array(list(row["intent"].values())) - result.intent[0]).max() <= 1e-5
        assert np.abs(np.array(row["profile"]) - result.profile[0]).max() <= 1e-5
        assert row["top_categories"] == result.top_categories[0]
