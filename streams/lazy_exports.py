"""Lazy re-exports for the package ``__init__`` files: a name's module is imported on first use.

A producer importing ``streams.clients`` must not load torch or faust just because
a sibling package's ``__init__`` re-exports the worker's API (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(package: str, modules: Mapping[str, Sequence[str]]
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package``; ``modules`` maps each
    (relative) module to the public names it defines."""
    owner = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = owner.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module, package), name)

    def __dir__() -> list[str]:
        return sorted(owner)

    return list(owner), __getattr__, __dir__
