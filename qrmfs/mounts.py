"""What is mounted below a source root: the separate filesystems copied with it, those left out and why, and
the -e excludes that fall inside them."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field

from .agent.fsutil import parse_mountinfo, unescape_mount
from .argv import MOUNT_DIRS_MARK

# Filesystems that hold an OS's own data: a separate /boot, /usr, /var, /home on one of these is copied too.
DISK_FS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "jfs", "reiserfs", "f2fs", "zfs", "vfat", "exfat", "bcachefs"}
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "sshfs", "fuse.sshfs", "glusterfs", "ceph", "9p", "davfs"}

@dataclass
class Mounts:
    """Mounts below a source root: which separate filesystems to copy too, and which to leave out."""
    include: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def mounts_below(mountinfo: str, root: str) -> Mounts:
    """From /proc/self/mountinfo text: whole disk filesystems mounted strictly below root (to copy as well);
    bind mounts (a directory of another filesystem shown elsewhere) and network filesystems are left out
    and reported. Pseudo filesystems (proc, sysfs, tmpfs, ...) are left out silently. A btrfs subvolume
    (fs root = its subvol=) is a filesystem, not a bind mount."""
    out = Mounts()
    base = root.rstrip("/")
    seen: set[str] = set()
    for m in parse_mountinfo(mountinfo):
        mp, fstype, fs_root = m.mountpoint, m.fstype, m.fs_root
        if mp == (base or "/") or not mp.startswith(base + "/") or mp in seen:
            continue
        seen.add(mp)
        subvol = next((o[len("subvol="):] for o in m.super_options.split(",") if o.startswith("subvol=")), None)
        if fstype in NETWORK_FS:
            out.skipped.append({"path": mp, "fstype": fstype, "why": "network filesystem"})
        elif fstype in DISK_FS and fs_root != "/" and not (fstype == "btrfs" and subvol == fs_root):
            out.skipped.append({"path": mp, "fstype": fstype, "why": f"bind mount of {fs_root}"})
        elif fstype in DISK_FS:
            out.include.append(mp)
    out.include.sort()
    return out


def source_mounts(output: str, root: str) -> Mounts:
    """mounts_below from the output of argv.mounts_argv: the mount table, then the mount points that are
    directories. A bind-mounted file (a container's /etc/hosts) is copied like any file: it is not reported."""
    table, _, listed = output.partition(f"\n{MOUNT_DIRS_MARK}\n")
    dirs = {unescape_mount(line) for line in listed.splitlines()}
    m = mounts_below(table, root)
    m.skipped = [s for s in m.skipped if s["path"] in dirs or not s["why"].startswith("bind mount")]
    return m


def rebase_excludes(excludes: Sequence[str], mountpoint: str, root: str) -> list[str]:
    """The -e excludes that fall inside a separately copied filesystem, anchored at its root."""
    rel_mp = "/" + posixpath.relpath(mountpoint, root) if root != "/" else mountpoint
    out = []
    for e in excludes:
        if e.startswith(rel_mp + "/"):
            out.append(e[len(rel_mp):])
    return out
