"""`profilestream snapshot` / `restore`: a consistent copy of all user state, and the way back to it.

A snapshot is taken from Kafka, not from a worker's disk, so it covers every
partition whichever worker owns it, and workers may keep running:

1. read the worker group's committed offsets on the events topic -- every
   event before them has been applied, and faust flushes the changelog before
   it commits;
2. then read the state changelog to its end and keep the newest record per key.

The state may already include events at or after the offsets of step 1;
that is harmless, because each state record remembers the source offset of
its last event and the worker skips redeliveries (streams/pipeline/admission.py).

Restore (workers stopped) appends the snapshot's records to the changelog as
its newest records, tombstones keys the snapshot does not have, and moves the
group's offsets back to the snapshot's: recovery then yields exactly the
snapshot state, and the events since are consumed and applied again, so a
restored worker catches up to what the live state would have been.  Restoring
a snapshot of an older model is how a model upgrade is rolled back.

Files in the snapshot directory: ``manifest.json`` (model fingerprints, time,
count, per-partition offsets) and ``states.bin`` (per record: u32 partition,
u32 key length, key, u32 value length, value; little endian).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from ..cli_common import (EXIT_UNAVAILABLE, CliError, add_json_flag, add_output_flag, add_quiet_flag, add_yes_flag,
                          confirm, emit, progress_bar)
from ..kafka.group_offsets import committed_offsets, reset_offsets
from ..settings import Settings
from ..state import codec as state_codec
from ..state.changelog import ChangelogRecord, deliver_records, ensure_changelog, read_latest

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
STATES = "states.bin"
_U32 = struct.Struct("<I")


def _write_states(path: Path, states: dict[bytes, tuple[int, bytes]]) -> None:
    with open(path, "wb") as out:
        for key, (partition, value) in sorted(states.items(), key=lambda kv: (kv[1][0], kv[0])):
            out.write(b"".join((_U32.pack(partition), _U32.pack(len(key)), key, _U32.pack(len(value)), value)))


def _read_states(path: Path) -> Iterator[ChangelogRecord]:
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        (partition,) = _U32.unpack_from(data, pos)
        (key_len,) = _U32.unpack_from(data, pos + 4)
        key = data[pos + 8:pos + 8 + key_len]
        pos += 8 + key_len
        (value_len,) = _U32.unpack_from(data, pos)
        yield partition, key, data[pos + 4:pos + 4 + value_len]
        pos += 4 + value_len


async def take_snapshot(settings: Settings, out_dir: Path, progress: tqdm | None = None) -> dict[str, Any]:
    """Write the snapshot files; returns the manifest.  ``progress`` counts changelog records read."""
    offsets = await committed_offsets(settings)  # first: see the module docstring
    states = await read_latest(settings, progress=progress)
    records = [(p, state_codec.decode(v)) for p, v in states.values()]
    max_applied: dict[int, int] = {}
    for partition, rec in records:
        max_applied[partition] = max(max_applied.get(partition, -1), rec.last_offset)
    manifest = {
        "format": FORMAT,
        "created_at_ms": int(time.time() * 1000),
        "app_id": settings.app_id,
        "events_topic": settings.events_topic,
        "partitions": settings.partitions,
        "count": len(states),
        "fingerprints": dict(Counter(rec.fingerprint for _, rec in records)),
        "events_offsets": {str(p): o for p, o in sorted(offsets.items())},
        "max_applied_offset": {str(p): o for p, o in sorted(max_applied.items())},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_states(out_dir / STATES, states)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(snapshot_dir: Path) -> dict[str, Any]:
    """The snapshot's manifest; :class:`CliError` (exit 3) when ``snapshot_dir`` is not a snapshot."""
    for path in (snapshot_dir / MANIFEST, snapshot_dir / STATES):
        if not path.is_file():
            raise CliError(f"{snapshot_dir} is not a snapshot: {path} does not exist", EXIT_UNAVAILABLE)
    try:
        manifest: dict[str, Any] = json.loads((snapshot_dir / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise CliError(f"{snapshot_dir / MANIFEST} is not valid JSON: {exc}") from None
    return manifest


async def restore(settings: Settings, snapshot_dir: Path, progress: tqdm | None = None) -> dict[str, Any]:
    """Make the snapshot the newest state and rewind the group to its offsets (workers stopped).

    ``progress`` counts the records written back to the changelog.
    """
    manifest = read_manifest(snapshot_dir)
    if manifest.get("format") != FORMAT:
        raise CliError(f"snapshot format {manifest.get('format')} is not {FORMAT}")
    if manifest["partitions"] != settings.partitions:
        raise CliError(f"snapshot has {manifest['partitions']} partitions, "
                       f"PROFILESTREAM_PARTITIONS is {settings.partitions}")
    records = list(_read_states(snapshot_dir / STATES))
    keep = {key for _, key, _ in records}
    await ensure_changelog(settings)
    doomed = [(p, key, None) for key, (p, _) in (await read_latest(settings)).items() if key not in keep]
    await deliver_records(settings, settings.changelog_topic, [*records, *doomed], progress=progress)
    await reset_offsets(settings, {int(p): o for p, o in manifest["events_offsets"].items()})
    manifest["removed"] = len(doomed)
    return manifest


def _cmd_snapshot(args: argparse.Namespace) -> int:
    with progress_bar(args, "snapshot: read changelog", "rec") as bar:
        manifest = asyncio.run(take_snapshot(Settings.from_env(), args.output, bar))
    emit(args, {**manifest, "output": str(args.output)},
         f"snapshot of {manifest['count']} states (models {', '.join(manifest['fingerprints']) or 'none'}) "
         f"written to {args.output}")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    manifest = read_manifest(args.source)  # before asking: a wrong path fails at once
    confirm(args, f"replace all user state of {settings.app_id} with the {manifest['count']} states of "
                  f"{args.source} and rewind its offsets on {settings.events_topic}")
    with progress_bar(args, "restore: write changelog", "rec") as bar:
        manifest = asyncio.run(restore(settings, args.source, bar))
    emit(args, {**manifest, "source": str(args.source)},
         f"restored {manifest['count']} states ({manifest['removed']} keys removed) from {args.source}; "
         f"start the workers with model {', '.join(manifest['fingerprints']) or '(any)'}: "
         f"events after the snapshot are applied again")
    return 0


def add_snapshot_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("snapshot", help="write a consistent copy of all user state to a directory")
    add_output_flag(p, "directory to write (created if missing)")
    add_json_flag(p)
    add_quiet_flag(p)
    p.set_defaults(func=_cmd_snapshot)
    p = subparsers.add_parser("restore", help="bring the state back to a snapshot (stop the workers first)")
    p.add_argument("--from", dest="source", type=Path, required=True, help="snapshot directory")
    add_yes_flag(p)
    add_json_flag(p)
    add_quiet_flag(p)
    p.set_defaults(func=_cmd_restore)
