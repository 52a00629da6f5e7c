"""Profile lookups on the worker's web server, straight from the state table.

* ``GET /users/{user_id}/profile`` -- one user: the body is exactly a profile
  message (streams/schemas/profile.schema.json) computed from the stored
  model state with ``ProfileModel.predict``; it equals the last profile
  published for the user, with ``updated_at`` = now.
* ``POST /users/profiles`` with ``{"user_ids": [...]}`` -- many users in one
  request, answered together, each marked ``found`` / ``not_found`` /
  ``unavailable`` (retry) / ``error``.

docs/http.md documents both (statuses, bodies, auth, ``age_ms``).

Routing: a user's state lives only on the worker that owns the user's table
partition.  Faust's assignor knows every current group member's URL
(``app.router``, from the ``canonical_url`` each member advertises), so any
worker answers: a non-owner forwards the users it does not own to their
owners, *once*, as one batch per owner, and only to a URL of the current
assignment.  A forwarded request carries :data:`FORWARDED_HEADER`: a
timestamp and an HMAC of the request keyed from the lookup token, so a
client cannot forge it (without a token there is nothing to protect and no
HMAC).  The receiver answers only for users it owns in its own view of the
assignment and marks the others ``unavailable`` -- it never forwards again
(two workers with different views during a rebalance would bounce requests)
and never answers ``not_found`` for a user it does not own, so even a forged
header cannot produce a wrong answer.

Load: at most ``PROFILESTREAM_LOOKUP_MAX_CONCURRENT`` lookup requests run at
once; more get 503 with ``Retry-After`` at once.  State decoding and the
model call run on a lookup thread of their own, off the event loop, so
lookups neither block batch processing nor queue behind its model step.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import aiohttp
import faust
import orjson
from faust.web import Request, Response, View
from yarl import URL

from models import ProfileModel, UserState

from ..pipeline.profile_message import profile_message
from ..settings import Settings
from ..state import codec as state_codec
from ..state.cache import StateCache
from ..state.store import TableStateStore
from .metrics import Metrics
from .web import readiness

log = logging.getLogger(__name__)

#: Marks (and authenticates) a request forwarded by another worker: "<unix seconds> <hmac hex>".
FORWARDED_HEADER = "X-ProfileStream-Forwarded"
#: The URL of the worker that read the state (single-user route): where a user lives.
SERVED_BY_HEADER = "X-ProfileStream-Served-By"
#: Milliseconds between the user's newest applied event and the answer (single-user route).
AGE_HEADER = "X-ProfileStream-Age-Ms"
FORWARD_TIMEOUT_S = 5.0
#: How far a forwarded request's timestamp may be from the receiver's clock (replay window).
FORWARD_MAX_SKEW_S = 30
#: Seconds a client should wait before retrying an ``unavailable`` user or a 503.
RETRY_AFTER_S = 1
BATCH_ROUTE = "/users/profiles"

FOUND, NOT_FOUND, UNAVAILABLE, ERROR = "found", "not_found", "unavailable", "error"


def bearer_ok(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time compare)."""
    scheme, _, credentials = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())


def forwarding_key(token: str) -> bytes:
    """The HMAC key of forwarded requests: derived from the token, so the token itself never travels."""
    return hmac.new(token.encode(), b"profilestream forwarded lookup", hashlib.sha256).digest()


def forward_signature(key: bytes, timestamp: int, path: str, body: bytes) -> str:
    message = b"\n".join([str(timestamp).encode(), path.encode(), hashlib.sha256(body).hexdigest().encode()])
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def forwarded_header(key: bytes | None, path: str, body: bytes, now: float | None = None) -> str:
    timestamp = int(time.time() if now is None else now)
    return f"{timestamp} {forward_signature(key, timestamp, path, body) if key else '-'}"


def forwarded_header_ok(value: str, key: bytes | None, path: str, body: bytes, now: float | None = None) -> bool:
    """Whether a :data:`FORWARDED_HEADER` value is fresh and signed with ``key`` (any value without a key)."""
    if key is None:
        return True
    stamp, _, signature = value.partition(" ")
    try:
        timestamp = int(stamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - timestamp) > FORWARD_MAX_SKEW_S:
        return False
    return hmac.compare_digest(signature.encode(), forward_signature(key, timestamp, path, body).encode())


def unauthorized(view: View, request: Request, token: str) -> Response | None:
    """The 401 answer when ``token`` is set and ``request`` does not carry it; None when it may pass.

    Shared by every route the token protects (lookups, /status).
    """
    if token and not bearer_ok(request.headers.get("Authorization"), token):
        return view.error(401, "unauthorized", headers={"WWW-Authenticate": 'Bearer realm="profilestream"'})
    return None


def current_profile(model: ProfileModel, user_id: str, stored: bytes | UserState) -> tuple[bytes, int]:
    """The profile message of a stored state record (or a cached, decoded state), without
    advancing the state, and its age (ms from the user's newest applied event to now).

    Raises ``ValueError`` (StateRecordError, StateError) for state this model cannot read.
    """
    return current_profiles(model, [user_id], [stored])[0]


def current_profiles(model: ProfileModel, user_ids: Sequence[str],
                     stored: Sequence[bytes | UserState]) -> list[tuple[bytes, int]]:
    """Profile messages and ages of many users, with one model call; see :func:`current_profile`."""
    states = []
    for user_id, value in zip(user_ids, stored):
        if isinstance(value, UserState):
            states.append(value)
            continue
        record = state_codec.decode(value)
        if record.fingerprint != model.fingerprint:
            raise state_codec.StateRecordError(
                f"state of {user_id!r} was written by model {record.fingerprint}, this worker runs {model.fingerprint}")
        states.append(model.decode_state(record.model_state))
    result = model.predict(states)
    now_ms = int(time.time() * 1000)
    return [(profile_message(user_id, model.version, now_ms, state.n_events, state.last_timestamp_ms,
                             result.profile[i], result.intent[i], result.top_categories[i]),
             max(0, now_ms - state.last_timestamp_ms))
            for i, (user_id, state) in enumerate(zip(user_ids, states))]


@dataclass
class UserResult:
    """The answer for one user; ``profile`` is the profile message's JSON (found only)."""

    status: str
    reason: str = ""
    profile: bytes = b""
    age_ms: int = 0
    served_by: str = ""

    def as_json(self, user_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {"user_id": user_id, "status": self.status}
        if self.status == FOUND:
            out.update(age_ms=self.age_ms, served_by=self.served_by, profile=orjson.Fragment(self.profile))
        elif self.status == UNAVAILABLE:
            out.update(reason=self.reason, retry_after=RETRY_AFTER_S)
        elif self.status == ERROR:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> "UserResult":
        status = item.get("status")
        if status == FOUND:
            return cls(FOUND, profile=orjson.dumps(item["profile"]), age_ms=int(item["age_ms"]),
                       served_by=str(item["served_by"]))
        if status in (NOT_FOUND, UNAVAILABLE, ERROR):
            return cls(status, reason=str(item.get("reason", "")))
        return cls(ERROR, reason=f"owner answered an unknown status {status!r}")


class LookupGate:
    """Bounded concurrency without a queue: a request over the limit is refused at once (503)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1


class Lookups:
    """Resolves users to owners, reads local states, forwards the rest (shared by both routes)."""

    def __init__(self, app: faust.App, store: TableStateStore, cache: StateCache, model: ProfileModel,
                 settings: Settings) -> None:
        self.app = app
        self.store = store
        #: Newer than RocksDB for users changed since the last commit (streams/state/cache.py).
        self.cache = cache
        self.model = model
        self.key = forwarding_key(settings.lookup_token) if settings.lookup_token else None
        self.batch_max = settings.lookup_batch_max
        self.gate = LookupGate(settings.lookup_max_concurrent)
        # One thread, niced: lookups never take more than one core, and where the CPU is
        # short, the scheduler runs batch processing first (docs/http.md, "Load").
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="lookup-model", initializer=_lower_priority)

    @property
    def url(self) -> str:
        return str(self.app.conf.canonical_url)

    def owners(self, user_ids: Sequence[str]) -> tuple[dict[str, list[str]], dict[str, UserResult]]:
        """Users grouped by the URL of the group member owning them; users with no known owner, answered."""
        topic = self.store.table.changelog_topic.get_topic_name()
        members = set(self.app.router.tables_metadata())
        by_owner: dict[str, list[str]] = {}
        unowned: dict[str, UserResult] = {}
        for user_id in user_ids:
            try:
                owner = str(self.app.router.key_store(self.store.table.name, user_id.encode()))
            except (KeyError, TypeError):  # no assignment known for the key's partition (or the topic) yet
                owner = ""
            if owner not in members:
                log.debug("no current group member owns %r's partition of %s", user_id, topic)
                unowned[user_id] = UserResult(UNAVAILABLE, "owner_unknown")
                continue
            by_owner.setdefault(owner, []).append(user_id)
        return by_owner, unowned

    async def resolve(self, user_ids: Sequence[str], forwarded: bool) -> dict[str, UserResult]:
        """Each distinct user's result; a forwarded request is answered only for users owned here."""
        by_owner, results = self.owners(list(dict.fromkeys(user_ids)))
        here = self.url
        remote = {owner: ids for owner, ids in by_owner.items() if not _same_node(URL(owner), URL(here))}
        local = [u for owner, ids in by_owner.items() if owner not in remote for u in ids]
        if forwarded:
            results.update({u: UserResult(UNAVAILABLE, "not_owner") for ids in remote.values() for u in ids})
            remote = {}
        answers = await asyncio.gather(self.read_local(local),
                                       *(self.forward(owner, ids) for owner, ids in remote.items()))
        for answer in answers:
            results.update(answer)
        return results

    async def read_local(self, user_ids: list[str]) -> dict[str, UserResult]:
        if not user_ids:
            return {}
        topic = self.store.table.changelog_topic.get_topic_name()
        by_partition: dict[int, list[str]] = {}
        for user_id in user_ids:
            by_partition.setdefault(self.app.producer.key_partition(topic, user_id.encode()).partition,
                                    []).append(user_id)
        found_ids: list[str] = []
        found_values: list[bytes | UserState] = []
        results: dict[str, UserResult] = {}
        for partition, ids in by_partition.items():
            values: list[bytes | UserState | None] = []
            uncached: list[int] = []
            for i, user_id in enumerate(ids):
                # A peek: lookups neither load states into the cache nor keep them there.
                cached, entry = self.cache.peek(partition, user_id.encode())
                values.append(None if entry is None else entry.state)
                if not cached:
                    uncached.append(i)
            for i, value in zip(uncached, self.store.get_many(partition, [ids[i].encode() for i in uncached])):
                values[i] = value
            for user_id, value in zip(ids, values):
                if value is None:
                    results[user_id] = UserResult(NOT_FOUND)
                else:
                    found_ids.append(user_id)
                    found_values.append(value)
        if found_ids:
            loop = asyncio.get_running_loop()
            answers: list[tuple[bytes, int] | UserResult]
            try:
                answers = list(await loop.run_in_executor(self.model_thread, current_profiles, self.model,
                                                          found_ids, found_values))
            except ValueError:  # one unreadable state: read each alone, so the others are still answered
                answers = [await loop.run_in_executor(self.model_thread, self._one, u, v)
                           for u, v in zip(found_ids, found_values)]
            for user_id, answer in zip(found_ids, answers):
                results[user_id] = (answer if isinstance(answer, UserResult) else
                                    UserResult(FOUND, profile=answer[0], age_ms=answer[1], served_by=self.url))
        return results

    def _one(self, user_id: str, stored: bytes | UserState) -> tuple[bytes, int] | UserResult:
        try:
            return current_profile(self.model, user_id, stored)
        except ValueError as exc:
            log.error("cannot read the stored state of user %r: %s", user_id, exc)
            return UserResult(ERROR, f"unreadable_state: {exc}")

    async def forward(self, owner: str, user_ids: list[str]) -> dict[str, UserResult]:
        """One forwarded batch to ``owner``; every user is ``unavailable`` if it cannot be reached."""
        body = orjson.dumps({"user_ids": user_ids})
        headers = {FORWARDED_HEADER: forwarded_header(self.key, BATCH_ROUTE, body),
                   "Content-Type": "application/json"}
        try:
            async with self.app.http_client.post(URL(owner).with_path(BATCH_ROUTE), data=body, headers=headers,
                                                 timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S)) as resp:
                payload = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("forwarding %d profile lookups to %s failed: %r", len(user_ids), owner, exc)
            return {u: UserResult(UNAVAILABLE, "owner_unreachable") for u in user_ids}
        try:
            if status == 200:
                answered = {item["user_id"]: UserResult.from_json(item) for item in orjson.loads(payload)["results"]}
                return {u: answered.get(u, UserResult(ERROR, "owner_left_out_the_user")) for u in user_ids}
            if status == 503:
                reason = orjson.loads(payload).get("error", "unavailable")
                return {u: UserResult(UNAVAILABLE, f"owner_{reason}") for u in user_ids}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not the body this route sends
            log.error("owner %s answered %d forwarded profile lookups with an unreadable body: %r", owner,
                      len(user_ids), exc)
            return {u: UserResult(ERROR, "owner_answer_unreadable") for u in user_ids}
        # 401 here means the workers do not share one lookup token: an operator's mistake, said loudly.
        log.error("owner %s refused %d forwarded profile lookups with HTTP %d: %s", owner, len(user_ids), status,
                  payload[:200])
        return {u: UserResult(ERROR, f"owner_http_{status}") for u in user_ids}


#: Niceness added to the lookup thread (Linux schedules threads one by one).
LOOKUP_THREAD_NICENESS = 10


def _lower_priority() -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOOKUP_THREAD_NICENESS)


def _same_node(a: URL, b: URL) -> bool:
    return (a.host, a.port) == (b.host, b.port)


class BadLookupRequest(ValueError):
    """A batch request body this route cannot answer; the message is the 400's detail."""


def parse_user_ids(body: bytes, limit: int) -> list[str]:
    """The ``user_ids`` of a batch request: 1 to ``limit`` non-empty strings."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadLookupRequest(f"the body is not JSON: {exc}") from None
    user_ids = parsed.get("user_ids") if isinstance(parsed, dict) else None
    if not isinstance(user_ids, list) or not all(isinstance(u, str) and u for u in user_ids):
        raise BadLookupRequest('the body must be {"user_ids": [non-empty strings]}')
    if not user_ids or len(user_ids) > limit:
        raise BadLookupRequest(f"{len(user_ids)} user ids; send 1 to {limit} per request")
    return user_ids


def register_lookup(app: faust.App, store: TableStateStore, cache: StateCache, model: ProfileModel,
                    settings: Settings, metrics: Metrics) -> Lookups:
    """Add the lookup routes to the worker's web server."""
    lookups = Lookups(app, store, cache, model, settings)
    token = settings.lookup_token

    def admit(view: View, request: Request, body: bytes) -> tuple[Response | None, bool]:
        """(a refusal, or None to go on; whether the request was forwarded by another worker)."""
        forwarded = request.headers.get(FORWARDED_HEADER)
        if forwarded is not None:
            if not forwarded_header_ok(forwarded, lookups.key, request.rel_url.raw_path, body):
                return view.error(401, "bad_forwarded_signature"), True
        elif (denied := unauthorized(view, request, token)) is not None:
            return denied, False
        facts = readiness(app)
        if not facts["recovered"] or facts["rebalancing"]:
            return view.error(503, "not_ready", headers={"Retry-After": str(RETRY_AFTER_S)}, **facts), False
        return None, forwarded is not None

    async def measured(endpoint: str, view: View, answer: Any) -> Response:
        """``answer()``'s response within the concurrency bound (503 beyond it), counted and timed."""
        t0 = time.perf_counter()
        if not lookups.gate.try_enter():
            response = view.error(503, "busy", headers={"Retry-After": str(RETRY_AFTER_S)})
        else:
            try:
                response = await answer()
            finally:
                lookups.gate.leave()
        metrics.observe_lookup(endpoint, response.status, time.perf_counter() - t0)
        return response

    @app.page("/users/{user_id}/profile")
    class ProfileLookupView(View):
        async def get(self, request: Request, user_id: str) -> Response:
            return await measured("profile", self, lambda: self.answer(request, user_id))

        async def answer(self, request: Request, user_id: str) -> Response:
            refused, forwarded = admit(self, request, b"")
            if refused is not None:
                return refused
            result = (await lookups.resolve([user_id], forwarded))[user_id]
            if result.status == FOUND:
                return self.bytes(result.profile, content_type="application/json",
                                  headers={SERVED_BY_HEADER: result.served_by, AGE_HEADER: str(result.age_ms)})
            if result.status == NOT_FOUND:
                return self.error(404, "unknown_user", user_id=user_id)
            if result.status == UNAVAILABLE:
                return self.error(503, result.reason, headers={"Retry-After": str(RETRY_AFTER_S)})
            return self.error(500, "unreadable_state" if result.reason.startswith("unreadable_state")
                              else "lookup_failed", detail=result.reason)

    @app.page(BATCH_ROUTE)
    class ProfilesLookupView(View):
        async def post(self, request: Request) -> Response:
            return await measured("profiles", self, lambda: self.answer(request))

        async def answer(self, request: Request) -> Response:
            body = await request.read()
            refused, forwarded = admit(self, request, body)
            if refused is not None:
                return refused
            try:
                user_ids = parse_user_ids(body, lookups.batch_max)
            except BadLookupRequest as exc:
                return self.error(400, "bad_request", detail=str(exc))
            results = await lookups.resolve(user_ids, forwarded)
            payload = orjson.dumps({"results": [results[u].as_json(u) for u in user_ids]})
            return self.bytes(payload, content_type="application/json")

    return lookups
