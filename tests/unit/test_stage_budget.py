"""`python -m streams.dev.stage_budget`: the per-stage cost of small batches, the processor alone."""

from __future__ import annotations

import asyncio

from streams.dev.stage_budget import main, measure
from streams.pipeline.stages import STAGES


def test_every_stage_is_timed_and_the_two_paths_differ_where_they_should() -> None:
    n, cached = asyncio.run(measure(batch=20, users=300, events=2000, write_through=False, threaded=False))
    _, before = asyncio.run(measure(batch=20, users=300, events=2000, write_through=True, threaded=True))
    assert n == 50 and set(cached) == set(STAGES) == set(before)
    for stages in (cached, before):
        assert all(stages[s] > 0 for s in ("prepare", "lookup", "admission", "featurise", "model_step", "heads",
                                           "state", "profiles", "metrics"))
    assert cached["flush"] > 0 and before["flush"] == 0  # write-through writes in "state", per batch
    # The inline step has no hand-off to the model thread and back.
    assert cached["model_thread"] < before["model_thread"]


def test_the_command_prints_the_budget_line(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--events", "400", "--users", "50"]) == 0
    out = capsys.readouterr().out
    assert "write-behind cache, model step inline" in out and "all but the model step:" in out
