"""State lookup and state write, batched, on faust's RocksDB table store.

Faust's ``table[key]`` API picks the RocksDB partition and changelog partition
from the *current event*, which does not exist for a micro-batch, and costs a
changelog send plus several Python calls per key.  This adapter reads with one
RocksDB multi-get per source partition and writes one ``WriteBatch`` per
partition, for the write-behind cache in front of it (streams/state/cache.py).  It hands the changelog records to faust's Kafka producer as whole
record batches (streams/kafka/record_batches.py) and keeps faust's recovery
bookkeeping itself (on each acknowledgement, the changelog offset the
partition's RocksDB holds data up to): faust's route (``send_soon``, its
buffer and ``FutureMessage`` machinery) cost a large share of a user's whole
step (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Sequence

import faust
import rocksdict

from ..internals import open_partitions, partition_db
from ..kafka.delivery import DeliveryGuard
from ..kafka.record_batches import SentBatch, client, send_records

#: Keys faust keeps in each partition's RocksDB next to ours (its changelog offset).
_FAUST_PREFIX = b"__faust\0"



def write_atomically(db: rocksdict.Rdict, items: Sequence[tuple[bytes, bytes | None]]) -> None:
    """Puts and deletes (value None) in one RocksDB write batch: all of them or, after a crash, none."""
    batch = rocksdict.WriteBatch(raw_mode=True)
    for key, value in items:
        if value is None:
            batch.delete(key)
        else:
            batch.put(key, value)
    db.write(batch)

class TableStateStore:
    """Batched access to a faust ``Table`` whose store is ``rocksdb://``."""

    def __init__(self, table: faust.Table, guard: DeliveryGuard) -> None:
        self.table = table
        #: Watches every changelog delivery (streams/kafka/delivery.py).
        self.guard = guard
        #: Partition -> the changelog offset last recorded in its RocksDB.
        self._recorded: dict[int, int] = {}

    def _db(self, partition: int) -> rocksdict.Rdict:
        # The store opens one RocksDB per table partition; faust has no public accessor.
        return partition_db(self.table, partition)

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values for ``keys`` (None where absent), in order, in one multi-get."""
        if not keys:
            return []
        return list(self._db(partition)[list(keys)])

    def write_local(self, partition: int, items: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Write puts and deletes (value None) to the partition's RocksDB in one atomic batch."""
        write_atomically(self._db(partition), items)

    async def send_changelog(self, partition: int, items: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Hand the changelog records of a local write to the Kafka client (value None: a tombstone).

        When this returns the records sit in the client's buffer, in order;
        the commit waits for their acknowledgement (streams/kafka/delivery.py),
        so a commit never covers a state change the changelog could lose.
        """
        topic = self.table.changelog_topic.get_topic_name()
        for sent in await send_records(client(self.table.app.producer), topic, partition, items):
            self.guard.watch(sent.delivery, f"{sent.count} state changelog records for {topic}[{partition}]")
            sent.delivery.add_done_callback(functools.partial(self._on_delivered, sent))

    def _on_delivered(self, sent: SentBatch, delivery: asyncio.Future) -> None:
        """Record the acknowledged offset where faust's recovery starts reading (faust's own rule).

        Never ahead of the broker: a record not acknowledged (failed, or still
        in flight at a crash) is read again by recovery, which replays the
        changelog from this offset to its end.
        """
        if delivery.cancelled() or delivery.exception() is not None:
            return  # the guard reports it; the recovery offset stays at the last acknowledged record
        last = delivery.result().offset + sent.count - 1  # the batch's first offset, then one per record
        partition = sent.partition
        if partition in open_partitions(self.table) and last > self._recorded.get(partition, -1):
            self._db(partition).put(self.table.data.offset_key, str(last).encode())
            self._recorded[partition] = last

    def scan_chunk(self, partition: int, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` (user key, state record) pairs of one partition in key order, starting
        after key ``after`` (from the first key if None); faust's bookkeeping keys skipped.

        A chunk, not an iterator: the caller yields to the event loop between
        chunks, and an iterator left open across that could outlive the
        partition's database (closed when the partition is revoked).
        """
        out: list[tuple[bytes, bytes]] = []
        for key, value in self._db(partition).items(from_key=after):
            if key == after or key.startswith(_FAUST_PREFIX):
                continue
            out.append((key, value))
            if len(out) == limit:
                break
        return out

    def count(self) -> int:
        """Approximate number of users held locally (RocksDB's key estimate)."""
        total = 0
        for partition in open_partitions(self.table):
            total += int(self._db(partition).property_int_value("rocksdb.estimate-num-keys") or 0)
        return total
