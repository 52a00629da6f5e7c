"""Profile lookup client for rankers: sync (standard library) and asyncio (aiohttp).

It needs neither torch nor faust: a ranker imports this module, the
standard library and aiohttp (for :class:`AsyncLookupClient` only), nothing
else of the worker (tests/integration/test_lookup.py checks it).

Both clients know every worker (a list of base URLs: any worker answers any
user, forwarding to the owner), spread requests over them, move on to the
next one when a connection fails, and retry 503 answers and ``unavailable``
users after the ``Retry-After`` the worker sent.  The worker's routes and
result statuses are documented in docs/http.md.

    client = LookupClient(["http://profilestream-0.profilestream-headless:6066"], token=token)
    results = client.get_many(["u1", "u2"])          # user id -> ProfileResult
    profile = client.get("u1")                       # profile dict, or None for an unknown user
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Generator, Iterator, Mapping, Sequence
from urllib.parse import quote

#: Per-user statuses of ``POST /users/profiles`` (docs/http.md).
FOUND, NOT_FOUND, UNAVAILABLE, ERROR = "found", "not_found", "unavailable", "error"
BATCH_PATH = "/users/profiles"
#: A worker's default batch bound (PROFILESTREAM_LOOKUP_BATCH_MAX); larger requests are split.
DEFAULT_BATCH_SIZE = 1000


class LookupClientError(RuntimeError):
    """A lookup that retrying cannot fix (bad token, bad request) or that ran out of attempts."""


@dataclass(frozen=True)
class ProfileResult:
    """One user's answer: ``profile`` (a profile message as a dict) is set when ``status`` is found.

    ``age_ms``: milliseconds between the user's newest applied event and the
    answer -- how old the newest behaviour the profile reflects is.
    """

    user_id: str
    status: str
    profile: dict[str, Any] | None = None
    age_ms: int | None = None
    reason: str = ""

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> "ProfileResult":
        return cls(item["user_id"], item["status"], item.get("profile"), item.get("age_ms"),
                   item.get("reason", ""))


@dataclass(frozen=True)
class Reply:
    """What one HTTP exchange gave: a status and body, or a connection failure (status 0)."""

    status: int
    body: bytes = b""
    retry_after: float = 0.0
    failure: str = ""


class _Policy:
    """What both clients share: where to send each attempt, and what a reply means."""

    def __init__(self, urls: Sequence[str], token: str | None, timeout: float, attempts: int,
                 max_retry_after: float, batch_size: int) -> None:
        if not urls:
            raise ValueError("give the lookup client at least one worker URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout
        self.attempts = attempts
        self.max_retry_after = max_retry_after
        self.batch_size = batch_size
        self._next = itertools.count()

    def __repr__(self) -> str:  # never the token
        return f"{type(self).__name__}(urls={self.urls!r})"

    def targets(self) -> Iterator[str]:
        """Base URLs for successive attempts, starting at a rotating worker to spread load."""
        start = next(self._next)
        for i in range(self.attempts):
            yield self.urls[(start + i) % len(self.urls)]

    def pause(self, reply: Reply) -> float:
        """Seconds to wait before the next attempt after ``reply``: none after a refused connection
        while other workers remain to try, else the worker's Retry-After (capped)."""
        if reply.status == 0 and len(self.urls) > 1:
            return 0.0
        return float(min(self.max_retry_after, reply.retry_after or 0.5))

    @staticmethod
    def retry_after(header: str | None) -> float:
        try:
            return max(0.0, float(header)) if header else 0.0
        except ValueError:
            return 0.0

    def single_result(self, user_id: str, reply: Reply) -> ProfileResult | None:
        """The answer to ``GET /users/{id}/profile``, or None to try again."""
        if reply.status == 200:
            profile = json.loads(reply.body)
            return ProfileResult(user_id, FOUND, profile, max(0, profile["updated_at"] - profile["last_event_timestamp"]))
        if reply.status == 404:
            return ProfileResult(user_id, NOT_FOUND)
        if reply.status in (0, 502, 503, 504):
            return None
        raise LookupClientError(f"lookup of {user_id!r} refused: HTTP {reply.status} {reply.body[:200]!r}")

    def batch_results(self, reply: Reply) -> list[ProfileResult] | None:
        """The per-user answers of ``POST /users/profiles``, or None to try again."""
        if reply.status == 200:
            return [ProfileResult.from_json(item) for item in json.loads(reply.body)["results"]]
        if reply.status in (0, 502, 503, 504):
            return None
        raise LookupClientError(f"batch lookup refused: HTTP {reply.status} {reply.body[:200]!r}")

    def chunks(self, user_ids: Sequence[str]) -> list[list[str]]:
        distinct = list(dict.fromkeys(user_ids))
        return [distinct[i:i + self.batch_size] for i in range(0, len(distinct), self.batch_size)]

    def give_up(self, what: str, reply: Reply) -> LookupClientError:
        detail = reply.failure or f"HTTP {reply.status} {reply.body[:200]!r}"
        return LookupClientError(f"{what}: no answer after {self.attempts} attempts ({detail})")


#: One step of a lookup: a request to send (method, URL, body), answered with its Reply, or seconds to sleep.
Step = tuple[str, str, bytes | None] | float


class _Lookups(_Policy):
    """The lookups themselves, written once as generators of :data:`Step`; each client runs them
    with its own I/O (blocking or asyncio)."""

    def single(self, user_id: str) -> Generator[Step, Reply | None, dict[str, Any] | None]:
        reply = Reply(0, failure="no attempt")
        for base in self.targets():
            reply = yield ("GET", f"{base}/users/{quote(user_id, safe='')}/profile", None)
            result = self.single_result(user_id, reply)
            if result is not None:
                return result.profile
            yield self.pause(reply)
        raise self.give_up(f"lookup of {user_id!r}", reply)

    def batch(self, pending: list[str], results: dict[str, ProfileResult]) -> Generator[Step, Reply | None, None]:
        """Ask for ``pending`` until every user is answered or attempts run out (then they stay unavailable)."""
        reply = Reply(0, failure="no attempt")
        for base in self.targets():
            reply = yield ("POST", base + BATCH_PATH, json.dumps({"user_ids": pending}).encode())
            answered = self.batch_results(reply)
            if answered is not None:
                for result in answered:
                    results[result.user_id] = result
                pending = [r.user_id for r in answered if r.status == UNAVAILABLE]
            if not pending:
                return
            yield self.pause(reply)
        if any(u not in results for u in pending):
            raise self.give_up(f"batch lookup of {len(pending)} users", reply)


class LookupClient(_Lookups):
    """Blocking client on ``urllib`` (thread-safe: it keeps no connection state)."""

    def __init__(self, urls: Sequence[str], token: str | None = None, *, timeout: float = 5.0, attempts: int = 5,
                 max_retry_after: float = 10.0, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        super().__init__(urls, token, timeout, attempts, max_retry_after, batch_size)

    def get(self, user_id: str) -> dict[str, Any] | None:
        """The user's current profile (a dict per profile.schema.json), or None if the user is unknown."""
        return self._run(self.single(user_id))

    def get_many(self, user_ids: Sequence[str]) -> dict[str, ProfileResult]:
        """Every distinct user's result; users still ``unavailable`` after all attempts stay so."""
        results: dict[str, ProfileResult] = {}
        for chunk in self.chunks(user_ids):
            self._run(self.batch(chunk, results))
        return results

    def _run(self, steps: Generator[Step, Reply | None, Any]) -> Any:
        try:
            step = next(steps)
            while True:
                if isinstance(step, tuple):
                    step = steps.send(self._send(*step))
                else:
                    time.sleep(step)
                    step = steps.send(None)
        except StopIteration as done:
            return done.value

    def _send(self, method: str, url: str, body: bytes | None) -> Reply:
        request = urllib.request.Request(url, data=body, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return Reply(resp.status, resp.read())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.read(), self.retry_after(exc.headers.get("Retry-After")))
        except (urllib.error.URLError, OSError) as exc:
            return Reply(0, failure=f"{url}: {exc}")


class AsyncLookupClient(_Lookups):
    """asyncio client on aiohttp; use it as ``async with AsyncLookupClient(...) as client``."""

    def __init__(self, urls: Sequence[str], token: str | None = None, *, timeout: float = 5.0, attempts: int = 5,
                 max_retry_after: float = 10.0, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        super().__init__(urls, token, timeout, attempts, max_retry_after, batch_size)
        import aiohttp  # only the asyncio client needs it
        self._aiohttp = aiohttp
        self._session: Any = None

    async def __aenter__(self) -> "AsyncLookupClient":
        self._session = self._aiohttp.ClientSession(headers=self.headers,
                                                     timeout=self._aiohttp.ClientTimeout(total=self.timeout))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, user_id: str) -> dict[str, Any] | None:
        """See :meth:`LookupClient.get`."""
        return await self._run(self.single(user_id))

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, ProfileResult]:
        """See :meth:`LookupClient.get_many`; chunks are requested concurrently."""
        results: dict[str, ProfileResult] = {}
        await asyncio.gather(*(self._run(self.batch(chunk, results)) for chunk in self.chunks(user_ids)))
        return results

    async def _run(self, steps: Generator[Step, Reply | None, Any]) -> Any:
        try:
            step = next(steps)
            while True:
                if isinstance(step, tuple):
                    step = steps.send(await self._send(*step))
                else:
                    await asyncio.sleep(step)
                    step = steps.send(None)
        except StopIteration as done:
            return done.value

    async def _send(self, method: str, url: str, body: bytes | None) -> Reply:
        if self._session is None:
            raise RuntimeError("use `async with AsyncLookupClient(...)` (or call __aenter__) first")
        try:
            async with self._session.request(method, url, data=body) as resp:
                return Reply(resp.status, await resp.read(), self.retry_after(resp.headers.get("Retry-After")))
        except (self._aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return Reply(0, failure=f"{url}: {exc!r}")
