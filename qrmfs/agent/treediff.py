"""What changed between an image and a staging copy of it (an update that started from the image's spare): the
two trees compared in parallel shares, or only the paths a scan and rsync named, counted by kind."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

from . import protocol as P
from .fsutil import in_two, is_real_dir, mine
from .manifest import CHANGE_KINDS
from .protocol import AgentError, ErrorKind
from .tree import check_staging, check_under, images_below, refuse_inner_images

SCAN_LIMIT = 100_000  # paths a scan (or rsync's items) may name before the count walks the whole trees instead


def op_rebase(path: str, export_root: str, staging: str, prepared: list[str],
              only: list[str] | None = None) -> P.Rebased:
    """What changed, counted against the image, when the staging copy started from the spare (an older tree,
    so rsync's own items say what changed since the spare): the staging copy (after rsync, before the
    preparation) is compared with the image, entry by entry (lstat: type, mode, owner, device, link target;
    size and modification time for all but directories), below /.qrmfs left out. An entry only one of them
    has is new or deleted (each entry below it too), as rsync counts them; an entry whose xattrs (ACLs among
    them) alone differ is a metadata change. `prepared`: the paths the preparation changes on purpose (the
    image's manifest), left out as in transfer's counts.
    only: the paths where the two can differ (op_rebase_scan's, made while rsync ran, and rsync's items):
    only those are compared, with the same result as the whole walk. The scan does not read xattrs (a read
    per entry of both trees while rsync works): an xattr change since the image is in rsync's items, unless
    the spare already had it (the source set it back since the spare was the image), which is then not
    counted."""
    check_under(path, export_root)
    check_staging(path, staging)
    done = frozenset(prepared)
    if only is not None:
        return P.Rebased(_recount(path, staging, done, only))
    shares = _comparing(staging, lambda share, shares: _rebase_share(path, staging, done, share, shares))
    return P.Rebased({k: sum(s[k] for s in shares) for k in shares[0]})


def op_rebase_scan(path: str, export_root: str, staging: str) -> P.RebaseScanned:
    """The paths where the staging copy and the image differ, found while rsync still works in the copy (on
    the cores it leaves idle): each differing entry, a new or deleted directory as itself only. What rsync
    changes meanwhile it itemizes, so these paths and rsync's items name every difference at its end (see
    op_rebase's only). None: more than SCAN_LIMIT (the count then walks the trees)."""
    check_under(path, export_root)
    check_staging(path, staging)
    refuse_inner_images(path, images_below(path))  # op_stage left it to this walk (the copy started from the spare)
    shares = _comparing(staging, lambda share, shares: _scan_share(path, staging, share, shares))
    found = [p for s in shares if s is not None for p in s]
    return P.RebaseScanned(None if any(s is None for s in shares) or len(found) > SCAN_LIMIT else found)


def _comparing(staging: str, work: Callable[[int, int], Any]) -> list[Any]:
    """in_two(work) for a comparison of staging with the image; its failure says so."""
    try:
        return in_two(work)
    except OSError as e:
        raise AgentError(ErrorKind.OS, f"comparing {staging} with the image: {e}") from None


def _differences(path: str, staging: str, share: int, shares: int, xattrs: bool = False
                 ) -> Iterator[tuple[str | None, str]]:
    """(kind, path in the tree) of each entry where staging and image differ, in the directories that fall to
    `share` of `shares` (by a hash of the path); every share walks every directory both trees have, and
    compares (lstat, and with `xattrs` the xattrs of an entry lstat finds unchanged) only the entries of its
    own. kind None: the entry changed while it was compared."""
    stack = [""]
    while stack:
        rel = stack.pop()
        new_entries, old_entries = _listing(staging + rel), _listing(path + rel)
        own = mine(rel, share, shares)
        for name in new_entries.keys() | old_entries.keys():
            r = f"{rel}/{name}"
            if r == "/.qrmfs":
                continue
            n, o = new_entries.get(name), old_entries.get(name)
            if n is not None and o is not None and _is_dir(n) and _is_dir(o):
                stack.append(r)
            if not own:
                continue
            try:
                kind = _change(_lstat(o), _lstat(n), path + r, staging + r, xattrs)
            except OSError:  # a link read as rsync replaced it
                yield None, r
                continue
            if kind is not None:
                yield kind, r


def _rebase_share(path: str, staging: str, done: frozenset[str], share: int, shares: int) -> dict[str, int]:
    """op_rebase's counts for the differences that fall to `share` of `shares` (see _differences)."""
    counts = dict.fromkeys(CHANGE_KINDS, 0)
    for kind, r in _differences(path, staging, share, shares, xattrs=True):
        _tally(counts, kind, r, path, staging, done)
    return counts


def _tally(counts: dict[str, int], kind: str | None, r: str, path: str, staging: str,
           done: frozenset[str]) -> None:
    """Count one difference: a new or deleted entry with each entry below it, none made on purpose."""
    if kind in ("new", "deleted"):
        for sub in _entries(staging + r if kind == "new" else path + r, r):
            if not prepared_change(kind, sub, done):
                counts[kind] += 1
    elif kind is not None and not prepared_change(kind, r, done):
        counts[kind] += 1


def _scan_share(path: str, staging: str, share: int, shares: int) -> list[str] | None:
    found = []
    for _kind, r in _differences(path, staging, share, shares):
        found.append(r)
        if len(found) > SCAN_LIMIT:
            return None
    return found


def _recount(path: str, staging: str, done: frozenset[str], candidates: list[str]) -> dict[str, int]:
    """op_rebase's counts, comparing only the candidate paths (with the entries below a new or deleted one).
    A candidate below an entry that is not a directory in both trees stands for that entry, as the whole walk
    would not go below it."""
    counts = dict.fromkeys(CHANGE_KINDS, 0)
    both: dict[str, bool] = {}
    handled: set[str] = set()

    def both_dirs(rel: str) -> bool:
        if rel not in both:
            both[rel] = is_real_dir(staging + rel) and is_real_dir(path + rel)
        return both[rel]

    for p in sorted(set(candidates)):
        if p == "/.qrmfs" or p.startswith("/.qrmfs/") or not p.startswith("/"):
            continue
        parts = p.split("/")
        target = next((a for a in ("/".join(parts[:i]) for i in range(2, len(parts))) if not both_dirs(a)), p)
        if target in handled:
            continue
        handled.add(target)
        kind = _change(_lstat_path(path + target), _lstat_path(staging + target), path + target, staging + target,
                       xattrs=True)
        _tally(counts, kind, target, path, staging, done)
    return counts


def prepared_change(kind: str, path: str, prepared: frozenset[str]) -> bool:
    """A change the preparation makes on purpose, not a change of the source: a path it fixed (or inside one),
    or a directory it made to hold one (/etc/qrmfs for node.conf, /mnt for /mnt/floppy), deleted by the copy
    from the source and made again."""
    if path in prepared or any(path.startswith(p + "/") for p in prepared if p != "/"):
        return True
    return kind in ("new", "deleted") and any(p.startswith(path + "/") for p in prepared)


def _listing(d: str) -> dict[str, os.DirEntry[str]]:
    """A directory's entries by name (each lstat-ed once, when asked, see _lstat); none when it is gone."""
    try:
        with os.scandir(d) as it:
            return {e.name: e for e in it}
    except OSError:
        return {}


def _entries(top: str, rel: str) -> list[str]:
    """top and every entry below it, as paths in the tree (rel is top's)."""
    out = [rel]
    if is_real_dir(top):
        for dirpath, dirnames, filenames in os.walk(top):
            base = rel + dirpath[len(top):]
            out += [f"{base}/{n}" for n in (*dirnames, *filenames)]
    return out


def _is_dir(e: os.DirEntry[str]) -> bool:
    try:
        return e.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _lstat_path(p: str) -> os.stat_result | None:
    try:
        return os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _lstat(e: os.DirEntry[str] | None) -> os.stat_result | None:
    if e is None:
        return None
    try:
        return e.stat(follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _change(old: os.stat_result | None, new: os.stat_result | None, old_path: str, new_path: str,
            xattrs: bool = False) -> str | None:
    """How the entry new (at new_path) differs from old (None: not at all, or in neither); with xattrs, an
    entry lstat finds unchanged is compared by its xattrs too (ACLs are xattrs)."""
    if new is None or old is None:
        return None if new is None and old is None else "deleted" if new is None else "new"
    if stat.S_IFMT(new.st_mode) != stat.S_IFMT(old.st_mode) or (
            stat.S_ISLNK(new.st_mode) and os.readlink(new_path) != os.readlink(old_path)) or (
            not stat.S_ISDIR(new.st_mode) and (new.st_size, new.st_mtime_ns) != (old.st_size, old.st_mtime_ns)):
        return "changed"
    if (new.st_mode, new.st_uid, new.st_gid, new.st_rdev) != (old.st_mode, old.st_uid, old.st_gid, old.st_rdev):
        return "metadata"
    if xattrs and _xattrs(new_path) != _xattrs(old_path):
        return "metadata"
    return None


def _xattrs(p: str) -> dict[str, bytes] | None:
    """An entry's xattrs, not following a symlink; None where it has none to read (gone, or a file system
    without xattrs)."""
    try:
        return {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}
    except OSError:
        return None
