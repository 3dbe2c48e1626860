"""The image tree on the storage server: staging, atomic publish, lock, manifest, remove, list.

Layout beside an image `<parent>/<name>` (all hidden, all on the same filesystem so rename is atomic):
  .<name>.qrmfs-lock            flock held by the one qrmfs operation on this image; names its holder
  .<name>.qrmfs-staging-<id>    a copy being made; never looks like an image (no manifest until ready)
  .<name>.qrmfs-gen-<seq>       an earlier generation of the image (update, rollback), with its own manifest
  .<name>.qrmfs-previous        an image replaced by `create --force` before generations existed (generation 0)
  .<name>.qrmfs-journal         the intent of a publish in progress (gens.py): finished under the next lock
and inside the image `.qrmfs/manifest.json` (what was done) and `.qrmfs/nodes/` (per-node state).

Outside the export, where no node can write: the source's host key, pinned for the storage server's own ssh
to the source while a copy runs, in `PIN_DIR/<hash of the image path>.known_hosts` (0600, in a 0700
directory owned by the agent's user; see pin_dir()). Its first line names the image, so `list` can show a
stale one. Earlier versions kept it beside the image as `.<name>.qrmfs-known_hosts`: cleaned as a leftover.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import protocol as P
from .fsutil import (
    Planted,
    crash_point,
    holders,
    is_real_dir,
    mounts_at_or_below,
    open_beneath,
    plain_dir,
    read_beneath,
    remove,
    remove_tree,
    undeletable,
    walk_tree,
    write_file,
)
from .manifest import PATH as MANIFEST
from .manifest import Manifest, ManifestError, generation_id
from .protocol import AgentError, ErrorKind


@dataclass(frozen=True)
class Siblings:
    """The hidden names beside an image: the one place they are spelled (the client uses it too)."""
    lock: str
    staging_prefix: str
    previous: str
    old_pin: str          # the in-export pin file of earlier versions (now outside the export: pin_file)
    removing: str
    gen_prefix: str
    journal: str
    spare: str            # a pruned generation kept as the next update's starting tree (gens.prune)


def siblings(path: str) -> Siblings:
    parent, name = os.path.split(path.rstrip("/"))
    return Siblings(lock=os.path.join(parent, f".{name}.qrmfs-lock"),
                    staging_prefix=os.path.join(parent, f".{name}.qrmfs-staging-"),
                    previous=os.path.join(parent, f".{name}.qrmfs-previous"),
                    old_pin=os.path.join(parent, f".{name}.qrmfs-known_hosts"),
                    removing=os.path.join(parent, f".{name}.qrmfs-removing"),
                    gen_prefix=os.path.join(parent, f".{name}.qrmfs-gen-"),
                    journal=os.path.join(parent, f".{name}.qrmfs-journal"),
                    spare=os.path.join(parent, f".{name}.qrmfs-spare"))


PIN_DIR = "/var/lib/qrmfs/pins"
PIN_DIR_ENV = "QRMFS_PIN_DIR"
PIN_HEADER = "# qrmfs: the source's host key, pinned for "


def pin_dir() -> str:
    """Where this agent keeps pin files: $QRMFS_PIN_DIR if set (tests, an agent run by hand), else PIN_DIR as
    root, else ~/.local/state/qrmfs/pins."""
    if os.environ.get(PIN_DIR_ENV):
        return os.environ[PIN_DIR_ENV]
    if os.geteuid() == 0:
        return PIN_DIR
    return os.path.join(os.path.expanduser("~"), ".local/state/qrmfs/pins")


def pin_file(path: str, directory: str | None = None) -> str:
    """The pin file of the image at path (a hash: a name safe for ssh's word splitting, whatever the path)."""
    digest = hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:32]
    return os.path.join(directory or pin_dir(), f"{digest}.known_hosts")


def _own_pin_dir(export_root: str) -> str:
    """The pin directory, made 0700 and checked: a real directory of ours, no one else's, outside the export."""
    d = pin_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or os.path.realpath(d) != os.path.abspath(d):
        raise AgentError(ErrorKind.REFUSED, f"the pin directory {d} is not a plain directory owned by the agent's "
                                            "user; refusing to keep a host key there")
    if os.path.realpath(d).startswith(os.path.realpath(export_root).rstrip("/") + "/"):
        raise AgentError(ErrorKind.REFUSED, f"the pin directory {d} lies inside the export {export_root}, which "
                                            "nodes can write; set it elsewhere")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(d, 0o700)
    return d


def remove_pins(path: str) -> list[str]:
    """The image's pin file (and an earlier version's in-export one), if any: what was removed."""
    gone = [p for p in (pin_file(path), siblings(path).old_pin) if os.path.lexists(p)]
    for p in gone:
        remove(p)
    return gone


def _pins(export_root: str) -> Iterator[tuple[str, str]]:
    """(pin file, image path) of every pin file kept for an image below export_root."""
    d = pin_dir()
    root = os.path.realpath(export_root).rstrip("/") + "/"
    try:
        names = sorted(os.listdir(d)) if is_real_dir(d) else []
    except OSError:
        return
    for n in names:
        p = os.path.join(d, n)
        try:
            with open(p, errors="replace") as f:
                first = f.readline().rstrip("\n")
        except OSError:
            continue
        if first.startswith(PIN_HEADER) and first[len(PIN_HEADER):].startswith(root):
            yield p, first[len(PIN_HEADER):]


def _is_staging(path: str, staging: str) -> bool:
    """staging is a staging dir of path: a direct sibling with the staging prefix, canonical (no '..')."""
    return (os.path.normpath(staging) == staging and os.path.dirname(staging) == os.path.dirname(path)
            and staging.startswith(siblings(path).staging_prefix))


def check_staging(path: str, staging: str, exists: bool = False) -> None:
    """Refuse a `staging` that is not a staging directory of path (with exists: or is not there)."""
    if not _is_staging(path, staging) or (exists and not is_real_dir(staging)):
        raise AgentError(ErrorKind.REFUSED, f"{staging} is not a staging directory of {path}")


def check_under(path: str, export_root: str) -> None:
    """The path must be a canonical path strictly below the export root, reached without symlinks."""
    root = os.path.realpath(export_root)
    if not is_real_dir(root):
        raise AgentError(ErrorKind.NOT_FOUND, f"export root {export_root} does not exist on the storage server")
    parent = os.path.dirname(path)
    if os.path.normpath(path) != path or not path.startswith(root + "/"):
        raise AgentError(ErrorKind.REFUSED, f"{path} is not below the export root {root}")
    if os.path.lexists(parent) and os.path.realpath(parent) != parent:
        raise AgentError(ErrorKind.REFUSED, f"{parent} is reached through a symlink; refusing")
    if os.path.islink(path):
        raise AgentError(ErrorKind.REFUSED, f"{path} is a symlink; refusing to follow it")
    _not_inside_an_image(path, root)


def _not_inside_an_image(path: str, root: str) -> None:
    """An image never lies inside another image, a generation, a staging copy or any other name qrmfs owns:
    `list` would not show it, and replacing or removing the outer one would take it along."""
    rel = path[len(root) + 1:].split("/")
    d = root
    for part in rel[:-1]:
        d = os.path.join(d, part)
        if part == ".qrmfs" or (part.startswith(".") and ".qrmfs-" in part):
            raise AgentError(ErrorKind.REFUSED, f"{path} would lie inside {d}, which belongs to qrmfs")
        if read_manifest(d) is not None:
            raise AgentError(ErrorKind.REFUSED, f"{path} would lie inside the image {d}")
    name = rel[-1]
    if name == ".qrmfs" or (name.startswith(".") and ".qrmfs-" in name):
        raise AgentError(ErrorKind.REFUSED, f"{path} is a name qrmfs keeps for itself")


def scan(top: str, depth: int) -> Iterator[tuple[str, str, Manifest | None]]:
    """Walk top a few levels deep, as images are found: ("image", path, manifest) for a directory with a
    manifest (not entered), ("hidden", path, None) for each hidden entry (qrmfs's siblings are among them)."""
    def walk(d: str, level: int) -> Iterator[tuple[str, str, Manifest | None]]:
        try:
            with os.scandir(d) as it:  # the entry's type from the directory listing: no stat of each file
                entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
        except OSError:
            return
        for e, is_dir in entries:
            full = os.path.join(d, e)
            if e.startswith("."):
                yield "hidden", full, None
            elif is_dir:
                try:
                    m = read_manifest(full)
                except Planted:
                    continue  # a tree a node made strange: not shown, not entered (its commands name it)
                except ManifestError:
                    m = None  # not listed: inspect, update and remove name what is wrong with it
                if m is not None:
                    yield "image", full, m
                elif level < depth:
                    yield from walk(full, level + 1)

    yield from walk(top, 1)


def images_below(path: str, depth: int = 4) -> list[str]:
    """Images (directories with a manifest) strictly below path, a few levels deep."""
    return [p for kind, p, _m in scan(path, depth) if kind == "image"]


def read_manifest(path: str) -> Manifest | None:
    """The manifest of an image, generation, spare or staging copy; None where there is none. Read without
    following anything a node could have planted (fsutil.read_beneath: Planted names it). One that is there but
    cannot be read as a manifest raises ManifestError: such a tree is no plain directory, and not an image to
    act on."""
    try:
        data = read_beneath(path, MANIFEST)
    except (FileNotFoundError, NotADirectoryError):
        return None  # no tree at path
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None  # path itself is a symlink: no image (its caller refuses it by its path)
        raise
    if data is None:
        return None
    return Manifest.parse(data.decode("utf-8", errors="surrogateescape"), os.path.join(path, MANIFEST))


def write_manifest(root: str, manifest: Manifest) -> None:
    """The manifest, and beside it the generation id alone (`.qrmfs/generation`: qrmfs-init reads it at boot and
    reports it, see holds.py), each a new file renamed over the old one, through a directory fd of its .qrmfs
    reached as open_beneath reaches it: never through a symlink a node planted."""
    try:
        there = plain_dir(root, ".qrmfs")
    except Planted:
        remove(os.path.join(root, ".qrmfs"))  # a symlink (unlinked, not followed) or a file
        there = False
    if not there:
        os.mkdir(os.path.join(root, ".qrmfs"), 0o755)
    gen = generation_id(manifest)
    d = open_beneath(root, ".qrmfs", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, text in (("generation", f"{gen}\n" if gen else None), ("manifest.json", manifest.text())):
            tmp = f"{name}.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=d)
            if text is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=d)
                continue
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=d)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, name, src_dir_fd=d, dst_dir_fd=d)
    finally:
        os.close(d)


def _root_of(path: str, root: str | None) -> str:
    """The tree an operation works on: the image itself, or one of its staging copies."""
    if root is None or root == path:
        return path
    if not _is_staging(path, root) or not is_real_dir(root):
        raise AgentError(ErrorKind.REFUSED, f"{root} is neither {path} nor a staging directory of it")
    return root


def op_inspect(path: str, export_root: str) -> P.Inspected:
    """What is at the target now: exists, is an image, staging leftovers, free space."""
    check_under(path, export_root)
    parent = os.path.dirname(path)
    st = os.statvfs(parent) if is_real_dir(parent) else os.statvfs(os.path.realpath(export_root))
    try:
        manifest, error = read_manifest(path), None
    except ManifestError as e:
        manifest, error = None, str(e)
    return P.Inspected(exists=os.path.lexists(path), is_image=manifest is not None, parent_exists=is_real_dir(parent),
                       previous=os.path.lexists(siblings(path).previous), free_bytes=st.f_bavail * st.f_frsize,
                       manifest=manifest, manifest_error=error)


def take_lock(path: str, export_root: str, holder: str) -> tuple[int, P.Locked]:
    """Take the image's lock (fails at once when taken). The caller holds the fd for as long as it runs."""
    check_under(path, export_root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = siblings(path).lock
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held_by = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AgentError(ErrorKind.LOCKED, held_by) from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # the file was removed (by release_lock) between our open and our flock: take the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(), 0)
    return fd, P.Locked(lock, _clean_leftovers(path))


def _clean_leftovers(path: str) -> list[str]:
    """With the image's lock just taken, nothing else works beside the image: a staging copy, a pinned source
    key or a half-removed tree found there was left by a qrmfs run that did not finish. Remove them, and say so."""
    s = siblings(path)
    parent = os.path.dirname(path)
    found = [os.path.join(parent, e) for e in sorted(os.listdir(parent))]
    # a staging copy named by the journal is an update's publish under way: gens.recover() finishes it
    doomed = [p for p in found if (p.startswith(s.staging_prefix) and not _journaled(path, p))
              or p == s.removing]
    for p in doomed:
        remove(p)
    return doomed + remove_pins(path)


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def release_lock(fd: int, path: str) -> None:
    """Give the lock up. When nothing of the image is left (it was removed, or never made), its lock file goes
    too, still under the lock: lock files do not pile up for every name ever used."""
    parent, image = os.path.split(path)
    names = os.listdir(parent) if is_real_dir(parent) else []
    rest = [n for n in names if (m := SIBLING.match(n)) and m.group(1) == image and m.group(2) != "lock"]
    if not os.path.lexists(path) and not rest:
        with contextlib.suppress(OSError):
            os.unlink(siblings(path).lock)
    else:
        os.ftruncate(fd, 0)
    os.close(fd)


def op_stage(path: str, export_root: str, token: str, known_hosts: str | None = None,
             check_inner: bool = True) -> P.Staged:
    """A fresh staging directory beside the image (and the source's pinned key). Refused where images lie
    below the path; not check_inner: the caller checks that later (an update from the spare, whose change
    count walks the image anyway, treediff.op_rebase_scan)."""
    check_under(path, export_root)
    refuse_inner_images(path, images_below(path) if check_inner and is_real_dir(path) else [])
    s = siblings(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = s.staging_prefix + token  # leftovers of earlier runs went when the lock was taken
    os.mkdir(staging, 0o755)
    pinned = op_pin_host(path, export_root, known_hosts).known_hosts if known_hosts is not None else None
    return P.Staged(staging, pinned)


def refuse_inner_images(path: str, inner: list[str]) -> None:
    if inner:
        raise AgentError(ErrorKind.REFUSED, f"{path} holds images ({', '.join(inner)}): an image is never made "
                                            "where images lie below it")


def op_pin_host(path: str, export_root: str, known_hosts: str) -> P.Pinned:
    """Write the source's known_hosts lines into the image's pin file, outside the export (nodes cannot touch
    it), for the storage server's ssh to the source; that ssh reads this file only."""
    check_under(path, export_root)
    _own_pin_dir(export_root)
    kh = pin_file(path)
    remove_pins(path)
    fd = os.open(kh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{PIN_HEADER}{path}\n{known_hosts}")
    return P.Pinned(kh)


def op_unpin_host(path: str, export_root: str) -> P.Unpinned:
    check_under(path, export_root)
    remove_pins(path)
    return P.Unpinned(pin_file(path))


def op_discard(path: str, export_root: str, staging: str) -> P.Discarded:
    """Remove a staging copy (a failed run); the image's name is untouched."""
    check_under(path, export_root)
    check_staging(path, staging)
    if _journaled(path, staging):
        # its publish began (gens.py): it is finished, never undone, under the image's next lock
        return P.Discarded("")
    remove(staging)
    remove_pins(path)
    return P.Discarded(staging)


def _journaled(path: str, staging: str) -> bool:
    try:
        with open(siblings(path).journal) as f:
            return bool(json.load(f).get("incoming") == staging)
    except (OSError, ValueError, AttributeError):
        return False


def op_write_manifest(path: str, export_root: str, staging: str, manifest: Manifest) -> P.Written:
    check_under(path, export_root)
    write_manifest(_root_of(path, staging), manifest)
    return P.Written(staging)


def op_publish(path: str, export_root: str, staging: str, force: bool,
               node_timeout: int = P.NODE_TIMEOUT_DEFAULT) -> P.Published:
    """Rename the staging copy to the image's name; with force the old image becomes `.previous` (refused
    while nodes run the `.previous` it would replace)."""
    check_under(path, export_root)
    s = siblings(path)
    check_staging(path, staging, exists=True)
    if read_manifest(staging) is None:
        raise AgentError(ErrorKind.REFUSED, f"{staging} has no manifest: not publishing an unfinished image")
    replaced = False
    if os.path.lexists(path):
        if not force:
            raise AgentError(ErrorKind.EXISTS, f"{path} exists")
        _refuse_running(path, node_timeout, [s.previous], "replacing it")
        remove_tree(s.previous)
        os.rename(path, s.previous)
        replaced = True
    os.rename(staging, path)
    remove_pins(path)
    return P.Published(path, replaced, s.previous if replaced else None)


def _refuse_running(path: str, node_timeout: int, trees: list[str] | None, doing: str, allowed: bool = False
                    ) -> None:
    """Refused while nodes run the image (or, given, these of its trees): the nodes named (holds.py); not
    when `allowed` (the operator said so)."""
    from .gens import held_trees
    from .holds import describe

    if allowed:
        return
    held = {t: h for t, h in held_trees(path, node_timeout).items() if trees is None or t in trees}
    if held:
        raise AgentError(ErrorKind.REFUSED, "nodes run " + "; ".join(
            f"{t}: {describe(h)}" for t, h in sorted(held.items())) + f": not {doing}")


def op_remove(path: str, export_root: str, force: bool, running_ok: bool = False,
              node_timeout: int = P.NODE_TIMEOUT_DEFAULT) -> P.Removed:
    """Remove an image: refuse anything that is not plainly an unmounted image below the export root, or that
    nodes run (unless running_ok)."""
    if path in ("", "/") or not path.startswith("/"):
        raise AgentError(ErrorKind.REFUSED, f"refusing to remove {path!r}")
    check_under(path, export_root)
    if os.path.realpath(path) != path:
        raise AgentError(ErrorKind.REFUSED, f"{path} resolves elsewhere ({os.path.realpath(path)}); refusing")
    if not os.path.lexists(path):
        raise AgentError(ErrorKind.NOT_FOUND, f"{path} does not exist")
    if not is_real_dir(path):
        raise AgentError(ErrorKind.REFUSED, f"{path} is not a directory")
    if not force and read_manifest(path) is None:  # a manifest that cannot be read is refused as it says
        raise AgentError(ErrorKind.NOT_IMAGE,
                         f"{path} has no qrmfs manifest: not an image (use --force to remove anyway)")
    _refuse_running(path, node_timeout, None, "removing it (--running-nodes-ok removes it anyway)", running_ok)
    trees = _trees_of(path)
    for t in trees:  # every tree is checked before anything is deleted: a refused remove leaves all of it
        busy = mounts_at_or_below(t)
        if busy:
            raise AgentError(ErrorKind.REFUSED, f"{t} has mounts under it: {', '.join(busy)}")
        users = holders(t) if is_real_dir(t) else []
        if users:
            raise AgentError(ErrorKind.REFUSED, f"{t} is in use by {', '.join(users[:5])}: nothing was removed")
        locked = undeletable(t)
        if locked:
            raise AgentError(ErrorKind.REFUSED, f"{t} cannot be deleted by the agent's user: {locked}; nothing was "
                                                "removed")
    # the intent first: a remove that started is finished by the next lock (gens.recover), however it ends
    write_file(siblings(path).journal, (json.dumps({"remove": path}) + "\n").encode(), 0o600)
    finish_remove(path)
    return P.Removed(path)


def _trees_of(path: str) -> list[str]:
    """Every tree of an image: the image, its generations, its spare, its staging copies."""
    s = siblings(path)
    parent = os.path.dirname(path)
    staging = [os.path.join(parent, e) for e in sorted(os.listdir(parent))
               if os.path.join(parent, e).startswith(s.staging_prefix)]
    return [path, *_earlier_generations(path), *([s.spare] if os.path.lexists(s.spare) else []), *staging]


def finish_remove(path: str) -> None:
    """Carry a journaled remove through: the image's name goes first (renamed out of sight), then each of its
    trees, then the journal. Called by op_remove and, after a crash, by the next lock."""
    s = siblings(path)
    if os.path.lexists(path):
        remove(s.removing)
        os.rename(path, s.removing)  # gone from its name at once; the slow part happens out of sight
    crash_point("remove-image")
    remove(s.removing)
    for t in _trees_of(path)[1:]:
        remove(t)
    remove(s.journal)


def _earlier_generations(path: str) -> list[str]:
    """`.NAME.qrmfs-gen-<seq>` and an old-style `.NAME.qrmfs-previous` that qrmfs made (each holds a
    manifest qrmfs wrote; a name that only looks like one is foreign: never deleted). Planted where one was
    made strange."""
    parent = os.path.dirname(path)
    found = [os.path.join(parent, e) for e in sorted(os.listdir(parent)) if generation_seq(path, e) is not None]
    return [g for g in found if made_by_qrmfs(g)]


def generation_seq(path: str, entry: str) -> int | None:
    """The seq of a generation's name beside the image at path (the previous image of old: 0); None for any
    other name, strictly: only ASCII digits, no sign, no space."""
    s = siblings(path)
    if entry == os.path.basename(s.previous):
        return 0
    prefix = os.path.basename(s.gen_prefix)
    digits = entry[len(prefix):] if entry.startswith(prefix) else ""
    return int(digits) if re.fullmatch(r"[0-9]{1,18}", digits) else None


SIBLING = re.compile(r"^\.([A-Za-z0-9_]{1,50})\.qrmfs-(lock|known_hosts|removing|previous|staging-.+|gen-[0-9]+|"
                     r"journal|removing-gen-[0-9]+|spare)$")
NAMESPACE = re.compile(r"^\.([A-Za-z0-9_]{1,50})\.qrmfs-(.*)$", re.DOTALL)  # any name in qrmfs's namespace


def op_list(export_root: str, depth: int = 3, leftovers: bool = True) -> P.Listed:
    root = os.path.realpath(export_root)
    if not is_real_dir(root):
        raise AgentError(ErrorKind.NOT_FOUND, f"export root {export_root} does not exist on the storage server")
    found: list[P.ListedImage] = []
    left: list[P.Leftover] = []
    for kind, path, m in scan(root, depth):
        if kind == "hidden":
            if leftovers:
                left.extend(_leftover(os.path.dirname(path), os.path.basename(path)))
        else:
            assert m is not None
            found.append(P.ListedImage(path, m, _lock_held(siblings(path).lock)))
    for pin, image in _pins(root) if leftovers else ():
        left.append(P.Leftover(pin, image, "known_hosts", os.lstat(pin).st_blocks * 512,
                               _lock_held(siblings(image).lock)))
    return P.Listed(found, left)


def _leftover(parent: str, entry: str) -> list[P.Leftover]:
    """What a hidden entry beside images is. "foreign": a name in qrmfs's namespace that qrmfs did not make
    (by its own record: a generation, previous or spare holds a manifest qrmfs wrote; any other name must be
    one qrmfs spells): shown, never deleted."""
    m = SIBLING.match(entry) or NAMESPACE.match(entry)
    if not m:
        return []
    image = os.path.join(parent, m.group(1))
    path = os.path.join(parent, entry)
    kind = ("foreign" if m.re is NAMESPACE else "staging" if m.group(2).startswith("staging-") else
            "generation" if m.group(2).startswith("gen-") else
            "removing" if m.group(2).startswith("removing-") else m.group(2))
    if kind in ("generation", "previous", "spare"):
        try:
            kind = kind if made_by_qrmfs(path) else "foreign"
        except Planted:
            kind = "foreign"
    held = _lock_held(siblings(image).lock)
    if kind == "lock" and (held or os.path.lexists(image)):
        return []  # the lock of an image that exists, or one in use: nothing left over
    size = tree_counts(path)[1] if is_real_dir(path) else os.lstat(path).st_blocks * 512
    return [P.Leftover(path, image, kind, size, held)]


def made_by_qrmfs(tree_: str) -> bool:
    """A tree qrmfs made (by its own record: a manifest qrmfs wrote there), read without following anything
    planted in it (Planted: the caller refuses, naming it, or shows it as foreign)."""
    try:
        return is_real_dir(tree_) and read_manifest(tree_) is not None
    except ManifestError:
        return False  # a manifest qrmfs cannot read is no record of its own: left alone


def _lock_held(lock: str) -> str | None:
    if not os.path.isfile(lock):
        return None
    fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)


def op_manifest_update(path: str, export_root: str, patch: dict[str, Any]) -> P.ManifestUpdated:
    check_under(path, export_root)
    m = read_manifest(path)
    if m is None:
        raise AgentError(ErrorKind.NOT_IMAGE, f"{path} has no qrmfs manifest")
    m = m.patched(patch)
    write_manifest(path, m)
    return P.ManifestUpdated(m)


def op_stats(path: str, export_root: str, root: str | None = None) -> P.Counts:
    """Entries and bytes (allocated) of a tree, without following symlinks or crossing filesystems. Only
    inodes with more than one link are remembered (to count their blocks once): memory stays flat."""
    check_under(path, export_root)
    top = _root_of(path, root)
    if not is_real_dir(top):
        raise AgentError(ErrorKind.NOT_FOUND, f"{top} does not exist")
    return P.Counts(*tree_counts(top))


def tree_counts(top: str) -> tuple[int, int]:
    w = walk_tree(top)
    return w.files, w.bytes
