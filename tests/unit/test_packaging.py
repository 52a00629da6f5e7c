"""The install split holds: the clients need only the base dependencies, the pipeline no Kafka client."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib

import pytest

from ..harness import REPO

#: Import name of each distribution the base install may bring.
IMPORT_NAMES = {"kafka-python": "kafka", "orjson": "orjson"}

PIPELINE_MODULES = ["streams.pipeline." + p.stem for p in sorted((REPO / "streams" / "pipeline").glob("*.py"))
                    if p.stem != "__init__"]


def third_party_imports(*modules: str) -> set[str]:
    """Top-level third-party packages loaded by importing ``modules`` in a fresh interpreter."""
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, text=True,
                                           capture_output=True).stdout))
    return {name for name in loaded
            if name not in sys.stdlib_module_names and name not in ("streams", "models") and not name.startswith("_")}


def test_the_clients_need_only_the_base_dependencies() -> None:
    base = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    allowed = {IMPORT_NAMES[re.split(r"[=<>!~ \[]", spec)[0]] for spec in base}
    loaded = third_party_imports("streams", "streams.clients", "streams.settings", "models.events",
                                 "streams.pipeline.validate")
    assert loaded <= allowed, f"the base install lacks {sorted(loaded - allowed)} (no torch, no faust for clients)"


@pytest.mark.parametrize("module", PIPELINE_MODULES)
def test_the_pipeline_imports_no_kafka_client(module: str) -> None:
    loaded = third_party_imports(module)
    assert not loaded & {"faust", "aiokafka", "mode", "kafka"}, f"{module} loads {sorted(loaded)}"


def imported_packages(paths: list) -> set[str]:
    """Top-level third-party packages that ``import`` statements in ``paths`` name."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("streams", "models", "__future__")}


def provided(*extras: str) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in extras for s in project["optional-dependencies"][extra]]
    return {DISTRIBUTION_IMPORTS.get(name, name.replace("-", "_"))
            for name in (re.split(r"[=<>!~ \[]", spec)[0] for spec in specs)}


#: Import name of each distribution whose import name differs from its own.
DISTRIBUTION_IMPORTS = {"kafka-python": "kafka", "faust-streaming": "faust", "mode-streaming": "mode",
                        "scikit-learn": "sklearn"}
#: Imported directly but installed by faust-streaming, whose web server they are.
VIA_FAUST = {"aiohttp", "yarl"}


#: `profilestream evaluate`'s tree peer: scikit-learn comes with the eval extra, never the worker's.
EVAL_ONLY = REPO / "models" / "tree_peer.py"


def test_the_worker_extra_holds_what_the_worker_and_model_import() -> None:
    paths = [p for p in (REPO / "streams").rglob("*.py") if "dev" not in p.relative_to(REPO).parts]
    paths += [p for p in (REPO / "models").rglob("*.py") if p != EVAL_ONLY]
    missing = imported_packages(paths) - provided("worker") - VIA_FAUST
    assert not missing, f"imported by the worker or the model but not in the worker extra: {sorted(missing)}"


def test_the_eval_extra_holds_what_the_tree_peer_imports() -> None:
    missing = imported_packages([EVAL_ONLY]) - provided("worker", "eval")
    assert not missing, f"imported by the tree peer but in neither the worker nor the eval extra: {sorted(missing)}"
    assert "sklearn" in imported_packages([EVAL_ONLY]) and "sklearn" not in provided("worker")


def test_the_dev_extra_holds_what_the_developer_tools_import() -> None:
    missing = imported_packages(list((REPO / "streams" / "dev").rglob("*.py"))) - provided("worker", "dev") - VIA_FAUST
    assert not missing, f"imported by streams/dev but not in the dev extra: {sorted(missing)}"
