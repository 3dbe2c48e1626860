"""The lab boot kit's pure parts, and qrmfs-init's node-id, hostname, machine-id and seeding logic run in a
fake root. No docker, no QEMU, no mounts."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab import boot
from lab.images import LabError

REPO = Path(__file__).resolve().parents[2]
QRMFS_INIT = REPO / "qrmfs" / "data" / "qrmfs-init"
BOOTKIT = REPO / "lab" / "bootkit"
SHELL_SCRIPTS = [QRMFS_INIT, BOOTKIT / "init", BOOTKIT / "probe.sh", BOOTKIT / "probe-sysv.sh",
                 BOOTKIT / "openqrm" / "openqrm-client"]

INFO = {"hosts": {"storage": {"address": "172.30.0.2", "export_root": "/exports"}}}


# --- kernel and initramfs -------------------------------------------------------------------------------

def test_kernel_package_from_apt_cache_depends():
    out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"
    assert boot.parse_kernel_depends(out) == "linux-image-6.1.0-56-amd64"
    assert boot.parse_kernel_depends("linux-image-amd64\n  Depends: <none>\n") is None
    assert boot.parse_kernel_depends("") is None


MODULES_DEP = """\
kernel/fs/nfs_common/grace.ko:
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/nfs/nfs.ko: kernel/fs/lockd/lockd.ko kernel/fs/nfs_common/grace.ko kernel/net/sunrpc/sunrpc.ko \
kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/fs/nfs/nfsv4.ko: kernel/net/dns_resolver/dns_resolver.ko kernel/fs/nfs/nfs.ko kernel/fs/lockd/lockd.ko \
kernel/fs/nfs_common/grace.ko kernel/net/sunrpc/sunrpc.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/fs/lockd/lockd.ko: kernel/fs/nfs_common/grace.ko kernel/net/sunrpc/sunrpc.ko
kernel/net/sunrpc/sunrpc.ko:
kernel/net/dns_resolver/dns_resolver.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
"""


def test_module_order_puts_every_dependency_first():
    order = boot.module_load_order(MODULES_DEP, ["virtio-net", "nfsv4", "fscache"])
    assert len(order) == len(set(order))
    deps = {line.split(":")[0]: line.split(":")[1].split() for line in MODULES_DEP.splitlines()}
    for i, mod in enumerate(order):
        for dep in deps[mod]:
            assert order.index(dep) < i, f"{dep} must come before {mod}"
    assert order.index("kernel/fs/netfs/netfs.ko") < order.index("kernel/fs/fscache/fscache.ko")
    assert order[-1] == "kernel/fs/nfs/nfsv4.ko" or "fscache" in order[-1]


def test_module_order_skips_builtins_and_refuses_unknown_modules():
    assert boot.module_load_order(MODULES_DEP, ["e1000"], builtin="kernel/drivers/net/e1000.ko\n") == []
    with pytest.raises(LabError, match="e1000"):
        boot.module_load_order(MODULES_DEP, ["e1000"])


def test_bootkit_module_list_names_the_nfs_client_and_a_nic():
    mods = boot.read_module_list((BOOTKIT / "modules.txt").read_text())
    assert {"nfsv4", "sunrpc", "netfs", "fscache", "virtio_net", "e1000"} <= set(mods)
    assert mods.index("netfs") < mods.index("fscache")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio")
def test_per_boot_archive_is_a_newc_cpio_the_tools_read(tmp_path):
    data = boot.per_boot_archive("echo hello\n")
    assert len(data) % 512 == 0
    listing = subprocess.run(["cpio", "-t", "-v", "--quiet"], input=data, capture_output=True, check=True)
    lines = listing.stdout.decode().splitlines()
    assert any(re.match(r"^c.*5,\s*1 .*dev/console$", ln) for ln in lines), lines
    assert any(ln.startswith("-rwxr-xr-x") and ln.endswith("etc/qrmfs-boot/test.sh") for ln in lines), lines
    out = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "etc/qrmfs-boot/test.sh"], input=data,
                         capture_output=True, check=True)
    assert out.stdout == b"echo hello\n"
    no_script = subprocess.run(["cpio", "-t", "--quiet"], input=boot.per_boot_archive(None),
                               capture_output=True, check=True)
    assert no_script.stdout.decode().split() == ["dev", "dev/console"]


def test_the_per_boot_archive_starts_on_a_boundary_the_kernel_looks_at():
    for size in (1, 3, 511, 512, 2378851):
        initrd = boot.assemble_initrd(b"\x1f\x8b" + b"x" * (size - 2) if size > 1 else b"\x1f", b"070701")
        start = initrd.index(b"070701")
        assert start % 512 == 0 and start >= size
        assert set(initrd[size:start]) <= {0}


# --- command lines ---------------------------------------------------------------------------------------

def test_kernel_cmdline_carries_root_node_and_hostname():
    line = boot.kernel_cmdline("10.0.2.100", "/exports/img1", node_id=7, hostname="web-7")
    args = line.split()
    assert "console=ttyS0,115200" in args
    assert "qrmfs.root=10.0.2.100:/exports/img1" in args
    assert "qrmfs.nfsopts=vers=4.1,port=2049" in args
    assert "qrmfs.node=7" in args and "qrmfs.hostname=web-7" in args
    assert not any(a.startswith("qrmfs.node=") for a in boot.kernel_cmdline("a", "/exports/x").split())


@pytest.mark.parametrize("bad", ["", "a b", "x/y", "n;reboot", "ä"])
def test_kernel_cmdline_refuses_bad_node_ids(bad):
    with pytest.raises(LabError):
        boot.kernel_cmdline("10.0.2.100", "/exports/img1", node_id=bad)


def test_kernel_cmdline_refuses_bad_paths_and_hostnames():
    with pytest.raises(LabError):
        boot.kernel_cmdline("10.0.2.100", "exports/img1")
    with pytest.raises(LabError):
        boot.kernel_cmdline("10.0.2.100", "/exports/a b")
    with pytest.raises(LabError):
        boot.kernel_cmdline("10.0.2.100", "/exports/img1", hostname="-bad")


def test_node_mac_and_uuid_are_stable_and_distinct():
    assert boot.node_mac(None) == boot.DEFAULT_MAC
    assert boot.node_mac(1) == boot.node_mac("1") != boot.node_mac(2)
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", boot.node_mac("node-a"))
    assert boot.node_uuid(1) == boot.node_uuid("1") != boot.node_uuid(2)


def test_kernel_cmdline_mounts_as_openqrm_does_on_request():
    assert "qrmfs.nfstype=nfs4" in boot.kernel_cmdline("10.0.2.100", "/exports/img1").split()
    args = boot.kernel_cmdline("10.0.2.100", "/exports/img1", mount="openqrm").split()
    assert "qrmfs.nfstype=nfs" in args and "qrmfs.nfsopts=rw,nolock" in args  # root-mount.nfs-deployment's mount


def test_qemu_argv_is_tcg_with_isolated_network_and_one_way_to_nfs():
    argv = boot.qemu_argv("/k/vmlinuz", "/k/initrd", "console=ttyS0", "172.30.0.2", mac="52:54:00:aa:bb:cc",
                          machine_uuid=boot.node_uuid(1), memory=1024, smp=2)
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-kernel") + 1] == "/k/vmlinuz" and argv[argv.index("-initrd") + 1] == "/k/initrd"
    assert argv[argv.index("-append") + 1] == "console=ttyS0"
    assert "-no-reboot" in argv and argv[argv.index("-uuid") + 1] == boot.node_uuid(1)
    netdev = argv[argv.index("-netdev") + 1]
    assert "restrict=on" in netdev.split(",")
    # NFS, and for NFSv3 rpcbind and the mount protocol's fixed port: each relayed to the same port of the storage
    forwards = [p for p in netdev.split(",") if p.startswith("guestfwd=")]
    assert [f.split("-cmd:")[0] for f in forwards] == [f"guestfwd=tcp:{boot.NFS_GUEST_ADDR}:{port}"
                                                       for port in (2049, 111, 20048)]
    assert [f.split()[-2:] for f in forwards] == [["172.30.0.2", "2049"], ["172.30.0.2", "111"],
                                                  ["172.30.0.2", "20048"]]
    assert "mac=52:54:00:aa:bb:cc" in argv[argv.index("-device") + 1]


def test_relay_command_refuses_paths_qemu_would_split(monkeypatch):
    with pytest.raises(LabError):
        boot.relay_command("172.30.0.2", python="/opt/my python/bin/python3")


def test_parse_target_accepts_the_storage_only():
    assert boot.parse_target("storage:/exports/img1", INFO) == "/exports/img1"
    assert boot.parse_target("172.30.0.2:/exports/img1/", INFO) == "/exports/img1"
    assert boot.parse_target("storage:img1", INFO) == "/exports/img1"
    assert boot.parse_target("img1", INFO) == "/exports/img1"
    for bad in ("source:/exports/img1", "10.0.0.1:/exports/img1", "storage:/etc", "storage:/exports",
                "storage:/exports/../etc", "storage:/exports/a/../../etc"):
        with pytest.raises(LabError):
            boot.parse_target(bad, INFO)


# --- the serial console ----------------------------------------------------------------------------------

SERIAL = """\
[    2.4] Run /init as init process\r
QRMFS-BOOT initramfs 6.1.0-56-amd64 root=10.0.2.100:/exports/img1\r
QRMFS-BOOT mounted 10.0.2.100:/exports/img1\r
QRMFS-BOOT switch_root /sbin/qrmfs-init\r
qrmfs-init: node 1 (image img1, state in /.qrmfs/nodes/1)\r
lab-source login: QRMFS-PROBE reached multi-user.target uptime=15.65\r
QRMFS-PROBE state=degraded uptime=16.01\r
QRMFS-PROBE failed-unit dev-mqueue.mount\r
QRMFS-PROBE failed-unit ssh.service\r
QRMFS-PROBE script-begin\r
QRMFS-OUT machine-id=abc\r
QRMFS-OUT \r
[   17.1] random kernel line\r
QRMFS-OUT  indented QRMFS-PROBE done\r
QRMFS-PROBE script-end rc=3\r
QRMFS-PROBE done\r
"""


def test_parse_serial_reads_the_probe_markers():
    r = boot.parse_serial(SERIAL)
    assert r.mounted and r.switched_to == "/sbin/qrmfs-init" and r.fatal is None
    assert r.reached and r.uptime == 15.65 and r.system_state == "degraded"
    assert r.failed_units == ["dev-mqueue.mount", "ssh.service"]
    assert r.script_lines == ["machine-id=abc", "", " indented QRMFS-PROBE done"]
    assert r.script_rc == 3 and r.done


def test_parse_serial_notices_an_initramfs_the_kernel_could_not_unpack():
    r = boot.parse_serial("[    1.3] Initramfs unpacking failed: invalid magic at start of compressed archive\n")
    assert r.unpack_error == "invalid magic at start of compressed archive"


def test_parse_serial_reports_a_fatal_initramfs_error_and_partial_boots():
    r = boot.parse_serial("QRMFS-BOOT FATAL cannot mount 10.0.2.100:/exports/x (-o vers=4.1)\n")
    assert r.fatal == "cannot mount 10.0.2.100:/exports/x (-o vers=4.1)" and not r.reached
    r = boot.parse_serial("QRMFS-BOOT mounted x\nQRMFS-BOOT switch_root /sbin/init\n")
    assert r.mounted and r.switched_to == "/sbin/init" and not r.reached and not r.done


# --- the guestfwd relay ----------------------------------------------------------------------------------

def test_relay_copies_both_ways_and_prints_nothing_into_the_stream():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data.upper())

    threading.Thread(target=echo, daemon=True).start()
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, str(BOOTKIT / "relay.py"), "127.0.0.1", str(port)],
                            stdin=theirs, stdout=theirs, stderr=theirs)
    theirs.close()
    try:
        ours.settimeout(10)
        ours.sendall(b"nfs call")
        got = b""
        while len(got) < 8:
            got += ours.recv(100)
        assert got == b"NFS CALL"
        ours.shutdown(socket.SHUT_WR)
        assert proc.wait(timeout=10) == 0
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
        server.close()


def test_relay_exits_quietly_when_the_server_is_away():
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    ours, theirs = socket.socketpair()
    proc = subprocess.run([sys.executable, str(BOOTKIT / "relay.py"), "127.0.0.1", str(port)],
                          stdin=theirs, stdout=theirs, stderr=theirs, timeout=30)
    theirs.close()
    ours.settimeout(5)
    assert proc.returncode == 1
    assert ours.recv(100) == b""  # no diagnostics injected into the guest's connection
    ours.close()


# --- shell scripts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    shell = "busybox" if script.name == "init" and shutil.which("busybox") else "sh"
    argv = [shell, "sh", "-n", str(script)] if shell == "busybox" else ["sh", "-n", str(script)]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script):
    r = subprocess.run(["shellcheck", "-s", "sh", "-S", "warning", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_qrmfs_init_is_executable_posix_sh():
    assert os.access(QRMFS_INIT, os.X_OK)
    assert QRMFS_INIT.read_text().splitlines()[0] == "#!/bin/sh"
    if shutil.which("dash"):
        r = subprocess.run(["dash", "-n", str(QRMFS_INIT)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


# --- qrmfs-init in a fake root ----------------------------------------------------------------------------

class FakeRoot:
    """A directory standing in for the node: a kernel command line, /sys/class/net, a console file."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.net = base / "sys-class-net"
        self.console = base / "console"
        self.cmdline = base / "cmdline"
        for d in (self.root / "etc" / "qrmfs", self.net):
            d.mkdir(parents=True)
        self.console.write_text("")
        self.set_cmdline("")

    def set_cmdline(self, text: str) -> None:
        self.cmdline.write_text(text + "\n")

    def add_nic(self, name: str, mac: str) -> None:
        (self.net / name).mkdir()
        (self.net / name / "address").write_text(mac + "\n")

    def conf(self, **values: str) -> None:
        text = "".join(f"QRMFS_{k.upper()}='{v}'\n" for k, v in values.items())
        (self.root / "etc" / "qrmfs" / "node.conf").write_text(text)

    def env(self) -> dict[str, str]:
        return {**os.environ, "QRMFS_INIT_SOURCED": "1", "QRMFS_ROOT": str(self.root),
                "QRMFS_CMDLINE_FILE": str(self.cmdline), "QRMFS_SYS_NET": str(self.net),
                "QRMFS_CONSOLE": str(self.console), "QRMFS_KMSG": str(self.base / "no-kmsg")}

    def run(self, snippet: str) -> subprocess.CompletedProcess[str]:
        """Run `snippet` in sh after sourcing qrmfs-init's functions (main is not run)."""
        return subprocess.run(["sh", "-c", f'. "$1"; {snippet}', "sh", str(QRMFS_INIT)], env=self.env(),
                              capture_output=True, text=True, timeout=60)

    @property
    def said(self) -> str:
        return self.console.read_text()


@pytest.fixture
def fake(tmp_path: Path) -> FakeRoot:
    return FakeRoot(tmp_path)


def test_node_id_comes_from_the_kernel_command_line(fake):
    fake.set_cmdline("console=ttyS0 qrmfs.node=web_7-a quiet")
    fake.add_nic("eth0", "52:54:00:12:34:56")
    r = fake.run("node_id")
    assert r.returncode == 0 and r.stdout == "web_7-a"


def test_an_invalid_node_id_on_the_command_line_is_refused_not_replaced(fake):
    fake.set_cmdline("qrmfs.node=../../etc")
    fake.add_nic("eth0", "52:54:00:12:34:56")
    r = fake.run("node_id")
    assert r.returncode != 0 and r.stdout == ""
    assert "qrmfs.node=../../etc is not a valid node id" in fake.said


def test_node_id_falls_back_to_the_first_real_mac(fake):
    fake.add_nic("lo", "00:00:00:00:00:00")
    fake.add_nic("dummy0", "00:00:00:00:00:00")
    fake.add_nic("eth1", "52:54:00:AA:BB:02")
    fake.add_nic("eth0", "52:54:00:AA:BB:01")
    r = fake.run("node_id")
    assert r.returncode == 0 and r.stdout == "525400aabb01"
    assert "using the MAC address 525400aabb01 as the node id" in fake.said


def test_without_any_node_id_nothing_per_node_happens_and_the_console_says_so(fake):
    fake.add_nic("lo", "00:00:00:00:00:00")
    r = fake.run("node_id")
    assert r.returncode != 0 and r.stdout == ""
    assert "no node id" in fake.said and "NOT set up" in fake.said
    assert all(line.startswith("qrmfs-init: ") for line in fake.said.splitlines())


@pytest.mark.parametrize(("cmdline", "conf", "node", "expected"), [
    ("", {"image": "img1", "hostname": ""}, "7", "img1-7"),
    ("", {"image": "img1", "hostname": "web"}, "7", "web-7"),
    ("qrmfs.hostname=front-door", {"image": "img1", "hostname": "web"}, "7", "front-door"),
    ("", {"image": "my_image", "hostname": ""}, "node_2", "my-image-node-2"),
    ("", {"image": "", "hostname": ""}, "3", "qrmfs-3"),
    ("", {"image": "img", "hostname": "-x.lab."}, "525400aabb01", "x.lab-525400aabb01"),
    ("", {"image": "img", "hostname": "h" * 80}, "12", "h" * 60 + "-12"),
])
def test_node_hostname(fake, cmdline, conf, node, expected):
    fake.set_cmdline(cmdline)
    fake.conf(**conf)
    r = fake.run(f"load_conf && node_hostname {node}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected
    assert len(r.stdout) <= 63


def test_machine_id_is_made_once_per_node_and_replaced_when_invalid(fake):
    node = fake.base / "node"
    node.mkdir()
    first = fake.run(f'ensure_machine_id "{node}"')
    assert first.returncode == 0 and re.fullmatch(r"[0-9a-f]{32}", first.stdout)
    assert (node / "machine-id").read_text() == first.stdout + "\n"
    again = fake.run(f'ensure_machine_id "{node}"')
    assert again.stdout == first.stdout
    other = fake.base / "other"
    other.mkdir()
    assert fake.run(f'ensure_machine_id "{other}"').stdout != first.stdout
    (node / "machine-id").chmod(0o644)
    (node / "machine-id").write_text("uninitialized\n")
    fixed = fake.run(f'ensure_machine_id "{node}"')
    assert re.fullmatch(r"[0-9a-f]{32}", fixed.stdout) and fixed.stdout != first.stdout


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ("link:" + os.readlink(p)) if p.is_symlink() else ("dir" if p.is_dir() else p.read_text())
    return out


def test_seeding_copies_the_private_dir_without_the_excluded_content(fake):
    orig = fake.base / "image" / "var" / "lib" / "app"
    (orig / "global" / "deep").mkdir(parents=True)
    (orig / "global" / "deep" / "shared.txt").write_text("common")
    (orig / "cache" / "sub" / "keep").mkdir(parents=True)
    (orig / "cache" / "sub" / "keep" / "x").write_text("excluded too")
    (orig / "cache" / "sub" / "mine.txt").write_text("copied")
    (orig / "state.db").write_text("seed")
    (orig / ".hidden").write_text("dot")
    (orig / "link").symlink_to("state.db")
    (orig / "cache").chmod(0o750)
    dest = fake.base / "nodes" / "1" / "var" / "lib" / "app"
    r = fake.run(f'EXCL="global cache/sub/keep"; seed_private "{orig}" "{dest}"; echo rc=$?')
    assert r.stdout.strip().endswith("rc=0"), r.stdout + r.stderr
    assert _tree(dest) == {
        ".hidden": "dot", "cache": "dir", "cache/sub": "dir", "cache/sub/keep": "dir",
        "cache/sub/mine.txt": "copied", "global": "dir", "link": "link:state.db", "state.db": "seed"}
    assert (dest / "cache").stat().st_mode & 0o777 == 0o750
    assert not list(dest.parent.glob("*.qrmfs-seed"))
    # Seeding happens once: the node's changes survive, the image's later changes do not leak in.
    (dest / "state.db").write_text("node 1 was here")
    (orig / "new-in-image").write_text("later")
    fake.run(f'EXCL="global"; seed_private "{orig}" "{dest}"')
    assert (dest / "state.db").read_text() == "node 1 was here"
    assert not (dest / "new-in-image").exists()


def test_an_interrupted_seed_starts_over(fake):
    orig = fake.base / "image" / "home"
    orig.mkdir(parents=True)
    (orig / "f").write_text("x")
    dest = fake.base / "nodes" / "1" / "home"
    (dest.parent / "home.qrmfs-seed").mkdir(parents=True)
    (dest.parent / "home.qrmfs-seed" / "half").write_text("junk")
    fake.run(f'EXCL=""; seed_private "{orig}" "{dest}"')
    assert _tree(dest) == {"f": "x"}
    assert not (dest.parent / "home.qrmfs-seed").exists()


@pytest.mark.parametrize("path", ["/", "/proc", "/sys/fs", "/.qrmfs/nodes", "/run", "var/lib", "/a/../etc",
                                  "/var/*", "/srv/a b"])
def test_unsafe_private_paths_are_refused(fake, path):
    r = fake.run(f'check_private_path "{path}"')
    assert r.returncode != 0
    assert "skipped" in fake.said


def _run_main(fake: FakeRoot, cmdline: str) -> subprocess.CompletedProcess[str]:
    init = fake.base / "real-init"
    init.write_text('#!/bin/sh\necho "REAL INIT $# $*"\n')
    init.chmod(0o755)
    fake.set_cmdline(f"{cmdline} qrmfs.init={init}")
    env = {**fake.env(), "QRMFS_INIT_EXEC": "1"}
    del env["QRMFS_INIT_SOURCED"]
    return subprocess.run([str(QRMFS_INIT), "--system", "two words"], env=env, capture_output=True, text=True,
                          timeout=60)


def test_main_execs_the_real_init_with_our_arguments_even_when_node_conf_is_broken(fake):
    (fake.root / "etc" / "qrmfs" / "node.conf").write_text("QRMFS_PRIVATE='/var/lib/app\nif then fi (\n")
    r = _run_main(fake, "qrmfs.node=1")
    assert r.stdout == "REAL INIT 2 --system two words\n", r.stderr
    assert "set-up incomplete" in fake.said


def test_main_without_node_conf_just_execs_the_real_init(fake):
    r = _run_main(fake, "")
    assert r.stdout == "REAL INIT 2 --system two words\n"
    assert "no /etc/qrmfs/node.conf" in fake.said


def test_main_without_a_node_id_boots_on_with_a_clear_message(fake):
    fake.conf(image="img1", shared="yes", hostname="", private="/var/lib/app", private_exclude="")
    r = _run_main(fake, "")
    assert r.stdout == "REAL INIT 2 --system two words\n"
    assert "no node id" in fake.said and "set-up incomplete" in fake.said


def test_run_by_hand_it_sets_up_and_exits_without_starting_an_init(fake):
    init = fake.base / "real-init"
    init.write_text('#!/bin/sh\necho "REAL INIT"\n')
    init.chmod(0o755)
    fake.set_cmdline(f"qrmfs.init={init}")
    env = fake.env()
    del env["QRMFS_INIT_SOURCED"]
    r = subprocess.run([str(QRMFS_INIT)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "REAL INIT" not in r.stdout
    assert "no /etc/qrmfs/node.conf" in fake.said


# --- /sbin/init leads to qrmfs-init (issue 27): the distribution's init kept at DIST_INIT ------------------------

def _dist_init(fake: FakeRoot) -> Path:
    """The distribution's init where qrmfs keeps it in the fake root: a script that says how it was run."""
    init = fake.root / "usr" / "lib" / "qrmfs" / "init"
    init.parent.mkdir(parents=True)
    init.write_text('#!/bin/sh\necho "DIST INIT ${0##*/} $# $*"\n')
    init.chmod(0o755)
    return init


def test_qrmfs_init_keeps_the_distribution_init_where_the_preparation_puts_it():
    from qrmfs.agent import steps

    assert re.findall(r"^DIST_INIT=(\S+)$", QRMFS_INIT.read_text(), re.M) == [steps.DIST_INIT]


# These tests run qrmfs-init on this machine, whose state paths (/.qrmfs, the private directories, /etc) are not
# moved by QRMFS_ROOT: their root has no node.conf (every node.conf asks at least for the node's running record),
# so that nothing is set up.

def test_as_pid_1_it_starts_the_distribution_init_qrmfs_kept_with_its_arguments(fake):
    _dist_init(fake)
    env = {**fake.env(), "QRMFS_INIT_EXEC": "1"}
    del env["QRMFS_INIT_SOURCED"]
    r = subprocess.run([str(QRMFS_INIT), "--system", "two words"], env=env, capture_output=True, text=True,
                       timeout=60)
    # its name is `init` (PID 1's name; systemd run as a command acts as telinit only under such a name)
    assert r.stdout == "DIST INIT init 2 --system two words\n", r.stderr
    assert "qrmfs-init: set-up complete" in fake.said


@pytest.mark.parametrize("name", ["init", "telinit"])
def test_as_sbin_init_but_not_pid_1_it_hands_over_to_the_real_init_at_once(fake, tmp_path, name):
    """`init 6`, `telinit q`, SysV shutdown's `init 0`: the distribution's init does it (as telinit), with the same
    arguments, and nothing is said (a run by hand would set up and exit)."""
    _dist_init(fake)
    fake.conf(image="img1")
    link = tmp_path / "sbin" / name
    link.parent.mkdir()
    link.symlink_to(QRMFS_INIT)
    env = fake.env()
    del env["QRMFS_INIT_SOURCED"]
    r = subprocess.run([str(link), "6"], env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "DIST INIT init 1 6\n"), r.stderr
    assert fake.said == ""


def test_it_never_starts_itself_again(fake, tmp_path):
    kept = fake.root / "usr" / "lib" / "qrmfs" / "init"
    kept.parent.mkdir(parents=True)
    kept.symlink_to(QRMFS_INIT)  # a kept init that leads back here is not started
    r = fake.run(f'is_us "{kept}" && echo us; is_us /bin/sh || echo not-us; real_init')
    assert r.stdout == "us\nnot-us\n/sbin/init", r.stderr  # exec_init then tries /sbin/init only if it is not us


def test_a_glob_on_the_command_line_is_not_expanded(fake):
    fake.set_cmdline("qrmfs.node=* quiet")
    r = fake.run("cmdline_arg qrmfs.node")
    assert r.stdout == "*"


# --- judging a boot --------------------------------------------------------------------------------------

def _report(text: str) -> boot.SerialReport:
    return boot.parse_serial(text)


def test_judge_a_complete_boot_is_a_success():
    assert boot.judge(_report(SERIAL), timed_out=False, returncode=0, timeout=300, script_given=True) == (
        "multi-user.target", None)


@pytest.mark.parametrize(("text", "kw", "state", "error"), [
    ("QRMFS-PROBE reached multi-user.target uptime=9\n", {"timed_out": True}, "multi-user.target",
     "the probe did not finish"),
    ("QRMFS-PROBE reached multi-user.target uptime=9\nQRMFS-PROBE script-begin\n", {"timed_out": True},
     "multi-user.target", "the test script did not finish"),
    ("QRMFS-PROBE reached multi-user.target uptime=9\nQRMFS-PROBE done\n", {"script_given": True},
     "multi-user.target", "the test script did not run"),
    ("Initramfs unpacking failed: invalid magic\nQRMFS-PROBE reached multi-user.target uptime=9\n"
     "QRMFS-PROBE done\n", {"script_given": True}, "multi-user.target", "could not unpack the initramfs"),
    ("QRMFS-PROBE reached multi-user.target uptime=9\nQRMFS-PROBE done\n",
     {"clean_poweroff": True, "clean_shutdown": False}, "multi-user.target", "orderly shutdown did not finish"),
    ("QRMFS-PROBE reached multi-user.target uptime=9\n", {"returncode": 1}, "multi-user.target",
     "before the probe finished"),
    ("QRMFS-BOOT FATAL cannot mount x\n", {}, "initramfs: cannot mount x", "the initramfs gave up"),
    ("QRMFS-BOOT mounted x\n", {"timed_out": True}, "timeout", "after mounting the NFS root"),
    ("", {"timed_out": True}, "timeout", "before the NFS root was mounted"),
    ("", {"returncode": 1, "qemu_err": "qemu: could not load kernel"}, "qemu exited (1)",
     "could not load kernel"),
])
def test_judge_failures(text, kw, state, error):
    args = {"timed_out": False, "returncode": 0, "timeout": 300, **kw}
    got_state, got_error = boot.judge(_report(text), **args)
    assert got_state == state
    assert got_error is not None and error in got_error


def test_log_tail_drops_colour_codes(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"one\r\n[\x1b[0;32m  OK  \x1b[0m] Reached target\r\n" + b"x\n" * 50)
    assert boot._tail(log, 52).splitlines()[:2] == ["one", "[  OK  ] Reached target"]
    assert boot._tail(tmp_path / "missing.log") == ""


def test_visibility_probe_lists_the_image_root_and_wants_etc_as_a_directory() -> None:
    listing = ("drwxr-xr-x  2     0     0         4096 etc\n"
               "lrwxrwxrwx  1     0     0            8 sbin\n")
    assert boot.visible_in_listing(listing)
    assert not boot.visible_in_listing("lrwxrwxrwx  1     0     0            8 etc\n")
    assert not boot.visible_in_listing("drwxr-xr-x  2     0     0         4096 etcetera\n")
    assert not boot.visible_in_listing("")


# --- one private-dir rule for qrmfs and qrmfs-init (issue 10, item 10) ---------------------------------------

def test_qrmfs_init_carries_the_one_private_dir_rule():
    from qrmfs.agent import steps

    text = QRMFS_INIT.read_text()
    assert re.findall(r"^PRIVATE_DIR_CHARS='([^']*)'$", text, re.M) == [steps.PRIVATE_DIR_CHARS]
    # every character class about private paths uses it: no second copy of the rule in the script
    assert text.count("[!$PRIVATE_DIR_CHARS]") == 3
    assert "A-Za-z0-9._+@/-" not in text and "A-Za-z0-9_./+@-]" not in text


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from("/ab.:_-+@ü*\\'\"$`;~%!#Z9q"), max_size=14).map(lambda s: "/" + s)
       | st.text(max_size=10))
def test_qrmfs_init_skips_exactly_what_qrmfs_refuses(path):
    """check_private_path in the real script, run by sh, against steps.private_dir_problem."""
    from qrmfs.agent import steps

    if "\x00" in path or any(c.isspace() for c in path):
        return  # qrmfs-init never sees these: it splits node.conf's list on white space first
    r = subprocess.run(["sh", "-c", '. "$1"; p="$2"; check_private_path "${p%/}"', "sh", str(QRMFS_INIT), path],
                       env={**os.environ, "LC_ALL": "C", "QRMFS_INIT_SOURCED": "1", "QRMFS_CONSOLE": "/dev/null",
                            "QRMFS_KMSG": "/dev/null"}, capture_output=True, timeout=30)
    assert (r.returncode == 0) == (steps.private_dir_problem(path) is None), (path, r.returncode)


# --- hiding the other nodes' state (issue 10, item 11) ------------------------------------------------------

def _can_unshare() -> bool:
    import shutil

    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare -m (a private mount namespace)")
def test_hide_nodes_covers_every_nodes_state_and_keeps_the_own_reachable(fake):
    """Real mounts, in a private mount namespace: the node's private dir bound from its state, then
    hide_nodes. Other nodes' keys vanish, the tmpfs is read-only, the node's own files stay where they are
    bound and at /.qrmfs/node; a second run changes nothing."""
    st = fake.base / "img" / ".qrmfs"
    for n in ("1", "2"):
        (st / "nodes" / n / "etc/ssh").mkdir(parents=True)
        (st / "nodes" / n / "etc/ssh/ssh_host_ed25519_key").write_text(f"secret-of-{n}")
        (st / "nodes" / n / "var/lib/app").mkdir(parents=True)
        (st / "nodes" / n / "var/lib/app/mine").write_text(f"app-of-{n}")
    app = fake.base / "img/var/lib/app"
    app.mkdir(parents=True)
    script = f"""
        mount --make-rprivate /
        STATE="{st}"; SELF="{st}/node"; NODE="{st}/nodes/1"; ID=1
        mount --bind "$NODE/var/lib/app" "{app}"
        hide_nodes; echo "rc=$?"
        hide_nodes; echo "again=$?"
        echo "listing=$(ls -A "$STATE/nodes" | tr '\\n' ' ')"
        cat "$STATE/nodes/2/etc/ssh/ssh_host_ed25519_key" 2>/dev/null && echo LEAK
        touch "$STATE/nodes/x" 2>/dev/null && echo WRITABLE
        echo "app=$(cat "{app}/mine")"
        echo "self=$(cat "$SELF/etc/ssh/ssh_host_ed25519_key")"
        echo "tmpfs=$(grep -c " $STATE/nodes ro," /proc/self/mountinfo)"
    """
    r = subprocess.run(["unshare", "-m", "sh", "-c", f'. "$1"; {script}', "sh", str(QRMFS_INIT)],
                       env=fake.env(), capture_output=True, text=True, timeout=60)
    out = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert "LEAK" not in r.stdout and "WRITABLE" not in r.stdout, r.stdout + r.stderr
    assert out == {"rc": "0", "again": "0", "listing": "", "app": "app-of-1", "self": "secret-of-1",
                   "tmpfs": "1"}, r.stdout + r.stderr
    assert "the other nodes' state is hidden" in fake.said
    # outside the namespace nothing changed: the host still sees both nodes' state
    assert (st / "nodes/2/etc/ssh/ssh_host_ed25519_key").read_text() == "secret-of-2"


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare -m (a private mount namespace)")
def test_a_plain_images_node_only_reports_the_generation_it_runs(fake):
    """An image neither shared nor with private directories: setup, as PID 1, writes the node's running record and
    hides the nodes' state, and mounts nothing else (no identity, no private directory). Real mounts, in a private
    mount namespace; the state paths moved into the test's directory, the heartbeat loop only named."""
    st = fake.base / "img" / ".qrmfs"
    (st / "nodes").mkdir(parents=True)
    (st / "generation").write_text("0123abcd\n")
    fake.set_cmdline("qrmfs.node=n7")
    script = f"""
        mount --make-rprivate /
        R=""; STATE="{st}"; SELF="{st}/node"; ROOTBIND="{st}/root"
        load_conf() {{ QRMFS_IMAGE=img QRMFS_SHARED=no QRMFS_HOSTNAME="" QRMFS_PRIVATE="" QRMFS_PRIVATE_EXCLUDE=""; }}
        start_heartbeat() {{ echo "heartbeat=$1"; }}
        before=$(awk '{{print $5}}' /proc/self/mountinfo | sort)
        (setup); echo "rc=$?"
        echo "mounted=$(awk '{{print $5}}' /proc/self/mountinfo | sort | grep -vxF "$before" | tr '\n' ' ')"
        echo "running=$(cat "$SELF/running")"
        test -f "$SELF/alive" && echo "alive=yes"
    """
    env = {**fake.env(), "QRMFS_INIT_EXEC": "1"}
    r = subprocess.run(["unshare", "-m", "sh", "-c", f'. "$1"; {script}', "sh", str(QRMFS_INIT)],
                       env=env, capture_output=True, text=True, timeout=60)
    out = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert out == {"rc": "0", "heartbeat": f"{st}/nodes/n7", "mounted": f"{st}/node {st}/nodes ",
                   "running": "0123abcd", "alive": "yes"}, r.stdout + r.stderr
    assert "running generation 0123abcd" in fake.said and "machine-id" not in fake.said, fake.said
    # outside the namespace: the record stays in the image, nothing else was made in the node's state
    assert sorted(p.name for p in (st / "nodes/n7").iterdir()) == ["alive", "running"]


# --- qrmfs-init's verdict and owners ------------------------------------------------------------------------

NODE_OK = ("QRMFS-BOOT switch_root /sbin/qrmfs-init\nqrmfs-init: node 1 (image x)\nqrmfs-init: set-up complete\n"
           "QRMFS-PROBE reached multi-user.target uptime=9\nQRMFS-PROBE done\n")
NODE_BAD = ("QRMFS-BOOT switch_root /sbin/qrmfs-init\n"
            "qrmfs-init: ERROR: cannot bind / at /.qrmfs/root: no private directories (uid 0; ...)\n"
            "qrmfs-init: set-up incomplete (see the messages above); booting on\n"
            "QRMFS-PROBE reached multi-user.target uptime=9\nQRMFS-PROBE done\n")


def test_a_node_whose_qrmfs_init_set_up_failed_is_not_healthy():
    good, bad = boot.parse_serial(NODE_OK), boot.parse_serial(NODE_BAD)
    assert good.node_setup == "complete" and good.node_errors == []
    assert bad.node_setup == "incomplete" and bad.node_errors[0].startswith("ERROR: cannot bind /")
    assert boot.judge(good, timed_out=False, returncode=0, timeout=300) == ("multi-user.target", None)
    state, error = boot.judge(bad, timed_out=False, returncode=0, timeout=300)
    assert state == "multi-user.target" and error is not None
    assert "qrmfs-init could not set up the node" in error and "cannot bind /" in error
    assert boot.parse_serial("QRMFS-PROBE reached multi-user.target uptime=9\n").node_setup is None


def test_the_probe_counts_as_reached_even_when_a_getty_swallowed_its_first_line():
    r = boot.parse_serial("own1-1 login: QRMFS-PROBE state=running uptime=113.24\nQRMFS-PROBE done\n")
    assert r.reached and r.system_state == "running" and r.uptime == 113.24 and r.done


def test_main_says_when_the_set_up_is_complete(fake):
    # no node.conf: nothing to set up on this machine (see above), which is a complete set-up
    env = {**fake.env(), "QRMFS_INIT_SOURCED": "", "QRMFS_INIT_EXEC": "1", "QRMFS_CMDLINE_FILE": str(fake.cmdline)}
    fake.set_cmdline("qrmfs.init=/bin/true")
    r = subprocess.run(["sh", str(QRMFS_INIT)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "qrmfs-init: set-up complete" in fake.said


def _fake_tool(path: Path, owner: int) -> None:
    path.write_text(f'#!/bin/sh\necho "{path.name} $*"\n')
    os.chown(path, owner, owner)
    path.chmod(0o4755)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown and a setuid file")
def test_a_setuid_mount_the_node_sees_owned_by_nobody_runs_through_the_loader(fake, tmp_path):
    bindir, loader = tmp_path / "bin", tmp_path / "ld.so"
    bindir.mkdir()
    _fake_tool(bindir / "mount", 4294967294)
    _fake_tool(bindir / "umount", 0)
    loader.write_text('#!/bin/sh\necho "loader $*"\n')
    loader.chmod(0o755)
    r = fake.run(f'PATH="{bindir}:$PATH"; QRMFS_LDSO="{tmp_path}/missing {loader}"; '
                 'mount --bind /a /b; umount /b')
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"loader {bindir}/mount --bind /a /b", "umount /b"]
    assert f"{bindir}/mount is setuid and owned by uid 4294967294" in fake.said


def test_mount_runs_as_itself_when_it_is_not_setuid(fake, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "mount").write_text('#!/bin/sh\necho "plain $*"\n')
    (bindir / "mount").chmod(0o755)
    r = fake.run(f'PATH="{bindir}:$PATH"; QRMFS_LDSO=/nonexistent; mount -t proc proc /proc')
    assert r.stdout.strip() == "plain -t proc proc /proc" and fake.said == ""


# --- SysV init, and boots without the probe ---------------------------------------------------------------

SYSV_CONSOLE = """QRMFS-BOOT init sysv\r
QRMFS-BOOT switch_root /sbin/init\r
INIT: version 3.06 booting\r
[\x1b[32m ok \x1b[39;49m] Starting hostname.\r
[\x1b[31mFAIL\x1b[39;49m] Starting kudzu ... failed!\r
INIT: Entering runlevel: 3\r
[ ok ] Starting OpenBSD Secure Shell server: sshd.\r
\r
Debian GNU/Linux 12 lab-sysv ttyS0\r
\r
lab-sysv login: """


def test_a_sysv_boot_without_the_probe_is_read_from_the_console():
    head, _, prompt = SYSV_CONSOLE.rpartition("\n")
    r = boot.parse_serial(head)
    assert r.init == "sysv" and r.runlevel == "3" and r.state == "runlevel 3"
    assert not r.getty and r.reached_without_probe()
    r.feed_partial(prompt)  # a getty's prompt ends without a newline
    assert r.getty and not r.reached
    assert r.failed_units == ["Starting kudzu ... failed!"]
    assert boot.judge(r, timed_out=False, returncode=None, timeout=300, probe=False) == ("runlevel 3", None)


def test_a_sysv_boot_is_not_reached_before_runlevel_3():
    r = boot.parse_serial("INIT: version 3.06 booting\nINIT: Entering runlevel: 2\nlab login: \n")
    assert r.getty and r.runlevel == "2" and not r.reached_without_probe()
    state, error = boot.judge(r, timed_out=True, returncode=None, timeout=60, probe=False)
    assert state == "timeout" and "no runlevel 3 within 60s" in (error or "") and "runlevel 2, a getty" in error


def test_the_sysv_probe_reports_runlevel_and_rc_done():
    r = boot.parse_serial("INIT: version 3.06 booting\nINIT: Entering runlevel: 3\n"
                          "QRMFS-PROBE reached runlevel 3 init=sysv uptime=21.5\n"
                          "QRMFS-PROBE state=rc-done uptime=21.5\nQRMFS-PROBE done\n")
    assert r.reached and r.rc_done and r.init == "sysv" and r.uptime == 21.5 and r.system_state == "rc-done"
    assert boot.judge(r, timed_out=False, returncode=0, timeout=300) == ("runlevel 3", None)


def test_systemd_without_the_probe_is_reached_at_multi_user():
    r = boot.parse_serial("[    2.1] systemd[1]: systemd 252.36-1~deb12u1 running in system mode (+PAM)\n"
                          "[  OK  ] Reached target \x1b[0;1;39mmulti-user.target\x1b[0m - Multi-User System.\n")
    assert r.init == "systemd" and r.multi_user and r.reached_without_probe()
    assert boot.judge(r, timed_out=False, returncode=None, timeout=300, probe=False) == ("multi-user.target", None)
    old = boot.parse_serial("Welcome to Debian GNU/Linux 11 (bullseye)!\n[  OK  ] Reached target Multi-User System.\n")
    assert old.init == "systemd" and old.reached_without_probe()
    # quiet once the serial getty runs: its prompt stands for multi-user
    quiet = boot.parse_serial("Welcome to Debian GNU/Linux 12 (bookworm)!\n"
                              "[  OK  ] Reached target getty.target - Login Prompts.\n")
    assert not quiet.reached_without_probe()
    quiet.feed_partial("lab-source login: ")
    assert quiet.reached_without_probe()


def test_boot_spec_is_frozen_and_checks_its_node_id():
    spec = boot.BootSpec("/exports/x", node_id="7")
    with pytest.raises(AttributeError):
        spec.timeout = 1  # type: ignore[misc]
    with pytest.raises(LabError):
        boot.BootSpec("/exports/x", node_id="a b")
    with pytest.raises(LabError):
        boot.BootSpec("/exports/x", script="true", probe=False)


def test_qemu_argv_forwards_only_the_ssh_port_into_the_guest():
    argv = boot.qemu_argv("/k", "/i", "c", "172.30.0.2", ssh_port=40022)
    netdev = argv[argv.index("-netdev") + 1]
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in netdev.split(",") and "restrict=on" in netdev.split(",")
    assert "hostfwd" not in boot.qemu_argv("/k", "/i", "c", "172.30.0.2")[argv.index("-netdev") + 1]


def test_ssh_banner_needs_a_real_ssh_identification():
    def serve(payload: bytes) -> int:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)

        def answer() -> None:
            conn, _ = srv.accept()
            conn.sendall(payload)
            conn.close()
            srv.close()
        threading.Thread(target=answer, daemon=True).start()
        return int(srv.getsockname()[1])

    assert boot.ssh_banner(serve(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")) == "SSH-2.0-OpenSSH_9.2p1 Debian-2"
    assert boot.ssh_banner(serve(b"")) is None  # QEMU accepts and closes when nothing listens in the guest
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert boot.ssh_banner(closed, timeout=1) is None


# --- a guest kernel that stalls under TCG: the boot is run once more -------------------------------------------

STALL_LOG = b"""[   41.003003] systemd[1]: systemd-firstboot.service - First Boot Wizard was skipped
[   62.183247] rcu: INFO: rcu_preempt self-detected stall on CPU
[   62.183247] rcu: \t1-....: (5221 ticks this GP) idle=3c64/1/0x4000000000000000 softirq=3798/3798 fqs=2530
[   62.183247] Workqueue: rpciod rpc_async_schedule [sunrpc]
"""


@pytest.mark.parametrize(("text", "stalled"), [
    (STALL_LOG, True),
    (b"[ 12.0] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:\n", True),
    (b"[ 30.1] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [kworker/u4:3:158]\n", True),
    (b"[ 3.2] rcu: Hierarchical RCU implementation.\n[ 39.6] Reached target local-fs.target\n", False),
])
def test_a_guest_kernels_stall_report_is_recognised(tmp_path: Path, text: bytes, stalled: bool) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(text)
    assert boot.guest_stalled(str(log)) is stalled
    assert boot.guest_stalled(str(tmp_path / "missing.log")) is False


def _result(tmp_path: Path, name: str, *, reached: bool, state: str, log: bytes) -> boot.BootResult:
    p = tmp_path / name
    p.write_bytes(log)
    return boot.BootResult(reached=reached, state=state, seconds=480.0 if not reached else 70.0, log_path=str(p),
                           wall_seconds=10.0)


@pytest.mark.parametrize(("first_log", "first_state", "boots"), [
    (STALL_LOG, "timeout", 2),            # the guest kernel stalled: once more
    (b"[ 39.6] Reached target\n", "timeout", 1),  # a timeout of its own: the image's, no second boot
    (STALL_LOG, "initramfs: no root", 1),  # failed otherwise: reported as it is
])
def test_a_boot_whose_guest_kernel_stalled_is_run_once_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            first_log: bytes, first_state: str, boots: int) -> None:
    results = [_result(tmp_path, "1.log", reached=False, state=first_state, log=first_log),
               _result(tmp_path, "2.log", reached=True, state="multi-user", log=b"ok\n")]
    calls: list[str] = []

    def fake(info: dict[str, Any], spec: boot.BootSpec) -> boot.BootResult:
        calls.append(spec.image_path)
        return results[len(calls) - 1]
    monkeypatch.setattr(boot, "_boot", fake)
    r = boot.boot({}, boot.BootSpec("/exports/img", node_id="2"))
    assert len(calls) == boots
    if boots == 2:
        assert r.reached and r.retried_after is not None and str(tmp_path / "1.log") in r.retried_after
        assert r.wall_seconds == 20.0
    else:
        assert not r.reached and r.retried_after is None and r.state == first_state


def test_a_second_stall_fails_the_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stalls = [_result(tmp_path, f"{i}.log", reached=False, state="timeout", log=STALL_LOG) for i in (1, 2)]
    monkeypatch.setattr(boot, "_boot", lambda info, spec: stalls.pop(0))
    r = boot.boot({}, boot.BootSpec("/exports/img"))
    assert not r.reached and r.state == "timeout" and not stalls and r.retried_after is not None
