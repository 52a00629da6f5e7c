"""streams/internals.py: every private third-party name it lists exists, and no other module uses one."""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.metadata
from pathlib import Path
from typing import Any

import aiokafka
from aiokafka.client import AIOKafkaClient
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.consumer.subscription_state import SubscriptionState
import faust
import pytest
from prometheus_client import CollectorRegistry, Histogram

from streams import internals

from ..harness import REPO

PACKAGES = ("streams", "models")
#: Standard-library private names allowed anywhere: argparse has no public name for the
#: subcommand action the ``add_*_command`` functions annotate.
STDLIB_PRIVATE = {"_SubParsersAction"}


def resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instances(tmp_path: Path) -> dict[str, Any]:
    """One real object per owner of a per-instance name, built as the worker builds them."""
    app = faust.App("internals-test", broker="kafka://127.0.0.1:1", store="rocksdb://", datadir=str(tmp_path))
    consumer = app.consumer
    table = app.Table("user-state", partitions=1)

    async def kafka_consumer() -> aiokafka.AIOKafkaConsumer:
        return aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")

    async def fetcher() -> Fetcher:
        # What AIOKafkaConsumer.start() builds; its background task is stopped again at once.
        built = Fetcher(AIOKafkaClient(bootstrap_servers="127.0.0.1:1"), SubscriptionState())
        await built.close()
        return built

    return {
        "aiokafka.AIOKafkaConsumer": asyncio.run(kafka_consumer()),
        "aiokafka.consumer.fetcher.Fetcher": asyncio.run(fetcher()),
        "faust.transport.drivers.aiokafka.Consumer": consumer,
        "mode.Service": consumer,
        "faust.sensors.monitor.Monitor": app.monitor,
        "faust.stores.rocksdb.Store": table.data,
        "prometheus_client.Histogram": Histogram("h", "h", registry=CollectorRegistry()),
    }


def test_the_pinned_versions_are_installed() -> None:
    installed = {name: importlib.metadata.version(name) for name in internals.PINNED}
    assert installed == internals.PINNED, "an upgrade: check every name in streams/internals.py, then the pins"


def test_every_listed_private_name_exists_in_the_installed_versions(tmp_path: Path) -> None:
    objects = instances(tmp_path)
    missing = []
    for entry in internals.PRIVATE_NAMES:
        owner = objects[entry.owner] if entry.per_instance else resolve(entry.owner)
        assert isinstance(owner, resolve(entry.owner)) or not entry.per_instance
        if not hasattr(owner, entry.name):
            missing.append(f"{entry.owner}.{entry.name}")
    assert not missing, f"removed or renamed by an upgrade: {missing}"


def our_private_names() -> set[str]:
    """Private names our own code defines (methods, attributes, module globals)."""
    names: set[str] = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    names.add(node.attr)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    names.add(node.id)
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def private_accesses(path: Path) -> set[str]:
    return {node.attr for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")}


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for package in PACKAGES
                                        for p in (REPO / package).rglob("*.py")
                                        if p != REPO / "streams" / "internals.py"))
def test_no_other_module_touches_a_private_name(path: str) -> None:
    listed = {entry.name for entry in internals.PRIVATE_NAMES}
    ours = (our_private_names() - listed) | STDLIB_PRIVATE
    foreign = private_accesses(REPO / path) - ours
    assert not foreign, f"{path} uses private names {sorted(foreign)}: move the access into streams/internals.py"


def test_no_class_outside_internals_overrides_a_private_third_party_name() -> None:
    overrides = []
    for path in sorted((REPO / "streams").rglob("*.py")):
        module_name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        if module_name == "streams.internals":
            continue
        module = importlib.import_module(module_name)
        for cls in [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module_name]:
            foreign_bases = [b for b in cls.__mro__[1:] if not b.__module__.startswith(("streams", "builtins"))]
            methods = [name for name, value in vars(cls).items()
                       if isinstance(value, (staticmethod, classmethod, property)) or callable(value)]
            for name in methods:
                if name.startswith("_") and not name.startswith("__") and any(hasattr(b, name) for b in foreign_bases):
                    overrides.append(f"{module_name}.{cls.__name__}.{name}")
    assert not overrides, f"private third-party methods overridden outside streams/internals.py: {overrides}"
