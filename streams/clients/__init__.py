"""What producers and rankers import: no torch, no faust (the base install; a test checks).

``EventProducer`` sends events validated by the worker's own rule;
``ProfileSubscriber`` keeps the latest profile per user from the compacted topic;
``LookupClient`` / ``AsyncLookupClient`` ask the workers for many users' profiles at once.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_MODULES = {
    ".producer": ["EventProducer", "DeliveryError", "DeliveryFailure"],
    ".subscriber": ["ProfileSubscriber"],
    ".lookup": ["LookupClient", "AsyncLookupClient", "LookupClientError", "ProfileResult"],
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _MODULES)
