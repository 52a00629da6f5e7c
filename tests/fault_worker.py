"""``profilestream worker`` whose model step fails for chosen events: fault injection for tests.

The real ``ProfileModel.prepare_advance`` (featurisation, the first record-dependent
stage after validation) is wrapped to raise for the event ids in
``PROFILESTREAM_TEST_FAIL_EVENTS`` (comma separated) -- an exception the validator
cannot foresee, caused by one record, deep in the pipeline.  Everything else is
the real worker: broker, RocksDB, model.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from models import ProfileModel, StepResult, UserState
from models.events import Event
from streams.cli import main

FAIL_EVENTS = frozenset(os.environ.get("PROFILESTREAM_TEST_FAIL_EVENTS", "").split(","))
_real_prepare_advance = ProfileModel.prepare_advance


def prepare_advance(self: ProfileModel, states: Sequence[UserState | None],
                    events: Sequence[Sequence[Event]]) -> Callable[[], StepResult]:
    for user_events in events:
        for event in user_events:
            if event.event_id in FAIL_EVENTS:
                raise ValueError(f"injected failure for event {event.event_id}")
    return _real_prepare_advance(self, states, events)


ProfileModel.prepare_advance = prepare_advance  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
