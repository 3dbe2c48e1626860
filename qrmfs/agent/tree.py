"""The image tree on the storage server: staging, atomic publish, lock, manifest, remove, list.

Layout beside an image `<parent>/<name>` (all hidden, all on the same filesystem so rename is atomic):
  .<name>.qrmfs-lock            flock held by the one qrmfs operation on this image; names its holder
  .<name>.qrmfs-staging-<id>    a copy being made; never looks like an image (no manifest until ready)
  .<name>.qrmfs-previous        the image replaced by `create --force`, kept for rollback
and inside the image `.qrmfs/manifest.json` (what was done) and `.qrmfs/nodes/` (per-node state).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import time
from typing import Any

from .fsutil import is_real_dir, remove

MANIFEST = ".qrmfs/manifest.json"


class AgentError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def siblings(path: str) -> dict[str, str]:
    parent, name = os.path.split(path.rstrip("/"))
    return {
        "lock": os.path.join(parent, f".{name}.qrmfs-lock"),
        "staging_prefix": os.path.join(parent, f".{name}.qrmfs-staging-"),
        "previous": os.path.join(parent, f".{name}.qrmfs-previous"),
        "known_hosts": os.path.join(parent, f".{name}.qrmfs-known_hosts"),
    }


def _is_staging(path: str, staging: str) -> bool:
    """staging is a staging dir of path: a direct sibling with the staging prefix, canonical (no '..')."""
    return (os.path.normpath(staging) == staging and os.path.dirname(staging) == os.path.dirname(path)
            and staging.startswith(siblings(path)["staging_prefix"]))


def _check_under(path: str, export_root: str) -> None:
    """The path must be a canonical path strictly below the export root, reached without symlinks."""
    root = os.path.realpath(export_root)
    if not is_real_dir(root):
        raise AgentError("not_found", f"export root {export_root} does not exist on the storage server")
    parent = os.path.dirname(path)
    if os.path.normpath(path) != path or not path.startswith(root + "/"):
        raise AgentError("refused", f"{path} is not below the export root {root}")
    if os.path.lexists(parent) and os.path.realpath(parent) != parent:
        raise AgentError("refused", f"{parent} is reached through a symlink; refusing")
    if os.path.islink(path):
        raise AgentError("refused", f"{path} is a symlink; refusing to follow it")


def read_manifest(path: str) -> dict[str, Any] | None:
    p = os.path.join(path, MANIFEST)
    if os.path.islink(p) or not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_manifest(root: str, manifest: dict[str, Any]) -> None:
    d = os.path.join(root, ".qrmfs")
    if not is_real_dir(d):
        if os.path.lexists(d):
            remove(d)
        os.makedirs(d, mode=0o755)
    tmp = os.path.join(d, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(d, "manifest.json"))


def op_inspect(path: str, export_root: str) -> dict[str, Any]:
    """What is at the target now: exists, is an image, staging leftovers, free space."""
    _check_under(path, export_root)
    s = siblings(path)
    parent = os.path.dirname(path)
    st = os.statvfs(parent) if is_real_dir(parent) else os.statvfs(os.path.realpath(export_root))
    return {
        "exists": os.path.lexists(path),
        "is_image": read_manifest(path) is not None,
        "parent_exists": is_real_dir(parent),
        "previous": os.path.lexists(s["previous"]),
        "free_bytes": st.f_bavail * st.f_frsize,
        "manifest": read_manifest(path),
    }


def op_lock(path: str, export_root: str, holder: str) -> int:
    """Hold the image's lock until stdin closes (qrmfs exited or finished). Fails at once when taken."""
    _check_under(path, export_root)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    lock = siblings(path)["lock"]
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held_by = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        print(json.dumps({"ok": False, "error": {"kind": "locked", "message": held_by}}), flush=True)
        return 3
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(), 0)
    print(json.dumps({"ok": True, "result": {"lock": lock}}), flush=True)
    sys.stdin.read()  # returns at EOF: our qrmfs is done (or gone); the flock dies with this process
    os.ftruncate(fd, 0)
    return 0


def op_stage(path: str, export_root: str, token: str, known_hosts: str | None = None) -> dict[str, Any]:
    _check_under(path, export_root)
    s = siblings(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = s["staging_prefix"] + token
    # Leftovers of crashed runs of this image (we hold its lock, so nobody else is writing them).
    parent = os.path.dirname(path)
    for e in os.listdir(parent):
        full = os.path.join(parent, e)
        if full.startswith(s["staging_prefix"]):
            remove(full)
    os.mkdir(staging, 0o755)
    out = {"staging": staging}
    if known_hosts is not None:
        out.update(op_pin_host(path, export_root, known_hosts))
    return out


def op_pin_host(path: str, export_root: str, known_hosts: str) -> dict[str, str]:
    """Write the source's known_hosts lines beside the image, for the storage server's ssh to the source."""
    _check_under(path, export_root)
    kh = siblings(path)["known_hosts"]
    remove(kh)
    fd = os.open(kh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(known_hosts)
    return {"known_hosts": kh}


def op_unpin_host(path: str, export_root: str) -> dict[str, str]:
    _check_under(path, export_root)
    remove(siblings(path)["known_hosts"])
    return {}


def op_discard(path: str, export_root: str, staging: str) -> dict[str, Any]:
    """Remove a staging copy (a failed run); the image's name is untouched."""
    _check_under(path, export_root)
    s = siblings(path)
    if not _is_staging(path, staging):
        raise AgentError("refused", f"{staging} is not a staging directory of {path}")
    remove(staging)
    remove(s["known_hosts"])
    return {"removed": staging}


def op_publish(path: str, export_root: str, staging: str, force: bool) -> dict[str, Any]:
    """Rename the staging copy to the image's name; with force the old image becomes `.previous`."""
    _check_under(path, export_root)
    s = siblings(path)
    if not _is_staging(path, staging) or not is_real_dir(staging):
        raise AgentError("refused", f"{staging} is not a staging directory of {path}")
    if read_manifest(staging) is None:
        raise AgentError("refused", f"{staging} has no manifest: not publishing an unfinished image")
    replaced = False
    if os.path.lexists(path):
        if not force:
            raise AgentError("exists", f"{path} exists")
        remove(s["previous"])
        os.rename(path, s["previous"])
        replaced = True
    os.rename(staging, path)
    remove(s["known_hosts"])
    return {"path": path, "replaced": replaced, "previous": s["previous"] if replaced else None}


def mounts_under(path: str) -> list[str]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
            if mp == path or mp.startswith(path.rstrip("/") + "/"):
                out.append(mp)
    return out


def op_remove(path: str, export_root: str, force: bool) -> dict[str, Any]:
    """Remove an image: refuse anything that is not plainly an unmounted image below the export root."""
    if path in ("", "/") or not path.startswith("/"):
        raise AgentError("refused", f"refusing to remove {path!r}")
    _check_under(path, export_root)
    if os.path.realpath(path) != path:
        raise AgentError("refused", f"{path} resolves elsewhere ({os.path.realpath(path)}); refusing")
    if not os.path.lexists(path):
        raise AgentError("not_found", f"{path} does not exist")
    if not is_real_dir(path):
        raise AgentError("refused", f"{path} is not a directory")
    if read_manifest(path) is None and not force:
        raise AgentError("not_image", f"{path} has no qrmfs manifest: not an image (use --force to remove anyway)")
    busy = mounts_under(path)
    if busy:
        raise AgentError("refused", f"{path} has mounts under it: {', '.join(busy)}")
    s = siblings(path)
    doomed = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.qrmfs-removing")
    remove(doomed)
    os.rename(path, doomed)  # gone from its name at once; the slow part happens out of sight
    remove(doomed)
    remove(s["previous"])
    return {"removed": path}


def op_list(export_root: str, depth: int = 3) -> list[dict[str, Any]]:
    root = os.path.realpath(export_root)
    if not is_real_dir(root):
        raise AgentError("not_found", f"export root {export_root} does not exist on the storage server")
    found = []

    def walk(d: str, level: int) -> None:
        try:
            entries = sorted(os.listdir(d))
        except OSError:
            return
        for e in entries:
            full = os.path.join(d, e)
            if e.startswith(".") or not is_real_dir(full):
                continue
            m = read_manifest(full)
            if m is not None:
                found.append({"path": full, "manifest": m,
                              "locked": _lock_held(siblings(full)["lock"])})
            elif level < depth:
                walk(full, level + 1)

    walk(root, 1)
    return found


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


def op_manifest_update(path: str, export_root: str, patch: dict[str, Any]) -> dict[str, Any]:
    _check_under(path, export_root)
    m = read_manifest(path)
    if m is None:
        raise AgentError("not_image", f"{path} has no qrmfs manifest")
    m.update(patch)
    write_manifest(path, m)
    return m


def op_stats(root: str) -> dict[str, int]:
    """Entries and bytes (allocated) of a tree, without following symlinks or crossing filesystems."""
    files = 0
    size = 0
    dev = os.lstat(root).st_dev
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.lstat(os.path.join(dirpath, d)).st_dev == dev]
        for n in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, n))
            files += 1
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * 512
    return {"files": files, "bytes": size}
