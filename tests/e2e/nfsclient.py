"""An NFSv3 client for the e2e tests that keeps its mount: libnfs (Debian libnfs13, which `make setup` installs with
libnfs-utils) through ctypes. This machine's kernel has no NFS client; `nfs-cat` mounts anew for each call, so a
client that holds a mount and an open file across an update (as a running node does) needs the library itself.

A Mount is a MNT of the export (its root handle, as the server answered then) and an NFS context on it; files are
looked up from that root, and an Open keeps its file handle."""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

_lib = ctypes.CDLL(ctypes.util.find_library("nfs") or "libnfs.so.13")
_lib.nfs_init_context.restype = ctypes.c_void_p
_lib.nfs_destroy_context.argtypes = [ctypes.c_void_p]
_lib.nfs_get_error.restype = ctypes.c_char_p
_lib.nfs_get_error.argtypes = [ctypes.c_void_p]
_lib.nfs_set_version.argtypes = [ctypes.c_void_p, ctypes.c_int]
_lib.nfs_mount.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
_lib.nfs_open.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
_lib.nfs_close.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_lib.nfs_pread.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p]
NFS_V3 = 3


class NfsError(Exception):
    pass


@dataclass
class Open:
    mount: Mount
    fh: ctypes.c_void_p

    def read(self, size: int = 4096) -> bytes:
        buf = ctypes.create_string_buffer(size)
        n = _lib.nfs_pread(self.mount.ctx, self.fh, 0, size, buf)
        if n < 0:
            raise NfsError(self.mount.error())
        return buf.raw[:n]


class Mount:
    """`mount -t nfs -o vers=3 SERVER:EXPORT`, held until close()."""

    def __init__(self, server: str, export: str) -> None:
        self.ctx = _lib.nfs_init_context()
        if not self.ctx:
            raise NfsError("libnfs: no context")
        _lib.nfs_set_version(self.ctx, NFS_V3)
        if _lib.nfs_mount(self.ctx, server.encode(), export.encode()) != 0:
            err = self.error()
            self.close()
            raise NfsError(f"mount {server}:{export}: {err}")
        self.opened: list[Open] = []

    def error(self) -> str:
        return (_lib.nfs_get_error(self.ctx) or b"").decode(errors="replace")

    def open(self, path: str) -> Open:
        fh = ctypes.c_void_p()
        if _lib.nfs_open(self.ctx, path.encode(), 0, ctypes.byref(fh)) != 0:
            raise NfsError(f"open {path}: {self.error()}")
        o = Open(self, fh)
        self.opened.append(o)
        return o

    def cat(self, path: str) -> bytes:
        """A fresh lookup of `path` from this mount's root, read."""
        return self.open(path).read()

    def close(self) -> None:
        if self.ctx:
            for o in getattr(self, "opened", []):
                _lib.nfs_close(self.ctx, o.fh)
            _lib.nfs_destroy_context(self.ctx)
            self.ctx = None

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cat(server: str, export: str, path: str) -> bytes:
    """A new client's view: mount, read, unmount."""
    with Mount(server, export) as m:
        return m.cat(path)
