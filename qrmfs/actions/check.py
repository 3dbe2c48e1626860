"""qrmfs check: a preflight that says, before a long copy, whether everything create needs is in place.

One Check per line, each ok / warn / fail. Nothing is changed anywhere: the storage probe writes one
scratch directory beside where the image would go and removes it; the openQRM probe is a request that
changes nothing (docs/openqrm.md: the credentials probe).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import argv as A
from .. import openqrm
from ..agent.exports import LISTERS
from ..config import SEARCH, Config, SshHost, Storage, load
from ..errors import CheckFailedError, ConfigError, QrmfsError, UsageError
from ..model import Location, Target, host, split_host
from ..results import Result
from ..runner import CommandFailed, Runner, ToolMissing, tail
from ..storage import StorageSide
from ..ui import Ui
from . import hosts
from .common import Credentials, Env, resolve_credentials

OK, WARN, FAIL = "ok", "warn", "fail"
MARGIN = 1.10  # free space below source size * MARGIN (but above it) is a warning
SSH_TIMEOUT = 60
DU_TIMEOUT = 600

# Runs on the storage server as `python3 -c PROBE DIR EXPORT_ROOT`: its parameters are argv, never program text.
# It probes the directory where the image would go (or its nearest existing ancestor inside the export root)
# with a scratch directory that it always removes, and prints one JSON object.
PROBE = r"""
import json, os, shutil, struct, sys, tempfile
d, root = sys.argv[1], sys.argv[2]
out = {"python": sys.version.split()[0], "dir": d, "root_exists": os.path.isdir(root)}
def emit():
    print(json.dumps(out))
    sys.exit(0)
if not out["root_exists"]:
    emit()
p = d
while not os.path.isdir(p) and p != root and p.startswith(root + "/"):
    p = os.path.dirname(p)
out["probed"] = p
st = os.statvfs(p)
out["free"] = st.f_bavail * st.f_frsize
out["total"] = st.f_blocks * st.f_frsize
try:
    t = tempfile.mkdtemp(prefix=".qrmfs-check-", dir=p)
except OSError as e:
    out["scratch_error"] = e.strerror or str(e)
    emit()
out["scratch"] = t
def probe(name, fn):
    try:
        fn()
        out[name] = None
    except OSError as e:
        out[name] = e.strerror or str(e)
    except AssertionError as e:
        out[name] = str(e)
a, b = os.path.join(t, "a"), os.path.join(t, "b")
def write():
    with open(a, "wb") as f:
        f.write(b"qrmfs check scratch file\n")
def hardlink():
    os.link(a, b)
    assert os.stat(a).st_nlink == 2, "a hard link did not raise the link count to 2"
def acl():
    # POSIX ACL xattr (version 2): user::rw- user:4242:r-x group::r-- mask::r-x other::r--
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 5, 4242), (0x04, 4, 0xFFFFFFFF), (0x10, 5, 0xFFFFFFFF),
               (0x20, 4, 0xFFFFFFFF)]
    value = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(a, "system.posix_acl_access", value)
    got = os.getxattr(a, "system.posix_acl_access")
    assert struct.pack("<HHI", 0x02, 5, 4242) in got, "the ACL entry user:4242:r-x did not read back"
def xattr():
    os.setxattr(a, "user.qrmfs_check", b"ok")
    assert os.getxattr(a, "user.qrmfs_check") == b"ok", "user.qrmfs_check did not read back"
def capability():
    # VFS_CAP_REVISION_2 with the effective flag: cap_net_raw+ep (what ping carries)
    os.setxattr(a, "security.capability", struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0))
    got = os.getxattr(a, "security.capability")
    assert len(got) >= 8 and struct.unpack("<I", got[4:8])[0] & (1 << 13), "cap_net_raw did not read back"
try:
    probe("write", write)
    if out["write"] is None:
        probe("hardlink", hardlink)
        probe("acl", acl)
        probe("xattr", xattr)
        probe("capability", capability)
finally:
    shutil.rmtree(t, ignore_errors=True)
    out["scratch_left"] = os.path.lexists(t)
emit()
"""


# Runs on the storage server as `python3 -c HOP KNOWN_HOSTS_LINES SSH_ARGV...`: the storage server's own ssh to
# the source, as the ssh route's rsync makes it, with the source's host key pinned in a temporary known_hosts
# file (its path replaces the @KNOWN_HOSTS@ marker in the argv), removed afterwards.
HOP_MARK = "@KNOWN_HOSTS@"
HOP = r"""
import os, subprocess, sys, tempfile
fd, path = tempfile.mkstemp(prefix=".qrmfs-check-known_hosts-")
try:
    os.write(fd, sys.argv[1].encode())
    os.close(fd)
    argv = [a.replace("@KNOWN_HOSTS@", path) for a in sys.argv[2:]]
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=90)
    except FileNotFoundError:
        sys.stderr.write("ssh: command not found on the storage server\n")
        sys.exit(127)
    sys.stdout.buffer.write(r.stdout)
    sys.stderr.buffer.write(r.stderr)
    sys.exit(r.returncode)
finally:
    os.unlink(path)
"""


# What the storage probe tries on its scratch file: (probe key, what, why create needs it)
FEATURES = (("hardlink", "hard links", "rsync -H keeps hard links"),
            ("acl", "ACLs", "rsync -A copies POSIX ACLs"),
            ("xattr", "xattrs", "rsync -X copies user.* extended attributes"),
            ("capability", "security.capability", "file capabilities (ping needs cap_net_raw)"))


@dataclass(frozen=True)
class Check:
    name: str
    status: str   # ok | warn | fail
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.message}"


@dataclass(frozen=True)
class Checked(Result):
    """qrmfs check's answer: every check in order; "no" (exit 15) when any failed."""
    checks: list[Check]
    failed: int
    warnings: int

    def text(self) -> str:
        n, w = self.failed, self.warnings
        return "\n".join([c.line() for c in self.checks]
                         + [f"{n} failed, {w} warning(s)" if n or w else "all checks passed"])

    def failure(self) -> QrmfsError | None:
        return CheckFailedError(f"{self.failed} check(s) failed") if self.failed else None


@dataclass(frozen=True)
class CheckRequest:
    config: str | None
    targets: tuple[str, ...] = ()      # STORAGE or STORAGE:/path/NAME; none: every configured storage server
    locations: tuple[str, ...] = ()    # HOST:/path or /dir; none: every configured host's /
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    url: str | None = None


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: str, message: str, **data: Any) -> Check:
        c = Check(name, status, message, data)
        self.checks.append(c)
        return c

    def result(self) -> Checked:
        return Checked(list(self.checks), sum(c.status == FAIL for c in self.checks),
                       sum(c.status == WARN for c in self.checks))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def ssh_problem(stderr: str, who: str, h: SshHost, known_hosts: str) -> str:
    """One line saying why ssh failed, from its stderr."""
    s = stderr
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in s or "Host key for" in s and "has changed" in s:
        return (f"the host key of {who} ({h.address}) differs from the one pinned in {known_hosts}: the key "
                "changed or another machine answers there; verify it before replacing the pinned line")
    if "No " in s and "host key is known" in s or "Host key verification failed" in s:
        return f"no host key of {who} ({h.address}) is pinned in {known_hosts}: add its verified host key first"
    if "Permission denied" in s:
        return f"{h.dest} refused our ssh key (Permission denied)"
    if "Connection refused" in s:
        return f"nothing accepts ssh at {h.address} port {h.port} (connection refused)"
    for what in ("No route to host", "timed out", "Could not resolve hostname", "Network is unreachable"):
        if what in s:
            return f"{who} is unreachable at {h.address} port {h.port} ({what})"
    return f"ssh to {h.dest} port {h.port} failed: {tail(s, 2) or 'no message'}"


def _ssh_failed(code: int, stderr: str) -> bool:
    return code == 255 or code == -9 or ("ssh:" in stderr and code != 0)


def _version(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else "?"
    # "rsync  version 3.2.7  protocol version 31"
    parts = first.split()
    return parts[2] if len(parts) > 2 and parts[1] == "version" else first


class Checker:
    def __init__(self, env: Env, report: Report) -> None:
        self.env, self.r = env, report
        self.cfg: Config = env.cfg
        self.known_hosts = self.cfg.known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        self.unreachable: set[str] = set()  # sources and storage servers that did not answer (no hop to check)

    def run(self, argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
        """Exit code, stdout, stderr; a timeout is exit code -9 (never raises for the exit code)."""
        try:
            res = self.env.runner.run(argv, ok=range(256), timeout=timeout)
            return res.code, res.stdout, res.stderr
        except CommandFailed as e:
            return e.code, "", e.stderr

    # --- sources ------------------------------------------------------------------------------------
    def source(self, loc: Location) -> int | None:
        """Checks one source; returns its estimated size in bytes (None when unknown)."""
        label = f"source {loc}"
        h = hosts.source_host(self.cfg, loc)
        if h is not None and h.is_local:
            h = None
        if h is None:
            if not os.path.isdir(loc.path):
                self.r.add(label, FAIL, f"{loc.path} is not a directory on this machine")
                return None
            try:
                code, out, err = self.run(("rsync", "--version"), SSH_TIMEOUT)
            except ToolMissing:
                code, out = 127, ""
            if code != 0:
                self.r.add(label, FAIL, "rsync is not installed on this machine (a local source is pushed with it)")
            else:
                self.r.add(label, OK, f"local directory; rsync {_version(out)}")
        else:
            code, out, err = self.run(A.ssh_argv(h, ("rsync", "--version"), identity=self.cfg.identity_file,
                                                 known_hosts=self.cfg.known_hosts), SSH_TIMEOUT)
            if _ssh_failed(code, err):
                self.r.add(f"{label} ssh", FAIL, ssh_problem(err, f"source host {loc.host}", h, self.known_hosts))
                self.unreachable.add(str(loc))
                return None
            self.r.add(f"{label} ssh", OK, f"{h.dest} port {h.port} answers; its host key is pinned in "
                                           f"{self.known_hosts}")
            if code != 0:
                self.r.add(f"{label} rsync", FAIL, f"rsync is not installed on {h.address} (the storage server "
                                                   "pulls from it with rsync)", stderr=tail(err, 3))
            else:
                self.r.add(f"{label} rsync", OK, f"rsync {_version(out)}", version=_version(out))
            self.tar(f"{label} tar", A.ssh_argv(h, ("tar", "--version"), identity=self.cfg.identity_file,
                                               known_hosts=self.cfg.known_hosts), f"on {h.address}")
        return self.source_size(loc, h, label)

    def tar(self, label: str, argv: Sequence[str], where: str) -> None:
        """GNU tar makes a first copy from a source host (a stream that sends a sparse file's holes as holes);
        without it on either end the stream fails and rsync makes the copy: it works, slower."""
        try:
            code, out, err = self.run(argv, SSH_TIMEOUT)
        except ToolMissing:
            code, out, err = 127, "", ""
        first = out.strip().splitlines()[0] if out.strip() else ""
        if code == 0 and "GNU tar" in first:
            self.r.add(label, OK, first, version=first.split()[-1])
        else:
            self.r.add(label, WARN, f"no GNU tar {where} ({first or tail(err, 1) or f'exit {code}'}): a first copy "
                                    "from a source host falls back to rsync (slower; a sparse file's holes cross "
                                    "the network as data)")

    def source_size(self, loc: Location, h: SshHost | None, label: str) -> int | None:
        try:
            mounts = hosts.discover_mounts(self.env.runner, self.cfg, h, loc.path)
        except QrmfsError as e:
            self.r.add(f"{label} size", WARN, f"cannot list its filesystems: {e.message}")
            return None
        paths = (loc.path, *mounts.include)
        du = ("du", "-s", "-x", "-k", "--", *paths)
        code, out, err = self.run(du if h is None else A.ssh_argv(h, du, identity=self.cfg.identity_file,
                                                                   known_hosts=self.cfg.known_hosts), DU_TIMEOUT)
        sizes = []
        for line in out.splitlines():
            first = line.split("\t", 1)[0].strip()
            if first.isdigit():
                sizes.append(int(first) * 1024)
        if not sizes or code not in (0, 1):
            self.r.add(f"{label} size", WARN, f"cannot estimate its size (du exited {code}): {tail(err, 1)}")
            return None
        total = sum(sizes)
        note = f" ({len(paths)} filesystems)" if len(paths) > 1 else ""
        note += "; some files were unreadable to du" if code == 1 else ""
        self.r.add(f"{label} size", OK, f"about {_size(total)} to copy{note}", bytes=total)
        return total

    # --- storage servers -----------------------------------------------------------------------------
    def storage(self, s: Storage, directory: str, need: int | None, need_from: str) -> None:
        label = _storage_label(s, directory)
        side = self.env.side(s)
        try:
            code, out, err = self.run(side.argv(("rsync", "--version")), SSH_TIMEOUT)
            if not side.local and _ssh_failed(code, err):
                self.r.add(f"{label} ssh", FAIL, ssh_problem(err, f"storage server {s.name}", s.ssh, self.known_hosts))
                self.unreachable.add(f"storage {s.name}")
                return
            if not side.local:
                self.r.add(f"{label} ssh", OK, f"{s.ssh.dest} port {s.ssh.port} answers; its host key is pinned in "
                                               f"{self.known_hosts}")
            if code != 0:
                self.r.add(f"{label} rsync", FAIL, f"rsync is not installed on storage server {s.name}",
                           stderr=tail(err, 3))
            else:
                self.r.add(f"{label} rsync", OK, f"rsync {_version(out)}", version=_version(out))
            if not side.local:
                self.tar(f"{label} tar", side.argv(("tar", "--version")), f"on storage server {s.name}")
            python = sys.executable if side.local else "python3"  # as the agent runs (qrmfs/storage.py)
            self.probe(s, side.argv((python, "-c", PROBE, directory, s.export_root)), directory, need, need_from)
            self.exports(s, side, label)
        finally:
            side.close()

    def exports(self, s: Storage, side: StorageSide, label: str) -> None:
        """The NFS server that serves each image's own export (`exports`) answers its listing, read-only."""
        if s.exports == "none":
            return
        argv = LISTERS[s.exports]
        try:
            code, _out, err = self.run(side.argv(argv), SSH_TIMEOUT)
        except ToolMissing as e:  # a `local` storage server: the tool is not on this machine
            code, err = 127, e.message
        if code != 0:
            self.r.add(f"{label} exports", FAIL, f"exports = {s.exports!r}, but `{' '.join(argv[:2])} ...` failed on "
                       f"{s.name} (exit {code}): qrmfs could not export its images", stderr=tail(err, 3))
        else:
            self.r.add(f"{label} exports", OK, f"{s.exports} answers its export listing; qrmfs edits "
                       f"{s.exports_table} for the clients {s.export_clients}")

    def probe(self, s: Storage, argv: Sequence[str], directory: str, need: int | None, need_from: str) -> None:
        label = _storage_label(s, directory)
        code, out, err = self.run(argv, SSH_TIMEOUT)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if code != 0 or not lines:
            missing = code == 127 or "python3" in err and ("not found" in err or "No such file" in err)
            self.r.add(f"{label} python3", FAIL, "python3 is not installed on the storage server (qrmfs runs its "
                       "storage-side helper with it)" if missing else
                       f"the probe failed (exit {code}): {tail(err, 2)}")
            return
        p = json.loads(lines[-1])
        self.r.add(f"{label} python3", OK, f"python3 {p['python']}", version=p["python"])
        if not p["root_exists"]:
            self.r.add(f"{label} export root", FAIL, f"{s.export_root} does not exist on {s.name}")
            return
        probed = p["probed"]
        if probed == directory:
            self.r.add(f"{label} export root", OK, f"{directory} exists" + (
                "" if directory == s.export_root else f" (below the export root {s.export_root})"))
        else:
            self.r.add(f"{label} export root", OK, f"{s.export_root} exists; {directory} does not yet (create "
                       f"makes it), probed {probed}")
        self._space(label, p, need, need_from)
        self._features(label, p)

    def _space(self, label: str, p: dict[str, Any], need: int | None, need_from: str) -> None:
        free, probed = p["free"], p["probed"]
        if p["total"] == 0:
            self.r.add(f"{label} free space", WARN, f"the filesystem of {probed} reports no size (ramfs?): free space "
                       "cannot be compared", free=free)
        elif need is None:
            self.r.add(f"{label} free space", OK, f"{_size(free)} free in {probed}; no source size to compare",
                       free=free)
        elif free < need:
            self.r.add(f"{label} free space", FAIL, f"{_size(free)} free in {probed}, but {need_from} needs about "
                       f"{_size(need)}", free=free, need=need)
        elif free < need * MARGIN:
            self.r.add(f"{label} free space", WARN, f"{_size(free)} free in {probed}, {need_from} needs about "
                       f"{_size(need)}: less than 10% to spare", free=free, need=need)
        else:
            self.r.add(f"{label} free space", OK, f"{_size(free)} free in {probed}; {need_from} needs about "
                       f"{_size(need)}", free=free, need=need)

    def _features(self, label: str, p: dict[str, Any]) -> None:
        probed = p["probed"]
        if "scratch_error" in p:
            self.r.add(f"{label} writable", FAIL, f"cannot create a scratch directory in {probed}: "
                       f"{p['scratch_error']}")
            return
        if p["write"] is not None:
            self.r.add(f"{label} writable", FAIL, f"cannot write a scratch file in {probed}: {p['write']}")
        else:
            for key, what, why in FEATURES:
                if p[key] is None:
                    self.r.add(f"{label} {what}", OK, f"{probed} accepts {what}")
                else:
                    self.r.add(f"{label} {what}", FAIL, f"{probed} does not accept {what} ({p[key]}): {why}, "
                               "so create would fail or lose them")
        if p["scratch_left"]:
            self.r.add(f"{label} scratch", WARN, f"could not remove the scratch directory {p['scratch']}")

    def hop(self, s: Storage, loc: Location) -> None:
        """The ssh route: the storage server logs in to the source with our forwarded key and the source's
        pinned host key, exactly as its rsync will."""
        h = hosts.source_host(self.cfg, loc)
        if str(loc) in self.unreachable or f"storage {s.name}" in self.unreachable:
            return  # a failed ssh check already says why
        if h is None or h.is_local or s.ssh.is_local or (h.address, h.port) == (s.ssh.address, s.ssh.port):
            return  # no hop: a local source is pushed, a local storage pulls itself, one host copies locally
        label = f"{_storage_label(s, s.export_root)} -> source {loc}"
        try:
            lines = hosts.source_known_hosts(self.env.runner, self.cfg, h)
        except QrmfsError as e:
            self.r.add(f"{label} ssh", FAIL, e.message)
            return
        side = self.env.side(s)
        remote = ("python3", "-c", HOP, lines, *A.ssh_argv(h, ("rsync", "--version"), known_hosts=HOP_MARK))
        try:
            with hosts.ssh_agent(self.env.runner, self.cfg.identity_file) as agent_env:
                runner = self.env.runner.with_env(agent_env)
                try:
                    res = runner.run(side.argv(remote, forward_agent=True), ok=range(256), timeout=SSH_TIMEOUT * 2)
                    code, err = res.code, res.stderr
                except CommandFailed as e:
                    code, err = e.code, e.stderr
        except QrmfsError as e:
            self.r.add(f"{label} ssh", FAIL, e.message)
            return
        finally:
            side.close()
        if code == 0:
            self.r.add(f"{label} ssh", OK, f"the storage server logs in to {h.dest} port {h.port} with the forwarded "
                                           "key and the pinned host key (the ssh route's pull)")
        elif code == 127 and "ssh: command not found" in err:
            self.r.add(f"{label} ssh", FAIL, f"ssh is not installed on storage server {s.name} (the ssh route pulls "
                                             "from the source with it)")
        else:
            why = ssh_problem(err, f"source host {loc.host}", h, "the pinned known_hosts")
            self.r.add(f"{label} ssh", FAIL, f"from storage server {s.name}: {why}", stderr=tail(err, 3))

    # --- openQRM and spool ---------------------------------------------------------------------------
    def openqrm(self, creds: Credentials, storages: Sequence[Storage]) -> None:
        if not creds.url:
            self.r.add("openqrm", WARN, "no openQRM URL (config [openqrm] url or --openqrm-url): create can only "
                                        "run with -o/--only-physical")
            return
        if not (creds.user and creds.password):
            missing = "-u/--username" if not creds.user else "a password (--password-file, $QRMFS_PASSWORD or " \
                                                              "[openqrm] password_file)"
            self.r.add("openqrm", WARN, f"{creds.url}: no {missing}, so the credentials cannot be checked; create "
                                        "needs them unless -o is given")
            return
        c = self.env.client(creds, retry=False)
        try:
            if not c.database_answers():
                self.r.add("openqrm", FAIL, f"{creds.url} is openQRM's, but its PHP fails (500) on a request that "
                                            "only reads its database: the database is down")
                return
            c.probe_credentials()
        except openqrm.Transient as e:
            self.r.add("openqrm", FAIL, f"{creds.url} does not answer: {e}")
            return
        except QrmfsError as e:
            self.r.add("openqrm", FAIL, e.message)
            return
        self.r.add("openqrm", OK, f"{creds.url} is openQRM, its database answers, and user {creds.user!r} is an "
                                  "administrator (shown by requests that change nothing on the server)")
        self.record_values(storages)

    def record_values(self, storages: Sequence[Storage]) -> None:
        """The values every record needs (jobs.image_fields). openQRM 5.3 shows neither over HTTP, so they are
        checked for presence here, for the storage servers checked (every one without -t); docs/openqrm.md says where
        an operator reads them."""
        o = self.cfg.openqrm
        if o.deployment_id is None:
            self.r.add("openqrm record", FAIL, "[openqrm] deployment_id is not set: records need the id of openQRM's "
                                               "nfs-deployment type (docs/openqrm.md, \"The values a record needs\")")
        missing = sorted({st.name for st in storages if st.storage_id is None})
        if missing:
            self.r.add("openqrm record", FAIL, f"no storage_id for storage server(s) {', '.join(missing)}: records "
                                               "need openQRM's id of each (docs/openqrm.md)")
        if o.deployment_id is not None and not missing:
            self.r.add("openqrm record", OK, f"image_type {o.deployment_id} and a storage_id for every storage server "
                                             "checked are set (openQRM 5.3 cannot show them over HTTP: not verified "
                                             "against the server)")

    def spool(self) -> None:
        sp = self.env.spool()
        d = sp.dir
        existing = d
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            self.r.add("spool", FAIL, f"{d} is not writable ({existing} is not a writable directory): a registration "
                                      "that cannot be delivered at once would be lost")
            return
        jobs = sp.jobs()
        files = list(d.glob("*.json")) if d.is_dir() else []
        unreadable = len(files) - len(jobs)
        where = f"{d} is writable" if d == existing else f"{d} does not exist yet; {existing} is writable"
        if jobs:
            self.r.add("spool", WARN, f"{where}; {len(jobs)} registration(s) pending: "
                       + ", ".join(f"{j.id} ({j.image})" for j in jobs) + "; `qrmfs flush` delivers them",
                       pending=[openqrm.public(j) for j in jobs])
        else:
            self.r.add("spool", OK, f"{where}; nothing pending", pending=[])
        if unreadable > 0:
            self.r.add("spool files", WARN, f"{unreadable} file(s) in {d} are not readable spool jobs")


def _storage_label(s: Storage, directory: str) -> str:
    return f"storage {s.name}" + ("" if directory == s.export_root else f":{directory}")


def _split_target(token: str) -> tuple[str, str | None]:
    """-t STORAGE or STORAGE:/path/NAME -> (storage token, image path or None)."""
    storage, sep, path = split_host(token)
    if not sep:
        host(token, "storage server in -t")
        return token, None
    t = Target.parse(token)
    return t.storage, t.path


def _config(req: CheckRequest, report: Report) -> Config | None:
    """The config check (parses; the files it names are readable); None when it does not parse."""
    try:
        cfg = load(req.config)
    except ConfigError as e:
        report.add("config", FAIL, e.message)
        return None
    if cfg.path:
        report.add("config", OK, f"{cfg.path}: {len(cfg.storage)} storage server(s), {len(cfg.hosts)} host(s)")
    else:
        report.add("config", WARN, f"no config file ({', '.join(('$QRMFS_CONFIG', *SEARCH))}): storage servers can "
                                   "only be named by address, with ssh as root and export root /exports")
    for what, path in (("[ssh] identity_file", cfg.identity_file), ("[ssh] known_hosts", cfg.known_hosts)):
        if path and not os.access(path, os.R_OK):
            report.add("config", FAIL, f"{what} {path} is not a readable file")
    return cfg


def _targets(req: CheckRequest, env: Env) -> list[tuple[Storage, str]]:
    """Each storage server and the directory where the image would go (bad input raises UsageError)."""
    out = []
    for token in req.targets:
        name, path = _split_target(token)
        if path is None:
            s = env.cfg.storage_for(name)
            out.append((s, s.export_root))
        else:
            out.append((env.storage(Target(name, path)), os.path.dirname(path)))  # refuses paths outside the root
    if not req.targets:
        out = [(s, s.export_root) for s in env.cfg.storage.values()]
    if not out:
        raise UsageError("no storage server to check: name one with -t STORAGE[:/path/NAME] or configure "
                         "[storage.NAME]")
    return out


def _credentials(req: CheckRequest, cfg: Config) -> tuple[Credentials, str | None]:
    """The openQRM credentials, and why the password could not be read (a failed check, not an abort)."""
    try:
        return resolve_credentials(cfg, req.user, req.password, req.password_file, req.url), None
    except UsageError as e:  # an unreadable or empty password file
        return Credentials(req.url or cfg.openqrm.url, req.user or cfg.openqrm.user), e.message


def check(req: CheckRequest, runner: Runner, ui: Ui) -> Checked:
    report = Report()
    cfg = _config(req, report)
    if cfg is None:
        return report.result()
    env = Env(cfg, runner, ui)
    targets = _targets(req, env)
    locations = [Location.parse(x) for x in req.locations] or [Location(name, "/") for name in cfg.hosts]
    creds, password_error = _credentials(req, cfg)
    checker = Checker(env, report)
    sizes = [(n, f"source {loc}") for loc in locations if (n := checker.source(loc)) is not None]
    need, need_from = max(sizes) if sizes else (None, "")
    for s, directory in targets:
        checker.storage(s, directory, need, need_from)
    for s in dict.fromkeys(s for s, _ in targets):
        for loc in locations:
            checker.hop(s, loc)
    if password_error:
        report.add("openqrm", FAIL, password_error)
    else:
        checker.openqrm(creds, [s for s, _ in targets])
    checker.spool()
    return report.result()
