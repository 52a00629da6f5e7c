"""The raw Kafka record as the pipeline sees it, independent of the consumer library.

Both the faust agent and any faster source hand the processor these, so the
steps after consumption do not depend on how records were fetched.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """One consumed record: where it came from and its untouched bytes."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    #: Kafka record headers; control records (streams/pipeline/control.py) are marked by one.
    headers: tuple[tuple[str, bytes], ...] = ()
