"""The storage container's exports: `/exports` on XFS with reflinks (default) or on a docker volume, and
`/exports-plain` always on a docker volume (ext4 here), so both kinds of path are testable in one lab.

The XFS file system is a sparse image file in the lab's state dir, made with `mkfs.xfs -m reflink=1`,
loop-mounted on this host and bind-mounted into the storage container. `release()` unmounts it, detaches
its loop device and removes the file; `prepare()` calls it first, so a crash leftover is cleaned by the
next `up`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .images import LabError

KINDS = ("xfs", "plain")
# $QRMFS_LAB_EXPORT chooses the kind of /exports for `up` without --export.
DEFAULT_KIND = os.environ.get("QRMFS_LAB_EXPORT") or "xfs"
EXPORT_ROOT = "/exports"
PLAIN_ROOT = "/exports-plain"
# Sparse: only what the lab writes takes space on the host's disk.
XFS_SIZE = os.environ.get("QRMFS_LAB_XFS_SIZE") or "64G"
FS_TYPE = {"xfs": "xfs", "plain": "ext4"}  # what each kind of export is on this project's machines


def image_file(state: Path) -> Path:
    return state / "exports.xfs"


def mount_point(state: Path) -> Path:
    return state / "exports.mnt"


def _run(argv: list[str], what: str) -> str:
    if shutil.which(argv[0]) is None:
        raise LabError(f"{what}: `{argv[0]}` is missing (run `make setup`, which installs xfsprogs)")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise LabError(f"{what}: `{' '.join(argv)}` exited {r.returncode}: {r.stderr.strip()[-400:]}")
    return r.stdout


def _loops(image: Path) -> list[str]:
    """Loop devices backed by `image` (`losetup -j` prints `/dev/loopN: [dev]:ino (path)` lines)."""
    if not image.exists() or shutil.which("losetup") is None:
        return []
    out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, timeout=30).stdout
    return [ln.split(":", 1)[0] for ln in out.splitlines() if ln.strip()]


def release(state: Path) -> list[str]:
    """Unmount the lab's XFS export, detach its loop devices and remove the image file. Returns what it did."""
    done: list[str] = []
    mnt, image = mount_point(state), image_file(state)
    while os.path.ismount(mnt):  # mounted twice by a crash between two `up`s: unmount each
        _run(["umount", str(mnt)], "lab down: unmounting the XFS export (is a container still using it?)")
        done.append(f"mount {mnt}")
    for dev in _loops(image):
        _run(["losetup", "-d", dev], f"lab down: detaching {dev}")
        done.append(f"loop device {dev}")
    if image.exists():
        image.unlink()
        done.append(f"file {image}")
    if mnt.is_dir():
        mnt.rmdir()
    return done


def prepare(state: Path) -> Path:
    """A fresh, empty XFS file system with reflinks, mounted at mount_point(state). Returns the mount point."""
    release(state)
    image, mnt = image_file(state), mount_point(state)
    try:
        image.touch()
        os.truncate(image, _bytes(XFS_SIZE))
        _run(["mkfs.xfs", "-q", "-m", "reflink=1", "-L", "qrmfs-lab", str(image)], "lab: making the XFS export")
        mnt.mkdir()
        _run(["mount", "-o", "loop", str(image), str(mnt)], "lab: loop-mounting the XFS export")
    except (LabError, OSError) as e:
        release(state)
        raise LabError(f"{e} (`python -m lab up --export plain` or QRMFS_LAB_EXPORT=plain puts /exports on a "
                       "docker volume instead)") from e
    mnt.chmod(0o755)
    return mnt


def is_ready(state: Path) -> bool:
    return os.path.ismount(mount_point(state))


def _bytes(size: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    s = size.strip().upper()
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)
