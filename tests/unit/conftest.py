"""Fixtures shared by the unit tests: an export root in tmp_path, and a `local` storage server on it (the real
agent, run in a subprocess with this interpreter)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from plumbum import local

from qrmfs.config import SshHost, Storage
from qrmfs.runner import Runner
from qrmfs.storage import StorageSide


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME of its own, and none of the operator's qrmfs settings or ssh agent in the environment."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("QRMFS_CONFIG", "QRMFS_PASSWORD", "SSH_AUTH_SOCK"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path.resolve() / "exports"
    r.mkdir()
    return r


@pytest.fixture
def side(root: Path) -> Iterator[StorageSide]:
    s = StorageSide(Storage("local", SshHost("local"), str(root)), Runner())
    yield s
    s.close()  # its agent session ends with the test


@pytest.fixture(autouse=True)
def pin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The agent's directory of pinned source keys (outside every export): a fresh one per test, never the
    machine's own. The local agent inherits it through the environment (plumbum keeps a copy of its own)."""
    d = tmp_path / "pins"
    monkeypatch.setenv("QRMFS_PIN_DIR", str(d))
    with local.env(QRMFS_PIN_DIR=str(d)):
        yield d


@pytest.fixture(scope="session")
def agent_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def agent_cache(agent_cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """$XDG_CACHE_HOME, where the agent's loader keeps the code it compiled (agent/loader.py): one per test
    worker, not the machine's, shared by its tests, so that their agents load it as a storage server's do."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(agent_cache_home))
    with local.env(XDG_CACHE_HOME=str(agent_cache_home)):
        yield agent_cache_home / "qrmfs"
