"""`profilestream backfill`: warm-start every user's state from a history log.

Streaming a year of history through Kafka would take hours; here each user's
whole sequence goes through one packed LSTM call (``ProfileModel.advance``
from an unseen user's state, batched over many users), which is what the
stream computes too, to float rounding.  The same admission rules as the
worker's (duplicate event ids, too-late events) decide which events count, so
the result equals what streaming the same events in the same order gives.

The states are loaded the way a worker itself persists them: appended to the
table's changelog topic, in the partition of the user's key
(streams/state/changelog.py); a worker starting afterwards recovers them into its
RocksDB.  Each user's profile is published too, so rankers are warm at once.

A log has no Kafka offsets, so records are marked ``last_offset = -1`` and the
user's last event timestamp is the cut-over: live events stamped at or before
it are skipped as already applied (streams/pipeline/admission.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from tqdm import tqdm

from models import ProfileModel
from models.events import Event
from models.loaders import FORMATS, load_events

from ..cli_common import add_json_flag, add_quiet_flag, add_yes_flag, confirm, emit, progress_bar
from ..kafka.group_offsets import beginning_offsets, reset_offsets
from ..kafka.topics import ensure_topics
from ..pipeline.admission import DEFAULT_MAX_LATENESS_MS, admit
from ..pipeline.partitioning import partition_for
from ..pipeline.profile_message import profile_message
from ..pipeline.source_record import SourceRecord
from ..pipeline.validate import Accepted
from ..settings import Settings
from ..state import codec as state_codec
from ..state.changelog import deliver_records, ensure_changelog
from ..state.codec import BACKFILLED, StateRecord

log = logging.getLogger(__name__)

#: Padded events ([longest sequence] x [users]) per model call; bounds memory.
EVENTS_PER_CALL = 32_768


@dataclass(frozen=True)
class Backfilled:
    """One user's final state record and profile message."""

    user_id: str
    record: bytes
    profile: bytes


def admitted_sequences(events: Sequence[Event], max_lateness_ms: int = DEFAULT_MAX_LATENESS_MS
                       ) -> dict[str, tuple[list[Event], tuple[int, ...]]]:
    """user -> (events the worker would apply, in order; their recent id hashes).

    Runs the worker's own admission rules; each event's position in the log
    stands in for its source offset.
    """
    by_user: dict[str, list[Accepted]] = defaultdict(list)
    for i, event in enumerate(events):
        by_user[event.user_id].append(Accepted(SourceRecord("backfill", 0, i, event.timestamp_ms, None, None), event))
    out = {}
    for user, items in by_user.items():
        adm = admit(items, None, None, max_lateness_ms)
        if adm.apply:
            out[user] = ([a.event for a in adm.apply], adm.recent_ids)
    return out


def compute(model: ProfileModel, events: Sequence[Event], progress: tqdm | None = None) -> list[Backfilled]:
    """Every user's final state after ``events`` (in log order), batched over whole sequences.

    ``progress`` counts the users computed.
    """
    sequences = admitted_sequences(events)
    users = sorted(sequences, key=lambda u: -len(sequences[u][0]))  # longest first: little padding
    if progress is not None:
        progress.reset(total=len(users))
    now_ms = int(time.time() * 1000)
    out: list[Backfilled] = []
    start = 0
    while start < len(users):
        width = len(sequences[users[start]][0])
        chunk = users[start:start + max(1, EVENTS_PER_CALL // width)]
        start += len(chunk)
        result = model.advance([None] * len(chunk), [sequences[u][0] for u in chunk])
        for row, (user, state) in enumerate(zip(chunk, result.states)):
            record = StateRecord(model.fingerprint, BACKFILLED, sequences[user][1], model.encode_state(state))
            profile = profile_message(user, model.version, now_ms, state.n_events, state.last_timestamp_ms,
                                      result.profile[row], result.intent[row], result.top_categories[row])
            out.append(Backfilled(user, state_codec.encode(record), profile))
        if progress is not None:
            progress.update(len(chunk))
    return out


async def load(settings: Settings, users: Sequence[Backfilled], publish: bool = True,
               progress: tqdm | None = None) -> None:
    """Append the states to the changelog (and profiles to the profile topic); workers must be stopped.

    ``progress`` counts the records acknowledged, topic by topic.
    """
    await ensure_topics(settings)
    await ensure_changelog(settings)
    await deliver_records(settings, settings.changelog_topic,
                       ((partition_for(u.user_id.encode(), settings.partitions), u.user_id.encode(), u.record)
                        for u in users), progress)
    if publish:
        if progress is not None:
            progress.set_description(f"backfill: {settings.profiles_topic}")
        await deliver_records(settings, settings.profiles_topic,
                           ((partition_for(u.user_id.encode(), settings.partitions), u.user_id.encode(), u.profile)
                            for u in users), progress)


async def rewind(settings: Settings) -> None:
    """Make the worker group re-read the events topic from its start (cut-overs skip the history)."""
    await reset_offsets(settings, await beginning_offsets(settings))


def _cmd_backfill(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.rewind:
        confirm(args, f"make group {settings.app_id} re-read {settings.events_topic} from its start")
    model = ProfileModel.load(args.model, args.device)
    with progress_bar(args, "backfill: read log", "B", unit_scale=True) as bar:
        events = load_events(args.data, args.format, progress=bar).events
    started = time.perf_counter()
    with progress_bar(args, "backfill: compute", "user") as bar:
        users = compute(model, events, bar)
    computed = time.perf_counter() - started
    log.info("computed %d users' states from %d events in %.1f s (%.0f events/s) with model %s",
             len(users), len(events), computed, len(events) / max(computed, 1e-9), model.fingerprint)
    with progress_bar(args, f"backfill: {settings.changelog_topic}", "rec") as bar:
        asyncio.run(load(settings, users, publish=not args.no_publish, progress=bar))
    if args.rewind:
        asyncio.run(rewind(settings))
    seconds = time.perf_counter() - started
    emit(args, {"users": len(users), "events": len(events), "model": model.fingerprint,
                "changelog_topic": settings.changelog_topic, "published": not args.no_publish,
                "rewound": args.rewind, "seconds": round(seconds, 3)},
         f"loaded {len(users)} users' states from {len(events)} events into {settings.changelog_topic} "
         f"in {seconds:.1f} s (model {model.fingerprint})" + ("; group rewound" if args.rewind else ""))
    return 0


def add_backfill_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("backfill", help="compute every user's state from a history log and load it "
                                               "for the workers (stop them first)")
    p.add_argument("--model", required=True, help="checkpoint (.pt) the workers will run")
    p.add_argument("--data", required=True, help="history log")
    p.add_argument("--format", required=True, choices=FORMATS, help="format of --data")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--no-publish", action="store_true", help="do not publish the backfilled profiles")
    p.add_argument("--rewind", action="store_true",
                   help="also make the worker group re-read the events topic from its start "
                        "(events up to each user's cut-over are skipped); asks first unless --yes")
    add_yes_flag(p)
    add_json_flag(p)
    add_quiet_flag(p)
    p.set_defaults(func=_cmd_backfill)
