"""qrmfs/agent/loader.py: the agent's modules are compiled once per set of sources and Python, and the cached
code is used only when it is the user's own and nobody else may write it."""

from __future__ import annotations

import builtins
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from qrmfs import storage as S
from qrmfs.agent import loader

MODULES = [["qrmfs.agent.a", "X = 1\n"], ["qrmfs.agent.b", "def f():\n    return 2\n"]]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    return tmp_path / "c" / "qrmfs"


def _no_compile(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) every compile from now on."""
    calls: list[str] = []

    def refuse(*a: Any, **k: Any) -> Any:
        calls.append(a[1])
        raise AssertionError("compiled again")
    monkeypatch.setattr(builtins, "compile", refuse)
    return calls


def test_the_second_agent_loads_the_code_the_first_compiled(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = loader.compiled(MODULES, "k1")
    path = Path(loader.cache_file("k1") or "")
    assert path.parent == cache and path.name.startswith("agent-k1-")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600
    _no_compile(monkeypatch)
    again = loader.compiled(MODULES, "k1")
    assert sorted(again) == sorted(first) == ["qrmfs.agent.a", "qrmfs.agent.b"]
    ns: dict[str, Any] = {}
    exec(again["qrmfs.agent.b"], ns)
    assert ns["f"]() == 2


def test_other_sources_are_compiled_and_replace_the_older_file(cache: Path) -> None:
    loader.compiled(MODULES, "k1")
    changed = [["qrmfs.agent.a", "X = 3\n"], MODULES[1]]
    codes = loader.compiled(changed, "k2")
    ns: dict[str, Any] = {}
    exec(codes["qrmfs.agent.a"], ns)
    assert ns["X"] == 3
    assert [p.name.split("-")[1] for p in cache.iterdir()] == ["k2"]


@pytest.mark.parametrize("spoil", ["group-writable", "garbage", "other-modules", "directory-open-to-others"])
def test_a_cache_file_that_is_not_safe_or_not_whole_is_compiled_over(cache: Path, spoil: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    loader.compiled(MODULES, "k1")
    path = Path(loader.cache_file("k1") or "")
    if spoil == "group-writable":
        path.chmod(0o660)
    elif spoil == "garbage":
        path.write_bytes(b"\x00not marshal")
    elif spoil == "other-modules":
        loader.store(str(path), {"qrmfs.agent.a": compile("X = 9", "a", "exec")})
    else:
        cache.chmod(0o777)
    assert loader.cached(str(path), [n for n, _ in MODULES]) is None
    compiled: list[str] = []
    real = builtins.compile

    def counted(*a: Any, **k: Any) -> Any:
        compiled.append(a[1])
        return real(*a, **k)
    monkeypatch.setattr(builtins, "compile", counted)
    codes = loader.compiled(MODULES, "k1")
    assert compiled == ["qrmfs.agent.a", "qrmfs.agent.b"] and sorted(codes) == compiled


def test_a_cache_that_cannot_be_written_costs_only_the_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert sorted(loader.compiled(MODULES, "k1")) == ["qrmfs.agent.a", "qrmfs.agent.b"]
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    assert loader.cache_file("k1") is None
    assert loader.cache_file("../../etc/x") is None  # the key names a file in the cache directory, nothing else


def test_qrmfs_names_the_cache_by_the_agents_sources(cache: Path) -> None:
    """The key qrmfs sends is the digest of the very modules it sends: a change to any of them is compiled."""
    key = S.payload.sources_key()
    assert key.isalnum() and len(key) == 32
    payload = S.payload.payload(None)
    assert '"key": "' + key + '"' in payload and '"op"' not in payload
    assert os.path.basename(loader.cache_file(key) or "").startswith("agent-" + key)
