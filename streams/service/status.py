"""``GET /status``: one worker's state for operators, and its view of the whole group.

`profilestream status` (streams/ops/cluster_status.py) asks one worker, learns every
worker's URL from the ``workers`` field -- faust's assignor knows which worker
owns which table partition (``app.router.table_metadata``, the same map profile
lookups route by) -- and then asks each of them.  The figures are the ones the
worker exports on ``/metrics`` (lag per partition, events consumed) plus
readiness and faust's table-recovery count, as JSON, so the command needs no
Prometheus.  Protected by the lookup bearer token when one is set: the
``workers`` map tells where the service runs.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.web import Request, Response, View

from models.events import EVENT_TYPES

from .lookup import unauthorized
from .metrics import Metrics
from ..settings import Settings
from .web import is_ready, readiness


def _samples(metrics: Metrics, names: set[str]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The current value of every sample named in ``names``, keyed by name and labels (one collect)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in metrics.registry.collect() for s in family.samples if s.name in names}


def worker_status(app: faust.App, metrics: Metrics, settings: Settings, table_name: str) -> dict[str, Any]:
    """The body of ``/status``; every key is documented in docs/operations.md."""
    topic = settings.events_topic
    assignment = app.consumer.assignment() if app.consumer is not None else set()
    partitions = sorted(tp.partition for tp in assignment if tp.topic == topic)
    samples = _samples(metrics, {"profilestream_consumer_lag_offsets", "profilestream_consumer_lag_seconds",
                                 "profilestream_events_consumed_total"})

    def lag(name: str, partition: int) -> float | None:
        return samples.get((name, frozenset({("topic", topic), ("partition", str(partition))})))

    recovery = app.tables.recovery
    workers = {str(url): sorted(p for partitions_ in topics.values() for p in partitions_)
               for url, topics in app.router.table_metadata(table_name).items()}
    return {
        "url": str(app.conf.canonical_url),
        "ready": is_ready(app),
        **readiness(app),
        "events_topic": topic,
        "partitions": partitions,
        # None until the monitor's first sample after an assignment.
        "lag": {str(p): {"events": lag("profilestream_consumer_lag_offsets", p),
                         "seconds": lag("profilestream_consumer_lag_seconds", p)} for p in partitions},
        "recovery_remaining": {"active": recovery.active_remaining_total(),
                               "standby": recovery.standby_remaining_total()},
        "events_consumed_total": sum(samples.get(("profilestream_events_consumed_total",
                                                  frozenset({("type", kind)})), 0.0) for kind in EVENT_TYPES),
        "workers": workers,
    }


def register_status(app: faust.App, metrics: Metrics, settings: Settings, table_name: str) -> None:
    """Add ``/status`` to the worker's web server."""
    token = settings.lookup_token

    @app.page("/status")
    class StatusView(View):
        async def get(self, request: Request) -> Response:
            denied = unauthorized(self, request, token)
            if denied is not None:
                return denied
            return self.json(worker_status(app, metrics, settings, table_name))
