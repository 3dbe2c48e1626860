"""How the bytes travel: the route and the exact rsync command lines for one copy into a staging dir.

Routes (chosen in this order, README "Routes"):
- ssh (default): rsync runs ON the storage server and pulls from the source host over ssh, with this
  machine's key forwarded through an ssh agent and the source's host key pinned in a known_hosts file
  written beside the image: data flows source -> storage in one hop. A local source is pushed instead.
- nfs (the manual's route, --route nfs): the storage export is mounted here (`mount -t nfs`) and rsync
  writes into the mount; only where this kernel can mount NFS.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

from .. import argv as A
from ..config import Config, SshHost, Storage
from ..errors import ConnectError, RouteError
from ..model import Location
from ..runner import CommandFailed, Runner, tail
from ..transfer import Mounts, mounts_below, rebase_excludes


@dataclass
class Copy:
    """One rsync: its own argv (recorded in the manifest) and the argv that runs it where it must run."""
    rsync: tuple[str, ...]
    run: tuple[str, ...]
    runs_on: str
    what: str


@dataclass
class CopyPlan:
    route: str
    copies: list[Copy] = field(default_factory=list)
    needs_agent: bool = False
    mounts: Mounts = field(default_factory=Mounts)

    def describe(self) -> list[dict[str, object]]:
        return [{"what": c.what, "runs_on": c.runs_on, "argv": list(c.rsync)} for c in self.copies]


def kernel_has_nfs(proc_filesystems: str, modules_dir: str | None) -> bool:
    if any(line.split()[-1:] in (["nfs"], ["nfs4"]) for line in proc_filesystems.splitlines()):
        return True
    if modules_dir and os.path.isdir(modules_dir):
        for _dirpath, _dirs, files in os.walk(modules_dir):
            if any(f.startswith("nfs.ko") for f in files):
                return True
    return False


def check_nfs_route() -> None:
    with open("/proc/filesystems") as f:
        text = f.read()
    if not kernel_has_nfs(text, f"/lib/modules/{os.uname().release}/kernel/fs/nfs"):
        raise RouteError("this machine's kernel cannot mount NFS (no nfs in /proc/filesystems, no nfs module); "
                         "use the default --route ssh, which writes the image over ssh on the storage server")


def source_host(cfg: Config, loc: Location) -> SshHost | None:
    return None if loc.host is None else cfg.host_for(loc.host)


def discover_mounts(runner: Runner, cfg: Config, loc: Location) -> Mounts:
    """Separate disk filesystems below the source root (copied too) and network ones (left out)."""
    h = source_host(cfg, loc)
    argv = A.mounts_argv() if h is None else A.ssh_argv(h, A.mounts_argv(), identity=cfg.identity_file,
                                                         known_hosts=cfg.known_hosts)
    try:
        out = runner.run(argv, timeout=60).stdout
    except CommandFailed as e:
        if h is None:
            return Mounts()
        raise ConnectError(f"cannot reach source host {h.address} over ssh ({h.dest} port {h.port})",
                           tail(e.stderr)) from None
    m = mounts_below(out, loc.path)
    binds = [s["path"] for s in m.skipped if s["why"].startswith("bind mount")]
    if binds:
        # rsync copies a bind-mounted FILE (a container's /etc/hosts) like any file: only directories are left out.
        check = ("find", *binds, "-maxdepth", "0", "-type", "d")
        argv = check if h is None else A.ssh_argv(h, check, identity=cfg.identity_file, known_hosts=cfg.known_hosts)
        dirs = set(runner.run(argv, ok=(0, 1), timeout=60).stdout.splitlines())
        m.skipped = [s for s in m.skipped if s["path"] in dirs or not s["why"].startswith("bind mount")]
    return m


def source_known_hosts(runner: Runner, cfg: Config, h: SshHost) -> str:
    """The known_hosts lines for the source, to pin its key when the storage server connects to it."""
    kh = cfg.known_hosts or os.path.expanduser("~/.ssh/known_hosts")
    r = runner.run(A.keygen_find_argv(kh, h.address, h.port), ok=(0, 1))
    lines = [ln for ln in r.stdout.splitlines() if ln and not ln.startswith("#")]
    if not lines:
        raise ConnectError(f"source host {h.address} is not in {kh}: add its verified host key first "
                           "(qrmfs never trusts a host key blindly)")
    return "\n".join(lines) + "\n"


def plan(cfg: Config, storage: Storage, src_host: SshHost | None, src_path: str, dest: str, excludes: list[str],
         mounts: Mounts, *, route: str, progress: bool, storage_known_hosts: str | None, live_root: bool = True,
         drift: bool = False) -> CopyPlan:
    """The rsync command lines copying src_host:src_path (None: this machine) into dest, a path on the storage
    server (or under the NFS mount): one for the root and one per separate filesystem below it."""
    if src_host is not None and src_host.is_local:
        src_host = None
    p = CopyPlan(route=route, mounts=mounts)
    parts = [(src_path, dest, excludes, "root filesystem")]
    base = src_path.rstrip("/")
    for mp in mounts.include:
        if any(mp == base + e or mp.startswith(base + e + "/") for e in excludes):
            continue  # the operator excluded it (or a directory above it)
        parts.append((mp, dest + mp[len(src_path.rstrip("/")):], rebase_excludes(excludes, mp, src_path),
                      f"separate filesystem {mp}"))
    storage_local = storage.ssh.is_local or route == "nfs"
    on_storage = (src_host is not None and not storage_local
                  and (src_host.address, src_host.port) == (storage.ssh.address, storage.ssh.port))
    for i, (sp, dp, exc, what) in enumerate(parts):
        rsh = None
        if on_storage:  # source and image on the same server: the copy never leaves it
            src, dst, where = sp, dp, f"storage {storage.name} (local copy)"
        elif src_host is None and storage_local:
            src, dst, where = sp, dp, "local"
            if i == 0 and (storage.export_root + "/").startswith(sp.rstrip("/") + "/"):
                # the export root lies inside the tree being copied: never copy the images into themselves
                exc = [*exc, storage.export_root[len(sp.rstrip("/")):]]
        elif src_host is None:
            rsh = A.rsync_rsh(storage.ssh, identity=cfg.identity_file, known_hosts=cfg.known_hosts)
            src, dst, where = sp, A.remote_spec(storage.ssh, dp), "local (push to storage)"
        elif storage_local:
            rsh = A.rsync_rsh(src_host, identity=cfg.identity_file, known_hosts=cfg.known_hosts)
            src, dst, where = A.remote_spec(src_host, sp), dp, "local (pull from source)"
        else:
            rsh = A.rsync_rsh(src_host, known_hosts=storage_known_hosts)
            src, dst, where = A.remote_spec(src_host, sp), dp, f"storage {storage.name} (pulls from {src_host.address})"
            p.needs_agent = True
        rs = A.rsync_argv(src, dst, excludes=exc, rsh=rsh, progress=progress, live_root=live_root and i == 0,
                          drift=drift)
        run = (A.ssh_argv(storage.ssh, rs, identity=cfg.identity_file, known_hosts=cfg.known_hosts,
                          forward_agent=p.needs_agent) if on_storage or p.needs_agent else rs)
        p.copies.append(Copy(rs, run, where, what))
    return p


def agent_for(runner: Runner, cp: CopyPlan, identity: str | None) -> AbstractContextManager[dict[str, str]]:
    """The environment the plan's commands need: an agent to forward for the pull route, else nothing."""
    return ssh_agent(runner, identity) if cp.needs_agent else nullcontext({})


@contextmanager
def ssh_agent(runner: Runner, identity: str | None) -> Iterator[dict[str, str]]:
    """A private ssh-agent holding our key for the storage server's hop to the source; gone afterwards.
    Without an identity file, the caller's own agent ($SSH_AUTH_SOCK) is used."""
    if not identity:
        sock = os.environ.get("SSH_AUTH_SOCK")
        if not sock:
            raise ConnectError("the ssh route needs a key for the source host: set [ssh] identity_file in the "
                               "config or run an ssh-agent holding it")
        yield {"SSH_AUTH_SOCK": sock}
        return
    with tempfile.TemporaryDirectory(prefix="qrmfs-agent-") as d:
        sock = os.path.join(d, "agent.sock")
        agent = runner.popen(A.ssh_agent_argv(sock), stdin=subprocess.DEVNULL)
        try:
            assert agent.stdout is not None
            agent.stdout.readline()  # "SSH_AUTH_SOCK=...; export ..." once it listens
            env = {"SSH_AUTH_SOCK": sock}
            Runner(env=env).run(A.ssh_add_argv(identity), timeout=30)
            yield env
        finally:
            agent.terminate()
            agent.wait(timeout=10)


@contextmanager
def nfs_mount(runner: Runner, storage: Storage) -> Iterator[str]:
    """The manual's route: the storage export mounted here for the duration."""
    check_nfs_route()
    with tempfile.TemporaryDirectory(prefix="qrmfs-nfs-") as mnt:
        server = storage.nfs_address or storage.ssh.address
        try:
            runner.run(A.mount_nfs_argv(server, storage.export_root, mnt), timeout=120)
        except CommandFailed as e:
            raise RouteError(f"mount -t nfs {server}:{storage.export_root} failed", tail(e.stderr)) from None
        try:
            yield mnt
        finally:
            runner.run(A.umount_argv(mnt), ok=range(256), timeout=120)
