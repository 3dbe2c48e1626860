"""What happens on the hosts around a copy: the source's mount table and pinned host key, the ssh-agent the pull
route forwards, the NFS mount of the manual's route. copyplan.py plans; this module runs (through the runner).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from .. import argv as A
from ..config import Config, SshHost, Storage
from ..errors import ConnectError, RouteError, UsageError
from ..model import Location
from ..mounts import Mounts, source_mounts
from ..runner import CommandFailed, Runner, stop, tail
from .copyplan import CopyPlan


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


def discover_mounts(runner: Runner, cfg: Config, h: SshHost | None, path: str) -> Mounts:
    """Separate disk filesystems below the source root (copied too) and network ones (left out)."""
    if h is not None and h.is_local:
        h = None
    mounts = A.mounts_argv(path)
    argv = mounts if h is None else A.ssh_argv(h, mounts, identity=cfg.identity_file, known_hosts=cfg.known_hosts)
    try:
        out = runner.run(argv, timeout=60).stdout
    except CommandFailed as e:
        if e.code == A.NO_SOURCE_DIR:
            where = "this machine" if h is None else f"source host {h.address}"
            raise UsageError(f"the source path {path} is not a directory on {where}") from None
        if h is None:
            return Mounts()
        raise ConnectError(f"cannot reach source host {h.address} over ssh ({h.dest} port {h.port})",
                           tail(e.stderr)) from None
    return source_mounts(out, path)


def source_known_hosts(runner: Runner, cfg: Config, h: SshHost) -> str:
    """The known_hosts lines for the source, to pin its key when the storage server connects to it."""
    kh = cfg.known_hosts or os.path.expanduser("~/.ssh/known_hosts")
    r = runner.run(A.keygen_find_argv(kh, h.address, h.port), ok=(0, 1))
    lines = [ln for ln in r.stdout.splitlines() if ln and not ln.startswith("#")]
    if not lines:
        raise ConnectError(f"source host {h.address} is not in {kh}: add its verified host key first "
                           "(qrmfs never trusts a host key blindly)")
    return "\n".join(lines) + "\n"


def agent_for(runner: Runner, cp: CopyPlan, identity: str | None,
              agent: PrivateAgent | None = None) -> AbstractContextManager[dict[str, str]]:
    """The environment the plan's commands need: an agent to forward for the pull route, else nothing."""
    return ssh_agent(runner, identity, agent) if cp.needs_agent else nullcontext({})


class PrivateAgent:
    """qrmfs's own ssh-agent, started empty. It holds our key only while a copy that needs it runs
    (`holding`), and is gone when stopped. Started before a run's connections to its storage servers, it is
    the agent those connections forward (ssh forwards only an agent that is there when it starts)."""

    def __init__(self, runner: Runner) -> None:
        self.dir = tempfile.mkdtemp(prefix="qrmfs-agent-")
        self.sock = os.path.join(self.dir, "agent.sock")
        self.env = {"SSH_AUTH_SOCK": self.sock}
        self._agent = runner.popen(A.ssh_agent_argv(self.sock), output=subprocess.DEVNULL)  # stdin: our pipe to cat
        self._daemon: int | None = None  # read when stopping: its command's exec may come after the socket
        try:
            _listening(self._agent, self.sock)
        except BaseException:
            self.stop()
            raise

    @contextmanager
    def holding(self, identity: str) -> Iterator[dict[str, str]]:
        keys = Runner(env=self.env)
        try:
            keys.run(A.ssh_add_argv(identity), timeout=30)
            yield self.env
        finally:
            keys.run(A.ssh_add_forget_argv(), ok=range(256), timeout=30)

    def stop(self) -> None:
        if self._daemon is None and self._agent.poll() is None:
            self._daemon = _agent_pid(self._agent.pid)
        stop(self._agent, grace=0)
        if self._daemon:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._daemon, signal.SIGTERM)
            _until_gone(self._daemon)
            self._daemon = None
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def ssh_agent(runner: Runner, identity: str | None, agent: PrivateAgent | None = None) -> Iterator[dict[str, str]]:
    """A private ssh-agent holding our key for the storage server's hop to the source; gone afterwards (the
    run's own agent, when it has one: then only the key goes). Without an identity file, the caller's own
    agent ($SSH_AUTH_SOCK) is used."""
    if not identity:
        own = os.environ.get("SSH_AUTH_SOCK")
        if not own:
            raise ConnectError("the ssh route needs a key for the source host: set [ssh] identity_file in the "
                               "config or run an ssh-agent holding it")
        yield {"SSH_AUTH_SOCK": own}
        return
    mine = agent or PrivateAgent(runner)
    try:
        with mine.holding(identity) as env:
            yield env
    finally:
        if agent is None:
            mine.stop()


def _until_gone(pid: int, timeout: float = 5.0) -> None:
    """Wait until a process that is not our child (the agent daemon) has ended, SIGKILL it after `timeout`: when
    qrmfs exits, nothing of its own is left running, not even for the moment a signal takes to land."""
    for sig in (None, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not _running(pid):
            return


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _agent_pid(command_pid: int, timeout: float = 10.0) -> int | None:
    """The agent's own pid, which ssh-agent gives its command as $SSH_AGENT_PID (our child's environment).
    ssh-agent makes its socket first, then forks and execs the command: until that exec, the environment has
    no SSH_AGENT_PID, so it is read again until it has (or the command is gone). Read once, a loaded machine
    left the daemon unknown, and it outlived qrmfs by up to 10 s (the test of the run's agent failed so)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{command_pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            return None
        pid = next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"SSH_AGENT_PID=")), None)
        if pid is not None or not _running(command_pid) or time.monotonic() > deadline:
            return pid
        time.sleep(0.005)


def _listening(agent: subprocess.Popen[bytes], sock: str, timeout: float = 10.0) -> None:
    """ssh-agent creates its socket before it starts its command: wait for it (or for the agent's failure)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(sock):
        if agent.poll() is not None or time.monotonic() > deadline:
            raise ConnectError(f"ssh-agent did not start (exit {agent.poll()})")
        time.sleep(0.002)  # it takes a few ms: the storage server's connection, started next, waits for it


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
