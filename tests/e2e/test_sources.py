"""Real sources beyond the default Debian 12 + systemd host: each made into an image by `qrmfs create` and
booted diskless in QEMU to its normal running state, checked from inside where the probe can run.

The extra source hosts are started on demand (`python -m lab up --sources ...`), each from a debootstrap
tree cached by recipe (lab/images/sources/). Slow: every boot is tens of seconds of emulated CPU, and the
first run builds the trees (about a minute each).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import boot as lab_boot
from lab import images
from lab import lab as _lab
from qrmfs.agent.steps import MTAB_OK

from .helpers import qrmfs, run_on
from .test_boot import BOOT_TIMEOUT, FLAKY_API_MOUNTS, NODE_SCRIPT, PREPARED_SCRIPT, _explain, _facts

pytestmark = [pytest.mark.e2e, pytest.mark.boot]


@pytest.fixture(scope="module")
def with_sources(lab: dict[str, Any]) -> Any:
    """`with_sources("sysv", ...)`: the lab with those extra source hosts running (each started once, on
    demand, so `-m "not slow"` never builds the trixie and bullseye trees)."""
    return lambda *names: _lab.up(sources=list(names))


def _create(lab: dict[str, Any], location: str, prefix: str, *options: str) -> str:
    path = f"{lab['hosts']['storage']['export_root']}/{prefix}_{uuid.uuid4().hex[:8]}"
    r = qrmfs("create", "-t", f"storage:{path}", "-l", location, "-o", *options, config=lab["config"])
    assert r.returncode == 0, r.stderr
    return path


def _remove(lab: dict[str, Any], path: str) -> None:
    assert re.fullmatch(r"/exports/src_[a-z]+_[0-9a-f]{8}", path), path
    # the test's nodes have powered off (their QEMU ended), but their last heartbeat still holds the image for
    # node_timeout: removing it now is what --running-nodes-ok is for
    r = qrmfs("remove", "-t", f"storage:{path}", "--yes", "-o", "--running-nodes-ok", config=lab["config"])
    assert r.returncode == 0, r.stderr


@pytest.fixture
def made(lab: dict[str, Any]) -> Iterator[list[str]]:
    """Images a test made; removed afterwards."""
    paths: list[str] = []
    yield paths
    for p in paths:
        _remove(lab, p)


def _manifest(lab: dict[str, Any], path: str) -> dict[str, Any]:
    out = run_on(lab, "storage", f"cat {path}/.qrmfs/manifest.json").stdout
    data: dict[str, Any] = json.loads(out)
    return data


SYSV_SCRIPT = r"""
echo "root=$(findmnt -n -o FSTYPE,SOURCE /)"
echo "mtab=$(readlink /etc/mtab)"
df / >/dev/null && echo "df=ok"
echo "fstab-disks=$(grep -cE '^(UUID|LABEL|PARTUUID|/dev/[sv]d)' /etc/fstab)"
echo "dhcp=$(pgrep -c dhclient)"
echo "eth0=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | tr '\n' ' ' | sed 's/ $//')"
echo "pid1=$(cat /proc/1/comm)"
echo "initdefault=$(sed -n 's/^[^#:]*:\([0-9]*\):initdefault:.*/\1/p' /etc/inittab)"
echo "runlevel=$(runlevel | cut -d' ' -f2)"
echo "sshd=$(pgrep -x sshd >/dev/null && echo running)"
echo "hostkey=$(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub 2>/dev/null | cut -d' ' -f2)"
echo "kudzu=$(ls /etc/rc3.d | grep kudzu)"
echo "mount-owner=$(stat -c '%u:%g' "$(readlink -f /bin/mount)")"
echo "proc-mounted=$(findmnt -n -o FSTYPE /proc)"
echo "hostname=$(hostname)"
true
"""


def _source_hostkey(lab: dict[str, Any], role: str) -> str:
    out = run_on(lab, role, "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").stdout.decode()
    return out.split()[1]


def test_a_sysv_source_boots_to_runlevel_3_with_the_manuals_preparation(with_sources, made):
    srclab = with_sources("sysv")
    path = _create(srclab, "sysv:/", "src_sysv", "--hostname", "sysvnode")
    made.append(path)
    r = lab_boot.boot(srclab, lab_boot.BootSpec(path, script=SYSV_SCRIPT, timeout=BOOT_TIMEOUT))
    assert r.ok, _explain(r)
    assert (r.init, r.state, r.runlevel, r.rc_done) == ("sysv", "runlevel 3", "3", True), _explain(r)
    assert r.sshd is not None and r.sshd.startswith("SSH-2.0-OpenSSH"), _explain(r)
    f = _facts(r)
    assert f["pid1"] == "init" and f["initdefault"] == "3" and f["runlevel"] == "3", f  # runlevel step
    assert f["root"].split() == ["nfs4", f"{lab_boot.NFS_GUEST_ADDR}:{path}"], f
    assert f["mtab"] in MTAB_OK and f["df"] == "ok", f                                  # mtab step
    assert f["fstab-disks"] == "0" and f["dhcp"] == "0" and f["eth0"] == "10.0.2.15/24", f
    assert f["kudzu"] == "K01kudzu", f                                                  # kudzu step
    assert f["mount-owner"] == "0:0" and f["proc-mounted"] == "proc", f                 # owners seen right
    assert f["sshd"] == "running" and f["hostkey"].startswith("SHA256:"), f
    assert f["hostkey"] != _source_hostkey(srclab, "sysv"), "the node made its own host keys"
    assert f["hostname"] == "sysvnode", f
    console = Path(r.log_path).read_text(errors="replace")
    assert "kudzu: probing hardware" not in console
    print(f"\nsysv boot: runlevel 3 after {r.seconds}s (guest uptime {r.guest_uptime}s), {r.wall_seconds}s in all")


def test_two_nodes_of_a_shared_sysv_image_keep_their_private_dirs_apart(with_sources, made):
    srclab = with_sources("sysv")
    path = _create(srclab, "sysv:/", "src_sysvshared", "--shared", "--hostname", "node",
                   "--private-add", "/var/lib/app", "--private-exclude", "/var/lib/app/global")
    made.append(path)
    r1 = lab_boot.boot(srclab, lab_boot.BootSpec(path, node_id="1", script=NODE_SCRIPT, timeout=BOOT_TIMEOUT))
    assert r1.ok and r1.script_rc == 0, _explain(r1)
    r2 = lab_boot.boot(srclab, lab_boot.BootSpec(path, node_id="2", script=NODE_SCRIPT, timeout=BOOT_TIMEOUT))
    assert r2.ok and r2.script_rc == 0, _explain(r2)
    n1, n2 = _facts(r1), _facts(r2)
    for r, facts in ((r1, n1), (r2, n2)):
        assert r.init == "sysv" and r.node_setup == "complete", _explain(r)
        assert facts["mount-owner"] == "0:0 -rwsr-xr-x", facts
        assert facts["app-mount"].endswith(f"{path}/.qrmfs/nodes/{facts['node']}/var/lib/app"), facts
    assert n1["app"].split() == ["global", "seed.txt"] and n2["app"].split() == ["global", "seed.txt"]
    assert n1["seed"] == n2["seed"] == "from-the-image"
    assert n1["global"].split() == ["from-image"] and n2["global"].split() == ["from-1", "from-image"]
    assert n1["machine-id"] != n2["machine-id"] and (n1["hostname"], n2["hostname"]) == ("node-1", "node-2")
    assert n1["kernel-hostname"] == "node-1" and n2["kernel-hostname"] == "node-2"
    assert n1["ssh-key"].startswith("SHA256:") and n1["ssh-key"] != n2["ssh-key"]
    print(f"\nsysv nodes: {r1.seconds}s and {r2.seconds}s to runlevel 3")


def test_separate_filesystems_are_each_copied_and_a_bind_mount_is_skipped(with_sources, made):
    """The `mounts` host has a real mount table: ext4 filesystems at /boot and /var/log, a bind mount of a
    directory at /srv/data."""
    srclab = with_sources("mounts")
    mountinfo = run_on(srclab, "mounts", "cat /proc/self/mountinfo").stdout.decode()
    fs = {ln.split()[4]: (ln.split()[3], ln.split(" - ")[1].split()[0]) for ln in mountinfo.splitlines()}
    assert fs["/boot"] == ("/", "ext4") and fs["/var/log"] == ("/", "ext4"), fs
    assert fs["/srv/data"][0] != "/", fs
    path = f"{srclab['hosts']['storage']['export_root']}/src_mounts_{uuid.uuid4().hex[:8]}"
    r = qrmfs("create", "-t", f"storage:{path}", "-l", "mounts:/", "-o", config=srclab["config"])
    assert r.returncode == 0, r.stderr
    made.append(path)
    assert re.search(r"not copied: /srv/data \(ext4, bind mount of ", r.stderr), r.stderr
    m = _manifest(srclab, path)
    assert m["separate_filesystems"] == ["/boot", "/var/log"], m["separate_filesystems"]
    assert len(m["rsync"]) == 3, m["rsync"]  # the root, /boot and /var/log: each its own rsync
    skipped = {s["path"]: s for s in m["skipped_mounts"]}
    assert skipped["/srv/data"]["why"].startswith("bind mount of "), skipped
    on = run_on(srclab, "storage", f"cd {path} && ls boot boot/grub && ls -A var/log var/log/lab-mounts "
                                   "&& ls -A srv/data | wc -l").stdout.decode().split()
    assert "config-6.1.0-lab-amd64" in on and "grub.cfg" in on, on
    assert "lab-mounts" in on and "separate-fs.log" not in on, "logs step: files cleared, directories kept"
    assert on[-1] == "0", "a bind mount's content is not copied"
    # an update copies the root while the mount table is still being read, then each separate filesystem
    run_on(srclab, "mounts", "echo new > /boot/qrmfs-update-probe && mkdir /var/log/qrmfs-update-probe")
    try:
        r = qrmfs("update", "-t", f"storage:{path}", "-o", config=srclab["config"])
    finally:
        run_on(srclab, "mounts", "rm -rf /boot/qrmfs-update-probe /var/log/qrmfs-update-probe")
    assert r.returncode == 0, r.stderr
    assert re.search(r"not copied: /srv/data \(ext4, bind mount of ", r.stderr), r.stderr
    m = _manifest(srclab, path)
    assert m["separate_filesystems"] == ["/boot", "/var/log"] and len(m["rsync"]) == 3, m["rsync"]
    assert [c["what"] for c in m["rsync"]] == ["root filesystem", "separate filesystem /boot",
                                               "separate filesystem /var/log"], m["rsync"]
    on = run_on(srclab, "storage", f"cat {path}/boot/qrmfs-update-probe && ls -d {path}/var/log/qrmfs-update-probe"
                ).stdout.decode().split()
    assert on == ["new", f"{path}/var/log/qrmfs-update-probe"], on


@pytest.mark.slow
@pytest.mark.parametrize("role", ["trixie", "bullseye"])
def test_other_debian_releases_with_systemd_boot_to_multi_user(with_sources, made, role):
    srclab = with_sources(role)
    path = _create(srclab, f"{role}:/", f"src_{role}")
    made.append(path)
    r = lab_boot.boot(srclab, lab_boot.BootSpec(path, script=PREPARED_SCRIPT, timeout=BOOT_TIMEOUT))
    assert r.ok and r.script_rc == 0, _explain(r)
    assert r.init == "systemd" and r.state == "multi-user.target", _explain(r)
    assert r.sshd is not None and r.sshd.startswith("SSH-2.0-OpenSSH"), _explain(r)
    f = _facts(r)
    assert f["root"].split() == ["nfs4", f"{lab_boot.NFS_GUEST_ADDR}:{path}"], f
    assert f["mtab"] in MTAB_OK and f["df"] == "ok" and f["fstab-disks"] == "0", f
    assert f["dhcp"] == "0" and f["eth0"] == "10.0.2.15/24", f
    assert f["sshd"] == "active" and f["hostkey"] == "yes", f
    assert set(r.failed_units) <= FLAKY_API_MOUNTS, _explain(r)
    print(f"\n{role} boot: multi-user after {r.seconds}s (guest uptime {r.guest_uptime}s)")


def test_a_debootstrap_directory_shared_with_a_private_dir_boots_without_the_probe(lab, made):
    """As a new user would: a SysV Debian 12 root debootstrapped into a local directory, made into a shared
    image with a private directory, booted with the probe off: the console and the sshd forward tell."""
    srclab = lab
    tree = images.ensure_tree("sysv")
    assert (tree / "etc/inittab").is_file() and not (tree / "lib/systemd/systemd").exists()
    path = _create(srclab, str(tree), "src_dir", "--shared", "--private-add", "/var/lib/app")
    made.append(path)
    r = lab_boot.boot(srclab, lab_boot.BootSpec(path, node_id="7", probe=False, timeout=BOOT_TIMEOUT))
    assert r.ok, _explain(r)
    assert (r.init, r.runlevel, r.node_setup) == ("sysv", "3", "complete"), _explain(r)
    assert r.sshd is not None and r.sshd.startswith("SSH-2.0-OpenSSH"), _explain(r)
    console = Path(r.log_path).read_text(errors="replace")
    assert "must be superuser" not in console and "qrmfs-init: /var/lib/app is private to node 7" in console
    print(f"\ndirectory source (no probe): runlevel 3 after {r.seconds}s, sshd {r.sshd}")
