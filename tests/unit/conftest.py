"""Fixtures shared by the unit tests: an export root in tmp_path, and a `local` storage server on it (the real
agent, run in a subprocess with this interpreter)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrmfs.config import SshHost, Storage
from qrmfs.runner import Runner
from qrmfs.storage import StorageSide


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path.resolve() / "exports"
    r.mkdir()
    return r


@pytest.fixture
def side(root: Path) -> StorageSide:
    return StorageSide(Storage("local", SshHost("local"), str(root)), Runner())
