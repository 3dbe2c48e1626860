"""The lab, once per test session: reused when it already runs, removed at the end when we started it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lab import lab as _lab


@pytest.fixture(scope="session")
def lab() -> Iterator[dict[str, Any]]:
    was_running = _lab.status() is not None
    info = _lab.up()
    yield info
    if not was_running and not os.environ.get("QRMFS_LAB_KEEP"):
        _lab.down()


def run_on(info: dict[str, Any], role: str, script: str, check: bool = True,
           input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a fixed test script on a lab host over ssh (verified host key)."""
    r = subprocess.run([*_lab.ssh_argv(info, role), script], capture_output=True, input=input, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"on {role}: {script!r} exited {r.returncode}: {r.stderr.decode(errors='replace')}")
    return r


@pytest.fixture
def on_storage(lab: dict[str, Any]) -> Any:
    return lambda script, **kw: run_on(lab, "storage", script, **kw)


@pytest.fixture
def on_source(lab: dict[str, Any]) -> Any:
    return lambda script, **kw: run_on(lab, "source", script, **kw)


@pytest.fixture
def mock(lab: dict[str, Any]) -> Iterator[httpx.Client]:
    """An httpx client on the openQRM mock, reset before and its faults cleared after each test."""
    with httpx.Client(base_url=lab["openqrm"]["base"], timeout=10) as c:
        c.post("/_mock/reset").raise_for_status()
        yield c
        c.delete("/_mock/fault")
