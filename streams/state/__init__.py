"""Per-user state at rest: the stored record's binary codec, the write-behind cache of decoded
states, the RocksDB store, its changelog topic.

``codec`` is pure Python (the pipeline, snapshot and backfill share it); ``cache``
keeps decoded states in memory and writes them behind, once per commit; ``store``
is the faust table's RocksDB partitions; ``changelog`` reads and writes the
compacted topic that backs them up.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_MODULES = {
    ".codec": ["StateRecord", "StateRecordError", "encode", "decode", "event_id_hash"],
    ".cache": ["StateCache", "StoredState"],
    ".store": ["TableStateStore"],
    ".changelog": ["ChangelogRecord", "deliver_records", "ensure_changelog", "newest_values",
                   "read_latest"],
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _MODULES)
