"""State lookup and state write, batched, on faust's RocksDB table store.

Faust's ``table[key]`` API picks the RocksDB partition and changelog partition
from the *current event*, which does not exist for a micro-batch, and costs a
changelog send plus several Python calls per key.  This adapter reads with one
RocksDB multi-get per source partition and writes one ``WriteBatch`` per
partition, then sends the changelog records through the table so faust still
tracks persisted offsets and recovers the table on restart or rebalance.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import faust
import rocksdict

#: Keys faust keeps in each partition's RocksDB next to ours (its changelog offset).
_FAUST_PREFIX = b"__faust\0"


class TableStateStore:
    """Batched access to a faust ``Table`` whose store is ``rocksdb://``."""

    def __init__(self, table: faust.Table) -> None:
        self.table = table

    def _db(self, partition: int) -> rocksdict.Rdict:
        # The store opens one RocksDB per table partition; there is no public
        # accessor, and this is the one place in the code base that reaches in.
        return self.table.data._db_for_partition(partition)

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values for ``keys`` (None where absent), in order, in one multi-get."""
        if not keys:
            return []
        return list(self._db(partition)[list(keys)])

    def put_many(self, partition: int, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Write all items atomically to the partition's RocksDB, then changelog them."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        pending = list(items)
        for key, value in pending:
            batch.put(key, value)
        self._db(partition).write(batch)
        for key, value in pending:
            self.table.send_changelog(partition, key, value, key_serializer="raw", value_serializer="raw")

    async def drain_changelog(self) -> None:
        """Hand every buffered changelog record to the Kafka client before the batch is acked.

        ``send_changelog`` only queues records in faust's producer buffer, and
        faust's flush before an offset commit gives up on that buffer after
        0.1 s without progress; a commit could then cover events whose state
        exists only in local RocksDB, and a worker taking the partition over
        after a crash would recover an older state and never see those events again.
        """
        buffer = self.table.app.producer.buffer
        while buffer.size:
            await buffer.flush()

    def delete_many(self, partition: int, keys: Iterable[bytes]) -> None:
        """Delete keys locally and write tombstones to the changelog."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        doomed = list(keys)
        for key in doomed:
            batch.delete(key)
        self._db(partition).write(batch)
        for key in doomed:
            self.table.send_changelog(partition, key, None, key_serializer="raw", value_serializer="raw")

    def scan(self, partition: int) -> Iterator[tuple[bytes, bytes]]:
        """Every (user key, state record) of one partition; faust's bookkeeping keys skipped."""
        for key, value in self._db(partition).items():
            if not key.startswith(_FAUST_PREFIX):
                yield key, value

    def find(self, key: bytes) -> tuple[int, bytes] | None:
        """(partition, value) of a key held by this worker, searching its partitions."""
        for partition in sorted(self.table.data._dbs):
            value = self._db(partition).get(key)
            if value is not None:
                return partition, value
        return None

    def count(self) -> int:
        """Approximate number of users held locally (RocksDB's key estimate)."""
        total = 0
        for partition in list(self.table.data._dbs):
            total += int(self._db(partition).property_int_value("rocksdb.estimate-num-keys") or 0)
        return total
