"""Path handling inside an image tree: symlinks resolve against the image root, never the host's."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_LINKS = 40


CRASH_ENV = "QRMFS_TEST_CRASH_AT"  # tests: the agent dies (os._exit) right after the named step


def crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os._exit(137)


class Escape(Exception):
    """A path would leave the image (or loops); the image is not touched there."""


def resolve(root: str, rel: str, follow_last: bool = True) -> str:
    """The host path of image path `rel`, resolving symlinks as if `root` were `/` (chroot semantics).

    Intermediate symlinks are always followed inside the image (merged /usr: /lib -> usr/lib); the last
    component only with follow_last. The result is always under root.
    """
    root = os.path.abspath(root)
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        last = not parts
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            done.append(part)
            continue
        if stat.S_ISLNK(st.st_mode) and (follow_last or not last):
            links += 1
            if links > MAX_LINKS:
                raise Escape(f"too many symlinks resolving /{rel}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(part)
    return os.path.join(root, *done)


class Planted(Exception):
    """Where qrmfs expects a directory or file of its own inside a tree a node can write (an image, a
    generation, the spare, a staging copy made from them), something else is there: a symlink, a mount point,
    a special file, a file with links elsewhere. qrmfs follows none of them: the operation is refused, naming
    the path, before anything is read, moved or written through it."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"{path} is {what}, not what qrmfs made there (a node may have planted it): refusing to "
                         "follow it; nothing was changed through it")
        self.path = path


# openat2(2): each component resolved in the kernel, below the directory, no symlink, no mount point crossed
_SYS_OPENAT2 = 437  # x86_64 and aarch64 alike
_RESOLVE = 0x01 | 0x04 | 0x08  # RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH
_openat2_works: list[bool] = []


def _openat2(dirfd: int, rel: str, flags: int) -> int | None:
    """openat2 with _RESOLVE; None where this kernel or libc has none (the caller then walks by hand)."""
    import ctypes

    if _openat2_works == [False]:
        return None

    class How(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        _openat2_works[:] = [False]
        return None
    how = How(flags | os.O_CLOEXEC, 0, _RESOLVE)
    fd = int(libc.syscall(_SYS_OPENAT2, dirfd, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how)))
    if fd >= 0:
        _openat2_works[:] = [True]
        return fd
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EPERM) and not _openat2_works:  # none here (or a seccomp filter forbids it)
        _openat2_works[:] = [False]
        return None
    raise OSError(e, os.strerror(e), rel)


def open_beneath(top: str, rel: str, flags: int = os.O_RDONLY) -> int:
    """An fd of top/rel, reached without following a symlink or crossing a mount point at any component, and
    never a special file (O_NONBLOCK: a FIFO does not block). Planted names what is in the way; an absent
    path raises FileNotFoundError. `top` itself is the caller's to check (the agent checks an image's path
    against the export root)."""
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    topfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    try:
        try:
            fd = _openat2(topfd, "/".join(parts), flags) if parts else os.dup(topfd)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR, errno.ENXIO):
                raise
            fd = None  # which component, and what it is: the walk below names it
        if fd is None:
            fd = _walk_beneath(top, topfd, parts, flags)
    finally:
        os.close(topfd)
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        os.close(fd)
        raise Planted(os.path.join(top, *parts), "a special file")
    return fd


def _walk_beneath(top: str, topfd: int, parts: list[str], flags: int) -> int:
    """open_beneath one component at a time (O_NOFOLLOW, st_dev and the mount table compared at each)."""
    dev = os.fstat(topfd).st_dev
    mounts = set(mounts_at_or_below(top))
    fd, here = os.dup(topfd), top
    try:
        for i, part in enumerate(parts):
            here = os.path.join(here, part)
            if part == "..":
                raise Planted(here, "a path out of its tree")
            last = i == len(parts) - 1
            st = os.lstat(part, dir_fd=fd)
            if stat.S_ISLNK(st.st_mode):
                raise Planted(here, "a symlink")
            if st.st_dev != dev or here in mounts:
                raise Planted(here, "a mount point")
            if not last and not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), here)
            nfd = os.open(part, flags if last else os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_beneath(top: str, rel: str) -> bytes | None:
    """The regular file top/rel (see open_beneath); None when it is absent. (A hard link is no way out of a
    tree: its other names lie on the same export, which the node sees only through its own image; qrmfs
    never writes into such a file, it replaces it by a rename, see write_file.)"""
    try:
        fd = open_beneath(top, rel)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise Planted(os.path.join(top, rel), "a directory")
        return f.read()


def plain_dir(top: str, rel: str) -> bool:
    """Whether top/rel is a directory reached as open_beneath reaches it (False: absent); Planted where
    something else is there."""
    try:
        fd = open_beneath(top, rel)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise Planted(os.path.join(top, rel), "below a file, not a directory") from None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise Planted(os.path.join(top, rel), "a file, not a directory")
    finally:
        os.close(fd)
    return True


def is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:  # absent, or a path through a file
        return False


def write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` (a symlink there is replaced, never followed) atomically."""
    tmp = f"{path}.qrmfs-tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_file(path: str) -> bytes | None:
    """Read a regular file without following a symlink; None when absent or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, OSError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


class Mounted(Exception):
    """A directory to delete has a filesystem mounted at or below it: deleting would reach into that one."""


class InUse(Exception):
    """A tree to delete is held open by a process on this machine (the NFS server serving it, a shell in it)."""


# NFS servers keep files that clients once opened open in a cache long after the client is gone (nfs-ganesha
# held 55 files of an image whose only node had powered off minutes before): their open files are no use.
NFS_SERVERS = ("ganesha.nfsd",)


def holders(path: str, proc: str = "/proc") -> list[str]:
    """Processes on this machine with a file, working directory or root at or below path ("pid N (name)"),
    the NFS server's cache left aside."""
    base = path.rstrip("/") + "/"
    out = []
    for pid in sorted((p for p in os.listdir(proc) if p.isdigit()), key=int):
        if int(pid) == os.getpid() or _comm(proc, pid) in NFS_SERVERS:
            continue
        links = [os.path.join(proc, pid, n) for n in ("cwd", "root")]
        try:
            links += [os.path.join(proc, pid, "fd", f) for f in os.listdir(os.path.join(proc, pid, "fd"))]
        except OSError:
            pass
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == path or target.startswith(base):
                out.append(f"pid {pid} ({_comm(proc, pid)})")
                break
    return out


def _comm(proc: str, pid: str) -> str:
    try:
        with open(os.path.join(proc, pid, "comm")) as f:
            return f.read().strip()
    except OSError:
        return "?"


def remove_tree(path: str) -> None:
    """Delete a whole image or generation: never one that something on this machine still holds open."""
    busy = holders(path) if is_real_dir(path) else []
    if busy:
        raise InUse(f"refusing to delete {path}: in use by {', '.join(busy[:5])}"
                    + (f" and {len(busy) - 5} more" if len(busy) > 5 else ""))
    remove(path)


def unchangeable(d: str) -> str | None:
    """Why the agent's user may not change directory d (add, remove or rename its entries), or None."""
    if os.access(d, os.W_OK | os.X_OK, follow_symlinks=False):
        return None
    st = os.lstat(d)
    return f"{d} (owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}) may not be changed"


def undeletable(path: str) -> str | None:
    """Why the agent's user could not delete the tree at path (a directory in it, or its parent, it may not
    change: owned by another user, read-only), or None. Walks the directories only (not following symlinks,
    nor into other file systems); root may change any."""
    def blocked(d: str) -> str | None:  # an empty directory needs no change of its own to go
        try:
            with os.scandir(d) as it:
                empty = next(it, None) is None
        except PermissionError:
            empty = False
        return None if empty else unchangeable(d)

    why = unchangeable(os.path.dirname(path))
    if why or not is_real_dir(path):
        return why
    dev = os.lstat(path).st_dev
    for dirpath, dirnames, _files in os.walk(path):
        why = blocked(dirpath)
        if why:
            return why
        dirnames[:] = [n for n in dirnames if os.lstat(os.path.join(dirpath, n)).st_dev == dev]
    return None


def remove(path: str) -> None:
    """Remove a file, symlink or whole directory tree without following symlinks, and never into another
    filesystem: a tree with anything mounted at or below it is refused whole (Mounted), before anything goes."""
    import shutil

    if not os.path.lexists(path):
        return
    if is_real_dir(path):
        busy = mounts_at_or_below(path)
        if busy:
            raise Mounted(f"refusing to delete {path}: {', '.join(busy)} mounted there")
        shutil.rmtree(path)
    else:
        os.unlink(path)


def makedirs(path: str, mode: int = 0o755) -> None:
    """mkdir -p, then the exact mode (umask-free)."""
    if not os.path.lexists(path):
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/PID/mountinfo: what is mounted where."""
    fs_root: str      # the directory of the filesystem shown at the mount point ("/" unless a bind mount)
    mountpoint: str
    fstype: str
    super_options: str


def unescape_mount(s: str) -> str:
    """A name as /proc/self/mountinfo writes it (octal escapes \\NNN for space, tab, newline, backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The one mountinfo parser: the source's mount table (client side) and the storage server's own
    (agent side) are both read with it."""
    out = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        f, g = pre.split(), post.split()
        if not sep or len(f) < 5 or not g:
            continue
        out.append(MountEntry(unescape_mount(f[3]), unescape_mount(f[4]), g[0], g[2] if len(g) > 2 else ""))
    return out


def mounts_at_or_below(path: str, mountinfo: str | None = None) -> list[str]:
    """Mount points at or below path on this machine (the storage server, for the agent)."""
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    base = path.rstrip("/")
    return [m.mountpoint for m in parse_mountinfo(mountinfo)
            if m.mountpoint == path or m.mountpoint.startswith(base + "/")]


# The live-system directories at an image's root whose contents are not the image's (the preparation empties
# proc, sys and run; dev holds device nodes): the socket search leaves them out.
NOT_SEARCHED = ("proc", "sys", "dev", "run")


@dataclass
class Walk:
    """What one walk of a tree found: its entries and allocated bytes (counted only when asked: that needs a
    stat per entry), and its sockets (from the directory entries' types, no stat needed)."""
    files: int = 0
    bytes: int = 0
    sockets: list[str] = field(default_factory=list)


def walk_tree(top: str, count: bool = True) -> Walk:
    """One walk of the tree below top, without following symlinks or crossing file systems. Memory stays flat
    in the file count: a stack of directories, and only the inodes with more than one link (to count their
    blocks once). Counting takes a stat per entry: the directories are then shared out between two processes
    (in_two), a file linked from directories of both counted once."""
    if not count:
        return _walk(_walk_share(top, False, 0, 1))
    return _walk(*in_two(lambda share, shares: _walk_share(top, True, share, shares)))


def _walk(*shares: dict[str, Any]) -> Walk:
    linked: dict[str, int] = {}
    for s in shares:
        linked.update(s["linked"])
    return Walk(sum(s["files"] for s in shares), sum(s["bytes"] for s in shares) + sum(linked.values()),
                [p for s in shares for p in s["sockets"]])


def _walk_share(top: str, count: bool, share: int, shares: int) -> dict[str, Any]:
    """walk_tree's findings in the directories that fall to `share` of `shares` (see mine); every share
    walks every directory."""
    files = size = 0
    linked: dict[str, int] = {}  # blocks of each inode with more than one link, by inode number
    sockets: list[str] = []
    dev = os.lstat(top).st_dev
    skip = {os.path.join(top, d) for d in NOT_SEARCHED}
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except FileNotFoundError:
            continue
        own = mine(d, share, shares)
        with it:
            for e in it:
                is_dir = e.is_dir(follow_symlinks=False)
                if count and (own or is_dir):
                    st = e.stat(follow_symlinks=False)
                    if own:
                        files += 1
                        size += _blocks(st, is_dir, linked)
                    if is_dir and st.st_dev != dev:
                        continue  # a directory of another file system: counted, not entered
                if is_dir:
                    if count or e.path not in skip:
                        stack.append(e.path)
                elif own and not e.is_file(follow_symlinks=False) and not e.is_symlink() and _is_socket(e) \
                        and not _under_any(e.path, skip):  # only a special file costs a stat here
                    sockets.append(e.path)
    return {"files": files, "bytes": size, "linked": linked, "sockets": sockets}


def _blocks(st: os.stat_result, is_dir: bool, linked: dict[str, int]) -> int:
    """An entry's allocated bytes; those of an inode with more links go into `linked` (counted once)."""
    if is_dir or st.st_nlink == 1:
        return st.st_blocks * 512
    linked[str(st.st_ino)] = st.st_blocks * 512
    return 0


def mine(directory: str, share: int, shares: int) -> bool:
    """Whether a directory's entries fall to `share` of `shares` (by a hash of its path, the same in every
    process)."""
    return shares == 1 or zlib.crc32(os.fsencode(directory)) % shares == share


def in_two(work: Callable[[int, int], Any]) -> list[Any]:
    """[work(0, 2), work(1, 2)], both at once: share 1 in a forked child, so that two cores walk (a tree walk
    is lstat after lstat, one core's work). Its answer comes back as JSON. With one core, or without fork,
    [work(0, 1)]. A failure of the child is raised here: its OSError as it was, anything else as EIO."""
    if len(os.sched_getaffinity(0)) < 2:
        return [work(0, 1)]
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return [work(0, 1)]
    if pid == 0:  # the child: its share, its answer on the pipe, gone without running the agent's exit code
        code = 0
        try:
            os.close(r)
            out = json.dumps({"ok": work(1, 2)})
        except BaseException as e:  # whatever it was goes to the parent, which raises it
            err = [e.errno, e.strerror, e.filename] if isinstance(e, OSError) and e.errno is not None else None
            out, code = json.dumps({"error": f"{type(e).__name__}: {e}", "oserror": err}), 1
        with contextlib.suppress(OSError), os.fdopen(w, "w") as f:
            f.write(out)
        os._exit(code)
    os.close(w)
    try:
        first = work(0, 2)
    finally:
        with os.fdopen(r) as f:
            text = f.read()
        os.waitpid(pid, 0)
    theirs = json.loads(text) if text else {"error": "the forked walker died without an answer"}
    if theirs.get("oserror"):
        raise OSError(*theirs["oserror"])  # as one process would have raised it (the agent says which path)
    if "error" in theirs:
        raise OSError(errno.EIO, f"the second walker failed: {theirs['error']}")
    return [first, theirs["ok"]]


def _is_socket(e: os.DirEntry[str]) -> bool:
    try:
        return stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _under_any(path: str, dirs: set[str]) -> bool:
    return any(path.startswith(d + "/") for d in dirs)
