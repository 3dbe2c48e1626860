"""qrmfs/agent/steps.py and fsutil.py on small fake image trees: check() finds, apply() fixes, twice is a no-op,
and nothing outside the image is ever written (an absolute symlink inside points at a host path)."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qrmfs.agent import fsutil, steps
from qrmfs.agent.protocol import AgentError, FindingRecord, Options

OUTSIDE = "/etc/real-hostname-outside"  # the image's /etc/hostname points here: must never be written on the host
NODE_INIT = "#!/bin/sh\n# qrmfs-init (test copy)\nexit 0\n"
FIXABLE_STEPS = ["dirs", "logs", "easymigration", "mtab", "kudzu", "runlevel", "fstab", "sockets", "machine-id",
                 "host-keys", "persistent-net", "network", "services", "hostname", "excludes", "node-init"]


def _w(root: Path, rel: str, data: str = "x\n", mode: int = 0o644) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(data)
    p.chmod(mode)
    return p


def _socket(path: Path) -> None:
    """A unix socket at path (bound with a relative name: tmp paths can exceed the 108-byte sun_path)."""
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind(path.name)
        s.close()
    finally:
        os.chdir(cwd)


def build(root: Path, merged_usr: bool = False, absolute_lib: bool = False) -> Path:
    """A Debian-ish root filesystem as rsync would leave it in the staging directory."""
    for d, m in [("proc", 0o555), ("run", 0o755), ("dev", 0o755), ("tmp", 0o755), ("mnt", 0o755), ("etc", 0o755)]:
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / d).chmod(m)
    _w(root, "proc/1234", "stale")
    _w(root, "run/sshd.pid", "99\n")
    _w(root, "var/log/syslog", "log\n")
    _w(root, "var/log/apt/history.log", "apt\n")
    (root / "var/log/journal").mkdir(parents=True)
    os.symlink("apt", root / "var/log/latest")
    _w(root, "etc/qrm/easymigration.conf", "X=1\n")
    _w(root, "etc/mtab", "/dev/sda1 / ext4 rw 0 0\n")
    _w(root, "etc/inittab", "# The default runlevel.\nid:2:initdefault:\nsi::sysinit:/etc/init.d/rcS\n")
    _w(root, "etc/rc3.d/S05kudzu", "#!/bin/sh\n", 0o755)
    _w(root, "etc/init.d/kudzu", "#!/bin/sh\n", 0o755)
    lib = "usr/lib" if merged_usr else "lib"
    _w(root, f"{lib}/systemd/systemd", "ELF", 0o755)
    for unit in ("fstrim.timer", "systemd-remount-fs.service", "smartd.service", "multi-user.target"):
        _w(root, f"{lib}/systemd/system/{unit}", "[Unit]\n")
    if merged_usr:
        os.symlink("/usr/lib" if absolute_lib else "usr/lib", root / "lib")
    (root / "sbin").mkdir()
    os.symlink("/lib/systemd/systemd", root / "sbin/init")  # Debian's systemd-sysv
    _w(root, "etc/fstab", "# /etc/fstab\nUUID=0a1b2c3d / ext4 errors=remount-ro 0 1\nproc /proc proc defaults 0 0\n"
                          "/dev/sda2 none swap sw 0 0\n")
    _w(root, "etc/machine-id", "0123456789abcdef0123456789abcdef\n", 0o444)
    _w(root, "var/lib/dbus/machine-id", "0123456789abcdef0123456789abcdef\n")
    _w(root, "etc/ssh/ssh_host_ed25519_key", "PRIVATE\n", 0o600)
    _w(root, "etc/ssh/ssh_host_ed25519_key.pub", "ssh-ed25519 AAAA\n")
    _w(root, "etc/ssh/sshd_config", "PermitRootLogin no\n")
    _w(root, "etc/udev/rules.d/70-persistent-net.rules",
       'SUBSYSTEM=="net", ATTR{address}=="52:54:00:12:34:56", NAME="eth0"\n')
    _w(root, "etc/network/interfaces",
       "auto lo\niface lo inet loopback\nauto eth0\niface eth0 inet static\n  address 10.0.0.7/24\n")
    _w(root, "etc/network/interfaces.d/eth1", "auto eth1\n")
    _w(root, "etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tsrc1.example.org src1\n")
    os.symlink(OUTSIDE, root / "etc/hostname")
    _w(root, OUTSIDE.lstrip("/"), "src1\n")
    (root / "var/lib/app").mkdir(parents=True)
    _socket(root / "var/lib/app/agent.sock")
    return root


def snapshot(base: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            kind = stat.S_IFMT(st_.st_mode)
            extra: object = None
            if stat.S_ISLNK(st_.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISREG(st_.st_mode):
                extra = Path(p).read_bytes()
            out[os.path.relpath(p, base)] = (kind, stat.S_IMODE(st_.st_mode), extra)
    return out


@pytest.fixture
def img(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir()
    _w(tmp_path, "outside/sentinel", "untouched\n")
    return build(tmp_path / "img")


@pytest.fixture(autouse=True)
def _host_untouched() -> object:
    before = os.path.lexists(OUTSIDE)
    yield
    assert os.path.lexists(OUTSIDE) == before, "a step wrote through an absolute symlink onto the host"


def check_only(root: str, opts: Options, names: list[str]) -> list[steps.Finding]:
    return [f for f in steps.check(root, opts) if f.step in names]


def found(root: Path, opts: Options, only: list[str] | None = None) -> list[tuple[str, str, str]]:
    return sorted((f.step, f.path, f.problem) for f in steps.check(str(root), opts) if not only or f.step in only)


# /sbin/init leads to qrmfs-init in every image (issue 27: initrds that start /sbin/init, as openQRM's linuxrc)
INIT_FINDINGS = [
    ("node-init", "/usr/lib/qrmfs/init", "the distribution's init (/lib/systemd/systemd) is not kept here"),
    ("node-init", "/sbin/init", "/sbin/init does not lead to qrmfs-init: a node whose initrd starts /sbin/init "
                                "(openQRM's linuxrc) would not report the generation it runs, nor get its private "
                                "directories and identity")]


DEFAULT_FINDINGS = sorted([
    ("dirs", "/proc", "not empty (1 entries)"),
    ("dirs", "/sys", "missing"),
    ("dirs", "/run", "not empty (1 entries)"),
    ("dirs", "/tmp", "mode 0755, want 1777"),
    ("dirs", "/mnt/floppy", "missing"),
    ("dirs", "/mnt/cdrom", "missing"),
    ("dirs", "/dev/console", "missing"),
    ("dirs", "/dev/null", "missing"),
    ("logs", "/var/log/syslog", "log file left in the image"),
    ("logs", "/var/log/latest", "log file left in the image"),
    ("logs", "/var/log/apt/history.log", "log file left in the image"),
    ("easymigration", "/etc/qrm/easymigration.conf", "present"),
    ("mtab", "/etc/mtab", "is a file, not a link to /proc/mounts"),
    ("kudzu", "/etc/rc3.d/S05kudzu", "kudzu starts at boot"),
    ("kudzu", "/etc/systemd/system/kudzu.service", "not masked"),
    ("runlevel", "/etc/inittab", "initdefault is 2, want 3"),
    ("runlevel", "/etc/systemd/system/default.target", "default target unset, want multi-user.target"),
    ("fstab", "/etc/fstab", "line 2 mounts a local disk: UUID=0a1b2c3d on /"),
    ("fstab", "/etc/fstab", "line 4 mounts a local disk: /dev/sda2 on none"),
    ("sockets", "/var/lib/app/agent.sock", "socket left in the tree"),
    ("machine-id", "/etc/machine-id", "carries the source machine's id"),
    ("machine-id", "/var/lib/dbus/machine-id", "a copy of the source's machine id"),
    ("host-keys", "/etc/ssh/ssh_host_ed25519_key", "host key of the source machine"),
    ("host-keys", "/etc/ssh/ssh_host_ed25519_key.pub", "host key of the source machine"),
    ("persistent-net", "/etc/udev/rules.d/70-persistent-net.rules", "binds NIC names to the source's MAC addresses"),
    ("network", "/etc/network/interfaces", "configures interfaces of the source machine"),
    ("network", "/etc/network/interfaces.d/eth1", "configures interfaces"),
    ("services", "/etc/systemd/system/systemd-remount-fs.service", "not masked"),
    ("services", "/etc/systemd/system/fstrim.timer", "not masked"),
    # every image: /sbin/init leads to qrmfs-init, which reports the generation a node runs
    ("node-init", "/etc/qrmfs/node.conf", "missing or not matching the image's options"),
    ("node-init", "/sbin/qrmfs-init", "missing or not the current qrmfs-init"),
    *INIT_FINDINGS,
])


def test_check_finds_everything(img: Path) -> None:
    assert found(img, Options("img1", node_init=NODE_INIT), [*FIXABLE_STEPS, "init"]) == DEFAULT_FINDINGS
    assert all(f.fix is not None for f in steps.check(str(img), Options("img1", node_init=NODE_INIT)))


def test_check_changes_nothing(img: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    steps.check(str(img), Options("img1", shared=True, hostname="n1", private_add=["/var/x"], node_init=NODE_INIT))
    assert snapshot(tmp_path) == before


def test_apply_result_and_end_state(img: Path, tmp_path: Path) -> None:
    fixed, left = steps.apply(str(img), Options("img1", node_init=NODE_INIT))
    assert left == []
    assert sorted((f.step, f.path, f.problem) for f in fixed if f.step in FIXABLE_STEPS) == (
        DEFAULT_FINDINGS)
    assert all(f.fixable for f in fixed)
    # dirs
    for d, mode in (("proc", 0o555), ("sys", 0o555), ("run", 0o755), ("dev", 0o755), ("tmp", 0o1777),
                    ("mnt/floppy", 0o755), ("mnt/cdrom", 0o755)):
        assert fsutil.is_real_dir(str(img / d)) and stat.S_IMODE(os.lstat(img / d).st_mode) == mode, d
    assert os.listdir(img / "proc") == [] and os.listdir(img / "run") == []
    # logs: files gone, directories kept
    assert sorted(os.listdir(img / "var/log")) == ["apt", "journal"]
    assert os.listdir(img / "var/log/apt") == []
    assert not (img / "etc/qrm/easymigration.conf").exists() and (img / "etc/qrm").is_dir()
    assert os.readlink(img / "etc/mtab") == "/proc/mounts"
    assert os.listdir(img / "etc/rc3.d") == ["K05kudzu"]
    assert (img / "etc/inittab").read_text() == (
        "# The default runlevel.\nid:3:initdefault:\nsi::sysinit:/etc/init.d/rcS\n")
    assert os.readlink(img / "etc/systemd/system/default.target") == "/lib/systemd/system/multi-user.target"
    assert (img / "etc/fstab").read_text() == (
        "# /etc/fstab\n#qrmfs (local disk on a diskless node): UUID=0a1b2c3d / ext4 errors=remount-ro 0 1\n"
        "proc /proc proc defaults 0 0\n#qrmfs (local disk on a diskless node): /dev/sda2 none swap sw 0 0\n")
    assert stat.S_IMODE(os.stat(img / "etc/fstab").st_mode) == 0o644
    assert not os.path.lexists(img / "var/lib/app/agent.sock")
    assert (img / "etc/machine-id").read_bytes() == b""
    assert stat.S_IMODE(os.lstat(img / "etc/machine-id").st_mode) == 0o444
    assert os.readlink(img / "var/lib/dbus/machine-id") == "/etc/machine-id"
    assert os.listdir(img / "etc/ssh") == ["sshd_config"]
    assert not os.path.lexists(img / "etc/udev/rules.d/70-persistent-net.rules")
    assert (img / "etc/network/interfaces").read_text() == steps.LOOPBACK_ONLY
    assert os.listdir(img / "etc/network/interfaces.d") == []
    for unit in ("kudzu.service", "fstrim.timer", "systemd-remount-fs.service"):
        assert os.readlink(img / f"etc/systemd/system/{unit}") == "/dev/null"
    assert not os.path.lexists(img / "etc/systemd/system/smartd.service")  # --keep-services is the default
    # untouched: no --hostname, nothing outside the image
    assert (img / OUTSIDE.lstrip("/")).read_text() == "src1\n"
    assert os.readlink(img / "etc/hostname") == OUTSIDE
    assert (tmp_path / "outside/sentinel").read_text() == "untouched\n"
    # node-init: only the report (no --shared, no private directory)
    assert os.readlink(img / "sbin/init") == "/sbin/qrmfs-init"
    assert os.readlink(img / "usr/lib/qrmfs/init") == "/lib/systemd/systemd"
    assert "QRMFS_SHARED='no'\nQRMFS_HOSTNAME=''\nQRMFS_PRIVATE=''\n" in (img / "etc/qrmfs/node.conf").read_text()


def test_apply_twice_changes_nothing(img: Path, tmp_path: Path) -> None:
    opts = Options("img1", shared=True, hostname="node7", private_add=["/var/lib/node"],
                   private_exclude=["/var/lib/node/common"], excludes=["/home/big"], keep_services=False,
                   node_init=NODE_INIT)
    fixed, left = steps.apply(str(img), opts)
    assert fixed and left == []
    after = snapshot(tmp_path)
    assert steps.apply(str(img), opts) == ([], [])
    assert snapshot(tmp_path) == after
    assert steps.check(str(img), opts) == []


STEP_OPTS = {
    "hostname": Options("img1", hostname="node7", node_init=NODE_INIT),
    "excludes": Options("img1", excludes=["/home/big", "/var/cache/apt"], node_init=NODE_INIT),
    "node-init": Options("img1", private_add=["/srv/private"], node_init=NODE_INIT),
}


@pytest.mark.parametrize("name", FIXABLE_STEPS)
def test_each_step_check_fix_idempotent(name: str, img: Path, tmp_path: Path) -> None:
    opts = STEP_OPTS.get(name, Options("img1", node_init=NODE_INIT))
    findings = check_only(str(img), opts, [name])
    assert findings, f"step {name} found nothing in the fake image"
    assert {f.step for f in findings} == {name}
    for f in findings:
        assert f.fix is not None
        f.fix()
    assert check_only(str(img), opts, [name]) == []
    after = snapshot(tmp_path)
    assert check_only(str(img), opts, [name]) == []
    assert snapshot(tmp_path) == after


def test_steps_registry() -> None:
    names = [s.name for s in steps.STEPS]
    assert len(names) == len(set(names))
    # the manual's steps first, in the manual's order; what an NFS root needs after them
    assert [n for n in names if n in FIXABLE_STEPS] == FIXABLE_STEPS
    assert all(s.what for s in steps.STEPS)


def test_init_step(tmp_path: Path) -> None:
    root = tmp_path / "img"
    (root / "etc").mkdir(parents=True)
    assert [(f.step, f.path, f.problem, f.fix) for f in check_only(str(root), Options("i"), ["init"])] == [
        ("init", "/sbin/init", "no executable init in the image: it cannot boot", None)]
    _w(root, "sbin/init", "ELF", 0o644)  # not executable: still no init
    assert len(check_only(str(root), Options("i"), ["init"])) == 1
    (root / "sbin/init").chmod(0o755)
    assert check_only(str(root), Options("i"), ["init"]) == []
    os.unlink(root / "sbin/init")
    os.symlink("/lib/systemd/systemd", root / "sbin/init")  # absolute link: resolved inside the image
    _w(root, "usr/lib/systemd/systemd", "ELF", 0o755)
    os.symlink("usr/lib", root / "lib")
    assert check_only(str(root), Options("i"), ["init"]) == []


# --- options ---------------------------------------------------------------------------------------

def test_keep_network_leaves_interfaces_and_host_keys(img: Path) -> None:
    opts = Options("img1", keep_network=True, node_init=NODE_INIT)
    names = {f[0] for f in found(img, opts)}
    assert not names & {"network", "host-keys", "persistent-net"}
    fixed, left = steps.apply(str(img), opts)
    assert left == []
    assert (img / "etc/network/interfaces").read_text().endswith("address 10.0.0.7/24\n")
    assert os.listdir(img / "etc/network/interfaces.d") == ["eth1"]
    assert sorted(os.listdir(img / "etc/ssh")) == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub",
                                                   "sshd_config"]
    assert (img / "etc/udev/rules.d/70-persistent-net.rules").exists()


def test_shared_removes_host_keys_even_with_keep_network(img: Path) -> None:
    opts = Options("img1", keep_network=True, shared=True, node_init=NODE_INIT)
    assert [f[1] for f in found(img, opts, ["host-keys", "persistent-net", "network"])] == [
        "/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_ed25519_key.pub",
        "/etc/udev/rules.d/70-persistent-net.rules"]
    steps.apply(str(img), opts)
    assert os.listdir(img / "etc/ssh") == ["sshd_config"]
    assert (img / "etc/network/interfaces").read_text().endswith("address 10.0.0.7/24\n")


def test_remove_services_masks_host_bound_units(img: Path) -> None:
    assert ("services", "/etc/systemd/system/smartd.service", "not masked") in found(
        img, Options("img1", keep_services=False, node_init=NODE_INIT))
    steps.apply(str(img), Options("img1", keep_services=False, node_init=NODE_INIT))
    assert os.readlink(img / "etc/systemd/system/smartd.service") == "/dev/null"
    # units the image does not have are not masked
    assert not os.path.lexists(img / "etc/systemd/system/NetworkManager.service")


def test_hostname_sets_hostname_and_hosts_inside_the_image(img: Path, tmp_path: Path) -> None:
    opts = Options("img1", hostname="node7", node_init=NODE_INIT)
    assert found(img, opts, ["hostname"]) == [("hostname", "/etc/hostname", "not node7"),
                                              ("hostname", "/etc/hosts", "127.0.1.1 does not name node7")]
    steps.apply(str(img), opts)
    # /etc/hostname is an absolute symlink: it resolves inside the image, never onto the host's /etc
    assert os.readlink(img / "etc/hostname") == OUTSIDE
    assert (img / OUTSIDE.lstrip("/")).read_text() == "node7\n"
    assert (img / "etc/hosts").read_text() == "127.0.0.1\tlocalhost\n127.0.1.1\tnode7\n"
    assert check_only(str(img), opts, ["hostname"]) == []


def test_hostname_adds_hosts_line_when_missing(tmp_path: Path) -> None:
    root = tmp_path / "img"
    _w(root, "etc/hosts", "127.0.0.1 localhost")
    _w(root, "etc/hostname", "old\n")
    steps.apply(str(root), Options("img1", hostname="n1.lab", node_init=NODE_INIT))
    assert (root / "etc/hostname").read_text() == "n1.lab\n"
    assert (root / "etc/hosts").read_text() == "127.0.0.1 localhost\n127.0.1.1\tn1.lab\n"


def test_private_dirs_and_node_conf(img: Path) -> None:
    opts = Options("img1", private_add=["/var/lib/node", "/srv/private"], private_exclude=["/srv/private/common"],
                   node_init=NODE_INIT)
    assert found(img, opts, ["node-init"]) == sorted([
        ("node-init", "/etc/qrmfs/node.conf", "missing or not matching the image's options"),
        ("node-init", "/sbin/qrmfs-init", "missing or not the current qrmfs-init"),
        *INIT_FINDINGS,
        ("node-init", "/var/lib/node", "private directory missing"),
        ("node-init", "/srv/private", "private directory missing"),
        ("node-init", "/srv/private/common", "private directory missing")])
    steps.apply(str(img), opts)
    assert (img / "etc/qrmfs/node.conf").read_text() == (
        "# Written by qrmfs: read by /sbin/qrmfs-init at each node's boot. Do not edit by hand;\n"
        "# `qrmfs validate --fix` rewrites it from the image's manifest.\n"
        "QRMFS_IMAGE='img1'\n"
        "QRMFS_SHARED='no'\n"
        "QRMFS_HOSTNAME=''\n"
        "QRMFS_PRIVATE='/var/lib/node /srv/private'\n"
        "QRMFS_PRIVATE_EXCLUDE='/srv/private/common'\n")
    assert (img / "sbin/qrmfs-init").read_text() == NODE_INIT
    assert stat.S_IMODE(os.stat(img / "sbin/qrmfs-init").st_mode) == 0o755
    for d in ("var/lib/node", "srv/private", "srv/private/common"):
        assert fsutil.is_real_dir(str(img / d))


def test_node_conf_shared_with_hostname_quotes() -> None:
    text = steps.node_conf(Options("img1", shared=True, hostname="n1", node_init=NODE_INIT))
    assert "QRMFS_SHARED='yes'\nQRMFS_HOSTNAME='n1'\n" in text
    assert "QRMFS_IMAGE='it'\\''s'\n" in steps.node_conf(Options("it's"))


def test_node_conf_rewritten_when_options_change(img: Path) -> None:
    steps.apply(str(img), Options("img1", shared=True, node_init=NODE_INIT))
    opts = Options("img1", shared=True, hostname="n9", node_init=NODE_INIT)
    assert found(img, opts, ["node-init"]) == [
        ("node-init", "/etc/qrmfs/node.conf", "missing or not matching the image's options")]
    steps.apply(str(img), opts)
    assert "QRMFS_HOSTNAME='n9'\n" in (img / "etc/qrmfs/node.conf").read_text()


# --- /sbin/init leads to qrmfs-init (issue 27: initrds that start /sbin/init, as openQRM's linuxrc) ---------

PRIVATE = Options("img1", private_add=["/var/lib/app"], node_init=NODE_INIT)
PLAIN = Options("img1", node_init=NODE_INIT)
SYSV_INIT = "\x7fELF sysvinit 3.06\n"


def _inits(img: Path) -> tuple[str | None, object]:
    """(/sbin/init's link target or None, what DIST_INIT is: its link target, its bytes, or None)."""
    link = img / "sbin/init"
    kept = img / steps.DIST_INIT.lstrip("/")
    what: object = os.readlink(kept) if kept.is_symlink() else kept.read_bytes() if kept.exists() else None
    return (os.readlink(link) if link.is_symlink() else None), what


def _sysv(img: Path) -> Path:
    """The image's /sbin/init as SysV init's binary (sysvinit-core)."""
    os.unlink(img / "sbin/init")
    return _w(img, "sbin/init", SYSV_INIT, 0o755)


def test_systemd_init_symlink_leads_to_qrmfs_init_and_the_distribution_init_is_kept(img: Path) -> None:
    assert found(img, PRIVATE, ["node-init"]) == sorted([
        ("node-init", "/etc/qrmfs/node.conf", "missing or not matching the image's options"),
        ("node-init", "/sbin/qrmfs-init", "missing or not the current qrmfs-init"), *INIT_FINDINGS])
    fixed, left = steps.apply(str(img), PRIVATE)
    assert left == [] and {"/sbin/init", "/usr/lib/qrmfs/init"} <= {f.path for f in fixed}
    assert _inits(img) == ("/sbin/qrmfs-init", "/lib/systemd/systemd")
    assert stat.S_IMODE(os.stat(img / "usr/lib/qrmfs").st_mode) == 0o755
    # validate recognises the prepared state; a second preparation changes nothing
    assert found(img, PRIVATE, ["node-init", "init"]) == []
    assert steps.apply(str(img), PRIVATE) == ([], [])


def test_sysv_init_binary_is_kept_by_a_second_name_and_sbin_init_leads_to_qrmfs_init(img: Path) -> None:
    ino = _sysv(img).stat().st_ino
    fixed, left = steps.apply(str(img), PRIVATE)
    assert left == []
    assert _inits(img) == ("/sbin/qrmfs-init", SYSV_INIT.encode())
    kept = img / "usr/lib/qrmfs/init"
    assert kept.stat().st_ino == ino and kept.stat().st_nlink == 1  # the same file, moved: no copy left behind
    assert stat.S_IMODE(kept.stat().st_mode) == 0o755
    assert steps.apply(str(img), PRIVATE) == ([], [])


def test_merged_usr_relative_init_link_is_kept_as_an_absolute_one(tmp_path: Path) -> None:
    img = build(tmp_path / "img", merged_usr=True)
    os.unlink(img / "sbin/init")
    os.rmdir(img / "sbin")
    (img / "usr/sbin").mkdir(parents=True)
    os.symlink("usr/sbin", img / "sbin")
    os.symlink("../lib/systemd/systemd", img / "usr/sbin/init")  # relative: from DIST_INIT it would lead elsewhere
    fixed, left = steps.apply(str(img), PRIVATE)
    assert left == []
    # the paths the preparation changed are named as they are in the tree (an update leaves them out of its counts)
    assert {"/usr/sbin/init", "/usr/lib/qrmfs/init", "/usr/sbin/qrmfs-init"} <= {f.path for f in fixed}
    assert os.readlink(img / "usr/sbin/init") == "/sbin/qrmfs-init"
    assert os.readlink(img / "usr/lib/qrmfs/init") == "/usr/lib/systemd/systemd"
    assert found(img, PRIVATE, ["node-init"]) == []


def test_validate_fix_restores_it_after_a_package_upgrade_replaced_sbin_init(img: Path) -> None:
    _sysv(img)
    steps.apply(str(img), PRIVATE)
    os.unlink(img / "sbin/init")  # dpkg unpacks a new sysvinit-core: /sbin/init is its binary again
    _w(img, "sbin/init", "\x7fELF sysvinit 3.07\n", 0o755)
    assert [(f[1], f[2][:40]) for f in found(img, PRIVATE, ["node-init"])] == [
        ("/sbin/init", "/sbin/init does not lead to qrmfs-init: "),
        ("/usr/lib/qrmfs/init", "the distribution's init (/sbin/init) is ")]
    steps.apply(str(img), PRIVATE)
    assert _inits(img) == ("/sbin/qrmfs-init", b"\x7fELF sysvinit 3.07\n")


@pytest.mark.parametrize(("make", "why"), [
    (lambda img: None, "/sbin/init is missing"),
    (lambda img: os.symlink("/lib/systemd/nothing", img / "sbin/init"),
     "/sbin/init is a symlink to /lib/systemd/nothing, which is not in the image"),
    (lambda img: (img / "sbin/init").mkdir(), "/sbin/init is a directory"),
    (lambda img: _w(img, "sbin/init", "ELF", 0o644), "/sbin/init is not executable"),
    (lambda img: os.symlink("init", img / "sbin/init"), "/sbin/init is a loop of symlinks"),
])
def test_a_missing_or_odd_sbin_init_is_a_clear_finding_and_nothing_is_changed(img: Path, make, why) -> None:
    os.unlink(img / "sbin/init")
    make(img)
    (f,) = [f for f in check_only(str(img), PRIVATE, ["node-init"]) if f.path == "/sbin/init"]
    assert f.problem.startswith(why + ": there is no init for qrmfs-init to start") and f.fix is None, f.problem
    before = snapshot(img / "sbin")
    fixed, left = steps.apply(str(img), PRIVATE)
    assert FindingRecord("node-init", "/sbin/init", f.problem, False) in left
    after = snapshot(img / "sbin")
    assert after.pop("qrmfs-init") and after == before  # only qrmfs-init was added
    assert not os.path.lexists(img / "usr/lib/qrmfs")


def test_an_interrupted_preparation_is_finished_and_a_lost_distribution_init_is_reported(img: Path) -> None:
    _sysv(img)
    steps.apply(str(img), PRIVATE)
    os.unlink(img / "sbin/init")  # stopped between keeping the init and the link to qrmfs-init
    assert found(img, PRIVATE, ["node-init"]) == [
        ("node-init", "/sbin/init", "missing (the distribution's init is kept at /usr/lib/qrmfs/init)")]
    steps.apply(str(img), PRIVATE)
    assert _inits(img) == ("/sbin/qrmfs-init", SYSV_INIT.encode())
    os.unlink(img / "usr/lib/qrmfs/init")
    ((path, problem, fix),) = [(f.path, f.problem, f.fix) for f in check_only(str(img), PRIVATE, ["node-init"])]
    assert (path, fix) == ("/usr/lib/qrmfs/init", None) and "qrmfs-init has no init to start" in problem


def test_a_plain_image_gets_qrmfs_init_which_only_reports_and_keeps_the_distribution_init(img: Path) -> None:
    """Neither shared nor private directories: /sbin/init still leads to qrmfs-init (so the node reports the
    generation it runs), with a node.conf that asks for nothing else; the distribution's init is kept."""
    for make, dist_init in ((lambda: None, "/lib/systemd/systemd"), (lambda: _sysv(img), SYSV_INIT.encode())):
        make()
        fixed, left = steps.apply(str(img), PLAIN)
        assert left == [] and _inits(img) == ("/sbin/qrmfs-init", dist_init)
        assert (img / "sbin/qrmfs-init").read_text() == NODE_INIT
        conf = (img / "etc/qrmfs/node.conf").read_text()
        assert "QRMFS_SHARED='no'\n" in conf and "QRMFS_PRIVATE=''\n" in conf, conf
        assert found(img, PLAIN, ["node-init"]) == []
    # from shared to plain: the node.conf follows, qrmfs-init and the lead to it stay
    steps.apply(str(img), Options("img1", shared=True, node_init=NODE_INIT))
    assert found(img, PLAIN, ["node-init"]) == [
        ("node-init", "/etc/qrmfs/node.conf", "missing or not matching the image's options")]
    steps.apply(str(img), PLAIN)
    assert "QRMFS_SHARED='no'\n" in (img / "etc/qrmfs/node.conf").read_text()
    assert _inits(img)[0] == "/sbin/qrmfs-init" and found(img, PLAIN, ["node-init"]) == []


def test_sbin_init_never_leads_to_a_qrmfs_init_that_is_not_in_the_image(img: Path) -> None:
    with pytest.raises(AgentError, match="/sbin/qrmfs-init is not in the image"):
        steps.apply(str(img), Options("img1"))  # the script's text not sent, and none in the image
    assert os.readlink(img / "sbin/init") == "/lib/systemd/systemd"


def test_private_path_that_is_a_file_is_reported_not_fixed(img: Path) -> None:
    _w(img, "srv/private", "a file")
    opts = Options("img1", private_add=["/srv/private"], node_init=NODE_INIT)
    (f,) = [f for f in check_only(str(img), opts, ["node-init"]) if f.path == "/srv/private"]
    assert (f.problem, f.fix) == ("private directory is not a directory", None)
    _, left = steps.apply(str(img), opts)
    assert left == [FindingRecord("node-init", "/srv/private", "private directory is not a directory", False)]


def test_excludes_are_created_empty(img: Path) -> None:
    steps.apply(str(img), Options("img1", excludes=["/home/big", "/var/cache/apt"], node_init=NODE_INIT))
    assert os.listdir(img / "home/big") == [] and os.listdir(img / "var/cache/apt") == []


def test_options_from_dict_ignores_unknown_keys() -> None:
    o = Options.from_dict({"image": "i", "shared": True, "arch": "x86_64", "route": "ssh"})
    assert o == Options("i", shared=True)


# --- systemd detection, merged /usr, sysv-only --------------------------------------------------------

@pytest.mark.parametrize("absolute", [False, True])
def test_merged_usr_lib_symlink(tmp_path: Path, absolute: bool) -> None:
    root = build(tmp_path / "img", merged_usr=True, absolute_lib=absolute)
    assert steps.Ctx(str(root), Options("i")).uses_systemd()
    assert ("services", "/etc/systemd/system/fstrim.timer", "not masked") in found(root, Options("i"))
    _, left = steps.apply(str(root), Options("i", node_init=NODE_INIT))
    assert left == []
    assert os.readlink(root / "etc/systemd/system/fstrim.timer") == "/dev/null"
    assert os.readlink(root / "lib") == ("/usr/lib" if absolute else "usr/lib")  # the link itself is kept
    assert steps.apply(str(root), Options("i", node_init=NODE_INIT)) == ([], [])


def test_sysv_only_image_gets_no_systemd_links(tmp_path: Path) -> None:
    root = tmp_path / "img"
    _w(root, "etc/inittab", "id:5:initdefault:\n")
    _w(root, "etc/rc2.d/S10kudzu", "")
    _w(root, "etc/rc2.d/S20ssh", "")
    steps.apply(str(root), Options("i", node_init=NODE_INIT))
    assert (root / "etc/inittab").read_text() == "id:3:initdefault:\n"
    assert sorted(os.listdir(root / "etc/rc2.d")) == ["K10kudzu", "S20ssh"]
    assert not os.path.lexists(root / "etc/systemd")


def test_inittab_without_initdefault_gets_one(tmp_path: Path) -> None:
    root = tmp_path / "img"
    _w(root, "etc/inittab", "#id:5:initdefault:\nsi::sysinit:/etc/init.d/rcS\n")
    assert found(root, Options("i"), ["runlevel"]) == [("runlevel", "/etc/inittab", "initdefault is none, want 3")]
    steps.apply(str(root), Options("i", node_init=NODE_INIT))
    assert (root / "etc/inittab").read_text() == "id:3:initdefault:\n#id:5:initdefault:\nsi::sysinit:/etc/init.d/rcS\n"


def test_mtab_links_that_are_fine(tmp_path: Path) -> None:
    for target in steps.MTAB_OK:
        root = tmp_path / target.replace("/", "_")
        (root / "etc").mkdir(parents=True)
        os.symlink(target, root / "etc/mtab")
        assert found(root, Options("i"), ["mtab"]) == []
    root = tmp_path / "bad"
    (root / "etc").mkdir(parents=True)
    os.symlink("/etc/mtab.real", root / "etc/mtab")
    assert found(root, Options("i"), ["mtab"]) == [("mtab", "/etc/mtab", "links to /etc/mtab.real, not /proc/mounts")]


def test_kudzu_red_hat_layout(tmp_path: Path) -> None:
    root = tmp_path / "img"
    _w(root, "etc/rc.d/rc3.d/S05kudzu", "")
    _w(root, "etc/rc.d/init.d/kudzu", "")
    _w(root, "etc/inittab", "id:3:initdefault:\n")
    for n in ("rc3.d", "init.d"):
        os.symlink(f"rc.d/{n}", root / "etc" / n)
    steps.apply(str(root), Options("i", node_init=NODE_INIT))
    assert os.listdir(root / "etc/rc.d/rc3.d") == ["K05kudzu"]


def test_path_through_a_file_does_not_crash_check(tmp_path: Path) -> None:
    root = tmp_path / "img"
    _w(root, "etc/network", "not a directory\n")
    _w(root, "etc/mtab", "x")
    names = {f[0] for f in found(root, Options("i"))}
    assert "mtab" in names


def test_socket_in_var_log(tmp_path: Path) -> None:
    root = tmp_path / "img"
    (root / "var/log").mkdir(parents=True)
    _w(root, "sbin/init", "ELF", 0o755)
    _socket(root / "var/log/dev-log")
    _, left = steps.apply(str(root), Options("i", node_init=NODE_INIT))
    assert left == [] and os.listdir(root / "var/log") == []


def test_check_reports_symlink_loop_instead_of_crashing(tmp_path: Path) -> None:
    root = tmp_path / "img"
    (root / "etc").mkdir(parents=True)
    os.symlink("fstab", root / "etc/fstab2")
    os.symlink("fstab2", root / "etc/fstab")
    fs = check_only(str(root), Options("i"), ["fstab"])
    assert [(f.step, f.path, f.fix) for f in fs] == [("fstab", "/", None)]
    assert "too many symlinks" in fs[0].problem


# --- fsutil ---------------------------------------------------------------------------------------

def test_resolve_examples(tmp_path: Path) -> None:
    r = str(tmp_path)
    (tmp_path / "usr/lib/systemd").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    os.symlink("usr/lib", tmp_path / "lib")
    os.symlink("/etc/real", tmp_path / "etc/hostname")
    os.symlink("../../../../../../etc/passwd", tmp_path / "etc/up")
    os.symlink("/", tmp_path / "etc/rootlink")
    assert fsutil.resolve(r, "/lib/systemd/systemd") == f"{r}/usr/lib/systemd/systemd"
    assert fsutil.resolve(r, "/lib", follow_last=False) == f"{r}/lib"
    assert fsutil.resolve(r, "/etc/hostname") == f"{r}/etc/real"
    assert fsutil.resolve(r, "/etc/hostname", follow_last=False) == f"{r}/etc/hostname"
    assert fsutil.resolve(r, "/etc/up") == f"{r}/etc/passwd"
    assert fsutil.resolve(r, "../../etc/./x/..//y") == f"{r}/etc/y"
    assert fsutil.resolve(r, "/etc/rootlink") == r
    assert fsutil.resolve(r, "/etc/rootlink/etc/rootlink/lib") == f"{r}/usr/lib"


def test_resolve_loop_raises_escape(tmp_path: Path) -> None:
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(fsutil.Escape, match="too many symlinks"):
        fsutil.resolve(str(tmp_path), "/a/x")


COMPONENT = st.sampled_from(["..", ".", "", "a", "b", "l1", "l2", "l3", "nope", "..."])


def _target() -> st.SearchStrategy[str]:
    return st.tuples(st.booleans(), st.lists(COMPONENT, max_size=7)).map(
        lambda t: ("/" if t[0] else "") + "/".join(t[1]) or ".")


@settings(max_examples=300, deadline=None)
@given(t1=_target(), t2=_target(), t3=_target(), rel=st.lists(COMPONENT, max_size=8).map("/".join),
       follow=st.booleans())
def test_resolve_never_leaves_the_root(t1: str, t2: str, t3: str, rel: str, follow: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = os.path.join(d, "root")
        os.makedirs(os.path.join(root, "a", "b"))
        os.makedirs(os.path.join(d, "a", "b"))  # the same names OUTSIDE the root
        os.symlink(t1, os.path.join(root, "l1"))
        os.symlink(t2, os.path.join(root, "a", "l2"))
        os.symlink(t3, os.path.join(root, "a", "b", "l3"))
        try:
            got = fsutil.resolve(root, rel, follow_last=follow)
        except fsutil.Escape:
            return
        assert got == root or got.startswith(root + "/")
        assert os.path.normpath(got) == got
        # with every link followed, the real path of an existing result is inside the root as well
        if follow and os.path.exists(got):
            assert os.path.realpath(got) == root or os.path.realpath(got).startswith(os.path.realpath(root) + "/")


def test_write_file_replaces_symlink_never_follows(tmp_path: Path) -> None:
    victim = _w(tmp_path, "outside/victim", "keep\n")
    (tmp_path / "img/etc").mkdir(parents=True)
    link = tmp_path / "img/etc/x"
    os.symlink(str(victim), link)
    fsutil.write_file(str(link), b"new\n", 0o600)
    assert victim.read_text() == "keep\n"
    assert not link.is_symlink() and link.read_text() == "new\n"
    assert stat.S_IMODE(os.lstat(link).st_mode) == 0o600
    assert os.listdir(tmp_path / "img/etc") == ["x"]


def test_read_file_does_not_follow_symlinks(tmp_path: Path) -> None:
    f = _w(tmp_path, "f", "data")
    os.symlink("f", tmp_path / "l")
    assert fsutil.read_file(str(f)) == b"data"
    assert fsutil.read_file(str(tmp_path / "l")) is None
    assert fsutil.read_file(str(tmp_path / "missing")) is None
    assert fsutil.read_file(str(tmp_path)) is None


def test_remove_does_not_follow_symlinks(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    _w(keep, "file", "x")
    (tmp_path / "tree").mkdir()
    os.symlink(str(keep), tmp_path / "tree/link")
    fsutil.remove(str(tmp_path / "tree/link"))
    assert (keep / "file").exists()
    os.symlink(str(keep), tmp_path / "tree/link2")
    fsutil.remove(str(tmp_path / "tree"))
    assert not os.path.lexists(tmp_path / "tree") and (keep / "file").exists()
    fsutil.remove(str(tmp_path / "tree"))  # absent: fine


def test_dev_console_and_null_made_and_repaired(img: Path) -> None:
    """openQRM's linuxrc mounts a tmpfs over an image's /dev that lacks console or null (and systemd then
    waits 90 s for its serial console): preparation makes both, and replaces what stands in their place."""
    _w(img, "dev/null", "a file, not a device\n")
    assert found(img, Options("img1", node_init=NODE_INIT), only=["dirs"]) == sorted([
        ("dirs", "/proc", "not empty (1 entries)"), ("dirs", "/sys", "missing"),
        ("dirs", "/run", "not empty (1 entries)"), ("dirs", "/tmp", "mode 0755, want 1777"),
        ("dirs", "/mnt/floppy", "missing"), ("dirs", "/mnt/cdrom", "missing"),
        ("dirs", "/dev/console", "missing"),
        ("dirs", "/dev/null", "not the character device 1:3 with mode 0666")])
    steps.apply(str(img), Options("img1", node_init=NODE_INIT))
    for rel, dev, perm in (("dev/console", (5, 1), 0o600), ("dev/null", (1, 3), 0o666)):
        st = os.lstat(img / rel)
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == dev, rel
        assert stat.S_IMODE(st.st_mode) == perm, rel
    assert found(img, Options("img1", node_init=NODE_INIT), only=["dirs"]) == []


def test_a_sysv_image_gets_no_dev_nodes(tmp_path: Path) -> None:
    """Without systemd nothing mounts a devtmpfs: openQRM's linuxrc's tmpfs copy of its initrd's /dev is the /dev
    a SysV node runs with, and console and null in the image would stop linuxrc from making it."""
    root = tmp_path / "sysv"
    for d in ("dev", "etc"):
        (root / d).mkdir(parents=True)
    _w(root, "etc/inittab", "id:3:initdefault:\n")
    assert not [f for f in found(root, Options("img1", node_init=NODE_INIT), only=["dirs"]) if f[1].startswith("/dev/")]


def test_makedirs_exact_mode(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        fsutil.makedirs(str(tmp_path / "t"), 0o1777)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(tmp_path / "t").st_mode) == 0o1777


def test_container_markers_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "img"
    _w(root, ".dockerenv", "")
    _w(root, "etc/hostname", "h\n")
    assert found(root, Options("i"), ["container"]) == [
        ("container", "/.dockerenv", "makes systemd believe it runs in a container")]
    steps.apply(str(root), Options("i"))
    assert not (root / ".dockerenv").exists() and found(root, Options("i"), ["container"]) == []


@pytest.mark.parametrize(("opts", "wanted"), [
    (Options("i", keep_network=True), False),             # keys kept: nothing to regenerate
    (Options("i", keep_network=False), True),             # --remove-network removed them
    (Options("i", keep_network=True, shared=True), True),  # shared: qrmfs-init's per-node keys come first
])
def test_host_keygen_unit_where_keys_are_removed(tmp_path: Path, opts: Options, wanted: bool) -> None:
    root = tmp_path / "img"
    _w(root, "lib/systemd/systemd", "", 0o755)
    _w(root, "etc/ssh/sshd_config", "PermitRootLogin no\n")
    _w(root, "etc/ssh/ssh_host_ed25519_key", "secret\n", 0o600)
    steps.apply(str(root), opts)
    unit = root / "etc/systemd/system" / steps.HOSTKEY_UNIT
    link = root / "etc/systemd/system/multi-user.target.wants" / steps.HOSTKEY_UNIT
    assert unit.is_file() is wanted and link.is_symlink() is wanted
    assert (root / "etc/ssh/ssh_host_ed25519_key").exists() is not wanted
    if wanted:
        assert "ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key" in unit.read_text()
        assert os.readlink(link) == f"/etc/systemd/system/{steps.HOSTKEY_UNIT}"
        assert found(root, opts, ["host-keygen", "host-keys"]) == []


# --- private directories qrmfs-init would skip (issue 10, item 10) -----------------------------------------

def test_validate_flags_a_node_conf_path_qrmfs_init_would_skip(img: Path) -> None:
    """An image made before the rule (or a hand-edited node.conf): the options come from its manifest."""
    opts = Options("img1", private_add=["/srv/a:b", "/var/lib/ünï"], node_init=NODE_INIT)
    steps.apply(str(img), opts)  # what an older qrmfs did
    got = [(f.path, f.problem, f.fix) for f in check_only(str(img), opts, ["node-init"])]
    why = ": qrmfs-init skips it at boot, so all nodes would share it (recreate the image with a valid --private-add)"
    assert got == [
        ("/srv/a:b", "private directory has characters other than ASCII letters, digits and '_./+@-' (':')" + why,
         None),
        ("/var/lib/ünï", "private directory has characters other than ASCII letters, digits and '_./+@-' "
                         "('ï', 'ü')" + why, None)]


def test_validate_flags_what_node_conf_says_even_when_the_manifest_differs(img: Path) -> None:
    opts = Options("img1", private_add=["/var/lib/app"], node_init=NODE_INIT)
    steps.apply(str(img), opts)
    conf = img / "etc/qrmfs/node.conf"
    conf.write_text(conf.read_text().replace("QRMFS_PRIVATE='/var/lib/app'",
                                             "QRMFS_PRIVATE='/var/lib/app /srv/x y /.qrmfs/nodes'"))
    flagged = {f.path for f in check_only(str(img), opts, ["node-init"]) if f.fix is None}
    assert flagged == {"y", "/.qrmfs/nodes"}  # split on white space as qrmfs-init splits it; /srv/x is bound


@pytest.mark.parametrize(("path", "problem"), [
    ("/var/lib/app", None), ("/var/lib/app/", None), ("/srv/a+b@c_d.e-f", None), ("/srv//x", None),
    ("var/lib", "is not an absolute path"), ("", "is not an absolute path"), ("/", "is not an absolute path"),
    ("/srv/a:b", "has characters other than"), ("/srv/a b", "has characters other than"),
    ("/srv/*", "has characters other than"), ("/.qrmfs", "cannot be per node"),
    ("/.qrmfs/nodes/1", "cannot be per node"), ("/proc/x", "cannot be per node"), ("//", "cannot be per node"),
    ("/srv/../etc", "has a '.' or '..' component"), ("/srv/.", "has a '.' or '..' component"),
    ("/srv/.hidden", None),
])
def test_private_dir_problem(path: str, problem: str | None) -> None:
    got = steps.private_dir_problem(path)
    assert (got is None) if problem is None else (got is not None and got.startswith(problem)), got


def test_host_keygen_on_sysv_is_an_init_script_that_runs_before_ssh(tmp_path: Path) -> None:
    """A SysV image (no systemd) whose keys were removed: Debian's ssh script will not start without keys."""
    root = tmp_path / "img"
    _w(root, "etc/inittab", "id:2:initdefault:\n")
    _w(root, "etc/ssh/sshd_config", "PermitRootLogin no\n")
    _w(root, "etc/ssh/ssh_host_ed25519_key", "secret\n", 0o600)
    _w(root, "etc/init.d/ssh", "#!/bin/sh\n", 0o755)
    _w(root, "etc/init.d/.depend.start", "TARGETS = killprocs rsync ssh single rc.local\nINTERACTIVE =\n"
                                         "single: killprocs\nrc.local: rsync ssh\n")
    for level in "2345":
        (root / f"etc/rc{level}.d").mkdir(parents=True)
        os.symlink("../init.d/ssh", root / f"etc/rc{level}.d/S01ssh")
    opts = Options("i", keep_network=False)
    steps.apply(str(root), opts)
    script = root / "etc/init.d" / steps.HOSTKEY_SYSV
    assert script.read_text() == steps.HOSTKEY_SYSV_TEXT and os.access(script, os.X_OK)
    for level in "2345":
        link = root / f"etc/rc{level}.d/S01{steps.HOSTKEY_SYSV}"
        assert os.readlink(link) == f"../init.d/{steps.HOSTKEY_SYSV}"
        # CONCURRENCY=none runs S links in name order: ours before S01ssh
        assert sorted(os.listdir(root / f"etc/rc{level}.d")) == [link.name, "S01ssh"]
    depend = (root / "etc/init.d/.depend.start").read_text().splitlines()
    assert depend[0].split() == ["TARGETS", "=", "killprocs", "rsync", "ssh", "single", "rc.local",
                                 steps.HOSTKEY_SYSV]
    assert f"ssh: {steps.HOSTKEY_SYSV}" in depend
    assert not (root / "etc/ssh/ssh_host_ed25519_key").exists()
    assert not (root / "etc/systemd/system" / steps.HOSTKEY_UNIT).exists()
    assert found(root, opts, ["host-keygen", "host-keys"]) == []
    assert steps.depend_start_with_hostkeys("\n".join(depend) + "\n") == "\n".join(depend) + "\n"


@pytest.mark.parametrize(("ganesha", "nfsd", "names"), [
    (None, None, False),                                                    # neither server here
    ("NFSV4 {\n    Graceless = true;\n}\n", None, True),                     # ganesha's default: names
    ("NFSV4 { Only_Numeric_Owners = true; }\n", None, False),
    ("NFSV4 {\n  # Only_Numeric_Owners = true;\n}\n", None, True),          # a comment does not count
    ("NFSV4 { only_numeric_owners = FALSE; }\n", None, True),
    (None, "Y\n", False),                                                   # kernel nfsd's default
    (None, "N\n", True),
])
def test_owner_names_from_the_storage_servers_settings(ganesha, nfsd, names) -> None:
    assert (steps.owner_names_sent(ganesha, nfsd) is not None) is names


def test_owners_step_warns_when_the_server_maps_owners_away(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "img"
    _w(root, "etc/hostname", "h\n")
    conf = tmp_path / "ganesha.conf"
    monkeypatch.setitem(steps.NFS_SERVER_FILES, "ganesha", str(conf))
    monkeypatch.setitem(steps.NFS_SERVER_FILES, "nfsd", str(tmp_path / "no-nfsd"))
    conf.write_text("NFSV4 { Graceless = true; }\n")
    got = check_only(str(root), Options("i"), ["owners"])
    assert len(got) == 1 and got[0].fix is None and "Only_Numeric_Owners" in got[0].problem
    assert "no NFSv4 ID mapper" in got[0].problem
    conf.write_text("NFSV4 { Graceless = true; Only_Numeric_Owners = true; }\n")
    assert check_only(str(root), Options("i"), ["owners"]) == []


def test_prepare_walks_once_and_counts_the_prepared_tree(img: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One whole-tree walk for the preparation (sockets and counts), after the path checks: its counts are
    those of a separate walk of the prepared tree."""
    walks: list[str] = []
    real = steps.walk_tree

    def counting(top: str, count: bool = True) -> fsutil.Walk:
        walks.append(top)
        return real(top, count)
    monkeypatch.setattr(steps, "walk_tree", counting)
    fixed, left, counts = steps.prepare(str(img), Options("img1", node_init=NODE_INIT))
    assert walks == [str(img)]
    assert ("sockets", "/var/lib/app/agent.sock") in [(f.step, f.path) for f in fixed]
    assert not [f for f in left if f.fixable]
    w = real(str(img))
    assert counts == (w.files, w.bytes) and w.sockets == []
    walks.clear()
    steps.check(str(img), Options("img1", node_init=NODE_INIT))
    assert walks == [str(img)]


def test_walk_tree_counts_and_finds_sockets(tmp_path: Path) -> None:
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "a/f").write_bytes(b"x" * 10000)
    os.link(tmp_path / "a/f", tmp_path / "a/b/hard")
    (tmp_path / "a/l").symlink_to("f")
    (tmp_path / "run").mkdir()
    for p in ("a/b/s.sock", "run/ignored.sock"):
        sk = socket.socket(socket.AF_UNIX)
        sk.bind(str(tmp_path / p))
        sk.close()
    w = fsutil.walk_tree(str(tmp_path))
    assert w.files == 8 and w.sockets == [str(tmp_path / "a/b/s.sock")]
    assert w.bytes == sum(os.lstat(tmp_path / p).st_blocks * 512 for p in ("a", "a/b", "a/f", "a/l", "run",
                                                                           "a/b/s.sock", "run/ignored.sock"))
    quick = fsutil.walk_tree(str(tmp_path), count=False)
    assert (quick.files, quick.bytes, quick.sockets) == (0, 0, w.sockets)


def test_the_counting_walk_in_two_processes_counts_what_one_walk_counts(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """walk_tree shares the directories out between this process and a forked one: a file hard-linked from
    directories of both shares is counted once, as one walk counts it."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    (tmp_path / "f").write_bytes(b"y" * 50000)
    for i in range(30):
        d = tmp_path / f"d{i}" / "s"
        d.mkdir(parents=True)
        os.link(tmp_path / "f", d / "hard")
        (d / "own").write_bytes(b"z" * (1000 * i))
    one = fsutil._walk(fsutil._walk_share(str(tmp_path), True, 0, 1))
    shares = [fsutil._walk_share(str(tmp_path), True, k, 2) for k in (0, 1)]
    assert all(s["linked"] for s in shares)  # the linked file is seen from both shares' directories
    w = fsutil.walk_tree(str(tmp_path))
    assert (w.files, w.bytes, w.sockets) == (one.files, one.bytes, one.sockets)
    assert w.files == 1 + 30 * 4
    assert w.bytes == sum(os.lstat(p).st_blocks * 512 for p in [tmp_path / "f", *(
        tmp_path / f"d{i}" / x for i in range(30) for x in ("", "s", "s/own"))])


def test_a_failure_in_the_forked_walker_is_raised_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # two cores, whatever runs the test

    def work(share: int, shares: int) -> dict[str, int]:
        if share == 1:
            raise PermissionError("denied below /x")
        return {"new": 1}

    with pytest.raises(OSError, match="PermissionError: denied below /x"):
        fsutil.in_two(work)
    assert fsutil.in_two(lambda share, shares: share + 1) == [1, 2]


def test_an_oserror_of_the_forked_walker_is_raised_as_one_process_raises_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent answers an OSError with its strerror and path: from the child, both come through."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})

    def work(share: int, shares: int) -> int:
        if share == 1:
            os.lstat("/nonexistent/qrmfs-walker-test")
        return 0

    with pytest.raises(FileNotFoundError) as e:
        fsutil.in_two(work)
    assert (e.value.errno, e.value.filename) == (2, "/nonexistent/qrmfs-walker-test")
