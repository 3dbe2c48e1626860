"""Which nodes run which generation of an image: the records qrmfs-init keeps in each node's state directory.

A node cannot be asked, and the NFS server cannot say which directory a client holds. So each node says it
itself, in its own state directory `<tree>/.qrmfs/nodes/<ID>/` (which moves with the image at every publish):
    running  the generation id of the tree the node booted (its root's /.qrmfs/generation), written once per
             boot; its modification time (set by the storage server's clock) is when it booted
    alive    touched every few seconds (qrmfs-init's heartbeat, qrmfs.heartbeat= on the kernel command line,
             60 s by default); its modification time is the storage server's clock at the last touch
Both times are the storage server's own (an NFS write or a plain touch takes the server's time), and this
agent runs on that server: they are compared with its own clock, whatever the node's clock says.

A record HOLDS the generation it names while its `alive` is at most `timeout` seconds old. A held
generation is never deleted, made the spare or recycled. What a node writes can only keep a generation:
a record this module cannot read strictly (not a regular file, a symlink, too big, not one generation id,
a name that is not a node id, a time in the future, a generation that is not this image's) is ignored, as
if it were not there; it never makes anything be deleted, and nothing is opened outside the image's trees
(every component is opened without following symlinks).
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Iterator

from . import protocol as P

NODES = ".qrmfs/nodes"
RUNNING = "running"
ALIVE = "alive"
NODE_TIMEOUT_DEFAULT = P.NODE_TIMEOUT_DEFAULT
MAX_RECORD = 128          # bytes of a `running` file read at most: a generation id and a newline
MAX_NODES = 10_000        # node directories read per tree at most (a node can make any number of them)
FUTURE_SLACK = 120        # seconds an `alive` may be ahead of this clock (the NFS server and this agent
#                           share it; a later time was set by hand: ignored)
NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")   # qrmfs-init's valid_id, bounded
GENERATION_ID = re.compile(r"[0-9a-f]{8,64}")  # uuid4().hex, or os.urandom(8).hex() (gens._swap)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)


def _open_dir(name: str, dir_fd: int | None = None) -> int | None:
    try:
        return os.open(name, _DIR, dir_fd=dir_fd)
    except OSError:
        return None


def _read_id(fd: int, name: str) -> tuple[str, float] | None:
    """(generation id, its mtime) of a file in the directory fd (a node's `running`, a tree's `generation`),
    when it is a small regular file holding exactly one generation id."""
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RECORD:
            return None
        f = os.open(name, _FILE, dir_fd=fd)
    except OSError:
        return None
    try:
        fst = os.fstat(f)
        if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            return None  # replaced between the look and the open
        data = os.read(f, MAX_RECORD + 1)
    except OSError:
        return None
    finally:
        os.close(f)
    if len(data) > MAX_RECORD:
        return None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    gen = text[:-1] if text.endswith("\n") else text
    return (gen, fst.st_mtime) if GENERATION_ID.fullmatch(gen) else None


def _alive(fd: int) -> float | None:
    try:
        st = os.stat(ALIVE, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None
    return st.st_mtime if stat.S_ISREG(st.st_mode) else None


def _names(fd: int) -> list[str]:
    """The node ids among a directory's first MAX_NODES entries."""
    names: list[str] = []
    try:
        with os.scandir(fd) as it:
            for e in it:
                if len(names) >= MAX_NODES:
                    break
                names.append(e.name)
    except OSError:
        return []
    return sorted(n for n in names if NODE_ID.fullmatch(n))


def _node_dirs(tree: str) -> Iterator[tuple[str, int]]:
    """(node id, an open fd) of each node state directory of a tree, at most MAX_NODES; none when the tree
    has no readable `.qrmfs/nodes` (each step opened without following a symlink)."""
    fds: list[int] = []
    try:
        for part in (tree, *NODES.split("/")):
            nxt = _open_dir(part, fds[-1] if fds else None)
            if nxt is None:
                return
            fds.append(nxt)
        for name in _names(fds[-1]):
            fd = _open_dir(name, fds[-1])
            if fd is None:
                continue
            try:
                yield name, fd
            finally:
                os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)


def records(trees: list[str], timeout: float, now: float | None = None) -> list[P.NodeHold]:
    """The node records of these trees that hold a generation now: each (node, generation id, since, seen),
    sorted, one per node and generation. `now`: this machine's clock (the NFS server's)."""
    now = time.time() if now is None else now
    found: dict[tuple[str, str], P.NodeHold] = {}
    for tree in trees:
        for node, fd in _node_dirs(tree):
            run, seen = _read_id(fd, RUNNING), _alive(fd)
            if run is None or seen is None or not now - timeout <= seen <= now + FUTURE_SLACK:
                continue
            gen, since = run
            hold = P.NodeHold(node, gen, min(since, seen), seen)
            old = found.get((node, gen))
            if old is None or old.seen < hold.seen:
                found[(node, gen)] = hold
    return sorted(found.values(), key=lambda h: (h.generation, h.node))


def generation_of(tree: str) -> str | None:
    """The generation id a tree says it is: its `.qrmfs/generation` (written beside its manifest), the file its
    nodes read at boot and report (read strictly, as a record)."""
    fd = _open_dir(os.path.join(tree, ".qrmfs"))
    if fd is None:
        return None
    try:
        found = _read_id(fd, "generation")
    finally:
        os.close(fd)
    return found[0] if found else None


def by_tree(trees: dict[str, str | None], timeout: float, now: float | None = None) -> dict[str, list[P.NodeHold]]:
    """The holds on each tree ({tree: its generation id}): the records of all the trees (a node's state may
    lie in any of them: it moves with the image, and a node that booted while a publish moved it left its new
    state with the tree it booted), each matched to the tree whose `.qrmfs/generation` is the one it names. A
    record naming no tree of this image holds nothing."""
    holds = records(list(trees), timeout, now)
    out: dict[str, list[P.NodeHold]] = {}
    for tree, gen in trees.items():
        mine = [h for h in holds if gen is not None and h.generation == gen]
        if mine:
            out[tree] = mine
    return out


def describe(holds: list[P.NodeHold], limit: int = 5) -> str:
    """'node 1 (since 2026-12-05 13:40:01 UTC), node 2 (...)' and how many more."""
    shown = [f"node {h.node} (since {stamp(h.since)})" for h in holds[:limit]]
    more = f" and {len(holds) - limit} more" if len(holds) > limit else ""
    return ", ".join(shown) + more


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
