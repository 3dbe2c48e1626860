"""Boot an image from the lab's NFS storage in a QEMU guest and report whether it reached its normal
running state: systemd's multi-user.target, or SysV init's runlevel 3 with its rc scripts done.

This machine's kernel has no NFS client, so the only real NFS-root boot is a QEMU guest under software
emulation (`-accel tcg`; KVM guests hang here). The parts:

* `kitcache`: the kernel and the base initramfs (busybox, NIC and NFS modules, lab/bootkit), cached;
* `cpio`: the per-boot archive appended to it (/dev/console and the optional test script);
* `qemu`: QEMU's argv (isolated user networking: NFS out through a relay, sshd in through one forward)
  and the supervision of a run;
* `serial`: what the console says (the initramfs's, qrmfs-init's and the probe's markers, SysV init's
  and systemd's own messages, a getty's prompt) and what that means (`judge`).

The probe: the initramfs puts it into a tmpfs /run that it moves into the new root, so the image on the
storage server is never modified. For systemd it is a transient unit after multi-user.target; for SysV
init, a copy of the image's /etc/inittab with one `once` entry appended (init runs it after the
runlevel's `wait` rc entry), bound over /etc/inittab for this boot only. It prints `QRMFS-PROBE` lines,
runs the optional test script and powers off. With `probe=False` nothing is added: the console and
the sshd forward tell the state, and QEMU is stopped once it is known.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..images import LabError
from .cpio import assemble_initrd, newc_archive, per_boot_archive
from .kitcache import (
    BOOTKIT,
    BUSYBOX,
    Prepared,
    boot_dir,
    bootkit_hash,
    build_initramfs,
    kernel_package,
    module_load_order,
    parse_kernel_depends,
    prepare,
    read_module_list,
)
from .qemu import (
    DEFAULT_MAC,
    MOUNTS,
    NFS_GUEST_ADDR,
    NFS_OPTS,
    NFS_PORT,
    QEMU,
    free_port,
    kernel_cmdline,
    node_mac,
    node_uuid,
    qemu_argv,
    relay_command,
    ssh_banner,
    supervise,
    validate_node_id,
)
from .serial import SYSTEMD_STATE, SerialReport, judge, parse_serial
from .serial import tail as _tail

__all__ = [
    "BOOTKIT", "BUSYBOX", "DEFAULT_MAC", "NFS_GUEST_ADDR", "NFS_OPTS", "NFS_PORT", "QEMU", "REACHED_STATE",
    "BootResult", "BootSpec", "Prepared", "SerialReport", "assemble_initrd", "boot", "boot_dir", "bootkit_hash",
    "build_initramfs", "free_port", "judge", "kernel_cmdline", "kernel_package", "module_load_order",
    "newc_archive", "node_mac", "node_uuid", "parse_kernel_depends", "parse_serial", "parse_target",
    "per_boot_archive", "prepare", "qemu_argv", "read_module_list", "relay_command", "ssh_banner",
    "validate_node_id", "visible_in_listing", "wait_visible", "_tail",
]

REACHED_STATE = SYSTEMD_STATE
KEEP_LOGS = 200  # console logs kept under state_dir()/boot/logs (oldest removed first)


@dataclass(frozen=True)
class BootSpec:
    """One boot: which image, as which node, with what test, within which limits."""

    image_path: str                  # e.g. /exports/img1 on the lab's storage
    node_id: str | None = None       # qrmfs.node=ID, and the VM's own MAC and UUID
    script: str | None = None        # run by /bin/sh inside the booted guest (needs the probe)
    timeout: float = 300             # the boot and the script
    hostname: str | None = None      # qrmfs.hostname=NAME
    probe: bool = True               # False: qrmfs.probe=0, the state is read from the console only
    clean_poweroff: bool = False     # an orderly shutdown at the end instead of a forced one
    reboot: bool = False             # end with the image's own `reboot` command (an orderly reboot, which ends
                                     # QEMU: -no-reboot); on SysV init it goes through shutdown and /sbin/init 6
    shutdown_timeout: float = 60     # after the probe is done, for the guest to power off
    visible_timeout: float = 150     # for the storage server to show the image over NFS
    forward_ssh: bool = True         # forward 127.0.0.1:PORT to the guest's sshd, to see it answer
    memory: int = 1024
    smp: int = 2
    mac: str | None = None
    mount: str = "nfs4"              # qemu.MOUNTS: "nfs4", or "openqrm" (`mount -t nfs -o rw,nolock`, NFSv3)
    openqrm: bool = False            # boot the openQRM way: openQRM's linuxrc, parameters from the lab's
                                     # real server, which the image must be registered with (lab/boot/openqrm.py)
    cmdline: tuple[str, ...] = ()    # more kernel arguments (e.g. qrmfs.heartbeat=5)

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_id", validate_node_id(self.node_id))
        if self.mount not in MOUNTS:
            raise LabError(f"mount {self.mount!r}: one of {', '.join(MOUNTS)}")
        if self.openqrm and not self.probe:
            raise LabError("the openQRM boot always runs the probe (the lab's openqrm-client stands in for openQRM's)")
        if self.script is not None and not self.probe:
            raise LabError("a test script needs the probe (it runs the script inside the guest)")
        if self.reboot and (self.clean_poweroff or not self.probe):
            raise LabError("reboot is the probe's way to end a boot: not with clean_poweroff, nor without the probe")

    @property
    def orderly_end(self) -> bool:
        """The boot ends with the image's own shutdown or reboot (the probe's qrmfs.poweroff=)."""
        return self.clean_poweroff or self.reboot


@dataclass(frozen=True)
class BootResult:
    reached: bool                 # the normal running state (multi-user.target / runlevel 3 with rc done)
    state: str                    # that state, or what went wrong ("timeout", "initramfs: ...")
    seconds: float                # wall time from QEMU's start to the state (or to the failure)
    log_path: str                 # the serial console log
    image: str = ""
    node_id: str | None = None
    kernel: str = ""
    init: str | None = None       # "systemd" or "sysv", as the console showed it
    runlevel: str | None = None   # SysV: the runlevel init entered last
    rc_done: bool | None = None   # SysV: the runlevel's rc scripts finished (probe ran after them)
    getty: bool = False           # a login prompt appeared on the serial console
    sshd: str | None = None       # the SSH banner the node's sshd sent through the forward
    node_setup: str | None = None  # qrmfs-init: "complete", "incomplete", or None when it did not run
    script_output: str = ""
    script_rc: int | None = None
    failed_units: list[str] = field(default_factory=list)  # systemd units; SysV: [FAIL] lines of rc
    system_state: str | None = None   # systemd: is-system-running; SysV: rc-done
    guest_uptime: float | None = None  # the guest's uptime when it reached the state (probe)
    probe: bool = True
    wall_seconds: float = 0.0     # the whole call: preparation, boot, script, shutdown
    prepare_seconds: float = 0.0  # kernel download + initramfs build (cold) or cache look-up (warm)
    cold: bool = False
    clean_shutdown: bool = False  # the guest powered itself off
    nfs_wait_seconds: float = 0.0  # waiting for the storage server to show the image over NFS
    error: str | None = None
    log_tail: str = ""
    retried_after: str | None = None  # a first boot whose guest kernel stalled (guest_stalled), run once more
    openqrm: dict[str, Any] | None = None  # the openQRM boot: the records it used (appliance, image, kernel,
                                           # resource ids) and what linuxrc said (image type, the root it mounted)

    @property
    def ok(self) -> bool:
        return self.reached and self.error is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def visible_in_listing(listing: str, entry: str = "etc") -> bool:
    """An `nfs-ls` listing of the image's root shows `entry` as a directory (a line `d... NAME`)."""
    return any(ln.startswith("d") and ln.rstrip().split(" ")[-1] == entry for ln in listing.splitlines())


def wait_visible(storage_address: str, image_path: str, timeout: float = 150.0) -> tuple[bool, float, str]:
    """Poll the image's root directory over NFSv4 from this machine (libnfs `nfs-ls`) until the server
    lists its `etc` directory.

    nfs-ganesha caches directory entries and attributes (about a minute): an image that was removed
    and made again under the same name can be invisible (NFS4ERR_NOENT) for that long. Booting then
    would fail in confusing ways, so we wait for a real answer instead. Returns (visible, seconds, why).
    The probe lists the image root, which qrmfs never publishes as a symlink: probing a path inside
    the image (such as /sbin, a symlink to usr/sbin in merged-/usr images) would let libnfs resolve a
    symlink, which it does with garbage after the target (`usr/sbin1`), failing at random.
    """
    if shutil.which("nfs-ls") is None:
        return True, 0.0, "nfs-ls not installed: not checked"
    url = f"nfs://{storage_address}{image_path}?version=4"
    t0 = time.monotonic()
    last = ""
    while True:
        try:
            r = subprocess.run(["nfs-ls", url], capture_output=True, text=True, timeout=30,
                               stdin=subprocess.DEVNULL)
            if r.returncode == 0 and visible_in_listing(r.stdout):
                return True, time.monotonic() - t0, ""
            last = (r.stderr or r.stdout).strip() or "no etc directory listed"
        except subprocess.TimeoutExpired:
            last = "nfs-ls timed out"
        if time.monotonic() - t0 > timeout:
            return False, time.monotonic() - t0, last[-300:]
        time.sleep(1.0)


def _log_path(image_path: str, node_id: str | None) -> Path:
    d = boot_dir() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    logs = sorted(d.glob("*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:max(0, len(logs) - KEEP_LOGS + 1)]:
        old.unlink(missing_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", image_path.rstrip("/").rsplit("/", 1)[-1] or "root")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return d / f"{name}-node{node_id or 'none'}-{stamp}-{os.getpid()}.log"


# The guest kernel's own stall reports. Under TCG a guest whose vCPU threads get too little of the host's cores
# can stall in its kernel: seen once in a CI run, node 2 of a shared image (2 vCPUs, the other test worker's
# tests beside it) reported an RCU stall at 62 s in the NFS client's TCP receive path and made no progress
# until the 480 s timeout. That says nothing of the image: such a boot is run once more (BootResult.retried_after
# says so); a second one fails as any boot does.
GUEST_STALL = re.compile(rb"rcu: INFO: rcu_\w+ (?:self-)?detected stalls?|watchdog: BUG: soft lockup")


def guest_stalled(log_path: str) -> bool:
    """The serial log of a boot shows its guest kernel reporting a stall."""
    try:
        return GUEST_STALL.search(Path(log_path).read_bytes()) is not None
    except OSError:
        return False


def boot(info: dict[str, Any], spec: BootSpec) -> BootResult:
    """Boot `spec.image_path` in QEMU and report what happened (see the module's doc). A boot that timed out
    with its guest kernel reporting a stall (guest_stalled) is run once more."""
    first = _boot(info, spec)
    if first.reached or first.state != "timeout" or not guest_stalled(first.log_path):
        return first
    again = _boot(info, spec)
    return replace(again, retried_after=f"{first.log_path} (the guest kernel stalled; timed out after "
                   f"{first.seconds:.0f}s)", wall_seconds=round(first.wall_seconds + again.wall_seconds, 2))


def _boot(info: dict[str, Any], spec: BootSpec) -> BootResult:
    t_call = time.monotonic()
    if shutil.which(QEMU) is None:
        raise LabError(f"{QEMU} is not installed (Debian qemu-system-x86; `make setup` installs it)")
    storage = info["hosts"]["storage"]["address"]
    extra = (*(("qrmfs.poweroff=clean",) if spec.clean_poweroff else ()),
             *(("qrmfs.poweroff=reboot",) if spec.reboot else ()), *spec.cmdline)
    cmdline = kernel_cmdline(NFS_GUEST_ADDR, spec.image_path, spec.node_id, spec.hostname, probe=spec.probe,
                             extra=extra, mount=spec.mount)
    prep = prepare()
    common: dict[str, Any] = {"image": spec.image_path, "node_id": spec.node_id, "kernel": prep.kernel_version,
                              "cold": prep.cold, "prepare_seconds": round(prep.seconds, 2), "probe": spec.probe}
    visible, waited, why = wait_visible(storage, spec.image_path, spec.visible_timeout)
    if not visible:
        return BootResult(reached=False, state="image not visible over NFS", seconds=0.0, log_path="",
                          nfs_wait_seconds=round(waited, 2), wall_seconds=round(time.monotonic() - t_call, 2),
                          error=(f"{storage}:{spec.image_path} (its /etc) is not visible over NFSv4 after "
                                 f"{waited:.0f}s ({why}); does the image exist on the storage server?"),
                          **common)
    log_path = _log_path(spec.image_path, spec.node_id)
    report = SerialReport()
    ssh_port = free_port() if spec.forward_ssh else None
    mac = spec.mac or node_mac(spec.node_id)
    base, netdev, records = prep.initramfs.read_bytes(), None, None
    if spec.openqrm:
        from .openqrm import ready_node

        node = ready_node(info, prep, image_name=spec.image_path.rsplit("/", 1)[-1], mac=mac, script=spec.script)
        base, cmdline, netdev, records = node.initrd, " ".join((node.cmdline, *extra)), node.netdev, node.records
    with tempfile.TemporaryDirectory(dir=boot_dir(), prefix=".run-") as tmp:
        initrd = Path(tmp) / "initrd"
        initrd.write_bytes(assemble_initrd(base, per_boot_archive(None if spec.openqrm else spec.script)))
        stderr_path = Path(tmp) / "qemu.stderr"
        argv = qemu_argv(str(prep.vmlinuz), str(initrd), cmdline, storage, mac=mac,
                         machine_uuid=node_uuid(spec.node_id), memory=spec.memory, smp=spec.smp, ssh_port=ssh_port,
                         netdev=netdev)
        with open(log_path, "wb") as log, open(stderr_path, "wb") as err:
            run = supervise(argv, log, err, report, timeout=spec.timeout, shutdown_timeout=spec.shutdown_timeout,
                            probe=spec.probe, ssh_port=ssh_port)
        qemu_err = stderr_path.read_text(errors="replace").strip()

    clean = report.done and not run.timed_out and run.returncode == 0
    state, error = judge(report, timed_out=run.timed_out, returncode=run.returncode, timeout=spec.timeout,
                         script_given=spec.script is not None, clean_poweroff=spec.orderly_end,
                         clean_shutdown=clean, shutdown_timeout=spec.shutdown_timeout,
                         qemu_err="" if run.stopped_by_host else qemu_err, probe=spec.probe)
    reached = report.reached if spec.probe else report.reached_without_probe()
    return BootResult(
        reached=reached, state=state,
        seconds=run.reached_after if (reached and run.reached_after is not None) else run.ended_after,
        log_path=str(log_path), init=report.init, runlevel=report.runlevel,
        rc_done=_rc_done(report, spec.probe),
        getty=report.getty, sshd=run.sshd_banner, node_setup=report.node_setup,
        script_output="".join(f"{ln}\n" for ln in report.script_lines), script_rc=report.script_rc,
        failed_units=report.failed_units, system_state=report.system_state, guest_uptime=report.uptime,
        wall_seconds=round(time.monotonic() - t_call, 2), clean_shutdown=clean,
        nfs_wait_seconds=round(waited, 2), error=error, log_tail=_tail(log_path) if error else "",
        openqrm=None if records is None else {**records, "image_type": report.openqrm_image_type,
                                              "root": report.openqrm_root},
        **common)


def _rc_done(report: SerialReport, probe: bool) -> bool | None:
    """SysV: the runlevel's rc scripts finished. The probe runs after them; without it, init starts the
    inittab's gettys only after the `wait` rc entry, so a getty's prompt tells."""
    if report.init != "sysv":
        return None
    return report.rc_done if probe else report.getty


def parse_target(target: str, info: dict[str, Any]) -> str:
    """`storage:/exports/NAME` (or the storage IP, or a bare NAME) -> the image's path on the storage."""
    storage = info["hosts"]["storage"]
    export_root = storage["export_root"].rstrip("/")
    host, sep, path = target.partition(":")
    if not sep:
        host, path = "storage", target
    if host not in ("storage", storage["address"]):
        raise LabError(f"{target!r}: the lab boots only from its storage (`storage` or {storage['address']})")
    if not path.startswith("/"):
        path = f"{export_root}/{path}"
    parts = path.rstrip("/").split("/")
    if ".." in parts or "." in parts or not path.startswith(export_root + "/") or len(parts) < 3:
        raise LabError(f"{target!r}: the image must be a directory under {export_root}/")
    return path.rstrip("/")

