"""The NFS-root preparation steps. `create` and `validate --fix` apply them, `validate` checks them.

Each step is one function that inspects an image tree and returns findings; a finding carries the
repair for exactly what it found. So a rule is written once, `apply` is "check, then fix each finding",
and running it twice changes nothing the second time. Paths are image paths ("/etc/mtab").
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .fsutil import Escape, Walk, is_real_dir, makedirs, read_file, remove, resolve, walk_tree, write_file
from .protocol import AgentError, ErrorKind, FindingRecord, Options

QRM_RUNLEVEL = "3"
MTAB_TARGET = "/proc/mounts"
MTAB_OK = ("/proc/mounts", "/proc/self/mounts", "../proc/self/mounts", "../proc/mounts")
NODE_INIT = "/sbin/qrmfs-init"
SBIN_INIT = "/sbin/init"  # what the kernel and every initrd start (openQRM's linuxrc: `switch_root /mnt /sbin/init`)
# Where the preparation keeps the distribution's own init once /sbin/init leads to qrmfs-init (every prepared
# image): a symlink to the systemd binary /sbin/init pointed at, or SysV init's binary itself. qrmfs-init
# carries the same path in its DIST_INIT line (a unit test compares them). Its name is `init`, as the kernel
# and systemd need it: PID 1's name stays `init`, and systemd run as a command (not PID 1) acts as telinit only
# when its name contains "init".
DIST_INIT = "/usr/lib/qrmfs/init"
NODE_CONF = "/etc/qrmfs/node.conf"
EASYMIGRATION = "/etc/qrm/easymigration.conf"
# Units that must not run on a diskless NFS-root node, whatever the options: they check, trim or
# remount a local root disk that the node does not have.
ALWAYS_MASK = ("systemd-fsck-root.service", "systemd-remount-fs.service", "fstrim.timer",
               "fstrim.service", "e2scrub_all.timer", "e2scrub_reap.service")
# --remove-services: units bound to the source machine's own hardware, disks and network management.
HOST_BOUND_SERVICES = ("smartd.service", "smartmontools.service", "mdmonitor.service", "mdadm.service",
                       "lvm2-monitor.service", "multipathd.service", "iscsid.service", "open-iscsi.service",
                       "NetworkManager.service", "systemd-networkd.service", "wpa_supplicant.service",
                       "ModemManager.service", "irqbalance.service", "thermald.service",
                       "kudzu.service", "nfs-server.service")
LOCAL_DISK = re.compile(r"^(UUID=|PARTUUID=|LABEL=|PARTLABEL=|/dev/(sd|hd|vd|xvd|nvme|mmcblk|md|mapper/|disk/))")
PERSISTENT_NET = ("/etc/udev/rules.d/70-persistent-net.rules",
                  "/etc/udev/rules.d/75-persistent-net-generator.rules")
LIVE_DIRS = {"/proc": 0o555, "/sys": 0o555, "/dev": 0o755, "/run": 0o755, "/tmp": 0o1777,
             "/mnt/floppy": 0o755, "/mnt/cdrom": 0o755}
EMPTY_DIRS = ("/proc", "/sys", "/run")
# The device nodes a systemd image's /dev holds under the devtmpfs systemd mounts, as a disk install has them: an
# initrd that finds them missing treats /dev as unusable. openQRM's linuxrc (prepare_udev) then mounts a tmpfs
# over the image's /dev and copies its own initrd's nodes into it; systemd sees /dev mounted, mounts no devtmpfs,
# and waits 90 s for a dev-ttyS0.device that udev never announces. A SysV image gets none: without udev nothing
# in it mounts a devtmpfs, and that tmpfs copy of the initrd's nodes is the /dev it runs with (its serial
# console included). (path: (permissions, major, minor))
DEV_NODES = {"/dev/console": (0o600, 5, 1), "/dev/null": (0o666, 1, 3)}
# The ONE definition of a private directory's characters (--private-add/--private-exclude). qrmfs/model.py
# uses it for the options, the node-init step for what an image's node.conf holds, and qrmfs-init carries the
# identical class in its PRIVATE_DIR_CHARS line (a unit test compares them): it skips any other path at boot,
# and that directory would then be shared by all nodes.
PRIVATE_DIR_CHARS = "A-Za-z0-9_./+@-"
PRIVATE_DIR_RE = re.compile(f"/[{PRIVATE_DIR_CHARS}]*")
NOT_PRIVATE = ("/.qrmfs", "/proc", "/sys", "/dev", "/run")


def private_dir_problem(path: str) -> str | None:
    """Why qrmfs-init would skip this private directory at boot (None: it binds it). The same checks, in the
    same order, as check_private_path in qrmfs-init, on the path without one trailing '/' (as it strips it)."""
    p = path[:-1] if path.endswith("/") else path
    if not p.startswith("/"):
        return "is not an absolute path"
    if not PRIVATE_DIR_RE.fullmatch(p):
        bad = sorted({c for c in p if not re.fullmatch(f"[{PRIVATE_DIR_CHARS}]", c)})
        return f"has characters other than ASCII letters, digits and '_./+@-' ({', '.join(map(repr, bad))})"
    if p == "/" or any(p == d or p.startswith(d + "/") for d in NOT_PRIVATE):
        return "cannot be per node"
    if "/../" in p + "/" or "/./" in p + "/":
        return "has a '.' or '..' component"
    return None


@dataclass
class Finding:
    step: str
    path: str
    problem: str
    fix: Callable[[], object] | None = None

    def record(self) -> FindingRecord:
        return FindingRecord(self.step, self.path, self.problem, self.fix is not None)


@dataclass
class Ctx:
    root: str
    opts: Options
    walk: Walk | None = None  # the one whole-tree walk (sockets; entries and bytes when preparing)
    defer_walk: bool = False  # preparing: the walk comes after the other steps' fixes (see prepare)

    def sockets(self) -> list[str]:
        """The sockets in the tree (host paths), from the one walk; none yet while the walk is deferred."""
        if self.walk is None:
            if self.defer_walk:
                return []
            self.walk = walk_tree(self.root, count=False)
        return self.walk.sockets

    def host(self, path: str, follow_last: bool = True) -> str:
        return resolve(self.root, path, follow_last)

    def uses_systemd(self) -> bool:
        return os.path.lexists(self.host("/lib/systemd/systemd"))

    def uses_sysv(self) -> bool:
        return os.path.lexists(self.host("/etc/inittab", follow_last=False))


Check = Callable[[Ctx], Iterator[Finding]]


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    check: Check


STEPS: list[Step] = []


def step(name: str, what: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        STEPS.append(Step(name, what, fn))
        return fn
    return register


# --- the manual's steps ---------------------------------------------------------------------------

@step("dirs", "empty proc, sys, run; dev (systemd: with its console and null nodes); tmp with mode 1777; "
              "mnt/floppy and mnt/cdrom")
def _dirs(ctx: Ctx) -> Iterator[Finding]:
    for path, mode in LIVE_DIRS.items():
        host = ctx.host(path, follow_last=False)
        if os.path.islink(host) or (os.path.lexists(host) and not is_real_dir(host)):
            yield Finding("dirs", path, "is not a directory",
                        functools.partial(_replace_with_dir, host, mode))
        elif not os.path.lexists(host):
            yield Finding("dirs", path, "missing", functools.partial(makedirs, host, mode))
        elif stat.S_IMODE(os.lstat(host).st_mode) != mode:
            have = stat.S_IMODE(os.lstat(host).st_mode)
            yield Finding("dirs", path, f"mode {have:04o}, want {mode:04o}",
                        functools.partial(os.chmod, host, mode))
        if path in EMPTY_DIRS and is_real_dir(host) and os.listdir(host):
            yield Finding("dirs", path, f"not empty ({len(os.listdir(host))} entries)",
                        functools.partial(_empty_dir, host))
    if not ctx.uses_systemd() or not is_real_dir(ctx.host("/dev", follow_last=False)):
        return  # a SysV image: none (DEV_NODES); no /dev yet: made above, its nodes in the next round
    for path, (perm, major, minor) in DEV_NODES.items():
        host = ctx.host(path, follow_last=False)
        want = os.makedev(major, minor)
        fix = functools.partial(_device_node, host, perm, want)
        if not os.path.lexists(host):
            yield Finding("dirs", path, "missing", fix)
        else:
            st = os.lstat(host)
            if not stat.S_ISCHR(st.st_mode) or st.st_rdev != want or stat.S_IMODE(st.st_mode) != perm:
                yield Finding("dirs", path, f"not the character device {major}:{minor} with mode {perm:04o}", fix)


@step("logs", "clear /var/log/* (files removed, directories kept)")
def _logs(ctx: Ctx) -> Iterator[Finding]:
    top = ctx.host("/var/log")
    if not is_real_dir(top):
        return
    for dirpath, dirnames, filenames in os.walk(top):
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                filenames.append(d)
        for f in filenames:
            host = os.path.join(dirpath, f)
            rel = "/var/log" + host[len(top):]
            yield Finding("logs", rel, "log file left in the image", functools.partial(remove, host))


@step("container", "no container runtime markers (/.dockerenv, /.containerenv): the image boots on a machine")
def _container(ctx: Ctx) -> Iterator[Finding]:
    yield from _absent(ctx, "container", ("/.dockerenv", "/.containerenv"),
                       "makes systemd believe it runs in a container")


@step("easymigration", "remove /etc/qrm/easymigration.conf")
def _easymigration(ctx: Ctx) -> Iterator[Finding]:
    yield from _absent(ctx, "easymigration", (EASYMIGRATION,), "present")


@step("mtab", "/etc/mtab is a symlink to /proc/mounts (for df)")
def _mtab(ctx: Ctx) -> Iterator[Finding]:
    host = ctx.host("/etc/mtab", follow_last=False)

    fix = functools.partial(_symlink, MTAB_TARGET, host)
    if os.path.islink(host):
        if os.readlink(host) not in MTAB_OK:
            yield Finding("mtab", "/etc/mtab", f"links to {os.readlink(host)}, not /proc/mounts", fix)
    elif os.path.lexists(host):
        yield Finding("mtab", "/etc/mtab", "is a file, not a link to /proc/mounts", fix)
    elif is_real_dir(os.path.dirname(host)):
        yield Finding("mtab", "/etc/mtab", "missing", fix)


@step("kudzu", "disable the kudzu hardware-detection service")
def _kudzu(ctx: Ctx) -> Iterator[Finding]:
    for rc in sorted(_glob(ctx, "/etc", r"rc[0-6S]\.d")):
        d = ctx.host(rc)
        for e in sorted(os.listdir(d)):
            if re.fullmatch(r"S\d*kudzu", e):
                src, dst = os.path.join(d, e), os.path.join(d, "K" + e[1:])
                yield Finding("kudzu", f"{rc}/{e}", "kudzu starts at boot", functools.partial(os.rename, src, dst))
    if os.path.lexists(ctx.host("/etc/init.d/kudzu")) or os.path.lexists(ctx.host("/lib/systemd/system/kudzu.service")):
        yield from _mask(ctx, "kudzu", ["kudzu.service"])


@step("runlevel", f"boot into the qrm runlevel {QRM_RUNLEVEL} (inittab initdefault; systemd: multi-user.target)")
def _runlevel(ctx: Ctx) -> Iterator[Finding]:
    if ctx.uses_sysv():
        host = ctx.host("/etc/inittab")
        data = read_file(host)
        if data is None:
            yield Finding("runlevel", "/etc/inittab", "not a regular file", None)
        else:
            text = data.decode("utf-8", "surrogateescape")
            m = re.search(r"^([^#:\n]*):(\d*):initdefault:", text, re.M)
            if not m or m.group(2) != QRM_RUNLEVEL:
                def fix(text: str = text) -> None:
                    line = f"id:{QRM_RUNLEVEL}:initdefault:"
                    new = (re.sub(r"^[^#:\n]*:\d*:initdefault:.*$", line, text, count=1, flags=re.M)
                           if m else f"{line}\n{text}")
                    write_file(host, new.encode("utf-8", "surrogateescape"), _mode(host))
                have = m.group(2) if m else "none"
                yield Finding("runlevel", "/etc/inittab", f"initdefault is {have}, want {QRM_RUNLEVEL}", fix)
    if ctx.uses_systemd():
        link = ctx.host("/etc/systemd/system/default.target", follow_last=False)
        want = "/lib/systemd/system/multi-user.target"
        if not os.path.islink(link) or os.path.basename(os.readlink(link)) != "multi-user.target":
            fix_target = functools.partial(_symlink, want, link)
            have = os.readlink(link) if os.path.islink(link) else "unset"
            yield Finding("runlevel", "/etc/systemd/system/default.target",
                        f"default target {have}, want multi-user.target", fix_target)


# --- what an NFS root needs -----------------------------------------------------------------------

@step("fstab", "/etc/fstab has no local-disk entries (the root comes over NFS)")
def _fstab(ctx: Ctx) -> Iterator[Finding]:
    host = ctx.host("/etc/fstab")
    data = read_file(host)
    if data is None:
        return
    lines = data.decode("utf-8", "surrogateescape").splitlines(keepends=True)
    bad = [i for i, ln in enumerate(lines)
           if ln.strip() and not ln.lstrip().startswith("#") and LOCAL_DISK.match(ln.split()[0])]
    if bad:
        def fix() -> None:
            out = [("#qrmfs (local disk on a diskless node): " + ln) if i in bad else ln
                   for i, ln in enumerate(lines)]
            write_file(host, "".join(out).encode("utf-8", "surrogateescape"), _mode(host))
        for i in bad:
            yield Finding("fstab", "/etc/fstab",
                        f"line {i + 1} mounts a local disk: {lines[i].split()[0]} on {_field(lines[i], 1)}", fix)


@step("sockets", "no sockets in the tree (they belong to processes of the source machine)")
def _sockets(ctx: Ctx) -> Iterator[Finding]:
    root = ctx.root
    for host in ctx.sockets():
        if os.path.lexists(host):  # not removed yet
            yield Finding("sockets", host[len(root):] or "/", "socket left in the tree",
                          functools.partial(remove, host))


@step("machine-id", "empty /etc/machine-id; no copied /var/lib/dbus/machine-id")
def _machine_id(ctx: Ctx) -> Iterator[Finding]:
    host = ctx.host("/etc/machine-id", follow_last=False)
    if not is_real_dir(os.path.dirname(host)):
        return
    data = read_file(host)
    if data is None or data.strip():
        yield Finding("machine-id", "/etc/machine-id",
                    "missing" if not os.path.lexists(host) else "carries the source machine's id",
                    functools.partial(write_file, host, b"", 0o444))
    dbus = ctx.host("/var/lib/dbus/machine-id", follow_last=False)
    if os.path.lexists(dbus) and not os.path.islink(dbus):
        yield Finding("machine-id", "/var/lib/dbus/machine-id", "a copy of the source's machine id",
                    functools.partial(_symlink, "/etc/machine-id", dbus))


@step("host-keys", "no ssh host keys when the image is shared or its network is removed")
def _host_keys(ctx: Ctx) -> Iterator[Finding]:
    if not ctx.opts.drops_host_keys:
        return
    d = ctx.host("/etc/ssh")
    if is_real_dir(d):
        for e in sorted(os.listdir(d)):
            if e.startswith("ssh_host_") and not is_real_dir(os.path.join(d, e)):
                yield Finding("host-keys", f"/etc/ssh/{e}", "host key of the source machine",
                            functools.partial(remove, os.path.join(d, e)))


HOSTKEY_UNIT = "qrmfs-ssh-hostkeys.service"
HOSTKEY_UNIT_TEXT = """# Written by qrmfs: this image's ssh host keys were removed (shared image or --remove-network);
# make new ones at the first boot, before sshd starts. On a shared image qrmfs-init provides per-node
# keys first, and this unit does nothing.
[Unit]
Description=qrmfs: generate ssh host keys on first boot
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""


HOSTKEY_SYSV = "qrmfs-ssh-hostkeys"
HOSTKEY_SYSV_TEXT = """#!/bin/sh
### BEGIN INIT INFO
# Provides:          qrmfs-ssh-hostkeys
# Required-Start:    $local_fs
# Required-Stop:
# X-Start-Before:    ssh
# Default-Start:     2 3 4 5
# Default-Stop:
# Short-Description: qrmfs: generate ssh host keys on first boot
### END INIT INFO
# Written by qrmfs: this image's ssh host keys were removed (shared image or --remove-network); make new
# ones at the first boot, before sshd starts (Debian's ssh script refuses to start without them). On a
# shared image qrmfs-init provides per-node keys first, and this does nothing.
case "$1" in
    start) [ -e /etc/ssh/ssh_host_ed25519_key ] || /usr/bin/ssh-keygen -A ;;
esac
exit 0
"""
SYSV_START_LEVELS = ("2", "3", "4", "5")


def depend_start_with_hostkeys(text: str) -> str:
    """insserv's /etc/init.d/.depend.start (which sysv-rc's startpar follows) with our script as a
    target that ssh depends on, as insserv would write it."""
    out, has_ssh = [], False
    for line in text.splitlines():
        key, sep, deps = line.partition(":") if not line.startswith("TARGETS") else line.partition("=")
        if line.startswith("TARGETS") and HOSTKEY_SYSV not in deps.split():
            line = f"{line.rstrip()} {HOSTKEY_SYSV}"
        elif sep and key.strip() == "ssh":
            has_ssh = True
            if HOSTKEY_SYSV not in deps.split():
                line = f"{line.rstrip()} {HOSTKEY_SYSV}"
        out.append(line)
    if not has_ssh:
        out.append(f"ssh: {HOSTKEY_SYSV}")
    return "".join(f"{ln}\n" for ln in out)


def _host_keygen_sysv(ctx: Ctx) -> Iterator[Finding]:
    script = ctx.host(f"/etc/init.d/{HOSTKEY_SYSV}", follow_last=False)
    if read_file(script) != HOSTKEY_SYSV_TEXT.encode():
        yield Finding("host-keygen", f"/etc/init.d/{HOSTKEY_SYSV}", "missing",
                      functools.partial(_write_new_exec, script, HOSTKEY_SYSV_TEXT.encode()))
    for level in SYSV_START_LEVELS:
        rel = f"/etc/rc{level}.d/S01{HOSTKEY_SYSV}"
        link = ctx.host(rel, follow_last=False)
        if not os.path.islink(link) and is_real_dir(os.path.dirname(link)):
            yield Finding("host-keygen", rel, "not enabled",
                          functools.partial(_symlink, f"../init.d/{HOSTKEY_SYSV}", link))
    depend = ctx.host("/etc/init.d/.depend.start", follow_last=False)
    data = read_file(depend)
    if data is not None:
        text = data.decode("utf-8", "surrogateescape")
        want = depend_start_with_hostkeys(text)
        if want != text:
            yield Finding("host-keygen", "/etc/init.d/.depend.start", "ssh may start before its keys exist",
                          functools.partial(write_file, depend, want.encode("utf-8", "surrogateescape")))


def _write_new_exec(host: str, data: bytes) -> None:
    makedirs(os.path.dirname(host))
    write_file(host, data, 0o755)


@step("host-keygen", "where host keys were removed: a unit (SysV: an init script) that makes new ones at "
                     "first boot, before sshd")
def _host_keygen(ctx: Ctx) -> Iterator[Finding]:
    if not ctx.opts.drops_host_keys:
        return
    if not os.path.lexists(ctx.host("/etc/ssh/sshd_config")):
        return
    if not ctx.uses_systemd():
        if ctx.uses_sysv() and is_real_dir(ctx.host("/etc/init.d")):
            yield from _host_keygen_sysv(ctx)
        return
    unit = ctx.host(f"/etc/systemd/system/{HOSTKEY_UNIT}", follow_last=False)
    if read_file(unit) != HOSTKEY_UNIT_TEXT.encode():
        yield Finding("host-keygen", f"/etc/systemd/system/{HOSTKEY_UNIT}", "missing",
                      functools.partial(_write_new, unit, HOSTKEY_UNIT_TEXT.encode()))
    wants = ctx.host(f"/etc/systemd/system/multi-user.target.wants/{HOSTKEY_UNIT}", follow_last=False)
    if not os.path.islink(wants):
        yield Finding("host-keygen", f"/etc/systemd/system/multi-user.target.wants/{HOSTKEY_UNIT}", "not enabled",
                      functools.partial(_symlink, f"/etc/systemd/system/{HOSTKEY_UNIT}", wants))


@step("persistent-net", "no persistent NIC naming rules when shared or network removed")
def _persistent_net(ctx: Ctx) -> Iterator[Finding]:
    if not ctx.opts.per_node_network:
        return
    yield from _absent(ctx, "persistent-net", PERSISTENT_NET, "binds NIC names to the source's MAC addresses")


@step("network", "--remove-network: interfaces reduced to loopback (the kernel brings up the NFS root's NIC)")
def _network(ctx: Ctx) -> Iterator[Finding]:
    if ctx.opts.keep_network:
        return
    host = ctx.host("/etc/network/interfaces")
    data = read_file(host)
    want = LOOPBACK_ONLY.encode()
    if data is not None and data != want:
        yield Finding("network", "/etc/network/interfaces", "configures interfaces of the source machine",
                    functools.partial(write_file, host, want, 0o644))
    d = ctx.host("/etc/network/interfaces.d")
    if is_real_dir(d):
        for e in sorted(os.listdir(d)):
            yield Finding("network", f"/etc/network/interfaces.d/{e}", "configures interfaces",
                        functools.partial(remove, os.path.join(d, e)))
    for sub in ("/etc/systemd/network", "/etc/NetworkManager/system-connections", "/etc/netplan"):
        d = ctx.host(sub)
        if is_real_dir(d):
            for e in sorted(os.listdir(d)):
                yield Finding("network", f"{sub}/{e}", "network configuration of the source machine",
                            functools.partial(remove, os.path.join(d, e)))


LOOPBACK_ONLY = """# Written by qrmfs (--remove-network): a diskless node's NIC is brought up by the kernel/initramfs
# for the NFS root and must not be reconfigured here.
auto lo
iface lo inet loopback
"""


@step("services", "mask units that must not run on a diskless node (and host-bound ones with --remove-services)")
def _services(ctx: Ctx) -> Iterator[Finding]:
    if not ctx.uses_systemd():
        return
    units = list(ALWAYS_MASK) + ([] if ctx.opts.keep_services else list(HOST_BOUND_SERVICES))
    present = [u for u in units if _unit_exists(ctx, u)]
    yield from _mask(ctx, "services", present)


@step("hostname", "--hostname: /etc/hostname and the 127.0.1.1 line of /etc/hosts")
def _hostname(ctx: Ctx) -> Iterator[Finding]:
    name = ctx.opts.hostname
    if not name:
        return
    host = ctx.host("/etc/hostname")
    if (read_file(host) or b"").strip() != name.encode():
        yield Finding("hostname", "/etc/hostname", f"not {name}",
                      functools.partial(write_file, host, f"{name}\n".encode()))
    hosts = ctx.host("/etc/hosts")
    data = read_file(hosts)
    if data is not None:
        text = data.decode("utf-8", "surrogateescape")
        line = f"127.0.1.1\t{name}"
        if not re.search(rf"^127\.0\.1\.1\s+{re.escape(name)}(\s|$)", text, re.M):
            def fix(text: str = text) -> None:
                new = (re.sub(r"^127\.0\.1\.1\s.*$", line, text, count=1, flags=re.M)
                       if re.search(r"^127\.0\.1\.1\s", text, re.M) else text.rstrip("\n") + f"\n{line}\n")
                write_file(hosts, new.encode("utf-8", "surrogateescape"), _mode(hosts))
            yield Finding("hostname", "/etc/hosts", f"127.0.1.1 does not name {name}", fix)


@step("excludes", "directories excluded from the copy (-e) exist, empty")
def _excludes(ctx: Ctx) -> Iterator[Finding]:
    for path in ctx.opts.excludes:
        host = ctx.host(path, follow_last=False)
        if not os.path.lexists(host):
            yield Finding("excludes", path, "excluded directory missing", functools.partial(makedirs, host))


@step("node-init", "every node reports the generation it runs, and gets its private directories and identity: "
      "/sbin/qrmfs-init and /etc/qrmfs/node.conf")
def _node_init(ctx: Ctx) -> Iterator[Finding]:
    yield from _node_init_files(ctx)
    yield from _init_leads_to_node_init(ctx)
    yield from _private_dirs(ctx)


# --- /sbin/init leads to qrmfs-init, which starts the distribution's init (kept at DIST_INIT) ---------------

@dataclass(frozen=True)
class _Inits:
    """Where /sbin/init, DIST_INIT and qrmfs-init are in an image (host paths, every symlink followed inside
    the image), and why each of the first two is no init to start (None: an executable regular file)."""

    link: str          # /sbin/init itself (its last component not followed)
    target: str        # where /sbin/init leads
    target_why: str | None
    kept: str          # DIST_INIT itself
    kept_target: str
    kept_why: str | None
    node_init: str     # /sbin/qrmfs-init

    @property
    def leads_to_node_init(self) -> bool:
        return self.target == self.node_init or self.target_why == "qrmfs-init itself"

    @property
    def kept_ok(self) -> bool:
        return self.kept_why is None and self.kept_target != self.node_init


def _init_problem(ctx: Ctx, path: str) -> tuple[str, str | None]:
    """Where image path `path` leads (a host path) and why that is no init to start, or None."""
    try:
        host = ctx.host(path)
    except Escape:
        return "", "a loop of symlinks"
    try:
        st = os.lstat(host)
    except OSError:
        own = ctx.host(path, follow_last=False)
        return host, (f"a symlink to {os.readlink(own)}, which is not in the image" if os.path.islink(own)
                      else "missing")
    if stat.S_ISDIR(st.st_mode):
        return host, "a directory"
    if not stat.S_ISREG(st.st_mode):
        return host, "not a regular file"
    if not st.st_mode & 0o111:
        return host, "not executable"
    if b"\n# qrmfs-init" in (_head(host) or b""):
        return host, "qrmfs-init itself"
    return host, None


def _head(host: str) -> bytes | None:
    try:
        fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.read(fd, 256)
    except OSError:
        return None
    finally:
        os.close(fd)


def _inits(ctx: Ctx) -> _Inits:
    target, target_why = _init_problem(ctx, SBIN_INIT)
    kept_target, kept_why = _init_problem(ctx, DIST_INIT)
    return _Inits(ctx.host(SBIN_INIT, follow_last=False), target, target_why, ctx.host(DIST_INIT, follow_last=False),
                  kept_target, kept_why, ctx.host(NODE_INIT))


def _image_path(ctx: Ctx, host: str) -> str:
    root = os.path.abspath(ctx.root)
    return "/" + os.path.relpath(host, root) if host.startswith(os.path.join(root, "")) else host


def _init_kept(ctx: Ctx, i: _Inits) -> bool:
    """DIST_INIT is what /sbin/init is now: the same file, or a symlink to where /sbin/init's symlink leads."""
    if os.path.islink(i.link):
        return os.path.islink(i.kept) and os.readlink(i.kept) == _image_path(ctx, i.target)
    try:
        return os.path.samestat(os.lstat(i.link), os.lstat(i.kept))
    except OSError:
        return False


def _init_leads_to_node_init(ctx: Ctx) -> Iterator[Finding]:
    """The distribution's init is kept at DIST_INIT and /sbin/init leads to qrmfs-init, so qrmfs-init runs
    whatever starts /sbin/init (openQRM's linuxrc, a plain kernel), and then starts the distribution's init."""
    i = _inits(ctx)
    link, kept = _image_path(ctx, i.link), _image_path(ctx, i.kept)
    if i.leads_to_node_init:
        if not i.kept_ok:
            why = i.kept_why or "qrmfs-init itself"
            yield Finding("node-init", kept, f"/sbin/init leads to qrmfs-init, but the distribution's init is not "
                          f"kept here ({why}): qrmfs-init has no init to start after it (update the image from its "
                          "source)", None)
        return
    if i.target_why == "missing" and i.kept_ok:  # interrupted after a rename kept the init (no hard links)
        yield Finding("node-init", link, f"missing (the distribution's init is kept at {DIST_INIT})",
                      functools.partial(_lead_to_node_init, ctx))
        return
    if i.target_why is not None:
        yield Finding("node-init", link, f"/sbin/init is {i.target_why}: there is no init for qrmfs-init to start "
                      "after it, and an initrd that starts /sbin/init (openQRM's linuxrc) cannot boot the image",
                      None)
        return
    if not _init_kept(ctx, i):
        yield Finding("node-init", kept, f"the distribution's init ({_image_path(ctx, i.target)}) is not kept here",
                      functools.partial(_keep_dist_init, ctx))
    yield Finding("node-init", link, "/sbin/init does not lead to qrmfs-init: a node whose initrd starts /sbin/init "
                  "(openQRM's linuxrc) would not report the generation it runs, nor get its private directories and "
                  "identity",
                  functools.partial(_lead_to_node_init, ctx))


def _keep_dist_init(ctx: Ctx) -> None:
    """DIST_INIT becomes what /sbin/init is: a second name of its file (renamed there where the file system
    refuses hard links), or a symlink to the absolute image path its symlink leads to (a relative one would
    lead elsewhere from DIST_INIT's directory). /sbin/init is never missing while both names are made."""
    i = _inits(ctx)
    if i.target_why is not None or i.leads_to_node_init or _init_kept(ctx, i):
        return
    makedirs(os.path.dirname(i.kept))
    tmp = f"{i.kept}.qrmfs-tmp"
    remove(tmp)
    if os.path.islink(i.link):
        os.symlink(_image_path(ctx, i.target), tmp)
    else:
        try:
            os.link(i.link, tmp)
        except OSError:
            os.rename(i.link, tmp)
    os.replace(tmp, i.kept)


def _lead_to_node_init(ctx: Ctx) -> None:
    """/sbin/init becomes a symlink to qrmfs-init (replaced by rename), once the distribution's init is kept."""
    _keep_dist_init(ctx)
    i = _inits(ctx)
    if not i.kept_ok:
        raise OSError(f"the distribution's init is not kept at {DIST_INIT} ({i.kept_why})")
    if _init_problem(ctx, NODE_INIT)[1] != "qrmfs-init itself":  # never lead /sbin/init to nothing
        raise OSError(f"{NODE_INIT} is not in the image: /sbin/init stays the distribution's init")
    _replace_with_symlink(NODE_INIT, i.link)


def _replace_with_symlink(target: str, link: str) -> None:
    tmp = f"{link}.qrmfs-tmp"
    remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _node_init_files(ctx: Ctx) -> Iterator[Finding]:
    o = ctx.opts
    conf, script = ctx.host(NODE_CONF), ctx.host(NODE_INIT)
    want_conf = node_conf(o).encode()
    if read_file(conf) != want_conf:
        def fix_conf() -> None:
            makedirs(os.path.dirname(conf))
            write_file(conf, want_conf)
        yield Finding("node-init", _image_path(ctx, conf), "missing or not matching the image's options", fix_conf)
    if o.node_init and (read_file(script) != o.node_init.encode() or not os.access(script, os.X_OK)):
        def fix_script() -> None:
            makedirs(os.path.dirname(script))
            write_file(script, o.node_init.encode(), 0o755)
        yield Finding("node-init", _image_path(ctx, script), "missing or not the current qrmfs-init", fix_script)


def _private_dirs(ctx: Ctx) -> Iterator[Finding]:
    o = ctx.opts
    conf = ctx.host(NODE_CONF)
    in_conf = _conf_words(read_file(conf)) if os.path.lexists(conf) else []
    for path in dict.fromkeys([*o.private_add, *o.private_exclude, *in_conf]):
        problem = private_dir_problem(path)
        if problem:
            yield Finding("node-init", path, f"private directory {problem}: qrmfs-init skips it at boot, so all "
                          "nodes would share it (recreate the image with a valid --private-add)", None)
    for path in [*o.private_add, *o.private_exclude]:
        if private_dir_problem(path):
            continue
        host = ctx.host(path, follow_last=False)
        if not is_real_dir(host):
            problem = "missing" if not os.path.lexists(host) else "is not a directory"
            yield Finding("node-init", path, f"private directory {problem}",
                          functools.partial(makedirs, host) if not os.path.lexists(host) else None)


def _conf_words(text: bytes | None) -> list[str]:
    """The words of node.conf's QRMFS_PRIVATE and QRMFS_PRIVATE_EXCLUDE, split as qrmfs-init splits them."""
    words: list[str] = []
    for line in (text or b"").decode("utf-8", "surrogateescape").splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("QRMFS_PRIVATE", "QRMFS_PRIVATE_EXCLUDE"):
            try:
                words += " ".join(shlex.split(value)).split()
            except ValueError:
                words.append(value)
    return words


def node_conf(o: Options) -> str:
    def q(v: str) -> str:
        return "'" + v.replace("'", "'\\''") + "'"
    return ("# Written by qrmfs: read by /sbin/qrmfs-init at each node's boot. Do not edit by hand;\n"
            "# `qrmfs validate --fix` rewrites it from the image's manifest.\n"
            f"QRMFS_IMAGE={q(o.image)}\n"
            f"QRMFS_SHARED={q('yes' if o.shared else 'no')}\n"
            f"QRMFS_HOSTNAME={q(o.hostname or '')}\n"
            f"QRMFS_PRIVATE={q(' '.join(o.private_add))}\n"
            f"QRMFS_PRIVATE_EXCLUDE={q(' '.join(o.private_exclude))}\n")


# The storage server's own NFS settings (not the image's): where they say how NFSv4 owners go out.
NFS_SERVER_FILES = {"ganesha": "/etc/ganesha/ganesha.conf",
                    "nfsd": "/sys/module/nfsd/parameters/nfs4_disable_idmapping"}
TRUE_WORDS = ("true", "yes", "on", "1")


def owner_names_sent(ganesha_conf: str | None, nfsd_disable_idmapping: str | None) -> str | None:
    """Why this storage server sends NFSv4 owners as names (`root@domain`) rather than numbers, or None.
    A client without an ID mapper (a diskless node early in its boot) maps such names to nobody."""
    if ganesha_conf is not None:
        text = re.sub(r"#[^\n]*", "", ganesha_conf)
        m = re.search(r"\bOnly_Numeric_Owners\s*=\s*([A-Za-z0-9]+)", text, re.I)
        if not (m and m.group(1).lower() in TRUE_WORDS):
            return "nfs-ganesha sends NFSv4 owners as names (set NFSV4 { Only_Numeric_Owners = true; })"
    if nfsd_disable_idmapping is not None and nfsd_disable_idmapping.strip().upper() in ("N", "0"):
        return ("kernel nfsd sends NFSv4 owners as names (nfsd's nfs4_disable_idmapping is N; "
                "its default Y sends numbers to AUTH_SYS clients)")
    return None


def _server_text(key: str) -> str | None:
    data = read_file(NFS_SERVER_FILES[key])
    return None if data is None else data.decode("utf-8", "replace")


@step("owners", "the storage server sends NFSv4 owners as numbers, so nodes see the image's real owners "
                "(checked, not repaired)")
def _owners(ctx: Ctx) -> Iterator[Finding]:
    why = owner_names_sent(_server_text("ganesha"), _server_text("nfsd"))
    if why is None:
        return
    mapper = os.path.lexists(ctx.host("/usr/sbin/nfsidmap")) or os.path.lexists(ctx.host("/sbin/nfsidmap"))
    yield Finding("owners", "/", f"nodes will see files owned by nobody (uid 4294967294), and the setuid-root "
                  f"mount run unprivileged: {why}" + ("; the image's nfsidmap helps only once it runs, with "
                                                      "the server's ID domain" if mapper else
                                                      "; the image has no NFSv4 ID mapper"), None)


@step("init", "an init to boot: /sbin/init or systemd (checked, not repaired)")
def _init(ctx: Ctx) -> Iterator[Finding]:
    for path in ("/sbin/init", "/lib/systemd/systemd"):
        host = ctx.host(path)
        if os.path.isfile(host) and os.access(host, os.X_OK):
            return
    yield Finding("init", "/sbin/init", "no executable init in the image: it cannot boot", None)


# --- helpers --------------------------------------------------------------------------------------


def _device_node(host: str, perm: int, dev: int) -> None:
    if os.path.lexists(host):
        remove(host)
    os.mknod(host, stat.S_IFCHR | perm, dev)
    os.chmod(host, perm)


def _replace_with_dir(host: str, mode: int) -> None:
    remove(host)
    makedirs(host, mode)


def _absent(ctx: Ctx, name: str, paths: tuple[str, ...], problem: str) -> Iterator[Finding]:
    """A finding (fixed by removal) for each of paths present in the image."""
    for path in paths:
        host = ctx.host(path, follow_last=False)
        if os.path.lexists(host):
            yield Finding(name, path, problem, functools.partial(remove, host))


def _write_new(host: str, data: bytes) -> None:
    makedirs(os.path.dirname(host))
    write_file(host, data)


def _empty_dir(host: str) -> None:
    for e in os.listdir(host):
        remove(os.path.join(host, e))


def _symlink(target: str, link: str) -> None:
    """Make `link` a symlink to `target`, replacing whatever is there (never following it)."""
    remove(link)
    makedirs(os.path.dirname(link))
    os.symlink(target, link)

def _mode(host: str) -> int:
    try:
        return stat.S_IMODE(os.lstat(host).st_mode)
    except FileNotFoundError:
        return 0o644


def _field(line: str, i: int) -> str:
    f = line.split()
    return f[i] if len(f) > i else "?"


def _glob(ctx: Ctx, parent: str, pattern: str) -> list[str]:
    d = ctx.host(parent)
    if not is_real_dir(d):
        return []
    return [f"{parent}/{e}" for e in os.listdir(d)
            if re.fullmatch(pattern, e) and os.path.isdir(ctx.host(f"{parent}/{e}"))]


def _unit_exists(ctx: Ctx, unit: str) -> bool:
    return any(os.path.lexists(ctx.host(f"{d}/{unit}", follow_last=False))
               for d in ("/lib/systemd/system", "/usr/lib/systemd/system", "/etc/systemd/system"))


def _mask(ctx: Ctx, name: str, units: list[str]) -> Iterator[Finding]:
    for unit in units:
        link = ctx.host(f"/etc/systemd/system/{unit}", follow_last=False)
        if not (os.path.islink(link) and os.readlink(link) == "/dev/null"):
            yield Finding(name, f"/etc/systemd/system/{unit}", "not masked",
                          functools.partial(_symlink, "/dev/null", link))


# --- entry points ---------------------------------------------------------------------------------

def check(root: str, opts: Options) -> list[Finding]:
    return _check(Ctx(root, opts))


def _check(ctx: Ctx) -> list[Finding]:
    out: list[Finding] = []
    for s in STEPS:
        try:
            out.extend(s.check(ctx))
        except Escape as e:
            out.append(Finding(s.name, "/", str(e), None))
    return out


def _fix(f: Finding, fixed: list[FindingRecord]) -> None:
    assert f.fix is not None
    try:
        f.fix()
    except OSError as e:
        raise AgentError(ErrorKind.OS, f"preparation step {f.step} failed at {f.path} in the image: "
                         f"{e.strerror or e}") from None
    fixed.append(f.record())


def prepare(root: str, opts: Options, rounds: int = 3, count: bool = True
            ) -> tuple[list[FindingRecord], list[FindingRecord], tuple[int, int]]:
    """Fix every finding; return (what was fixed, what is left after a last check, (entries, bytes) of the
    prepared tree). A fix can make another step apply (node-init creating /etc makes mtab and machine-id
    relevant), so check again until nothing fixable is left, a bounded number of rounds. Those checks look
    only at the paths each step names; the tree is walked once, after them: that walk finds the sockets and
    counts the tree, and removing a socket (no other step makes or needs one) takes one entry and no blocks
    off the count. A fix that fails names its step and image path."""
    ctx = Ctx(root, opts, defer_walk=True)
    fixed: list[FindingRecord] = []
    for _ in range(rounds):
        todo = [f for f in _check(ctx) if f.fix is not None]
        if not todo:
            break
        for f in todo:
            _fix(f, fixed)
    ctx.walk = walk_tree(root, count=count)
    for f in list(_sockets(ctx)):
        _fix(f, fixed)
        ctx.walk.files -= 1
    left = [f.record() for f in _check(ctx)]
    return fixed, left, (ctx.walk.files, ctx.walk.bytes)


def apply(root: str, opts: Options, rounds: int = 3) -> tuple[list[FindingRecord], list[FindingRecord]]:
    """prepare without the counts."""
    fixed, left, _ = prepare(root, opts, rounds, count=False)
    return fixed, left
