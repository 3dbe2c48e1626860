"""Frozen value types, validated on creation: a bad value raises UsageError naming what is wrong."""

from __future__ import annotations

import enum
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .agent.steps import PRIVATE_DIR_CHARS, PRIVATE_DIR_RE, private_dir_problem
from .errors import UsageError

__all__ = ["PRIVATE_DIR_CHARS", "PRIVATE_DIR_RE"]

NAME_RE = re.compile(r"[A-Za-z0-9_]{1,50}")
HOST_RE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}@)?"
                     r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})|\[[0-9A-Fa-f:.]+\])")
HOSTNAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                         r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
TAG_RE = re.compile(r"[A-Za-z0-9_.+-]{1,32}")
# Every component of a target path (the export root's included): ASCII letters, digits, '_', '.', '-', not
# starting with '.' or '-'. Such a path is safe as one word for ssh, rsync and a remote shell, and never
# names one of qrmfs's own hidden siblings (.NAME.qrmfs-*).
COMPONENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
COMPONENT_RULE = "ASCII letters, digits, '_', '.' and '-', not starting with '.' or '-'"
# A directory private to each node: the one rule lives in qrmfs/agent/steps.py (qrmfs-init and the node-init
# step use it too); PRIVATE_DIR_CHARS and PRIVATE_DIR_RE are re-exported here.
# An ssh user name (config ssh_user, user@ of a host): no leading '-', nothing ssh or a shell would split.
USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
# What ssh itself would misread inside `-o Key=value` or a path it expands: white space (ssh splits
# UserKnownHostsFile and friends on it), quotes and backslash (its word splitting honours them),
# '%' (its token expansion) and control characters.
SSH_UNSAFE = frozenset(" \t\n\r\v\f\"'\\%")
OS_RE = re.compile(r"[A-Za-z0-9_.+ -]{1,64}")
LIVE = ("/proc", "/sys", "/dev", "/run")


class Route(enum.Enum):
    """How the image's tree is written (docs/routes.md): over ssh on the storage server, or through the
    export mounted here with the kernel's NFS client (the manual's way)."""
    SSH = "ssh"
    NFS = "nfs"


def _matching(rx: re.Pattern[str], value: str, message: str) -> str:
    if not rx.fullmatch(value or ""):
        raise UsageError(message)
    return value


# openQRM's own two images: it registers a record of these names but never deregisters one (remove_by_name keeps
# them, and its database compares names without case: `remove OpenQRM` would delete openQRM's own record)
RESERVED_NAMES = ("openqrm", "idle")


def image_name(value: str, what: str = "image name") -> str:
    _matching(NAME_RE, value, f"invalid {what} {value!r}: use 1-50 letters, digits and '_' only")
    if value.lower() in RESERVED_NAMES:
        raise UsageError(f"invalid {what} {value!r}: openQRM keeps its own image of that name (in any case) and "
                         "never deregisters one; choose another name")
    return value


def _canonical(value: str) -> str:
    return "/" + posixpath.normpath(value).lstrip("/")


def abs_path(value: str, what: str, allow_root: bool = False, no_space: bool = False) -> str:
    """A canonical absolute path: no '..', '.', '//' or trailing '/', no control characters."""
    if not value or not value.startswith("/"):
        raise UsageError(f"invalid {what} {value!r}: must be an absolute path")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UsageError(f"invalid {what} {value!r}: contains a control character")
    if no_space and any(c.isspace() for c in value):
        raise UsageError(f"invalid {what} {value!r}: must not contain white space")
    if posixpath.normpath(value) != value or value.startswith("//"):
        raise UsageError(f"invalid {what} {value!r}: not canonical (write {_canonical(value)!r})")
    if value == "/" and not allow_root:
        raise UsageError(f"invalid {what} '/': the root directory is not allowed here")
    return value


def plain_path(value: str, what: str) -> str:
    """An absolute path without rsync wildcards (excludes are made into empty directories)."""
    p = abs_path(value, what)
    if any(c in p for c in "*?[]\\"):
        raise UsageError(f"invalid {what} {value!r}: wildcards are not supported, name the directory")
    return p


def safe_path(value: str, what: str) -> str:
    """A canonical absolute path whose every component obeys COMPONENT_RE (targets, export roots)."""
    abs_path(value, what)
    for c in value.split("/")[1:]:
        if not COMPONENT_RE.fullmatch(c):
            raise UsageError(f"invalid {what} {value!r}: component {c!r} must be 1-255 {COMPONENT_RULE}")
    return value


def ssh_value(value: str, what: str, *, own_word: bool = False) -> str:
    """A value that ends up in ssh's argv or `-o Key=value` (a path, a user, an address): ssh must see it as
    one word, never as an option, and expand nothing in it. own_word: the value is an argv word of its own
    (`-i PATH`), which ssh does not split, so white space is allowed there."""
    if not value:
        raise UsageError(f"invalid {what}: empty")
    if value.startswith("-"):
        raise UsageError(f"invalid {what} {value!r}: must not start with '-'")
    bad = sorted({c for c in value if (own_word and c == " ") is False
                  and (c in SSH_UNSAFE or c.isspace() or not c.isprintable())})
    if bad:
        raise UsageError(f"invalid {what} {value!r}: must not contain {', '.join(repr(c) for c in bad)}")
    return value


def ssh_user(value: str, what: str = "ssh user") -> str:
    return _matching(USER_RE, value, f"invalid {what} {value!r}: 1-32 of letters, digits, '_', '.', '-', "
                                     "not starting with '-' or '.'")


def openqrm_url(value: str, what: str = "openQRM URL") -> str:
    """http(s)://host[:port][/path]: no credentials, query or fragment in it (a password never goes in a URL)."""
    try:
        u = urlsplit(value or "")
    except ValueError:  # an unbalanced IPv6 bracket
        raise UsageError(f"invalid {what} {value!r}: expected http(s)://HOST[:PORT]/PATH") from None
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value or ""):
        raise UsageError(f"invalid {what} {value!r}: contains white space or a control character")
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UsageError(f"invalid {what} {value!r}: expected http(s)://HOST[:PORT]/PATH")
    if u.username is not None or u.password is not None:
        raise UsageError(f"invalid {what}: credentials do not belong in the URL (use -u and --password-file)")
    if u.query or u.fragment or value.endswith(("?", "#")):
        raise UsageError(f"invalid {what} {value!r}: no query or fragment, only http(s)://HOST[:PORT]/PATH")
    try:
        u.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise UsageError(f"invalid {what} {value!r}: bad port") from None
    host(u.hostname if ":" not in u.hostname else f"[{u.hostname}]", f"host in {what}")
    return value


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
        if path.startswith("//"):
            raise UsageError(f"invalid {what} {value!r}: STORAGE:/path, not a URL "
                             f"(did you mean '{storage}:{_canonical(path)}'?)")
        abs_path(path, f"path in {what}")
        image_name(posixpath.basename(path), f"image name in {what} (its last path component)")
        safe_path(path, f"path in {what}")
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


def private_dir(value: str, what: str) -> str:
    """A canonical absolute path that qrmfs-init binds at boot (steps.private_dir_problem says why not)."""
    abs_path(value, what, no_space=True)
    problem = private_dir_problem(value)
    if problem:
        raise UsageError(f"invalid {what} {value!r}: {problem}; qrmfs-init would skip it at boot")
    return value


def private_dirs(adds: list[str], excludes: list[str]) -> tuple[list[str], list[str]]:
    """--private-add / --private-exclude: each exclude strictly inside one private directory."""
    for p in adds:
        abs_path(p, "--private-add directory", no_space=True)
        if any(p == d or p.startswith(d + "/") for d in LIVE):
            raise UsageError(f"invalid --private-add {p!r}: {p.split('/')[1]} is not part of the image")
    a = [private_dir(p, "--private-add directory") for p in adds]
    e = [private_dir(p, "--private-exclude directory") for p in excludes]
    if e and not a:
        raise UsageError("--private-exclude needs --private-add: it names directories inside private ones")
    for p in e:
        if not any(p.startswith(d + "/") for d in a):
            raise UsageError(f"invalid --private-exclude {p!r}: not inside any --private-add directory "
                             f"({', '.join(a)})")
    return a, e
