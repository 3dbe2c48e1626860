"""The lab, once per test session: reused when it already runs, removed at the end when we started it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lab import lab as _lab

from .helpers import run_on, write_config


@pytest.fixture(scope="session")
def lab() -> Iterator[dict[str, Any]]:
    was_running = _lab.status() is not None
    info = _lab.up()
    yield info
    if not was_running and not os.environ.get("QRMFS_LAB_KEEP"):
        _lab.down()


@pytest.fixture
def on_storage(lab: dict[str, Any]) -> Any:
    return lambda script, **kw: run_on(lab, "storage", script, **kw)


@pytest.fixture
def on_source(lab: dict[str, Any]) -> Any:
    return lambda script, **kw: run_on(lab, "source", script, **kw)


@pytest.fixture
def mock(lab: dict[str, Any]) -> Iterator[httpx.Client]:
    """An httpx client on the openQRM mock, reset to a new install with the real server's deployment types
    before and its faults cleared after each test. A test that uses it gets a `cfg` pointing qrmfs at the
    mock instead of the real server."""
    with httpx.Client(base_url=lab["openqrm_mock"]["base"], timeout=10) as c:
        c.post("/_mock/reset").raise_for_status()
        # the real server's deployment types (their ids are the server's own): the config's deployment_id
        # means the same on both
        c.post("/_mock/state", json={"deployments": _lab.deployments(lab["name"])}).raise_for_status()
        yield c
        c.delete("/_mock/fault")


@pytest.fixture
def cfg(lab: dict[str, Any], tmp_path: Any, request: pytest.FixtureRequest) -> str:
    """qrmfs's config for the lab: the real openQRM server, or the mock when the test uses `mock`."""
    return write_config(lab, tmp_path, server="openqrm_mock" if "mock" in request.fixturenames else "openqrm")


@pytest.fixture
def image_path(lab: dict[str, Any], request: Any) -> Iterator[str]:
    """A fresh image name under /exports for one test, removed (with its siblings) afterwards."""
    import re
    import uuid

    name = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:30] + "_" + uuid.uuid4().hex[:6]
    yield f"/exports/{name}"
    run_on(lab, "storage", f"rm -rf /exports/{name} /exports/.{name}.qrmfs-*", check=False)
