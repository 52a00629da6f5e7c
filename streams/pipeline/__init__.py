"""The hot path, one module per step; imports no faust and no aiokafka (a test checks).

``source_record`` (what the fetch loop hands over) -> ``validate`` -> ``grouping``
(by user) -> ``admission`` (against the stored state) -> the model step ->
``profile_message``; ``control`` reads forget and expire requests;
``partitioning`` is the Kafka default partitioner; ``model_guard`` is the rule
that a worker never applies events to another model's (or another log's)
state; ``processor``
strings the steps together behind two ports, a state store and a publisher.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_MODULES = {
    ".source_record": ["SourceRecord"],
    ".validate": ["Accepted", "Rejection", "check_message", "check_partition", "unprocessable", "validate_record",
                  "validate_batch", "MAX_VALUE_BYTES"],
    ".grouping": ["UserBatch", "group_by_user"],
    ".admission": ["Admission", "admit", "DEFAULT_MAX_LATENESS_MS"],
    ".control": ["CONTROL_HEADER", "ControlRequest", "control_request", "expire_headers", "forget_headers",
                 "is_control"],
    ".partitioning": ["partition_for"],
    ".model_guard": ["ModelMismatchError", "StateAheadOfLogError", "StoredStateError", "ahead_message",
                     "mismatch_message"],
    ".profile_message": ["PROFILE_SCHEMA_VERSION", "profile_message"],
    ".processor": ["BatchProcessor", "BatchReport", "PreparedBatch", "Publisher", "StateStore"],
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _MODULES)
