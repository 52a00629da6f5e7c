"""Developer tools, installed with the ``dev`` extra: the embedded broker, synthetic traffic, demo, produce, bench.

Nothing in the worker's runtime path imports this package.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_MODULES = {
    ".embedded_broker": ["EmbeddedBroker", "free_port"],
    ".traffic": ["SyntheticTraffic"],
    ".demo": ["DemoOptions", "run_demo"],
    ".produce": ["add_produce_command"],
    ".bench": ["add_bench_command"],
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _MODULES)
