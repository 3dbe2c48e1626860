"""Generations of an image: the journaled publish of an update or a rollback, recovery, pruning, and what
each generation costs.

An image `<parent>/<name>` keeps its earlier generations beside it as `.<name>.qrmfs-gen-<seq>` (a higher
seq is newer; an old-style `.<name>.qrmfs-previous` counts as seq 0). Each is a complete tree with its own
manifest. Node state (`/.qrmfs/nodes`) lives only in the current image: it moves with every publish.

A publish (`swap`) brings an `incoming` tree (a finished staging copy, or a generation for rollback) in as the
image. Steps, each one recoverable:
    journal  write `.<name>.qrmfs-journal`: {incoming, outgoing, new_id, keep}
    nodes    rename <image>/.qrmfs/nodes -> <incoming>/.qrmfs/nodes
    swap     exchange <incoming> and <image> (renameat2 RENAME_EXCHANGE: the image's name never disappears;
             two renames where the file system cannot exchange)
    retire   rename <incoming> (now the old image) -> <outgoing>, the newest generation
    prune    generations beyond `keep` are renamed out of sight, then deleted (never one a node runs: holds.py)
    done     the journal is removed
The next operation on the image takes its lock and calls recover(), which finishes a journaled publish
(it only ever moves forward: the incoming tree was complete before the journal was written).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from typing import Any

from . import holds
from . import protocol as P
from .fsutil import CRASH_ENV as CRASH_ENV  # the tests' name for it
from .fsutil import (
    Mounted,
    crash_point,
    holders,
    is_real_dir,
    open_beneath,
    plain_dir,
    remove,
    unchangeable,
    write_file,
)
from .holds import NODES
from .manifest import generation_id
from .protocol import AgentError, ErrorKind
from .space import can_reflink, cost
from .tree import (
    check_staging,
    check_under,
    finish_remove,
    generation_seq,
    made_by_qrmfs,
    read_manifest,
    remove_pins,
    siblings,
    write_manifest,
)


def generations(path: str) -> list[tuple[int, str]]:
    """(seq, dir) of every earlier generation, oldest first: a directory named by qrmfs's own pattern
    (`gen-` and ASCII digits, nothing else: `gen-²` is no generation) that holds a qrmfs manifest. What only
    looks like one is no generation: never pruned, rolled back to or deleted (`list` shows it as foreign)."""
    parent = os.path.dirname(path)
    out = []
    for e in os.listdir(parent) if is_real_dir(parent) else []:
        seq = generation_seq(path, e)
        full = os.path.join(parent, e)
        if seq is not None and made_by_qrmfs(full):
            out.append((seq, full))
    return sorted(out)


def _next_generation(path: str) -> str:
    """A name after every generation's, and after any foreign name that looks like one (never renamed onto)."""
    parent = os.path.dirname(path)
    seqs = [q for e in os.listdir(parent) if (q := generation_seq(path, e)) is not None]
    return siblings(path).gen_prefix + str(max(seqs, default=0) + 1)




# --- the journaled publish -------------------------------------------------------------------------------

def _exchange(a: str, b: str) -> bool:
    """Swap two directory entries atomically. False when this system cannot (then nothing was changed)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(e, os.strerror(e), a)


def _move_nodes(image: str, incoming: str) -> bool:
    """The image's node state moves into the incoming tree (a rename: same inodes, so running nodes' bind
    mounts keep working). Once the incoming tree holds node state, it is the one that was moved there (see
    _set_aside): a node that booted in between and seeded a new one in the image leaves that with the image.
    Both `.qrmfs` directories are opened without following anything a node planted (a symlink to another
    image's, a mount point): the rename is between those two directory fds."""
    if not plain_dir(image, NODES) or _lexists_beneath(incoming, NODES):
        return False
    if not plain_dir(incoming, ".qrmfs"):
        os.mkdir(os.path.join(incoming, ".qrmfs"), 0o755)
    src, dst = (open_beneath(t, ".qrmfs", os.O_RDONLY | os.O_DIRECTORY) for t in (image, incoming))
    try:
        os.rename("nodes", "nodes", src_dir_fd=src, dst_dir_fd=dst)
    finally:
        os.close(src)
        os.close(dst)
    return True


def _lexists_beneath(top: str, rel: str) -> bool:
    """Whether anything is at top/rel, its directory reached as open_beneath reaches it."""
    d, name = os.path.split(rel)
    try:
        fd = open_beneath(top, d, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        os.lstat(name, dir_fd=fd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


def _set_aside(incoming: str) -> None:
    """Node state an old generation still carries (an image replaced by create --force before generations
    existed kept its nodes) is renamed aside before the journal is written, never mixed with the current."""
    if _lexists_beneath(incoming, NODES):
        d = open_beneath(incoming, ".qrmfs", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rename("nodes", "nodes" + time.strftime(".superseded-%Y%m%dT%H%M%S", time.gmtime()),
                      src_dir_fd=d, dst_dir_fd=d)
        finally:
            os.close(d)


def _read_journal(path: str) -> dict[str, Any] | None:
    j = siblings(path).journal
    if not os.path.isfile(j) or os.path.islink(j):
        return None
    try:
        with open(j) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _finish(path: str, j: dict[str, Any]) -> P.Swapped:
    """Carry a journaled publish through to its end, from whatever step it reached."""
    incoming, outgoing, new_id = j["incoming"], j["outgoing"], j["new_id"]
    nodes_moved = False
    if generation_id(read_manifest(path)) != new_id:  # the swap has not happened yet
        if not is_real_dir(incoming):
            remove(siblings(path).journal)  # nothing to bring in: the journal is stale
            raise AgentError(ErrorKind.REFUSED, f"{incoming} is gone; the publish it journaled cannot finish")
        if os.path.lexists(path):
            nodes_moved = _move_nodes(path, incoming)
            crash_point("nodes")
            if not _exchange(incoming, path):
                os.rename(path, outgoing)
                crash_point("retire-first")
                os.rename(incoming, path)
        else:  # two-rename fallback interrupted between its renames
            os.rename(incoming, path)
        crash_point("swap")
    if os.path.lexists(incoming) and os.path.lexists(path) and not os.path.lexists(outgoing):
        os.rename(incoming, outgoing)  # after an exchange, incoming's name holds the old image
    crash_point("retire")
    pruned, failed, held = prune(path, int(j.get("keep", 1)), str(j.get("spare", P.SPARE_DEFAULT)),
                                 int(j.get("node_timeout", P.NODE_TIMEOUT_DEFAULT)))
    crash_point("prune")
    remove_pins(path)  # the source's pinned host key served the copy only
    remove(siblings(path).journal)
    return P.Swapped(path, outgoing if os.path.lexists(outgoing) else None, pruned, nodes_moved, failed, held)


def _swap(path: str, incoming: str, keep: int, spare: str = P.SPARE_DEFAULT,
          node_timeout: int = P.NODE_TIMEOUT_DEFAULT) -> P.Swapped:
    m = read_manifest(incoming)
    if m is None:
        raise AgentError(ErrorKind.REFUSED, f"{incoming} has no manifest: not publishing an unfinished image")
    new_id = generation_id(m)
    if new_id is None:  # a generation made before generation ids: give it one (its manifest, by replace)
        new_id = os.urandom(8).hex()
        m = m.patched({"generation": {**m.generation, "id": new_id}})
        write_manifest(incoming, m)
    # node state a node made strange, or that the agent's user may not move, is refused before the journal
    # commits the publish (which would then fail at every lock)
    if plain_dir(path, NODES):
        for d in (os.path.join(path, NODES), os.path.join(path, ".qrmfs"), os.path.join(incoming, ".qrmfs")):
            why = unchangeable(d) if is_real_dir(d) else None
            if why:
                raise AgentError(ErrorKind.REFUSED, f"{why}: the node state cannot move; nothing was published")
    _set_aside(incoming)
    j = {"incoming": incoming, "outgoing": _next_generation(path), "new_id": new_id, "keep": keep, "spare": spare,
         "node_timeout": node_timeout}
    write_file(siblings(path).journal, (json.dumps(j) + "\n").encode(), 0o600)
    crash_point("journal")
    return _finish(path, j)


def recover(path: str) -> P.Swapped | None:
    """Finish a publish that a crash interrupted, and drop generations half-deleted by a crashed prune.
    Call only while holding the image's lock."""
    s = siblings(path)
    parent = os.path.dirname(path)
    if is_real_dir(parent):
        for e in os.listdir(parent):
            if os.path.join(parent, e).startswith(s.removing + "-gen-"):
                with contextlib.suppress(OSError, Mounted):  # what cannot be deleted now is tried again later
                    remove(os.path.join(parent, e))
    j = _read_journal(path)
    if j is None:
        if os.path.lexists(s.journal):
            remove(s.journal)
        return None
    if j.get("remove") == path:  # a remove that started: it finishes
        finish_remove(path)
        return None
    try:
        return _finish(path, j)
    except AgentError:
        return None  # a stale journal (its tree is gone): removed


def trees(path: str) -> dict[str, str | None]:
    """Every tree of an image, with the generation id it says it is (holds.generation_of: what its nodes report):
    the image, its generations, its spare."""
    spare = siblings(path).spare
    found = [path, *(d for _, d in generations(path)), *([spare] if is_real_dir(spare) else [])]
    return {d: holds.generation_of(d) for d in found}


def held_trees(path: str, node_timeout: int) -> dict[str, list[P.NodeHold]]:
    """The trees of an image that nodes run now, with their nodes (holds.py)."""
    return holds.by_tree(trees(path), node_timeout)


def prune(path: str, keep: int, policy: str, node_timeout: int
          ) -> tuple[list[str], list[str], list[P.Held]]:
    """Delete the oldest generations beyond `keep` (each renamed out of sight first, so a crash never leaves
    a half-deleted tree that looks like a generation). (deleted, could not delete, kept because nodes run
    them): a generation that cannot be deleted never undoes the publish; what is left of it is tried again at
    the next lock. A generation a node runs (holds.py: its record is younger than node_timeout) is neither
    deleted nor made the spare: it stays a generation, and the first prune after its last node rebooted into
    another generation or stopped reporting deletes it.

    The newest of them is not deleted but becomes the image's spare (`.<name>.qrmfs-spare`, one at most) where
    `policy` says so: "reflink" where the file system shares extents (reflinks), "always", "never". The next
    update starts its staging copy from the spare instead of copying the whole image, and rsync --delete
    --delete-excluded makes it the source's exact copy all the same. It is no generation (rollback never sees
    it), and `remove` deletes it with the image. With reflinks it costs only the extents it shares with no other
    tree; without ("always" on ext4) it holds a whole copy between updates, the copy an update without it makes
    while it runs (so the space an update needs at its peak is the same), and an update then neither copies
    the image nor deletes a whole tree."""
    gone: list[str] = []
    failed: list[str] = []
    gens = generations(path)
    by_node = held_trees(path, node_timeout)
    kept = [P.Held(d, by_node[d]) for _, d in gens[:max(0, len(gens) - keep)] if d in by_node]
    doomed = [(seq, d) for seq, d in gens[:max(0, len(gens) - keep)] if d not in by_node]
    spare = siblings(path).spare
    for seq, d in doomed:
        hidden = f"{siblings(path).removing}-gen-{seq}"
        busy = holders(d)
        if busy:  # a shell or a process on the storage server is in it: kept
            failed.append(f"{d}: in use by {', '.join(busy[:5])}")
            continue
        try:
            if (seq, d) == doomed[-1] and not os.path.lexists(spare) and _keeps_spare(path, policy):
                os.rename(d, spare)
                gone.append(d)
                continue
            remove(hidden)
            os.rename(d, hidden)
            remove(hidden)
            gone.append(d)
        except (OSError, Mounted) as e:
            failed.append(f"{d}: {e.strerror}: {e.filename}" if isinstance(e, OSError) else f"{d}: {e}")
    return gone, failed, kept


def _keeps_spare(path: str, policy: str) -> bool:
    return policy == "always" or (policy == "reflink" and can_reflink(os.path.dirname(path)))


def op_publish_update(path: str, export_root: str, staging: str, keep: int, spare: str,
                      node_timeout: int = P.NODE_TIMEOUT_DEFAULT) -> P.Swapped:
    """A finished staging copy becomes the image; the image becomes the newest generation."""
    check_under(path, export_root)
    if spare not in P.SPARE_POLICIES:
        raise AgentError(ErrorKind.BAD_REQUEST, f"spare must be one of {', '.join(P.SPARE_POLICIES)}, not {spare!r}")
    check_staging(path, staging, exists=True)
    if read_manifest(path) is None:
        raise AgentError(ErrorKind.NOT_IMAGE, f"{path} has no qrmfs manifest: nothing to update")
    return _swap(path, staging, keep, spare, node_timeout)


def op_prune(path: str, export_root: str, keep: int, spare: str,
             node_timeout: int = P.NODE_TIMEOUT_DEFAULT) -> P.Pruned:
    """gc: prune as an update would, without publishing anything (see prune)."""
    check_under(path, export_root)
    if spare not in P.SPARE_POLICIES:
        raise AgentError(ErrorKind.BAD_REQUEST, f"spare must be one of {', '.join(P.SPARE_POLICIES)}, not {spare!r}")
    if read_manifest(path) is None:
        raise AgentError(ErrorKind.NOT_IMAGE, f"{path} has no qrmfs manifest")
    return P.Pruned(*prune(path, keep, spare, node_timeout))


def op_rollback(path: str, export_root: str, keep: int) -> P.Swapped:
    """The newest generation becomes the image again; the image becomes the newest generation."""
    check_under(path, export_root)
    if read_manifest(path) is None:
        raise AgentError(ErrorKind.NOT_IMAGE, f"{path} has no qrmfs manifest")
    gens = [(seq, d) for seq, d in generations(path) if read_manifest(d) is not None]
    if not gens:
        raise AgentError(ErrorKind.NOT_FOUND, f"{path} has no earlier generation to roll back to")
    return _swap(path, gens[-1][1], max(keep, len(generations(path))))


def op_stage_update(path: str, export_root: str, token: str, known_hosts: str | None = None,
                    node_timeout: int = P.NODE_TIMEOUT_DEFAULT) -> P.StagedUpdate:
    """A fresh staging directory for an update, the image's top-level entries to copy into it (all but
    /.qrmfs: the manifest is written anew and node state moves at publish), and whether the file system
    can share extents (reflinks)."""
    from .tree import op_stage

    check_under(path, export_root)
    if read_manifest(path) is None:
        raise AgentError(ErrorKind.NOT_IMAGE, f"{path} has no qrmfs manifest: nothing to update")
    spare = _usable_spare(path, node_timeout)
    staged = op_stage(path, export_root, token, known_hosts, check_inner=spare is None)  # else: op_rebase_scan
    if spare is not None:
        recycled = _recycle(spare, staged.staging)
        return P.StagedUpdate(staged.staging, staged.known_hosts, [], True, recycled)
    return _copy_of(path, staged)


def _usable_spare(path: str, node_timeout: int) -> str | None:
    """The image's spare (see prune), when there is one the staging copy can be renamed from (a directory on
    the file system of the image's parent, where staging is made) and no node runs it (a node that booted it
    while it was the image, and was not heard of when it was pruned: it stays where it is)."""
    spare = siblings(path).spare
    usable = is_real_dir(spare) and os.lstat(spare).st_dev == os.lstat(os.path.dirname(path)).st_dev
    return spare if usable and spare not in held_trees(path, node_timeout) else None


def _recycle(spare: str, staging: str) -> dict[str, Any]:
    """The spare becomes the staging copy, without its /.qrmfs (a manifest is written anew, node state moves in
    at publish): what it was. A crash from here on leaves a staging copy, which the next lock removes like
    any."""
    m = read_manifest(spare)
    os.rename(spare, staging)  # onto the empty staging directory, which it replaces
    remove(os.path.join(staging, ".qrmfs"))
    return {"generation": generation_id(m), "made": m.made if m is not None else None}



def op_stage_copy(path: str, export_root: str, token: str, origin: str, origin_root: str) -> P.StagedUpdate:
    """A fresh staging directory for a new image copied from the image `origin` on this server (clone): the
    same answer as an update's, staging beside `path`, entries of `origin`."""
    from .tree import op_stage

    check_under(path, export_root)
    check_under(origin, origin_root)
    if read_manifest(origin) is None:
        raise AgentError(ErrorKind.NOT_IMAGE, f"{origin} has no qrmfs manifest: nothing to copy")
    return _copy_of(origin, op_stage(path, export_root, token, None))


def _copy_of(image: str, staged: P.Staged) -> P.StagedUpdate:
    """What to copy of `image` into staging (its top-level entries but /.qrmfs), and whether with reflinks:
    the staging directory's file system shares extents, and it is the image's (no reflink across file
    systems)."""
    entries = sorted(e for e in os.listdir(image) if e != ".qrmfs")
    same_fs = os.lstat(image).st_dev == os.lstat(staged.staging).st_dev
    return P.StagedUpdate(staged.staging, staged.known_hosts, entries, same_fs and can_reflink(staged.staging))

def op_generations(path: str, export_root: str, costs: bool = False,
                   node_timeout: int = P.NODE_TIMEOUT_DEFAULT) -> P.GenerationList:
    """The image and its earlier generations (newest first), each with its manifest, the nodes that run it
    and, asked for, its cost."""
    check_under(path, export_root)
    if not is_real_dir(path):
        raise AgentError(ErrorKind.NOT_FOUND, f"{path} does not exist")
    by_node = held_trees(path, node_timeout)
    items = [P.Generation(path, "current", None, read_manifest(path),
                          cost(path, os.path.join(path, NODES)) if costs else None, by_node.get(path, []))]
    for seq, d in reversed(generations(path)):
        items.append(P.Generation(d, "generation", seq, read_manifest(d), cost(d) if costs else None,
                                  by_node.get(d, [])))
    return P.GenerationList(items, _read_journal(path) is not None)
