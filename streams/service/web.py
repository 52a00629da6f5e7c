"""HTTP endpoints on the worker's faust web server (docs/http.md lists every route and its auth).

* ``/metrics``  -- Prometheus exposition of :class:`~streams.service.metrics.Metrics`.
* ``/healthz``  -- liveness: the event loop answers, batch processing has
  not failed and no events partition stayed stalled through a re-seek (a faust
  worker can stay up with its processing dead; the orchestrator must restart
  such a worker).  A failing answer names the reason.
* ``/readyz``   -- readiness: joined the group, table recovery finished, not
  rebalancing.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import aiohttp.web
import faust
from faust.web import Request, Response, View

from .metrics import Metrics


def _json(web: faust.web.Web, status: int, body: dict[str, Any]) -> Response:
    return web.bytes(json.dumps(body).encode(), content_type="application/json", status=status)


def readiness(app: faust.App) -> dict[str, Any]:
    """The facts readiness is decided on (also returned as the response body)."""
    recovery = app.tables.recovery
    return {
        "recovered": recovery.completed.is_set() and not recovery.in_recovery,
        "rebalancing": bool(app.rebalancing),
        "assigned_partitions": len(app.consumer.assignment()) if app.consumer is not None else 0,
    }


def is_ready(app: faust.App) -> bool:
    facts = readiness(app)
    return bool(facts["recovered"] and not facts["rebalancing"])


def register_views(app: faust.App, metrics: Metrics, failure: Callable[[], str | None]) -> None:
    """Serve the routes above; ``failure`` is why the worker is no longer alive (None: it is)."""
    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            body, content_type = metrics.render()
            # As a header: aiohttp refuses a charset inside ``content_type=``, and
            # Prometheus' content type carries one.
            return aiohttp.web.Response(body=body, headers={"Content-Type": content_type})

    @app.page("/healthz")
    class LivenessView(View):
        async def get(self, request: Request) -> Response:
            reason = failure()
            if reason is None:
                return _json(self, 200, {"alive": True})
            return _json(self, 503, {"alive": False, "reason": reason})

    @app.page("/readyz")
    class ReadinessView(View):
        async def get(self, request: Request) -> Response:
            ready = is_ready(app)
            metrics.set_ready(ready)
            return _json(self, 200 if ready else 503, {"ready": ready, **readiness(app)})
