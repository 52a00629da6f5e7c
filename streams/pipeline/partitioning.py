"""Where a key lives: the Kafka default partitioner, as producers apply it.

A user's state must sit in the changelog partition numbered like the events
partition holding the user's events (the worker stores state under the
*source* partition), and the validator refuses events a producer put on
another partition.  Event producers use the Kafka default partitioner
(murmur2 of the key, as the Java client, aiokafka and kafka-python do), so
:func:`partition_for` does the same.  The hash is written out here rather
than imported so the pipeline needs no Kafka client; a unit test checks it
against aiokafka's and kafka-python's.
"""

from __future__ import annotations

__all__ = ["murmur2", "partition_for"]

_MASK = 0xFFFFFFFF
_SEED = 0x9747B28C
_M = 0x5BD1E995


def murmur2(data: bytes) -> int:
    """MurmurHash2 as org.apache.kafka.common.utils.Utils.murmur2 computes it (unsigned 32 bits)."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    tail = length & ~3
    for i in range(0, tail, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    extra = length & 3
    if extra >= 3:
        h ^= data[tail + 2] << 16
    if extra >= 2:
        h ^= data[tail + 1] << 8
    if extra >= 1:
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition the Kafka default partitioner gives ``key`` (murmur2, positive, modulo)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
