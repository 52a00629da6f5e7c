"""Lifecycle commands run beside the workers: backfill from history, snapshot/restore, forget users.

docs/lifecycle.md explains when to use which.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_MODULES = {
    ".backfill": ["add_backfill_command"],
    ".snapshot": ["add_snapshot_commands", "take_snapshot", "restore"],
    ".forget": ["add_forget_command", "request_forget"],
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _MODULES)
