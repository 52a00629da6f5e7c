"""The one typed settings object of the service, read from environment variables.

Every knob lives here with its default, so the README's configuration table,
the docker-compose file and the code cannot drift apart: ``Settings.describe()``
is what the README table is generated from.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


def _env_field(env: str, default: Any, doc: str, secret: bool = False) -> Any:
    """A dataclass field that remembers its env var name and documentation.

    A ``secret`` field can also be read from the file named by ``<env>_FILE``
    (a mounted Kubernetes or compose secret) and is never shown by ``repr``.
    """
    if secret:
        doc = f"{doc} Secret: or read from the file named by `{env}_FILE`; never logged."
    return field(default=default, metadata={"env": env, "doc": doc, "secret": secret})


#: Shown instead of a secret's value by ``repr(Settings)``.
REDACTED = "<redacted>"
#: Bind addresses reachable only from this machine: a worker bound to one needs no lookup token.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class Settings:
    """Service configuration; build it with :meth:`from_env`."""

    bootstrap_servers: str = _env_field(
        "KAFKA_BOOTSTRAP_SERVERS", "localhost:9092", "Kafka bootstrap servers, comma separated.")
    app_id: str = _env_field(
        "PROFILESTREAM_APP_ID", "profilestream",
        "Consumer group id and prefix of the state changelog topic.")
    events_topic: str = _env_field(
        "PROFILESTREAM_EVENTS_TOPIC", "profilestream.events", "Input topic of website events.")
    profiles_topic: str = _env_field(
        "PROFILESTREAM_PROFILES_TOPIC", "profilestream.profiles", "Compacted output topic of profiles.")
    dlq_topic: str = _env_field(
        "PROFILESTREAM_DLQ_TOPIC", "profilestream.events.dlq", "Dead-letter topic for invalid events.")
    partitions: int = _env_field(
        "PROFILESTREAM_PARTITIONS", 8,
        "Partitions of the events topic and the state changelog (created if missing). The two must "
        "match: a worker refuses to start when they differ (docs/reliability.md).")
    replication_factor: int = _env_field(
        "PROFILESTREAM_REPLICATION_FACTOR", 3,
        "Replicas of every topic the service creates: events, profiles, dead letters, the state "
        "changelog and faust's internal topics. 3 keeps the state when one broker is lost; a one-broker "
        "cluster (the compose stack, the embedded broker) needs 1.")
    batch_max: int = _env_field(
        "PROFILESTREAM_BATCH_MAX", 10000,
        "Most events in one micro-batch (one model call); under load a bigger batch coalesces more of a "
        "user's events into one state read, write and profile.")
    overlap_min_events: int = _env_field(
        "PROFILESTREAM_OVERLAP_MIN_EVENTS", 500,
        "A fetched batch of at least this many events means the worker is behind: the next batch is "
        "prepared while this one's model step runs in the model thread (throughput); smaller ones are applied "
        "first, their model step inline (latency).")
    state_cache_users: int = _env_field(
        "PROFILESTREAM_STATE_CACHE_USERS", 20000,
        "Users whose decoded state a worker keeps in memory, least recently used evicted (written to "
        "RocksDB first when changed). Changed states are written to RocksDB and the changelog once per "
        "commit, not per batch (docs/performance.md gives the memory per user). 0 writes every batch "
        "through.")
    commit_interval_s: float = _env_field(
        "PROFILESTREAM_COMMIT_INTERVAL_S", 1.0,
        "Seconds between offset commits; each first writes the changed cached states to RocksDB and the "
        "changelog. Longer: fewer writes of users active within it, more events read again after a crash.")
    producer_batch_bytes: int = _env_field(
        "PROFILESTREAM_PRODUCER_BATCH_BYTES", 1_000_000,
        "Largest produce batch per partition; a full batch makes a send wait, so Kafka's usual 16384 "
        "stalls the worker. Keep it below the brokers' message.max.bytes.")
    producer_request_timeout_s: float = _env_field(
        "PROFILESTREAM_PRODUCER_REQUEST_TIMEOUT_S", 120.0,
        "How long the worker's producer retries a produce request before giving the records up, which "
        "stops the worker before its next commit (docs/reliability.md); the Java producer's default.")
    fetch_max_wait_ms: int = _env_field(
        "PROFILESTREAM_FETCH_MAX_WAIT_MS", 500,
        "Longest a fetch waits for records (Kafka answers as soon as there are any, so this "
        "only bounds idle polls). Capped at 10 with the embedded broker, which holds fetches.")
    fetch_stall_s: float = _env_field(
        "PROFILESTREAM_FETCH_STALL_S", 30.0,
        "Fetch-stall watchdog: seconds of fetching without a record of an events partition whose end "
        "lies beyond the next offset to process, after which the partition is re-seeked; after as many "
        "again, /healthz fails so that the worker is restarted (docs/reliability.md). 0 = off.")
    device: str = _env_field(
        "PROFILESTREAM_DEVICE", "auto", "Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    torch_threads: int = _env_field(
        "PROFILESTREAM_TORCH_THREADS", 1,
        "Torch intra-op threads on the CPU; 0 = torch's default (one per core). One is faster: the "
        "LSTM's matrices are small and the consumer thread and Kafka client need the other cores.")
    model_path: str = _env_field(
        "PROFILESTREAM_MODEL_PATH", "", "Model checkpoint (.pt); empty = the shipped default checkpoint.")
    on_model_mismatch: str = _env_field(
        "PROFILESTREAM_ON_MODEL_MISMATCH", "refuse",
        "What a worker does with stored states it must not apply events to -- written by another model, "
        "or ahead of their events partition's end (topic recreated or truncated): refuse (do not start "
        "or stop) or reset (discard them, those users start afresh). See docs/lifecycle.md.")
    rocksdb_write_buffer_mb: int = _env_field(
        "PROFILESTREAM_ROCKSDB_WRITE_BUFFER_MB", 8,
        "RocksDB memtable size per state partition (two at most). Every state write lands in one "
        "until it is flushed, so this, not the event count, bounds write memory (faust's default: 3 x 64).")
    rocksdb_block_cache_mb: int = _env_field(
        "PROFILESTREAM_ROCKSDB_BLOCK_CACHE_MB", 32,
        "RocksDB block cache per state partition: hot users' states read from disk (faust's default: 2048).")
    data_dir: Path = _env_field(
        "PROFILESTREAM_DATA_DIR", Path(".profilestream"), "Directory for RocksDB state and faust metadata.")
    web_host: str = _env_field(
        "PROFILESTREAM_WEB_HOST", "127.0.0.1",
        "Bind address of the HTTP server (metrics, health, lookups); 0.0.0.0 in containers.")
    web_port: int = _env_field(
        "PROFILESTREAM_WEB_PORT", 6066, "Port of the HTTP server (/metrics, /healthz, /readyz, /users/...).")
    advertised_url: str = _env_field(
        "PROFILESTREAM_ADVERTISED_URL", "",
        "URL other workers use to reach this one (faust's canonical_url; lookups are forwarded to it), "
        "e.g. the pod's stable DNS name. Empty = http://<web host>:<web port>, with this machine's host "
        "name for a wildcard bind (0.0.0.0, ::).")
    lookup_token: str = _env_field(
        "PROFILESTREAM_LOOKUP_TOKEN", "",
        "Bearer token required by the lookup routes (docs/http.md); also keys the HMAC of forwarded "
        "lookups. Empty = no token: allowed only on a loopback bind or with "
        "PROFILESTREAM_ALLOW_ANONYMOUS_LOOKUPS.", secret=True)
    allow_anonymous_lookups: bool = _env_field(
        "PROFILESTREAM_ALLOW_ANONYMOUS_LOOKUPS", False,
        "Let a worker bound to a non-loopback address start without a lookup token (anyone who reaches "
        "the port reads every profile). Without it such a worker refuses to start.")
    lookup_max_concurrent: int = _env_field(
        "PROFILESTREAM_LOOKUP_MAX_CONCURRENT", 16,
        "Lookup requests a worker serves at once (single and batch; forwarded ones included); more get "
        "503 with Retry-After, so a flood of lookups cannot starve batch processing.")
    lookup_batch_max: int = _env_field(
        "PROFILESTREAM_LOOKUP_BATCH_MAX", 1000, "Most user ids in one POST /users/profiles request.")
    monitor_interval_s: float = _env_field(
        "PROFILESTREAM_MONITOR_INTERVAL_S", 5.0, "Seconds between lag / state-size / readiness samples.")
    standby_replicas: int = _env_field(
        "PROFILESTREAM_STANDBY_REPLICAS", 0, "Faust standby replicas of the state table (warm fail-over).")
    state_ttl_days: float = _env_field(
        "PROFILESTREAM_STATE_TTL_DAYS", 0.0,
        "Erase users whose last event is older than this many days (state + profile tombstone), through "
        "expire requests on the events topic that the partition's owner applies in order with events; "
        "0 = keep state forever. See docs/reliability.md.")
    state_ttl_sweep_s: float = _env_field(
        "PROFILESTREAM_STATE_TTL_SWEEP_S", 3600.0, "Seconds between idle-state sweeps (with a TTL set).")
    embedded_broker: bool = _env_field(
        "PROFILESTREAM_EMBEDDED_BROKER", False,
        "Apply the embedded (Tansu) broker's workarounds: probed end offsets, a 10 ms fetch wait, short "
        "group timeouts. Set automatically by `demo`; never needed against Apache Kafka.")
    log_level: str = _env_field("PROFILESTREAM_LOG_LEVEL", "info", "Log level of the service.")
    security_protocol: str = _env_field(
        "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    sasl_mechanism: str = _env_field(
        "KAFKA_SASL_MECHANISM", "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with SASL_*).")
    sasl_username: str = _env_field("KAFKA_SASL_USERNAME", "", "SASL user name.")
    sasl_password: str = _env_field("KAFKA_SASL_PASSWORD", "", "SASL password.", secret=True)
    ssl_cafile: str = _env_field("KAFKA_SSL_CAFILE", "", "CA bundle to verify the brokers (SSL, SASL_SSL).")
    ssl_certfile: str = _env_field("KAFKA_SSL_CERTFILE", "", "Client certificate for mutual TLS.")
    ssl_keyfile: str = _env_field("KAFKA_SSL_KEYFILE", "", "Client private key for mutual TLS.")
    ssl_key_password: str = _env_field(
        "KAFKA_SSL_KEY_PASSWORD", "", "Password of an encrypted KAFKA_SSL_KEYFILE.", secret=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Read every field from its env var (falling back to the default), then apply overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = _secret_from_file(f.metadata["env"], env) if f.metadata["secret"] else None
            if raw is None:
                raw = env.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, f.default, raw)
        values.update(overrides)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Fail at start-up, with the variable's name, rather than mid-stream."""
        problems = []
        if self.partitions < 1:
            problems.append("PROFILESTREAM_PARTITIONS must be >= 1")
        if self.replication_factor < 1:
            problems.append("PROFILESTREAM_REPLICATION_FACTOR must be >= 1")
        if self.producer_request_timeout_s <= 0:
            problems.append("PROFILESTREAM_PRODUCER_REQUEST_TIMEOUT_S must be > 0")
        if self.batch_max < 1:
            problems.append("PROFILESTREAM_BATCH_MAX must be >= 1")
        if self.overlap_min_events < 1:
            problems.append("PROFILESTREAM_OVERLAP_MIN_EVENTS must be >= 1")
        if self.torch_threads < 0:
            problems.append("PROFILESTREAM_TORCH_THREADS must be >= 0 (0 = torch's default)")
        if self.state_cache_users < 0:
            problems.append("PROFILESTREAM_STATE_CACHE_USERS must be >= 0 (0 = write every batch through)")
        if self.fetch_stall_s < 0:
            problems.append("PROFILESTREAM_FETCH_STALL_S must be >= 0 (0 = off)")
        if self.commit_interval_s <= 0:
            problems.append("PROFILESTREAM_COMMIT_INTERVAL_S must be > 0")
        if self.producer_batch_bytes < 16384:
            problems.append("PROFILESTREAM_PRODUCER_BATCH_BYTES must be >= 16384")
        if self.rocksdb_write_buffer_mb < 1 or self.rocksdb_block_cache_mb < 1:
            problems.append("PROFILESTREAM_ROCKSDB_WRITE_BUFFER_MB and _BLOCK_CACHE_MB must be >= 1")
        if self.state_ttl_days < 0:
            problems.append("PROFILESTREAM_STATE_TTL_DAYS must be >= 0 (0 = off)")
        if self.state_ttl_sweep_s <= 0:
            problems.append("PROFILESTREAM_STATE_TTL_SWEEP_S must be > 0")
        if self.on_model_mismatch not in ("refuse", "reset"):
            problems.append(f"PROFILESTREAM_ON_MODEL_MISMATCH={self.on_model_mismatch!r} is not refuse or reset")
        if self.security_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            problems.append(f"KAFKA_SECURITY_PROTOCOL={self.security_protocol!r} is not supported")
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            problems.append("KAFKA_SASL_MECHANISM is required with a SASL security protocol")
        if self.lookup_max_concurrent < 1:
            problems.append("PROFILESTREAM_LOOKUP_MAX_CONCURRENT must be >= 1")
        if self.lookup_batch_max < 1:
            problems.append("PROFILESTREAM_LOOKUP_BATCH_MAX must be >= 1")
        if self.advertised_url and not self.advertised_url.startswith(("http://", "https://")):
            problems.append(f"PROFILESTREAM_ADVERTISED_URL={self.advertised_url!r} is not an http(s):// URL")
        if problems:
            raise ValueError("; ".join(problems))

    def check_lookup_exposure(self) -> None:
        """Refuse to serve profiles to anyone on the network by accident (called when a worker starts).

        Not part of :meth:`check`: clients (producer, subscriber) read the same
        environment, image defaults included, and serve nothing.
        """
        if self.lookup_token or self.allow_anonymous_lookups or self.web_host in LOOPBACK_HOSTS:
            return
        raise ValueError(
            f"PROFILESTREAM_WEB_HOST={self.web_host} is not a loopback address and PROFILESTREAM_LOOKUP_TOKEN is "
            "empty: anyone who reaches the port could read every profile. Set the token (or "
            "PROFILESTREAM_LOOKUP_TOKEN_FILE), or PROFILESTREAM_ALLOW_ANONYMOUS_LOOKUPS=1 to allow that")

    def __repr__(self) -> str:
        """All fields, secrets replaced by :data:`REDACTED` when set (a repr ends up in logs)."""
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            shown.append(f"{f.name}={REDACTED if f.metadata['secret'] and value else repr(value)}")
        return f"Settings({', '.join(shown)})"

    @property
    def canonical_url(self) -> str:
        """The URL this worker advertises to the group (see ``PROFILESTREAM_ADVERTISED_URL``)."""
        if self.advertised_url:
            return self.advertised_url.rstrip("/")
        host = socket.gethostname() if self.web_host in ("0.0.0.0", "::", "") else self.web_host
        return f"http://{host}:{self.web_port}"

    @property
    def changelog_topic(self) -> str:
        """Faust names a table's changelog ``<app id>-<table name>-changelog``."""
        return f"{self.app_id}-user-state-changelog"

    @classmethod
    def env_vars(cls) -> set[str]:
        """Every environment variable :meth:`from_env` reads, ``<VAR>_FILE`` of secrets included."""
        names = {f.metadata["env"] for f in dataclasses.fields(cls)}
        return names | {f"{f.metadata['env']}_FILE" for f in dataclasses.fields(cls) if f.metadata["secret"]}

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(env var, default, meaning) rows for the README's configuration table."""
        return [(f.metadata["env"], str(f.default), f.metadata["doc"]) for f in dataclasses.fields(cls)]

    @classmethod
    def markdown_table(cls) -> str:
        """The README's configuration table (tests/unit/test_readme.py keeps the two identical)."""
        rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
        rows += [f"| `{env}` | `{default}` | {doc} |" if default else f"| `{env}` | (empty) | {doc} |"
                 for env, default, doc in cls.describe()]
        return "\n".join(rows)


def _secret_from_file(env_name: str, env: Mapping[str, str]) -> str | None:
    """The secret in the file named by ``<env_name>_FILE`` (trailing newline dropped), if that is set.

    Errors name the variable and the path, never the content.
    """
    path = env.get(f"{env_name}_FILE")
    if not path:
        return None
    if env.get(env_name):
        raise ValueError(f"set {env_name} or {env_name}_FILE, not both")
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ValueError(f"{env_name}_FILE={path}: cannot read the secret: {reason}") from None


def _parse(name: str, default: Any, raw: str) -> Any:
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a boolean, got {raw!r}")
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {raw!r}") from None
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name}: expected an integer, got {raw!r}") from None
    if isinstance(default, Path):
        return Path(raw)
    return raw
