"""Kafka plumbing: client options, topics, offsets, delivery watching, record batches, the fetch loop.

Every private faust / aiokafka / mode name the project uses is in streams/internals.py.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_MODULES = {
    ".client_config": ["aiokafka_options", "kafka_python_options", "ssl_context"],
    ".topics": ["ensure_topics", "assign_whole_topic", "caught_up", "topic_specs"],
    ".end_offsets": ["EndOffsetProbe", "end_offsets"],
    ".group_offsets": ["beginning_offsets", "committed_offsets", "reset_offsets"],
    ".delivery": ["DeliveryGuard"],
    ".record_batches": ["SentBatch", "send_records", "key_partitions"],
    ".publisher": ["Publisher", "dead_letter_headers", "headers_dict"],
    ".fetcher": ["BatchingConsumer"],
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _MODULES)
