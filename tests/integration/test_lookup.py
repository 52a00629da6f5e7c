"""The HTTP surface: routes and their auth, secrets, forwarding between workers bound to
0.0.0.0 with distinct advertised URLs, the batch lookup, the lookup clients, and
bounded concurrency -- against real workers on the embedded broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from models import ProfileModel
from streams.dev.embedded_broker import EmbeddedBroker, free_port
from streams.service.app import build_app
from streams.service.lookup import (
    BATCH_ROUTE,
    FORWARDED_HEADER,
    BadLookupRequest,
    current_profiles,
    forwarded_header,
    forwarded_header_ok,
    forwarding_key,
    parse_user_ids,
)
from streams.clients.lookup import AsyncLookupClient, LookupClient, LookupClientError
from streams.settings import REDACTED, Settings
from streams.state import codec as state_codec

from ..harness import REPO, Deployment, WorkerProcess, synthetic, wait_for, wait_for_counts

TOKEN = "lookup-token-7f3a9c"
HTTP_DOC = REPO / "docs" / "http.md"


# -- settings: secrets, exposure, advertised URL ------------------------------


def test_secrets_are_read_from_files_and_never_shown(tmp_path: Path) -> None:
    files = {}
    for env, value in [("PROFILESTREAM_LOOKUP_TOKEN", "tok-123"), ("KAFKA_SASL_PASSWORD", "pw-456"),
                       ("KAFKA_SSL_KEY_PASSWORD", "key-789")]:
        path = tmp_path / env.lower()
        path.write_text(value + "\n")  # `echo secret > file` leaves a newline: it is not part of the secret
        files[f"{env}_FILE"] = str(path)
    settings = Settings.from_env(files)
    assert (settings.lookup_token, settings.sasl_password, settings.ssl_key_password) == ("tok-123", "pw-456",
                                                                                         "key-789")
    shown = repr(settings) + str(settings)
    assert not {"tok-123", "pw-456", "key-789"} & set(re.findall(r"[\w-]+", shown))
    assert shown.count(REDACTED) == 2 * 3 and "sasl_username=''" in shown
    assert REDACTED not in repr(Settings.from_env({}))  # an unset secret is shown as empty


def test_secret_file_errors_name_the_variable_not_the_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PROFILESTREAM_LOOKUP_TOKEN or PROFILESTREAM_LOOKUP_TOKEN_FILE, not both"):
        Settings.from_env({"PROFILESTREAM_LOOKUP_TOKEN": "a", "PROFILESTREAM_LOOKUP_TOKEN_FILE": "/x"})
    missing = tmp_path / "absent"
    with pytest.raises(ValueError, match=f"KAFKA_SASL_PASSWORD_FILE={missing}: cannot read the secret"):
        Settings.from_env({"KAFKA_SASL_PASSWORD_FILE": str(missing)})
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfesecret-bytes")
    with pytest.raises(ValueError) as err:
        Settings.from_env({"KAFKA_SASL_PASSWORD_FILE": str(binary)})
    assert "secret-bytes" not in str(err.value) and "not UTF-8" in str(err.value)


def test_a_worker_exposed_without_a_token_needs_explicit_consent() -> None:
    for host in ("127.0.0.1", "localhost", "::1"):
        Settings.from_env({"PROFILESTREAM_WEB_HOST": host}).check_lookup_exposure()
    exposed = Settings.from_env({"PROFILESTREAM_WEB_HOST": "0.0.0.0"})
    with pytest.raises(ValueError, match="PROFILESTREAM_ALLOW_ANONYMOUS_LOOKUPS=1"):
        exposed.check_lookup_exposure()
    Settings.from_env({"PROFILESTREAM_WEB_HOST": "0.0.0.0", "PROFILESTREAM_LOOKUP_TOKEN": "t"}).check_lookup_exposure()
    Settings.from_env({"PROFILESTREAM_WEB_HOST": "0.0.0.0",
                       "PROFILESTREAM_ALLOW_ANONYMOUS_LOOKUPS": "1"}).check_lookup_exposure()


def test_the_worker_process_refuses_to_start_exposed_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROFILESTREAM_", "KAFKA_"))}
    env.update(PROFILESTREAM_WEB_HOST="0.0.0.0", PROFILESTREAM_DATA_DIR=str(tmp_path),
               KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")  # refused before any connection is tried
    proc = subprocess.run([sys.executable, "-m", "streams.cli", "worker"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "refusing to start: PROFILESTREAM_WEB_HOST=0.0.0.0 is not a loopback address" in proc.stderr + proc.stdout


def test_advertised_url() -> None:
    assert Settings.from_env({}).canonical_url == "http://127.0.0.1:6066"
    assert Settings.from_env({"PROFILESTREAM_ADVERTISED_URL": "http://w-0.svc:6066/"}).canonical_url == "http://w-0.svc:6066"
    assert Settings.from_env({"PROFILESTREAM_WEB_HOST": "0.0.0.0", "PROFILESTREAM_WEB_PORT": "7000"}).canonical_url \
        == f"http://{__import__('socket').gethostname()}:7000"
    with pytest.raises(ValueError, match="PROFILESTREAM_ADVERTISED_URL='w-0:6066' is not an http"):
        Settings.from_env({"PROFILESTREAM_ADVERTISED_URL": "w-0:6066"})


# -- forwarding signature and request parsing ---------------------------------


def test_forwarded_header_is_an_hmac_of_path_body_and_time() -> None:
    key = forwarding_key(TOKEN)
    body = b'{"user_ids": ["u1"]}'
    header = forwarded_header(key, BATCH_ROUTE, body, now=1000.0)
    assert TOKEN not in header
    assert forwarded_header_ok(header, key, BATCH_ROUTE, body, now=1010.0)
    assert not forwarded_header_ok(header, key, BATCH_ROUTE, b'{"user_ids": ["u2"]}', now=1010.0)
    assert not forwarded_header_ok(header, key, "/users/u1/profile", body, now=1010.0)
    assert not forwarded_header_ok(header, forwarding_key("other"), BATCH_ROUTE, body, now=1010.0)
    assert not forwarded_header_ok(header, key, BATCH_ROUTE, body, now=1100.0)  # replayed too late
    assert not forwarded_header_ok("1000 " + "0" * 64, key, BATCH_ROUTE, body, now=1000.0)
    assert not forwarded_header_ok("yes", key, BATCH_ROUTE, body, now=1000.0)


def test_batch_request_bodies() -> None:
    assert parse_user_ids(b'{"user_ids": ["a", "b", "a"]}', 3) == ["a", "b", "a"]
    for body, message in [(b"[", "not JSON"), (b'["a"]', "must be"), (b'{"user_ids": "a"}', "must be"),
                          (b'{"user_ids": ["a", ""]}', "must be"), (b'{"user_ids": ["a", 1]}', "must be"),
                          (b'{"user_ids": []}', "0 user ids; send 1 to 3"),
                          (b'{"user_ids": ["a", "b", "c", "d"]}', "4 user ids; send 1 to 3")]:
        with pytest.raises(BadLookupRequest, match=message):
            parse_user_ids(body, 3)


def test_profiles_of_stored_states_and_their_age(model: ProfileModel) -> None:
    events = synthetic(30, users=3, seed=4, start_ms=int(time.time() * 1000) - 60_000)
    users = sorted({e.user_id for e in events})
    states = model.advance([None] * len(users), [[e for e in events if e.user_id == u] for u in users]).states
    stored = [state_codec.encode(state_codec.StateRecord(model.fingerprint, 0, (), blob))
              for blob in model.encode_states(states)]
    answers = current_profiles(model, users, stored)
    for user, state, (body, age_ms) in zip(users, states, answers):
        message = json.loads(body)
        assert message["user_id"] == user and message["event_count"] == state.n_events
        assert age_ms == message["updated_at"] - message["last_event_timestamp"] >= 50_000  # events of ~1 min ago
    alien = state_codec.encode(state_codec.StateRecord("0" * len(model.fingerprint), 0, (), b""))
    with pytest.raises(ValueError, match=f"state of '{users[1]}' was written by model 0+, this worker runs"):
        current_profiles(model, users, [stored[0], alien, stored[2]])


# -- the routes a worker serves -----------------------------------------------


def documented_routes() -> set[tuple[str, str]]:
    """(method, path) rows of the route table in docs/http.md."""
    return {(m, p) for m, p in re.findall(r"^\| `(GET|POST) ([^`]+)` \|", HTTP_DOC.read_text(), re.M)}


def test_the_web_server_serves_exactly_the_documented_routes(model: ProfileModel) -> None:
    """faust's own views (/table, /router, /graph, statistics, /performance) are not among them."""
    service = build_app(Settings.from_env({}), model)
    web = service.app.web
    web.init_server()
    served = {(r.method, r.resource.canonical) for r in web.web_app.router.routes() if r.method != "HEAD"}
    assert served == documented_routes()
    assert not any(p.startswith(("/table", "/router", "/graph", "/performance", "/stats")) for _, p in served)


def test_the_lookup_client_needs_neither_torch_nor_faust() -> None:
    code = ("import sys, streams.clients.lookup; "
            "print(sorted(m for m in ('torch', 'faust', 'numpy', 'aiokafka') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_client_gives_up_with_a_reason_when_no_worker_answers() -> None:
    client = LookupClient([f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"], attempts=3,
                          max_retry_after=0.01)
    with pytest.raises(LookupClientError, match="no answer after 3 attempts .*Connection refused"):
        client.get("u1")
    with pytest.raises(LookupClientError, match="batch lookup of 2 users: no answer after 3 attempts"):
        client.get_many(["u1", "u2"])
    assert TOKEN not in repr(LookupClient(["http://x"], token=TOKEN))


# -- two workers bound to 0.0.0.0 with distinct advertised URLs ----------------


@dataclass
class Cluster:
    dep: Deployment
    workers: list[WorkerProcess]
    urls: list[str]
    counts: Counter[str]
    published: dict[str, dict]


def request(worker: WorkerProcess, path: str, body: Any = None, token: str | None = TOKEN,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    return worker.request(path, data, token, headers)


@pytest.fixture(scope="module")
def cluster(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Worker 0 reads the token from a file and advertises 127.0.0.1, worker 1 reads it from the
    environment, advertises localhost and serves one lookup at a time (the flood test)."""
    tmp = tmp_path_factory.mktemp("lookup")
    dep = Deployment(broker.bootstrap_servers, tmp)
    dep.create_topics()
    token_file = tmp / "lookup_token"
    token_file.write_text(TOKEN + "\n")
    first = dep.worker(0, PROFILESTREAM_WEB_HOST="0.0.0.0", PROFILESTREAM_LOOKUP_TOKEN_FILE=str(token_file))
    second = dep.worker(1, PROFILESTREAM_WEB_HOST="0.0.0.0", PROFILESTREAM_LOOKUP_TOKEN=TOKEN,
                        PROFILESTREAM_LOOKUP_MAX_CONCURRENT="1")
    urls = [f"http://127.0.0.1:{first.web_port}", f"http://localhost:{second.web_port}"]
    for worker, url in zip((first, second), urls):
        worker.extra["PROFILESTREAM_ADVERTISED_URL"] = url
    workers = [first.start(wait_ready=False), second.start(wait_ready=False)]
    try:
        for worker in workers:
            worker.wait_ready()
        events = synthetic(400, users=24, seed=11)
        dep.produce(events)
        counts = Counter(e.user_id for e in events)
        published = wait_for_counts(dep, counts)
        yield Cluster(dep, workers, urls, counts, published)
    finally:
        for worker in workers:
            worker.stop()


def all_users_served(cluster: Cluster) -> set[str] | None:
    """Served-by URLs when both workers answer every user with their full profile, else None."""
    served = set()
    for worker in cluster.workers:
        if request(worker, "/readyz", token=None)[0] != 200:
            return None
        for user, n in cluster.counts.items():
            status, headers, body = request(worker, f"/users/{user}/profile")
            if status != 200 or json.loads(body)["event_count"] != n:
                return None
            served.add(headers["X-ProfileStream-Served-By"])
    return served


def test_a_lookup_on_the_non_owner_is_forwarded_to_the_advertised_url(cluster: Cluster) -> None:
    served = wait_for(lambda: all_users_served(cluster), 90, interval=1.0, what="every user from both workers")
    assert served == set(cluster.urls)  # each worker owns some users; the other forwarded to its advertised URL
    user = next(iter(cluster.counts))
    for worker in cluster.workers:
        status, headers, body = request(worker, f"/users/{user}/profile")
        got = json.loads(body)
        assert int(headers["X-ProfileStream-Age-Ms"]) == got["updated_at"] - got["last_event_timestamp"]
        np.testing.assert_allclose(got["profile"], cluster.published[user]["profile"], atol=1e-5)
    for worker in cluster.workers:  # no token on disk or in the environment reaches a log
        assert TOKEN not in worker.log_path.read_text(errors="replace")


def test_every_lookup_route_needs_the_token_and_faust_views_are_gone(cluster: Cluster) -> None:
    worker = cluster.workers[0]
    user = next(iter(cluster.counts))
    for path, body in [(f"/users/{user}/profile", None), (BATCH_ROUTE, {"user_ids": [user]})]:
        for token in (None, "wrong"):
            status, headers, _ = request(worker, path, body, token=token)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    for path in ("/metrics", "/healthz", "/readyz"):
        assert request(worker, path, token=None)[0] == 200
    assert json.loads(request(worker, "/", token=None)[2]) == {"status": "OK"}  # faust's index: no data
    for path in ("/table/user-state/", f"/table/user-state/{user}/", "/router/", f"/router/user-state/{user}/",
                 "/graph/", "/stats/", "/assignment/", "/performance/"):
        assert request(worker, path, token=None)[0] == 404, path


def test_a_client_cannot_skip_routing_with_the_forwarded_header(cluster: Cluster) -> None:
    worker = cluster.workers[0]
    users = sorted(cluster.counts)
    body = json.dumps({"user_ids": users}).encode()
    forged = {FORWARDED_HEADER: f"{int(time.time())} {'0' * 64}"}
    assert request(worker, BATCH_ROUTE, body, token=None, headers=forged)[0] == 401
    assert request(worker, BATCH_ROUTE, body, headers=forged)[0] == 401  # a valid bearer does not help
    # Even with a valid signature (a peer's), users owned elsewhere are `unavailable`, never `not_found`.
    signed = {FORWARDED_HEADER: forwarded_header(forwarding_key(TOKEN), BATCH_ROUTE, body)}
    status, _, answer = request(worker, BATCH_ROUTE, body, token=None, headers=signed)
    assert status == 200
    statuses = Counter((r["status"], r.get("reason")) for r in json.loads(answer)["results"])
    assert set(statuses) == {("found", None), ("unavailable", "not_owner")}, statuses


def test_batch_lookup_answers_every_user_together(cluster: Cluster) -> None:
    users = sorted(cluster.counts)
    asked = users + ["nobody-1", users[0], "nobody-2"]
    for worker in cluster.workers:
        status, _, body = request(worker, BATCH_ROUTE, {"user_ids": asked})
        assert status == 200, body
        results = json.loads(body)["results"]
        assert [r["user_id"] for r in results] == asked
        for r in results:
            if r["user_id"].startswith("nobody"):
                assert r == {"user_id": r["user_id"], "status": "not_found"}
                continue
            assert r["status"] == "found" and r["served_by"] in cluster.urls
            assert r["profile"]["event_count"] == cluster.counts[r["user_id"]]
            assert r["age_ms"] == r["profile"]["updated_at"] - r["profile"]["last_event_timestamp"]
            np.testing.assert_allclose(r["profile"]["profile"], cluster.published[r["user_id"]]["profile"], atol=1e-5)
        assert {r["served_by"] for r in results if r["status"] == "found"} == set(cluster.urls)
    worker = cluster.workers[0]
    status, _, body = request(worker, BATCH_ROUTE, {"user_ids": [f"u{i}" for i in range(1001)]})
    assert status == 400 and "1001 user ids; send 1 to 1000" in json.loads(body)["detail"]
    assert request(worker, BATCH_ROUTE, b"not json")[0] == 400


def test_sync_and_async_clients_use_every_worker(cluster: Cluster) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # a worker that is gone: the clients move on
    urls = [dead] + [f"http://127.0.0.1:{w.web_port}" for w in cluster.workers]
    users = sorted(cluster.counts)
    client = LookupClient(urls, token=TOKEN)
    results = client.get_many(users + ["nobody"])
    assert {u: r.status for u, r in results.items()} == {**{u: "found" for u in users}, "nobody": "not_found"}
    assert all(results[u].profile["event_count"] == cluster.counts[u] for u in users)
    for _ in urls:  # every starting worker, the dead one included
        assert client.get(users[0])["event_count"] == cluster.counts[users[0]]
    assert client.get("nobody") is None

    async def run() -> tuple[dict, dict | None, dict | None]:
        # Several concurrent chunks: worker 1 serves one lookup at a time, so some are answered
        # `unavailable` (owner busy) and retried -- with enough attempts, every user is found.
        async with AsyncLookupClient(urls, token=TOKEN, batch_size=7, attempts=30, max_retry_after=0.2) as aclient:
            return await aclient.get_many(users), await aclient.get(users[1]), await aclient.get("nobody")
    many, one, none = asyncio.run(run())
    assert {u: r.profile["event_count"] for u, r in many.items()} == dict(cluster.counts)
    assert one["event_count"] == cluster.counts[users[1]] and none is None
    with pytest.raises(LookupClientError, match="HTTP 401"):
        LookupClient(urls[1:], token="wrong").get_many(users)


def test_the_example_ranker_ranks_with_a_batch_lookup(cluster: Cluster) -> None:
    user = max(cluster.counts, key=lambda u: cluster.counts[u])
    top = cluster.published[user]["top_categories"][0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROFILESTREAM_", "KAFKA_"))}
    env["PROFILESTREAM_LOOKUP_TOKEN"] = TOKEN
    out = subprocess.run(
        [sys.executable, "examples/ranker.py", "--workers", *cluster.urls, "--user", user, "--user", "nobody",
         "low:c-none:0.5", f"boosted:{top}:0.45"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"{user}: newest event in the profile" in out.stdout and "no profile for nobody; base order" in lines
    ranked = [line.split()[1] for line in lines if re.match(r"\s*\d+\.\d{3}  ", line)]
    assert ranked == ["boosted", "low", "low", "boosted"]  # the user's top category first; nobody keeps the base order


def test_a_flood_of_lookups_gets_503_and_batches_keep_flowing(cluster: Cluster) -> None:
    """Worker 1 serves one lookup at a time: the rest are refused at once with Retry-After,
    the client retries them, and events produced during the flood are still applied."""
    worker = cluster.workers[1]
    users = sorted(cluster.counts)
    batch = users + [f"absent-{i}" for i in range(1000 - len(users))]
    more = synthetic(60, users=24, seed=12, start_ms=int(time.time() * 1000) - 60_000)
    counts = cluster.counts + Counter(e.user_id for e in more)

    def flood(_: int) -> tuple[int, str | None]:
        status, headers, _ = request(worker, BATCH_ROUTE, {"user_ids": batch})
        return status, headers.get("Retry-After")

    with ThreadPoolExecutor(12) as pool:
        raw = Counter(pool.map(flood, range(48)))
        cluster.dep.produce(more)
        client = LookupClient([f"http://127.0.0.1:{worker.web_port}"], token=TOKEN, attempts=100,
                              max_retry_after=0.05)
        answered = list(pool.map(lambda _: client.get_many(batch), range(12)))
    assert set(raw) <= {(200, None), (503, "1")} and raw[(503, "1")] > 0, raw
    for results in answered:
        assert sum(r.status == "found" for r in results.values()) == len(users)
    wait_for_counts(cluster.dep, counts, timeout=60)
    metrics = request(worker, "/metrics", token=None)[2].decode()
    refused = re.search(r'profilestream_lookup_requests_total\{endpoint="profiles",status="503"\} (\S+)', metrics)
    assert refused and float(refused.group(1)) >= raw[(503, "1")]
    assert re.search(r'profilestream_lookup_seconds_count\{endpoint="profiles"\} [1-9]', metrics)
