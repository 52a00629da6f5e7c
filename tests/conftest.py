"""Shared fixtures: one real embedded broker per test session, the real default model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from models import ProfileModel, default_checkpoint_path
from streams.dev.embedded_broker import EmbeddedBroker

from .harness import Deployment


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


@pytest.fixture(scope="session")
def model() -> ProfileModel:
    return ProfileModel.load(default_checkpoint_path(), device="cpu")


@pytest.fixture
def deployment(broker: EmbeddedBroker, tmp_path: Path) -> Deployment:
    dep = Deployment(broker.bootstrap_servers, tmp_path)
    dep.create_topics()
    return dep


@pytest.fixture(scope="session")
def shared_data() -> Path | None:
    """../shared/data when the test command points PROFILESTREAM_SHARED_DATA at it."""
    path = os.environ.get("PROFILESTREAM_SHARED_DATA")
    return Path(path) if path else None
