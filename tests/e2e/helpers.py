"""What the e2e tests do against the lab: run qrmfs, run a script on a lab host, read the --json envelope,
write a config, list the export. (conftest.py keeps only the fixtures.)"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

from lab import lab as _lab


def run_on(info: dict[str, Any], role: str, script: str, check: bool = True,
           input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a fixed test script on a lab host over ssh (verified host key)."""
    r = subprocess.run([*_lab.ssh_argv(info, role), script], capture_output=True, input=input, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"on {role}: {script!r} exited {r.returncode}: {r.stderr.decode(errors='replace')}")
    return r


def write_config(lab: dict[str, Any], directory: Any, *, retries: int = 1, timeout: float = 3.0,
                 server: str = "openqrm") -> str:
    """A qrmfs config for the lab with its own spool dir and quick openQRM retries (tests stay fast);
    `server`: "openqrm" (the real openQRM 5.3.60) or "openqrm_mock" (the mock, for injected faults)."""
    path = directory / "qrmfs.toml"
    path.write_text(_lab.config_toml(lab, spool_dir=str(directory / "spool"), timeout=timeout, retries=retries,
                                     backoff=0.05, server=server))
    return str(path)


def qrmfs(*args: str, config: str | None = None, env: dict[str, str] | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real qrmfs CLI in a subprocess (real exit codes, real stderr)."""
    import sys

    argv = [sys.executable, "-m", "qrmfs", *args] + (["--config", config] if config else [])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def result_of(r: subprocess.CompletedProcess[str], ok: bool = True) -> Any:
    """The result inside qrmfs's --json envelope (docs/json.md), after checking the envelope."""
    import json

    env = json.loads(r.stdout)
    assert env["schema"] == 1 and env["ok"] is ok, env
    return env["result"]


def tree_info(info: dict[str, Any], role: str, root: str) -> dict[str, Any]:
    import json
    from pathlib import Path

    script = (Path(__file__).parent / "treeinfo.py").read_bytes()
    r = run_on(info, role, f"python3 - {root}", input=script)
    return json.loads(r.stdout)


def exports_listing(info: dict[str, Any]) -> list[str]:
    """Every name directly under the export root, hidden ones included."""
    return sorted(run_on(info, "storage", "ls -A /exports").stdout.decode().split())


def until(what: str, check: Any, timeout: float = 60.0) -> Any:
    """Wait for a condition (polled every 0.2 s) and return its value; fail naming it after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def mock_state(mock: Any) -> dict[str, Any]:
    """The openQRM mock's tables and requests (GET /_mock/state), image_info without openQRM's own records
    (openqrm, idle), which every install has."""
    st: dict[str, Any] = mock.get("/_mock/state").json()
    st["images"] = [i for i in st["images"] if i["image_id"] not in ("0", "1")]
    return st
