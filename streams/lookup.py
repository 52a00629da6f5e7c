"""``GET /users/{user_id}/profile``: a user's current profile, straight from the state table.

The body is exactly a profile message (streams/schemas/profile.schema.json),
computed from the stored model state with ``ProfileModel.predict`` -- it
equals the last profile published for the user, with ``updated_at`` = now.

Routing: a user's state lives only on the worker that owns the user's table
partition.  Faust's assignor knows every worker's URL (``app.router.key_store``,
from the ``canonical_url`` each worker advertises), so any worker answers: a
non-owner forwards the request to the owner, *once* -- the forwarded request
carries :data:`FORWARDED_HEADER` and is answered where it lands.  (Faust's own
``@app.table_route`` forwards again from the receiving worker, so two workers
with different views of the assignment during a rebalance would bounce a
request between them; it also gives a bare 500 when the owner is down.)

Status codes: 200 profile; 404 unknown user; 401 missing/wrong bearer token
(only when ``PROFILESTREAM_LOOKUP_TOKEN`` is set); 503 while the worker
recovers or rebalances, or when the owner cannot be reached (retry); 500 for
state this model cannot read.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

import aiohttp
import faust
from faust.web import Request, Response, View
from yarl import URL

from models import ProfileModel

from . import state_record
from .publish import profile_message
from .settings import Settings
from .state_store import TableStateStore
from .web import readiness

log = logging.getLogger(__name__)

#: Marks a request already forwarded by another worker; it is never forwarded again.
FORWARDED_HEADER = "X-ProfileStream-Forwarded"
#: The URL of the worker that read the state (kept through forwarding): where a user lives.
SERVED_BY_HEADER = "X-ProfileStream-Served-By"
FORWARD_TIMEOUT_S = 5.0


def bearer_ok(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time compare)."""
    scheme, _, credentials = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())


def unauthorized(view: View, request: Request, token: str) -> Response | None:
    """The 401 answer when ``token`` is set and ``request`` does not carry it; None when it may pass.

    Shared by every route the token protects (lookups, /status).
    """
    if token and not bearer_ok(request.headers.get("Authorization"), token):
        return view.error(401, "unauthorized", headers={"WWW-Authenticate": 'Bearer realm="profilestream"'})
    return None


def current_profile(model: ProfileModel, user_id: str, stored: bytes) -> bytes:
    """The profile message of a stored state record, without advancing the state.

    Raises ``ValueError`` (StateRecordError, StateError) for state this model cannot read.
    """
    record = state_record.decode(stored)
    if record.fingerprint != model.fingerprint:
        raise state_record.StateRecordError(
            f"state was written by model {record.fingerprint}, this worker runs {model.fingerprint}")
    state = model.decode_state(record.model_state)
    result = model.predict([state])
    return profile_message(user_id, model.version, int(time.time() * 1000), state.n_events,
                           state.last_timestamp_ms, result.profile[0], result.intent[0],
                           result.top_categories[0])


def _same_node(a: URL, b: URL) -> bool:
    return (a.host, a.port) == (b.host, b.port)


def register_lookup(app: faust.App, store: TableStateStore, model: ProfileModel, settings: Settings) -> None:
    """Add the lookup view to the worker's web server."""
    token = settings.lookup_token
    table_name = store.table.name

    @app.page("/users/{user_id}/profile")
    class ProfileLookupView(View):
        async def get(self, request: Request, user_id: str) -> Response:
            denied = unauthorized(self, request, token)
            if denied is not None:
                return denied
            facts = readiness(app)
            if not facts["recovered"] or facts["rebalancing"]:
                return self.error(503, "not_ready", headers={"Retry-After": "1"}, **facts)
            if FORWARDED_HEADER not in request.headers:
                try:
                    owner = URL(app.router.key_store(table_name, user_id.encode()))
                except KeyError:  # no assignment known for the key's partition yet
                    return self.error(503, "owner_unknown", headers={"Retry-After": "1"})
                if not _same_node(owner, URL(str(app.conf.canonical_url))):
                    return await self._forward(request, owner)
            found = store.find(user_id.encode())
            if found is None:
                return self.error(404, "unknown_user", user_id=user_id)
            try:
                body = current_profile(model, user_id, found[1])
            except ValueError as exc:
                log.error("cannot read the stored state of user %r: %s", user_id, exc)
                return self.error(500, "unreadable_state", detail=str(exc))
            return self.bytes(body, content_type="application/json",
                              headers={SERVED_BY_HEADER: str(app.conf.canonical_url)})

        async def _forward(self, request: Request, owner: URL) -> Response:
            target = owner.with_path(request.rel_url.raw_path, encoded=True)
            headers = {FORWARDED_HEADER: str(app.conf.canonical_url)}
            if "Authorization" in request.headers:
                headers["Authorization"] = request.headers["Authorization"]
            try:
                async with app.http_client.get(
                        target, headers=headers, timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S)) as resp:
                    served_by = resp.headers.get(SERVED_BY_HEADER)
                    return self.bytes(await resp.read(), content_type=resp.content_type, status=resp.status,
                                      headers={SERVED_BY_HEADER: served_by} if served_by else None)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.warning("forwarding the profile lookup to %s failed: %r", owner, exc)
                return self.error(503, "owner_unreachable", headers={"Retry-After": "1"}, owner=str(owner))
