"""What a tree costs on disk and whether its file system shares extents: reflink support (FICLONE) and the
blocks a tree holds that no other tree shares (FIEMAP)."""

from __future__ import annotations

import fcntl
import os
import stat
import struct

FICLONE = 0x40049409


def can_reflink(directory: str) -> bool:
    """Whether files in this directory can share extents (FICLONE on two scratch files)."""

    a, b = os.path.join(directory, ".qrmfs-reflink-a"), os.path.join(directory, ".qrmfs-reflink-b")
    try:
        with open(a, "wb") as fa:
            fa.write(b"x" * 4096)
        with open(a, "rb") as fa, open(b, "wb") as fb:
            fcntl.ioctl(fb.fileno(), FICLONE, fa.fileno())
        return True
    except OSError:
        return False
    finally:
        for p in (a, b):
            if os.path.lexists(p):
                os.unlink(p)


# --- listing and cost ------------------------------------------------------------------------------------

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_HEAD = struct.Struct("=QQLLLL")
_EXTENT = struct.Struct("=QQQQQLLLL")


def _unshared(fd: int, size: int, blocks: int) -> int:
    """Bytes of a file's extents that no other file shares (FIEMAP); all its blocks where FIEMAP is missing."""

    total, start, n = 0, 0, 64
    while True:
        buf = bytearray(_HEAD.pack(start, 2**64 - 1 - start, 0, 0, n, 0) + b"\0" * (_EXTENT.size * n))
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError:
            return blocks * 512
        mapped = _HEAD.unpack_from(buf)[3]
        if mapped == 0:
            return total
        last = None
        for i in range(mapped):
            ext = _EXTENT.unpack_from(buf, _HEAD.size + i * _EXTENT.size)
            logical, length, flags = ext[0], ext[2], ext[5]
            if not flags & FIEMAP_EXTENT_SHARED:
                total += length
            last = (logical, length, flags)
        assert last is not None
        if last[2] & FIEMAP_EXTENT_LAST or last[0] + last[1] >= size:
            return total
        start = last[0] + last[1]


def cost(top: str, skip: str | None = None) -> int:
    """What a tree costs on its own: the bytes of its extents shared with no other file (with reflinks, a
    generation costs only what changed), plus its directories' blocks. `skip`: a subtree left out."""
    size = 0
    seen: set[int] = set()
    dev = os.lstat(top).st_dev
    stack = [top]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if skip and e.path == skip:
                    continue
                st = e.stat(follow_symlinks=False)
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                if stat.S_ISDIR(st.st_mode):
                    size += st.st_blocks * 512
                    if st.st_dev == dev:
                        stack.append(e.path)
                elif stat.S_ISREG(st.st_mode) and st.st_blocks:
                    try:
                        fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                    except OSError:
                        size += st.st_blocks * 512
                        continue
                    try:
                        size += _unshared(fd, st.st_size, st.st_blocks)
                    finally:
                        os.close(fd)
                else:
                    size += st.st_blocks * 512
    return size
