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


def write_config(lab: dict[str, Any], directory: Any, *, retries: int = 1, timeout: float = 3.0) -> str:
    """A qrmfs config for the lab with its own spool dir and quick openQRM retries (tests stay fast)."""
    path = directory / "qrmfs.toml"
    path.write_text(_lab.config_toml(lab, spool_dir=str(directory / "spool"), timeout=timeout, retries=retries,
                                     backoff=0.05))
    return str(path)


def qrmfs(*args: str, config: str | None = None, env: dict[str, str] | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real qrmfs CLI in a subprocess (real exit codes, real stderr)."""
    import sys

    argv = [sys.executable, "-m", "qrmfs", *args] + (["--config", config] if config else [])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def result_of(r: subprocess.CompletedProcess[str], ok: bool = True) -> Any:
    """The result inside qrmfs's --json envelope (README "JSON output"), after checking the envelope."""
    import json

    env = json.loads(r.stdout)
    assert env["schema"] == 1 and env["ok"] is ok, env
    return env["result"]


@pytest.fixture
def cfg(lab: dict[str, Any], tmp_path: Any) -> str:
    return write_config(lab, tmp_path)


def tree_info(info: dict[str, Any], role: str, root: str) -> dict[str, Any]:
    import json
    from pathlib import Path

    script = (Path(__file__).parent / "treeinfo.py").read_bytes()
    r = run_on(info, role, f"python3 - {root}", input=script)
    return json.loads(r.stdout)


def exports_listing(info: dict[str, Any]) -> list[str]:
    """Every name directly under the export root, hidden ones included."""
    return sorted(run_on(info, "storage", "ls -A /exports").stdout.decode().split())


@pytest.fixture
def image_path(lab: dict[str, Any], request: Any) -> Iterator[str]:
    """A fresh image name under /exports for one test, removed (with its siblings) afterwards."""
    import re
    import uuid

    name = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:30] + "_" + uuid.uuid4().hex[:6]
    yield f"/exports/{name}"
    run_on(lab, "storage", f"rm -rf /exports/{name} /exports/.{name}.qrmfs-*", check=False)
