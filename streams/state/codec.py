"""The per-user value stored in the RocksDB table: a small versioned binary envelope.

Layout (little endian)::

    u8  format version (2)
    u8  length F of the model fingerprint, then F ASCII bytes
    i64 source offset of the last applied event (-1: none, e.g. after a backfill)
    u8  number N of remembered event-id hashes, then N x u64 (newest last)
    u8  number L of legacy event-id hashes, then L x u64 (all older than the N)
    ... the model's own encoded user state (opaque here)

Format 1 (no legacy count) hashed event ids as two CRC32s of the same bytes,
which collide together as often as one CRC32 does (a 32-bit hash: a duplicate
check that wrongly skips one event in ~4 billion pairs).  Format 2 hashes with
BLAKE2b-64.  A format-1 record still decodes: its hashes become the *legacy*
ids, which admission checks with the old hash, so an event re-sent across the
upgrade is still caught; they age out as the user's next events are applied.

The fingerprint ties the state to the model that produced it, so a worker
started with another model can never misread it; the source offset is what
makes redelivered events detectable (effectively-once state over
at-least-once Kafka); the event-id hashes catch a producer re-sending an event.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

FORMAT_VERSION = 2
#: The format before event ids were hashed with BLAKE2b (still decoded).
LEGACY_FORMAT_VERSION = 1
#: ``last_offset`` of a state loaded by a backfill: no source offset, the
#: user's last event timestamp is the cut-over (see streams/pipeline/admission.py).
BACKFILLED = -1
#: How many recent event ids a user remembers for duplicate detection.
RECENT_EVENT_IDS = 8

_HEAD = struct.Struct("<BB")
_OFFSET_COUNT = struct.Struct("<qB")
_COUNT = struct.Struct("<B")


class StateRecordError(ValueError):
    """Stored bytes are not a state record this code can read."""


@dataclass(frozen=True, slots=True)
class StateRecord:
    fingerprint: str
    last_offset: int
    recent_event_ids: tuple[int, ...]
    model_state: bytes
    #: Format-1 hashes (:func:`legacy_event_id_hash`) of events older than ``recent_event_ids``.
    legacy_event_ids: tuple[int, ...] = ()


def event_id_hash(event_id: str) -> int:
    """A stable 64-bit hash of an event id (BLAKE2b; Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(event_id.encode("utf-8"), digest_size=8).digest(), "little")


def legacy_event_id_hash(event_id: str) -> int:
    """The format-1 hash (two CRC32s of the same bytes), to match ids remembered before the upgrade."""
    raw = event_id.encode("utf-8")
    return (zlib.crc32(raw) << 32) | zlib.crc32(raw, 0x9E3779B9)


def encode(record: StateRecord) -> bytes:
    fp = record.fingerprint.encode("ascii")
    ids = record.recent_event_ids[-RECENT_EVENT_IDS:]
    legacy = record.legacy_event_ids[len(record.legacy_event_ids) - max(0, RECENT_EVENT_IDS - len(ids)):]
    return b"".join((
        _HEAD.pack(FORMAT_VERSION, len(fp)), fp,
        _OFFSET_COUNT.pack(record.last_offset, len(ids)),
        struct.pack(f"<{len(ids)}Q", *ids),
        _COUNT.pack(len(legacy)),
        struct.pack(f"<{len(legacy)}Q", *legacy),
        record.model_state,
    ))


def decode(data: bytes) -> StateRecord:
    try:
        version, fp_len = _HEAD.unpack_from(data, 0)
        if version not in (FORMAT_VERSION, LEGACY_FORMAT_VERSION):
            raise StateRecordError(f"state record format {version} is not {FORMAT_VERSION} "
                                   f"(or {LEGACY_FORMAT_VERSION})")
        pos = _HEAD.size
        fingerprint = data[pos:pos + fp_len].decode("ascii")
        pos += fp_len
        last_offset, n_ids = _OFFSET_COUNT.unpack_from(data, pos)
        pos += _OFFSET_COUNT.size
        ids = struct.unpack_from(f"<{n_ids}Q", data, pos)
        pos += 8 * n_ids
        if version == LEGACY_FORMAT_VERSION:
            return StateRecord(fingerprint, last_offset, (), data[pos:], legacy_event_ids=ids)
        (n_legacy,) = _COUNT.unpack_from(data, pos)
        pos += _COUNT.size
        legacy = struct.unpack_from(f"<{n_legacy}Q", data, pos)
        pos += 8 * n_legacy
    except (struct.error, UnicodeDecodeError) as exc:
        raise StateRecordError(f"corrupt state record: {exc}") from exc
    return StateRecord(fingerprint, last_offset, ids, data[pos:], legacy)
