"""Read public behaviour logs and the stream's JSONL into canonical events.

Each format maps its rows to a JSON object of the event contract and hands it
to :func:`models.events.event_from_dict`, so a row is valid here exactly when
the stream would accept it.  Rows that break the format or the contract are
counted by reason, reported in the log and skipped -- a loader never crashes
on bad data.  Formats without event ids get a deterministic one
(``"<format>:<line number>"``) so replays and dead-letter records can point
back at the source line.

Mappings:

* ``taobao`` -- UserBehavior.csv, no header: ``user,item,category,behavior,ts``
  (Unix seconds); pv->view, fav->favorite, cart->cart, buy->purchase.
* ``retailrocket`` -- events.csv with header ``timestamp,visitorid,event,
  itemid,transactionid`` (Unix ms); view->view, addtocart->cart,
  transaction->purchase.  The file has no category, so the item is used as its
  own category (``top_categories`` then name items).
* ``rees46`` -- header ``event_time,event_type,product_id,category_id,
  category_code,brand,price,user_id,user_session``; view/cart/purchase map to
  themselves.  ``remove_from_cart`` has no canonical type and is not an
  intent signal we model, so those rows are skipped and counted under
  ``skipped_remove_from_cart`` (not as malformed).
* ``jsonl`` -- one event object per line in the stream's event contract.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator, TextIO

from tqdm import tqdm

from models.events import Event, EventError, event_from_dict

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("jsonl", "taobao", "retailrocket", "rees46")

TAOBAO_TYPES = {"pv": "view", "fav": "favorite", "cart": "cart", "buy": "purchase"}
RETAILROCKET_TYPES = {"view": "view", "addtocart": "cart", "transaction": "purchase"}
REES46_TYPES = {"view": "view", "cart": "cart", "purchase": "purchase"}
#: Rows of a known, deliberately unmodelled kind: skipped, but not "malformed".
REES46_SKIPPED = {"remove_from_cart"}

#: Historical logs are replayed long after they were written; only the
#: contract's "not absurdly far in the future" check makes sense for them.
_FAR_FUTURE_MS = 2**62


@dataclass
class LoadResult:
    """Events in input order plus what was dropped and why."""

    events: list[Event]
    malformed: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())

    def summary(self) -> str:
        parts = [f"{len(self.events)} events"]
        if self.malformed:
            parts.append(f"{self.malformed_total} malformed rows skipped ({dict(self.malformed)})")
        if self.skipped:
            parts.append(f"{sum(self.skipped.values())} rows skipped ({dict(self.skipped)})")
        return ", ".join(parts)


class _Skip(Exception):
    """A well-formed row of a kind the model does not use."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _taobao(row: list[str], line_no: int) -> dict[str, Any]:
    if len(row) != 5:
        raise EventError("bad_row", f"expected 5 columns, got {len(row)}")
    user, item, category, behavior, ts = row
    if behavior not in TAOBAO_TYPES:
        raise EventError("unknown_type", f"behavior {behavior!r}")
    return {"event_id": f"taobao:{line_no}", "user_id": user, "item_id": item,
            "category_id": category, "type": TAOBAO_TYPES[behavior], "timestamp": int(ts) * 1000}


def _retailrocket(row: dict[str, str], line_no: int) -> dict[str, Any]:
    kind = row.get("event")
    if kind not in RETAILROCKET_TYPES:
        raise EventError("unknown_type", f"event {kind!r}")
    item = row.get("itemid")
    return {"event_id": f"retailrocket:{line_no}", "user_id": row.get("visitorid"), "item_id": item,
            "category_id": item, "type": RETAILROCKET_TYPES[kind], "timestamp": int(row["timestamp"])}


def _rees46(row: dict[str, str], line_no: int) -> dict[str, Any]:
    kind = row.get("event_type")
    if kind in REES46_SKIPPED:
        raise _Skip(kind)
    if kind not in REES46_TYPES:
        raise EventError("unknown_type", f"event_type {kind!r}")
    when = datetime.strptime(row["event_time"].replace(" UTC", "+0000"), "%Y-%m-%d %H:%M:%S%z")
    price = row.get("price")
    return {"event_id": f"rees46:{line_no}", "user_id": row.get("user_id"), "item_id": row.get("product_id"),
            "category_id": row.get("category_id"), "type": REES46_TYPES[kind],
            "timestamp": int(when.timestamp() * 1000), "price": float(price) if price else None,
            "session_id": row.get("user_session") or None}


def _csv_rows(handle: TextIO, header: bool) -> Iterator[tuple[int, Any]]:
    """(1-based line number, row) pairs; dict rows when the file has a header."""
    if header:
        reader: Any = csv.DictReader(handle)
        for row in reader:
            yield reader.line_num, row
    else:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            yield line_no, row


def _jsonl_rows(handle: TextIO) -> Iterator[tuple[int, Any]]:
    for line_no, line in enumerate(handle, start=1):
        if line.strip():
            yield line_no, line


_MAPPERS: dict[str, tuple[Callable[[Any, int], dict[str, Any]], bool]] = {
    "taobao": (_taobao, False),
    "retailrocket": (_retailrocket, True),
    "rees46": (_rees46, True),
}


def parse_events(handle: Iterable[str], fmt: str) -> LoadResult:
    """Parse an open text stream (or any iterable of its lines) of format ``fmt``; see the module docstring."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    result = LoadResult(events=[])
    rows = _jsonl_rows(handle) if fmt == "jsonl" else _csv_rows(handle, _MAPPERS[fmt][1])
    for line_no, row in rows:
        try:
            if fmt == "jsonl":
                obj = json.loads(row)
            else:
                obj = _MAPPERS[fmt][0](row, line_no)
            result.events.append(event_from_dict(obj, now_ms=_FAR_FUTURE_MS))
        except _Skip as skip:
            result.skipped[skip.reason] += 1
        except EventError as err:
            result.malformed[err.reason] += 1
        except (ValueError, KeyError, TypeError, AttributeError):  # unparsable number/date/JSON, missing column
            result.malformed["unparsable"] += 1
    return result


def _lines_with_progress(handle: TextIO, progress: tqdm) -> Iterator[str]:
    """``handle``'s lines; ``progress`` follows the bytes read from the file (checked every few
    thousand lines: a bar update per line would cost more than parsing short CSV rows)."""
    progress.reset(total=os.fstat(handle.fileno()).st_size)
    for i, line in enumerate(handle):
        if i % 4096 == 0:
            progress.update(handle.buffer.tell() - progress.n)
        yield line
    progress.update(progress.total - progress.n)


def load_events(path: str | os.PathLike[str], fmt: str, progress: tqdm | None = None) -> LoadResult:
    """Load a whole file; logs what was skipped so bad input is never silent.

    ``progress``: a bar that counts the file's bytes as they are parsed.
    """
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        result = parse_events(handle if progress is None else _lines_with_progress(handle, progress), fmt)
    level = logging.WARNING if result.malformed else logging.INFO
    log.log(level, "loaded %s: %s", os.fspath(path), result.summary())
    return result
