"""The per-user value stored in the RocksDB table: a small versioned binary envelope.

Layout (little endian)::

    u8  format version (1)
    u8  length F of the model fingerprint, then F ASCII bytes
    i64 source offset of the last applied event (-1: none, e.g. after a backfill)
    u8  number N of remembered event-id hashes, then N x u64 (newest last)
    ... the model's own encoded user state (opaque here)

The fingerprint ties the state to the model that produced it, so a worker
started with another model can never misread it; the source offset is what
makes redelivered events detectable (effectively-once state over
at-least-once Kafka); the event-id hashes catch a producer re-sending an event.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

FORMAT_VERSION = 1
#: ``last_offset`` of a state loaded by a backfill: no source offset, the
#: user's last event timestamp is the cut-over (see streams/pipeline/admission.py).
BACKFILLED = -1
#: How many recent event ids a user remembers for duplicate detection.
RECENT_EVENT_IDS = 8

_HEAD = struct.Struct("<BB")
_OFFSET_COUNT = struct.Struct("<qB")


class StateRecordError(ValueError):
    """Stored bytes are not a state record this code can read."""


@dataclass(frozen=True, slots=True)
class StateRecord:
    fingerprint: str
    last_offset: int
    recent_event_ids: tuple[int, ...]
    model_state: bytes


def event_id_hash(event_id: str) -> int:
    """A stable 64-bit hash of an event id (two CRC32s; Python's hash() is salted)."""
    raw = event_id.encode("utf-8")
    return (zlib.crc32(raw) << 32) | zlib.crc32(raw, 0x9E3779B9)


def encode(record: StateRecord) -> bytes:
    fp = record.fingerprint.encode("ascii")
    ids = record.recent_event_ids[-RECENT_EVENT_IDS:]
    return b"".join((
        _HEAD.pack(FORMAT_VERSION, len(fp)), fp,
        _OFFSET_COUNT.pack(record.last_offset, len(ids)),
        struct.pack(f"<{len(ids)}Q", *ids),
        record.model_state,
    ))


def decode(data: bytes) -> StateRecord:
    try:
        version, fp_len = _HEAD.unpack_from(data, 0)
        if version != FORMAT_VERSION:
            raise StateRecordError(f"state record format {version} is not {FORMAT_VERSION}")
        pos = _HEAD.size
        fingerprint = data[pos:pos + fp_len].decode("ascii")
        pos += fp_len
        last_offset, n_ids = _OFFSET_COUNT.unpack_from(data, pos)
        pos += _OFFSET_COUNT.size
        ids = struct.unpack_from(f"<{n_ids}Q", data, pos)
        pos += 8 * n_ids
    except (struct.error, UnicodeDecodeError) as exc:
        raise StateRecordError(f"corrupt state record: {exc}") from exc
    return StateRecord(fingerprint, last_offset, ids, data[pos:])
