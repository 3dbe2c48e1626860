"""QEMU under software emulation: its argv, the node's identity on the virtual hardware, and the
supervision of one run (the serial console streamed into a log and a SerialReport; no fixed sleeps).

The guest's network is QEMU user networking with `restrict=on`: it reaches nothing but the lab's NFS
server, through a guestfwd of 10.0.2.100:2049 to the storage container's 2049 (one relay process per
connection, `lab/bootkit/relay.py`). One host forward, 127.0.0.1:PORT to the guest's port 22, lets this
machine see whether the node's sshd answers.
"""

from __future__ import annotations

import hashlib
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import IO

from ..images import LabError
from .kitcache import BOOTKIT
from .serial import SerialReport

QEMU = "qemu-system-x86_64"
DEFAULT_MAC = "52:54:00:12:34:56"  # QEMU's own default
GUEST_IP, GUEST_GW = "10.0.2.15/24", "10.0.2.2"
NFS_GUEST_ADDR = "10.0.2.100"  # the storage server as the guest sees it (guestfwd)
NFS_PORT = 2049
NFS_OPTS = f"vers=4.1,port={NFS_PORT}"
# NFSv3 needs two more: rpcbind, which names the mount protocol's port, and that port (ganesha's MNT_Port in
# lab/images/storage/ganesha.conf). Each is forwarded at the same port of NFS_GUEST_ADDR.
RPCBIND_PORT, MOUNTD_PORT = 111, 20048
FORWARDED_PORTS = (NFS_PORT, RPCBIND_PORT, MOUNTD_PORT)
# How a node mounts its image: the lab's default (NFSv4.1), or exactly as openQRM's root-mount.nfs-deployment
# does (`mount -t nfs -o rw,nolock SERVER:ROOTDEVICE`: NFSv3, the kernel's default for type nfs).
MOUNTS = {"nfs4": ("nfs4", NFS_OPTS), "openqrm": ("nfs", "rw,nolock")}
NODE_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")
SSH_WAIT = 30.0  # seconds, after the running state was reached, for the node's sshd to answer


def validate_node_id(node_id: int | str | None) -> str | None:
    if node_id is None:
        return None
    s = str(node_id)
    if not NODE_ID_RE.match(s):
        raise LabError(f"node id {s!r}: use letters, digits, '_' and '-' only")
    return s


def node_mac(node_id: int | str | None) -> str:
    """A stable, locally administered MAC per node (QEMU's default when there is no node id)."""
    nid = validate_node_id(node_id)
    if nid is None:
        return DEFAULT_MAC
    h = hashlib.sha256(f"qrmfs-node:{nid}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def node_uuid(node_id: int | str | None) -> str:
    """A stable SMBIOS UUID per node, as real machines have: systemd derives a VM's fallback machine-id
    from it, so nodes without qrmfs-init still differ (and never match the image's own id)."""
    nid = validate_node_id(node_id)
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"qrmfs-lab-node:{nid if nid is not None else '-'}"))


def kernel_cmdline(nfs_server: str, image_path: str, node_id: int | str | None = None,  # noqa: PLR0913
                   hostname: str | None = None, probe: bool = True, extra: tuple[str, ...] = (),
                   mount: str = "nfs4") -> str:
    """The guest kernel's command line: console on ttyS0, the NFS root for the initramfs, node identity."""
    if not image_path.startswith("/") or any(c.isspace() for c in image_path):
        raise LabError(f"image path {image_path!r} must be absolute and contain no white space")
    args = ["console=ttyS0,115200", "panic=-1", "net.ifnames=0",
            f"qrmfs.root={nfs_server}:{image_path}", f"qrmfs.nfstype={MOUNTS[mount][0]}",
            f"qrmfs.nfsopts={MOUNTS[mount][1]}",
            f"qrmfs.ip={GUEST_IP}", f"qrmfs.gw={GUEST_GW}"]
    if not probe:
        args.append("qrmfs.probe=0")
    nid = validate_node_id(node_id)
    if nid is not None:
        args.append(f"qrmfs.node={nid}")
    if hostname is not None:
        if not HOSTNAME_RE.match(hostname):
            raise LabError(f"hostname {hostname!r} is not a valid host name")
        args.append(f"qrmfs.hostname={hostname}")
    for a in extra:
        if not a or any(c.isspace() for c in a):
            raise LabError(f"kernel argument {a!r} must be one word")
    args.extend(extra)
    return " ".join(args)


def relay_command(storage_address: str, port: int = NFS_PORT, python: str = sys.executable) -> str:
    """The per-connection command QEMU's guestfwd runs to reach the storage server's NFS port."""
    for part in (python, str(BOOTKIT / "relay.py")):
        if any(c.isspace() or c in "'\",\\" for c in part):
            raise LabError(f"path {part!r} cannot be used in a QEMU guestfwd command (spaces, quotes or commas)")
    return f"{python} {BOOTKIT / 'relay.py'} {storage_address} {port}"


def qemu_argv(  # noqa: PLR0913 - keyword-only: the VM's knobs for one QEMU command line
              kernel: str, initrd: str, cmdline: str, storage_address: str, *, mac: str = DEFAULT_MAC,
              machine_uuid: str | None = None, memory: int = 1024, smp: int = 2,
              nic: str = "virtio-net-pci", ssh_port: int | None = None, netdev: str | None = None) -> list[str]:
    """QEMU under TCG, serial console on stdout, isolated user networking with one way out: NFS (and,
    with `ssh_port`, one way in: 127.0.0.1:ssh_port to the guest's sshd). `netdev` replaces that user
    network (the openQRM boot's, lab/boot/openqrm.py)."""
    if netdev is None:
        netdev = "user,id=net0,restrict=on" + "".join(
            f",guestfwd=tcp:{NFS_GUEST_ADDR}:{port}-cmd:{relay_command(storage_address, port)}"
            for port in FORWARDED_PORTS)
    if ssh_port is not None:
        netdev += f",hostfwd=tcp:127.0.0.1:{int(ssh_port)}-:22"
    return [QEMU, "-accel", "tcg", "-machine", "pc", "-cpu", "qemu64", "-m", str(memory), "-smp", str(smp),
            *(["-uuid", machine_uuid] if machine_uuid else []),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", "stdio,id=serial0,signal=off", "-serial", "chardev:serial0",
            "-netdev", netdev, "-device", f"{nic},netdev=net0,mac={mac}",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (QEMU binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ssh_banner(port: int, timeout: float = 3.0) -> str | None:
    """The SSH identification line the guest's sshd sends through the forward, or None. QEMU accepts the
    connection itself, so only a banner proves that sshd answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            data = s.recv(256)
    except OSError:
        return None
    line = data.split(b"\n", 1)[0].strip().decode(errors="replace")
    return line if line.startswith("SSH-") else None


@dataclass(frozen=True)
class Supervised:
    """How one QEMU run went, as seen from this machine."""

    timed_out: bool
    returncode: int | None
    reached_after: float | None   # seconds from QEMU's start to the running state
    ended_after: float            # seconds from QEMU's start to its end
    sshd_banner: str | None
    stopped_by_host: bool         # QEMU was stopped by us (probe off: after the state was seen)
def supervise(  # noqa: PLR0913 - keyword-only limits of one supervised run
              argv: list[str], log: IO[bytes], stderr: IO[bytes], report: SerialReport, *, timeout: float,
              shutdown_timeout: float, probe: bool, ssh_port: int | None) -> Supervised:
    """Run QEMU, stream its console into `log` and `report` until the guest is done and off (probe), or
    until the running state was seen and sshd checked (no probe), or time runs out. QEMU is always gone
    when this returns."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
    watcher = SshWatcher(ssh_port) if ssh_port is not None else None
    try:
        timed_out, reached_at, by_host = _watch(proc, log, report, t0, timeout, shutdown_timeout, probe, watcher)
    finally:
        if watcher is not None:
            watcher.stop()
        _stop(proc)
    end = time.monotonic()
    return Supervised(timed_out, proc.returncode, None if reached_at is None else round(reached_at - t0, 2),
                      round(end - t0, 2), watcher.banner if watcher else None, by_host)


class SshWatcher:
    """Polls the forwarded sshd port from QEMU's start until a banner comes (or stop()): a guest that
    powers off right after its probe leaves no other moment to ask."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.banner: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ssh-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            banner = ssh_banner(self.port, timeout=5.0)
            if banner is not None:
                self.banner = banner
                return
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _reached(report: SerialReport, probe: bool) -> bool:
    return report.reached if probe else report.reached_without_probe()
def _watch(  # noqa: PLR0913 - the supervise() loop's state, passed once
           proc: subprocess.Popen[bytes], log: IO[bytes], report: SerialReport, t0: float, timeout: float,
           shutdown_timeout: float, probe: bool, ssh: SshWatcher | None) -> tuple[bool, float | None, bool]:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    pending = b""
    deadline = t0 + timeout
    shutdown_deadline: float | None = None
    reached_at: float | None = None
    ssh_until: float | None = None
    try:
        while True:
            now = time.monotonic()
            # No probe: stop once the state, sshd and a getty were seen (or SSH_WAIT after the state).
            if not probe and reached_at is not None and ssh_until is not None and (
                    (report.getty and (ssh is None or ssh.banner is not None)) or now >= ssh_until):
                return False, reached_at, True
            limit = shutdown_deadline if shutdown_deadline is not None else deadline
            if now >= limit:
                return True, reached_at, False
            wait = min(limit - now, 1.0 if reached_at is not None else 5.0)
            if not sel.select(timeout=wait):
                continue
            data = os.read(fd, 65536)
            if not data:  # QEMU closed the console: it exited
                if pending:
                    report.feed_line(pending.decode(errors="replace"))
                proc.wait()
                return False, reached_at, False
            log.write(data)
            log.flush()
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                report.feed_line(line.decode(errors="replace"))
            report.feed_partial(pending.decode(errors="replace"))
            if reached_at is None and _reached(report, probe):
                reached_at = time.monotonic()
                ssh_until = reached_at + SSH_WAIT
            if (report.done or report.fatal) and shutdown_deadline is None:
                shutdown_deadline = time.monotonic() + shutdown_timeout
    finally:
        sel.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
