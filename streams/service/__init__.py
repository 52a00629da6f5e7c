"""The running worker: the faust app and its process, web views, lookup, monitor, metrics, idle TTL.

``app`` wires the pipeline into faust (table, topics, timers, views); ``worker``
loads the model and runs it; ``metrics`` is the Prometheus registry.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_MODULES = {
    ".app": ["ProfileStreamApp", "build_app", "faust_config"],
    ".worker": ["load_model", "preflight", "run_worker"],
    ".web": ["is_ready", "readiness", "register_views"],
    ".lookup": ["current_profile", "register_lookup"],
    ".metrics": ["Metrics"],
    ".ttl": ["idle_users", "sweep"],
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _MODULES)
