"""Frozen value types, validated on creation: a bad value raises UsageError naming what is wrong."""

from __future__ import annotations

import enum
import posixpath
import re
from dataclasses import dataclass

from .errors import UsageError

NAME_RE = re.compile(r"[A-Za-z0-9_]{1,50}")
HOST_RE = re.compile(r"(?:[A-Za-z0-9._-]+@)?(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})|\[[0-9A-Fa-f:.]+\])")
HOSTNAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                         r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
TAG_RE = re.compile(r"[A-Za-z0-9_.+-]{1,32}")
OS_RE = re.compile(r"[A-Za-z0-9_.+ -]{1,64}")
LIVE = ("/proc", "/sys", "/dev", "/run")


class Route(enum.Enum):
    """How the image's tree is written (README "Routes"): over ssh on the storage server, or through the
    export mounted here with the kernel's NFS client (the manual's way)."""
    SSH = "ssh"
    NFS = "nfs"


def _matching(rx: re.Pattern[str], value: str, message: str) -> str:
    if not rx.fullmatch(value or ""):
        raise UsageError(message)
    return value


def image_name(value: str, what: str = "image name") -> str:
    return _matching(NAME_RE, value, f"invalid {what} {value!r}: use 1-50 letters, digits and '_' only")


def abs_path(value: str, what: str, allow_root: bool = False, no_space: bool = False) -> str:
    """A canonical absolute path: no '..', '.', '//' or trailing '/', no control characters."""
    if not value or not value.startswith("/"):
        raise UsageError(f"invalid {what} {value!r}: must be an absolute path")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UsageError(f"invalid {what} {value!r}: contains a control character")
    if no_space and any(c.isspace() for c in value):
        raise UsageError(f"invalid {what} {value!r}: must not contain white space")
    if posixpath.normpath(value) != value or value.startswith("//"):
        raise UsageError(f"invalid {what} {value!r}: not canonical (write {posixpath.normpath(value)!r})")
    if value == "/" and not allow_root:
        raise UsageError(f"invalid {what} '/': the root directory is not allowed here")
    return value


def plain_path(value: str, what: str) -> str:
    """An absolute path without rsync wildcards (excludes are made into empty directories)."""
    p = abs_path(value, what)
    if any(c in p for c in "*?[]\\"):
        raise UsageError(f"invalid {what} {value!r}: wildcards are not supported, name the directory")
    return p


def host(value: str, what: str = "host") -> str:
    if (value or "").startswith("-"):
        raise UsageError(f"invalid {what} {value!r}: expected [user@]hostname or address")
    return _matching(HOST_RE, value, f"invalid {what} {value!r}: expected [user@]hostname or address")


def hostname(value: str) -> str:
    return _matching(HOSTNAME_RE, value, f"invalid hostname {value!r}: letters, digits, '-' and '.', labels of 1-63")


def tag(value: str, what: str) -> str:
    return _matching(TAG_RE, value, f"invalid {what} {value!r}: 1-32 of letters, digits, '_', '.', '+', '-'")


def os_name(value: str) -> str:
    return _matching(OS_RE, value, f"invalid operating system {value!r}: 1-64 of letters, digits, space, '_.+-'")


def split_host(value: str) -> tuple[str, str, str]:
    """'HOST:PATH' -> (host, ':', path); a bracketed IPv6 host ('[fd00::5]:/p', 'u@[::1]:/p') keeps its colons."""
    if "[" in value.split(":", 1)[0] and "]:" in value:
        i = value.index("]:")
        return value[:i + 1], ":", value[i + 2:]
    return value.partition(":")


def bare_address(host_token: str) -> tuple[str, str]:
    """'[user@]host' -> (user or '', address without IPv6 brackets: what ssh wants)."""
    user, _, addr = host_token.rpartition("@")
    if addr.startswith("[") and addr.endswith("]"):
        addr = addr[1:-1]
    return user, addr


@dataclass(frozen=True)
class Target:
    """STORAGE:/full/path/NAME: where an image lives."""
    storage: str
    path: str

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> str:
        return posixpath.dirname(self.path)

    def __str__(self) -> str:
        return f"{self.storage}:{self.path}"

    @classmethod
    def parse(cls, value: str, what: str = "target") -> Target:
        storage, sep, path = split_host(value or "")
        if not sep or not storage:
            raise UsageError(f"invalid {what} {value!r}: expected STORAGE:/full/path/IMAGE_NAME")
        host(storage, f"storage server in {what}")
        abs_path(path, f"path in {what}")
        image_name(posixpath.basename(path), f"image name in {what} (its last path component)")
        return cls(storage, path)


def named_target(name: str | None, target: str) -> Target:
    """-t with an optional -s: the image name is the target's last path component, and -s must agree."""
    t = Target.parse(target)
    if name is not None and image_name(name) != t.name:
        raise UsageError(f"image name {name!r} and target {target!r} disagree: the target must end in /{name}")
    return t


@dataclass(frozen=True)
class Location:
    """Where the root filesystem comes from: HOST:/path over ssh, or a local directory ('/' = this system)."""
    host: str | None
    path: str

    @property
    def is_local(self) -> bool:
        return self.host is None

    def __str__(self) -> str:
        return self.path if self.host is None else f"{self.host}:{self.path}"

    @classmethod
    def parse(cls, value: str) -> Location:
        if not value:
            raise UsageError("invalid location '': expected HOST:/rootfs or a local directory")
        if value.startswith("/"):
            return cls(None, abs_path(value, "location", allow_root=True))
        h, sep, path = split_host(value)
        if not sep:
            raise UsageError(f"invalid location {value!r}: expected HOST:/rootfs or an absolute local directory")
        host(h, "source host")
        return cls(h, abs_path(path, "location path", allow_root=True))


def private_dirs(adds: list[str], excludes: list[str]) -> tuple[list[str], list[str]]:
    """--private-add / --private-exclude: each exclude strictly inside one private directory."""
    a = [abs_path(p, "--private-add directory", no_space=True) for p in adds]
    e = [abs_path(p, "--private-exclude directory", no_space=True) for p in excludes]
    for p in a:
        if any(p == d or p.startswith(d + "/") for d in LIVE):
            raise UsageError(f"invalid --private-add {p!r}: {p.split('/')[1]} is not part of the image")
    if e and not a:
        raise UsageError("--private-exclude needs --private-add: it names directories inside private ones")
    for p in e:
        if not any(p.startswith(d + "/") for d in a):
            raise UsageError(f"invalid --private-exclude {p!r}: not inside any --private-add directory "
                             f"({', '.join(a)})")
    return a, e
