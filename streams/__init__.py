"""ProfileStream's stream processor: events in, per-user LSTM state, profiles out.

Reading map (data flows one way; start at ``pipeline/processor.py``)::

    clients/     what producers and rankers import (no torch, no faust)
                   producer.EventProducer -> events topic -> ... -> profiles topic -> subscriber.ProfileSubscriber;
                   lookup.LookupClient asks the workers for many users' profiles at once
    pipeline/    the hot path, no Kafka client:
                   source_record -> validate -> grouping -> admission -> models.ProfileModel.advance
                   -> profile_message; control (forget and TTL expire requests); partitioning (Kafka's
                   default partitioner); processor strings them together and isolates failing records
    state/       state at rest: codec (the stored record), store (RocksDB), changelog (its topic)
    kafka/       Kafka plumbing: client_config, topics, end/group offsets, delivery guard,
                   record_batches, publisher, fetcher (faust's consumer, batched)
    internals.py every private faust / aiokafka / mode / prometheus-client name we use, and only there
    service/     the running worker: app (faust wiring), worker, web, lookup, status, monitor, metrics, ttl
    ops/         operators' commands: backfill, snapshot/restore, forget, cluster_status
    dev/         developer tools: embedded broker, traffic, demo, produce, bench, lookup_bench
    settings.py  every setting, from PROFILESTREAM_* / KAFKA_* env vars
    cli.py       the ``profilestream`` command; cli_common.py its shared flags, errors and exit codes

Words with one meaning each: a *record* is a Kafka record (``SourceRecord`` in,
record batches out) except ``StateRecord``, the stored per-user value; a
*batch* is the micro-batch the processor applies, a *record batch* is what the
Kafka client sends, a user's slice of a batch is a ``UserBatch``; *state* is a
user's model state (``models.UserState``) and its stored form
(``state/``); *metrics* are Prometheus series (``service/metrics.py``).

The names below are the public API; each is imported on first use, so
``import streams`` stays light.
"""

from __future__ import annotations

from .lazy_exports import lazy_exports

_MODULES = {
    ".settings": ["Settings"],
    ".clients.producer": ["EventProducer", "DeliveryError"],
    ".clients.subscriber": ["ProfileSubscriber"],
    ".clients.lookup": ["LookupClient", "AsyncLookupClient"],
    ".pipeline.validate": ["check_message"],
    ".pipeline.processor": ["BatchProcessor", "BatchReport"],
    ".service.app": ["ProfileStreamApp", "build_app"],
    ".service.worker": ["run_worker"],
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _MODULES)
