"""The agent's loader: the first thing that runs on the storage server (storage.BOOTSTRAP runs it from the first
line qrmfs writes on stdin). It makes the agent's modules from the sources in that line and runs the operation.

Compiling the sources is a fifth of an agent's start (about 17 ms of 70 on the lab's storage server), paid by
the run's session and again by every supervised command. So the code compiled from one set of sources is kept
in the ssh user's cache (`$XDG_CACHE_HOME/qrmfs` or `~/.cache/qrmfs`, a directory of its own, mode 0700), in a
file named by the sources' digest (qrmfs sends it) and by the Python that compiled it: the same sources with
the same Python load it instead. A file that is not the user's own, that others may write, or that does not
load is not used, and the sources are compiled as before; a cache that cannot be written costs nothing but
the compile. Writing one removes the files the same Python wrote for other sources (an older qrmfs).

Standard library only, like every agent module; `load(r)` is called with the first line's JSON object. A line
without "op" comes from a warm agent (StorageSide.warm): it loads the modules, then reads its request as the
next line, and exits doing nothing at end of file.
"""

from __future__ import annotations

import json
import marshal
import os
import sys
import types
from typing import Any

PREFIX = "agent-"


def cache_dir() -> str | None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qrmfs") if os.path.isabs(base) else None


def _suffix() -> str:
    return f"-{sys.implementation.cache_tag}-{sys.hexversion:x}"


def cache_file(key: str) -> str | None:
    d = cache_dir()
    if d is None or not key.isalnum():
        return None
    return os.path.join(d, PREFIX + key + _suffix())


def _own(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def cached(path: str, names: list[str]) -> dict[str, Any] | None:
    """The code objects in `path`, if it is ours, unwritable by others, and holds code for exactly `names`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            if not _own(os.fstat(fd)) or not _own(os.stat(os.path.dirname(path))):
                return None
            codes = marshal.load(f)
        except (OSError, EOFError, ValueError, TypeError):
            return None
    if not isinstance(codes, dict) or sorted(codes) != sorted(names) or not all(
            isinstance(c, types.CodeType) for c in codes.values()):
        return None
    return codes


def store(path: str, codes: dict[str, Any]) -> None:
    """Write the cache file whole (a temporary file renamed over it); leave it be on any failure."""
    d = os.path.dirname(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        if not _own(os.stat(d)):
            return
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            marshal.dump(codes, f)
        os.rename(tmp, path)
        for other in os.listdir(d):
            if other.startswith(PREFIX) and other.endswith(_suffix()) and os.path.join(d, other) != path:
                os.unlink(os.path.join(d, other))
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def compiled(modules: list[list[str]], key: str) -> dict[str, Any]:
    """Each module's code: from the cache when it holds these sources' code, else compiled (and cached)."""
    names = [n for n, _ in modules]
    path = cache_file(key)
    codes = cached(path, names) if path else None
    if codes is None:
        codes = {n: compile(src, n, "exec") for n, src in modules}
        if path:
            store(path, codes)
    return codes


def load(r: dict[str, Any]) -> int:
    """Make the modules (as the package qrmfs.agent) and run r's operation; its exit code."""
    for n in ("qrmfs", "qrmfs.agent"):
        m = types.ModuleType(n)
        m.__path__ = []
        sys.modules[n] = m
    codes = compiled(r["modules"], str(r.get("key") or ""))
    for n, _src in r["modules"]:
        m = types.ModuleType(n)
        m.__package__ = "qrmfs.agent"
        sys.modules[n] = m
        exec(codes[n], m.__dict__)
    if "op" not in r:  # a warm agent: the request is the next line (none: qrmfs had no command for it)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        r = json.loads(line)
    run: Any = sys.modules["qrmfs.agent.main"].run
    return int(run(r["op"], r["args"]))
