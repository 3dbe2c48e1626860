"""What an agent on the storage server is sent: the fixed `python3 -c BOOTSTRAP` program, then on stdin the
loader (agent/loader.py) and the agent modules (qrmfs/agent, standard library only) with their digest, by which
the loader keeps their compiled code in the storage server's cache; then its requests, one JSON line each."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys
from importlib import resources
from typing import Any

from .. import argv as A
from ..agent import protocol as P

AGENT_MODULES = ("fsutil", "manifest", "protocol", "steps", "tree", "holds", "space", "treediff", "gens", "supervise",
                 "exports", "main")
# The -c program is tiny and fixed; the loader (agent/loader.py) and the agent modules come on stdin (first JSON
# line, with the modules' digest: the loader keeps their compiled code in the storage server's cache by it).
BOOTSTRAP = 'import sys,json;r=json.loads(sys.stdin.readline());exec(r["loader"])'


@functools.cache
def agent_sources() -> list[tuple[str, str]]:
    pkg = resources.files("qrmfs.agent")
    return [(f"qrmfs.agent.{m}", (pkg / f"{m}.py").read_text()) for m in AGENT_MODULES]


@functools.cache
def loader() -> str:
    return (resources.files("qrmfs.agent") / "loader.py").read_text() + "\nsys.exit(load(r))\n"


@functools.cache
def sources_key() -> str:
    """The digest the storage-side loader names its cache file by (agent/loader.py)."""
    return hashlib.sha256(json.dumps(agent_sources()).encode()).hexdigest()[:32]


def agent_remote(local: bool) -> tuple[str, ...]:
    """The command that starts an agent: here with this interpreter, on a storage server with its python3."""
    return A.agent_argv(sys.executable if local else "python3", BOOTSTRAP)


def payload(req: P.Request[Any] | None) -> str:
    """The first line an agent reads: the loader and the modules, with the request; without one (a warm
    agent, see warm.WarmAgents), the request comes as the next line."""
    line: dict[str, Any] = {"loader": loader(), "modules": agent_sources(), "key": sources_key()}
    if req is not None:
        line.update(op=req.op, args=P.encode(req))
    return json.dumps(line) + "\n"


def request_line(req: P.Request[Any]) -> str:
    """One request as the agent reads it: a JSON line of its op and arguments."""
    return json.dumps({"op": req.op, "args": P.encode(req)}) + "\n"


def write(p: subprocess.Popen[bytes], data: bytes) -> None:
    """Write to the agent's stdin; a closed pipe shows as the missing answer that follows."""
    assert p.stdin is not None
    try:
        p.stdin.write(data)
        p.stdin.flush()
    except (BrokenPipeError, ValueError):
        pass


def node_init_script() -> str:
    """The qrmfs-init script's text, which the agent installs in an image that needs it."""
    return (resources.files("qrmfs") / "data" / "qrmfs-init").read_text()
