"""Images really boot: a QEMU guest (TCG) mounts them from the lab's NFS server and reaches multi-user.

Slow (each boot is tens of seconds of emulated CPU). The images are made by `make_image`, the one place
that knows how; it will become `qrmfs create`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import boot as lab_boot
from lab import lab as _lab
from qrmfs.agent.steps import MTAB_OK

from .helpers import qrmfs, result_of

pytestmark = [pytest.mark.e2e, pytest.mark.boot]

BOOT_TIMEOUT = float(os.environ.get("QRMFS_BOOT_TIMEOUT", "480"))
QRMFS_INIT = Path(__file__).resolve().parents[2] / "qrmfs" / "data" / "qrmfs-init"


def _on(  # noqa: PLR0913 - keyword options of one ssh call in tests
        lab: dict[str, Any], role: str, script: str, input: bytes | None = None, env: dict[str, str] | None = None,
        ssh_options: tuple[str, ...] = (), ok: tuple[int, ...] = (0,)) -> str:
    argv = _lab.ssh_argv(lab, role)
    argv[-1:-1] = list(ssh_options)
    r = subprocess.run([*argv, script], input=input, capture_output=True, env=env, timeout=600)
    if r.returncode not in ok:
        raise AssertionError(f"on {role}: {script!r} exited {r.returncode}: {r.stderr.decode(errors='replace')}")
    return r.stdout.decode(errors="replace")


def _explain(r: lab_boot.BootResult) -> str:
    return (f"state={r.state} error={r.error}\nfailed units: {r.failed_units}\nscript rc={r.script_rc}:\n"
            f"{r.script_output}\n--- log {r.log_path} ---\n{r.log_tail}")


def make_image(lab: dict[str, Any], name: str, *options: str) -> str:
    """An image of the lab source made by `qrmfs create` (not registered), as an operator would."""
    path = f"{lab['hosts']['storage']['export_root']}/{name}"
    r = qrmfs("create", "-t", f"storage:{path}", "-l", "source:/", "-o", *options, config=lab["config"])
    assert r.returncode == 0, r.stderr
    return path


def _remove(lab: dict[str, Any], path: str) -> None:
    assert re.fullmatch(r"/exports/boot_[a-z]+_[0-9a-f]{8}", path), path
    # the test's nodes have powered off (their QEMU ended), but their last heartbeat still holds the image for
    # node_timeout: removing it now is what --running-nodes-ok is for
    r = qrmfs("remove", "-t", f"storage:{path}", "--yes", "-o", "--running-nodes-ok", config=lab["config"])
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def plain_image(lab: dict[str, Any]) -> Iterator[str]:
    path = make_image(lab, f"boot_plain_{uuid.uuid4().hex[:8]}")
    yield path
    _remove(lab, path)


@pytest.fixture(scope="module")
def shared_image(lab: dict[str, Any]) -> Iterator[str]:
    """--shared with a private /var/lib/app whose global/ stays common (the lab source ships
    /var/lib/app/seed.txt and /var/lib/app/global/from-image)."""
    path = make_image(lab, f"boot_shared_{uuid.uuid4().hex[:8]}", "--shared", "--hostname", "node",
                      "--private-add", "/var/lib/app", "--private-exclude", "/var/lib/app/global")
    yield path
    _remove(lab, path)


def test_prepared_kernel_and_initramfs_are_reused():
    first = lab_boot.prepare()
    second = lab_boot.prepare()
    assert not second.cold
    assert (second.vmlinuz, second.initramfs) == (first.vmlinuz, first.initramfs)
    assert second.initramfs.name == f"initramfs-{second.kernel_version}-{lab_boot.bootkit_hash()}.cpio.gz"


def test_image_made_by_create_boots_to_multi_user(lab, plain_image):
    """The node mounts its image as openQRM's root-mount.nfs-deployment does, `mount -t nfs -o rw,nolock
    SERVER:ROOTDEVICE`: NFSv3, through the image's own export (the lab's ganesha, `exports = "ganesha"`)."""
    r = lab_boot.boot(lab, lab_boot.BootSpec(plain_image, script=PREPARED_SCRIPT, timeout=BOOT_TIMEOUT,
                                             mount="openqrm"))
    assert r.reached, _explain(r)
    assert r.ok and r.state == "multi-user.target" and r.init == "systemd"
    assert r.script_rc == 0, _explain(r)
    assert r.sshd is not None and r.sshd.startswith("SSH-2.0-OpenSSH"), "sshd answers through the forward"
    f = _facts(r)
    # what qrmfs's preparation is for, seen from inside the running node
    assert f["root"].split() == ["nfs", f"{lab_boot.NFS_GUEST_ADDR}:{plain_image}"], f
    assert f["nfs"] == "vers=3 nolock", f
    assert f["mtab"] in MTAB_OK and f["df"] == "ok", f                   # mtab: df works on the NFS root
    assert f["fstab-disks"] == "0", f                                    # fstab: no local disk to wait for
    assert f["remount-fs"] == "masked" and f["fsck-root"] == "masked", f  # masked for a diskless node
    assert f["dhcp"] == "0" and f["eth0"] == "10.0.2.15/24", f           # network config removed: NIC untouched
    assert f["sshd"] == "active" and f["hostkey"] == "yes", f            # host keys made anew at first boot
    assert f["container"] == "none", f
    # a plain image's node reports the generation it runs too: /sbin/init led to qrmfs-init, which only recorded
    # that (no private directory, no identity of its own) and started the distribution's init
    generation = _on(lab, "storage", f"cat {plain_image}/.qrmfs/generation").strip()
    assert f["sbin-init"] == "/sbin/qrmfs-init" and f["running"] == generation, f
    assert f["identity-binds"] == "0" and f["nodes-hidden"] == "tmpfs", f
    node = lab_boot.DEFAULT_MAC.replace(":", "")
    assert _on(lab, "storage", f"cat {plain_image}/.qrmfs/nodes/{node}/running").strip() == generation
    listed = qrmfs("list", "--generations", "-t", f"storage:{plain_image}", "--json", config=lab["config"])
    assert listed.returncode == 0, listed.stderr
    current = [g for g in result_of(listed)["images"][0]["generations"] if g["role"] == "current"]
    assert [g["id"] for g in current] == [generation], current
    assert node in [n["node"] for n in current[0]["nodes"]], current  # (test_cli_boot's node 9 may run it too)
    # Under TCG systemd sometimes fails to mount these API filesystems (exit 32; lab-notes.md saw it too):
    # harmless to a diskless node and not caused by the image. Any other failed unit is a failure.
    assert set(r.failed_units) <= FLAKY_API_MOUNTS, _explain(r)
    assert r.guest_uptime is not None and 0 < r.guest_uptime < r.seconds
    assert r.clean_shutdown, "the guest should power itself off after the probe"
    assert Path(r.log_path).is_file()
    print(f"\nplain boot: {r.seconds}s to multi-user (guest uptime {r.guest_uptime}s), {r.wall_seconds}s "
          f"in all, prepare {r.prepare_seconds}s ({'cold' if r.cold else 'warm'}), system {r.system_state}, "
          f"failed units {r.failed_units}")


FLAKY_API_MOUNTS = {"dev-hugepages.mount", "dev-mqueue.mount", "sys-kernel-debug.mount", "sys-kernel-tracing.mount"}
PREPARED_SCRIPT = r"""
echo "root=$(findmnt -n -o FSTYPE,SOURCE /)"
echo "nfs=$(findmnt -n -o OPTIONS / | tr , '\n' | grep -xE 'vers=[0-9.]+|nolock' | tr '\n' ' ' | sed 's/ $//')"
echo "mtab=$(readlink /etc/mtab)"
df / >/dev/null && echo "df=ok"
echo "fstab-disks=$(grep -cE '^(UUID|LABEL|PARTUUID|/dev/[sv]d)' /etc/fstab)"
echo "remount-fs=$(systemctl is-enabled systemd-remount-fs.service)"
echo "fsck-root=$(systemctl is-enabled systemd-fsck-root.service)"
echo "dhcp=$(pgrep -c dhclient)"
echo "eth0=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | tr '\n' ' ' | sed 's/ $//')"
echo "sshd=$(systemctl is-active ssh.service)"
test -s /etc/ssh/ssh_host_ed25519_key && echo "hostkey=yes"
echo "container=$(systemd-detect-virt --container)"
echo "sbin-init=$(readlink /sbin/init)"
echo "running=$(cat /.qrmfs/node/running)"
echo "identity-binds=$(findmnt -n -o TARGET | grep -cxE '/etc/(machine-id|hostname)|/etc/ssh/ssh_host_.*')"
echo "nodes-hidden=$(findmnt -n -o FSTYPE /.qrmfs/nodes)"
true
"""


NODE_SCRIPT = r"""
n=$(sed -n 's/.*qrmfs\.node=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "node=$n"
echo "app=$(ls -A /var/lib/app | sort | tr '\n' ' ')"
echo "global=$(ls -A /var/lib/app/global | sort | tr '\n' ' ')"
echo "seed=$(cat /var/lib/app/seed.txt)"
echo "node $n" > /var/lib/app/mine-$n && echo "wrote-mine=yes"
echo "from $n" > /var/lib/app/global/from-$n && echo "wrote-global=yes"
echo "machine-id=$(cat /etc/machine-id)"
echo "hostname=$(cat /etc/hostname)"
echo "kernel-hostname=$(hostname)"
echo "ssh-key=$(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2)"
echo "mount-owner=$(stat -c '%u:%g %A' "$(readlink -f /bin/mount)")"
echo "passwd-owner=$(stat -c '%u:%g' /etc/passwd)"
echo "app-mount=$(findmnt -n -o SOURCE /var/lib/app)"
sync
"""


def _facts(r: lab_boot.BootResult) -> dict[str, str]:
    return dict(line.split("=", 1) for line in r.script_output.splitlines() if "=" in line)


def test_two_nodes_share_an_image_but_not_their_private_dirs_or_identity(lab, shared_image):
    r1 = lab_boot.boot(lab, lab_boot.BootSpec(shared_image, node_id="1", script=NODE_SCRIPT, timeout=BOOT_TIMEOUT))
    assert r1.reached and r1.script_rc == 0, _explain(r1)
    r2 = lab_boot.boot(lab, lab_boot.BootSpec(shared_image, node_id="2", script=NODE_SCRIPT, timeout=BOOT_TIMEOUT))
    assert r2.reached and r2.script_rc == 0, _explain(r2)
    n1, n2 = _facts(r1), _facts(r2)
    print(f"\nnode 1: {r1.seconds}s to multi-user, {r1.wall_seconds}s in all; "
          f"node 2: {r2.seconds}s, {r2.wall_seconds}s")

    # Owners as the storage server has them (NFSv4 numeric owners): the setuid-root mount stays root's,
    # so qrmfs-init could bind the private directory, and said so.
    for r, facts in ((r1, n1), (r2, n2)):
        assert facts["mount-owner"] == "0:0 -rwsr-xr-x" and facts["passwd-owner"] == "0:0", facts
        assert facts["app-mount"].endswith(f"{shared_image}/.qrmfs/nodes/{facts['node']}/var/lib/app"), facts
        assert r.node_setup == "complete", _explain(r)

    # Private: each node starts from the image's content, and does not see the other's files.
    assert n1["node"] == "1" and n2["node"] == "2"
    assert n1["seed"] == n2["seed"] == "from-the-image"
    assert n1["app"].split() == ["global", "seed.txt"]
    assert n2["app"].split() == ["global", "seed.txt"], "node 2 must not see node 1's private files"
    assert n1["wrote-mine"] == n2["wrote-mine"] == "yes"
    # Excluded: common to all nodes.
    assert n1["global"].split() == ["from-image"]
    assert n2["global"].split() == ["from-1", "from-image"]

    # Identity: one per node, none in the image.
    for facts in (n1, n2):
        assert re.fullmatch(r"[0-9a-f]{32}", facts["machine-id"]), facts
    assert n1["machine-id"] != n2["machine-id"]
    assert (n1["hostname"], n2["hostname"]) == ("node-1", "node-2")
    assert n1["kernel-hostname"] == n1["hostname"] and n2["kernel-hostname"] == n2["hostname"]
    assert n1["ssh-key"].startswith("SHA256:") and n1["ssh-key"] != n2["ssh-key"]
    for r in (r1, r2):
        assert "systemd-machine-id-commit.service" not in r.failed_units, _explain(r)

    # On the storage server: the image itself is unchanged where it matters, node state is apart.
    facts = _on(lab, "storage", f"""cd {shared_image}
        echo "machine-id-size=$(stat -c %s etc/machine-id)"
        echo "app=$(ls -A var/lib/app | sort | tr '\\n' ' ')"
        echo "global=$(ls -A var/lib/app/global | sort | tr '\\n' ' ')"
        echo "node1=$(ls -A .qrmfs/nodes/1/var/lib/app | sort | tr '\\n' ' ')"
        echo "node2=$(ls -A .qrmfs/nodes/2/var/lib/app | sort | tr '\\n' ' ')"
        echo "node1-global=$(ls -A .qrmfs/nodes/1/var/lib/app/global | tr '\\n' ' ')"
        echo "root-bind=$(ls -A .qrmfs/root | tr '\\n' ' ')"
        """)
    s = dict(line.split("=", 1) for line in facts.splitlines() if "=" in line)
    assert s["machine-id-size"] == "0", "the image's own /etc/machine-id must stay empty"
    assert s["app"].split() == ["global", "seed.txt"], "private writes must not land in the image"
    assert s["global"].split() == ["from-1", "from-2", "from-image"]
    assert s["node1"].split() == ["global", "mine-1", "seed.txt"]
    assert s["node2"].split() == ["global", "mine-2", "seed.txt"]
    assert s["node1-global"].split() == [], "the node's copy of an excluded dir is only a mount point"
    assert s["root-bind"].split() == []


def test_a_node_whose_private_dir_set_up_failed_is_not_reported_healthy(lab):
    """A real fault: the image's private directory is replaced by a file, so qrmfs-init cannot bind it."""
    path = make_image(lab, f"boot_broken_{uuid.uuid4().hex[:8]}", "--private-add", "/var/lib/app")
    try:
        _on(lab, "storage", f"rm -rf {path}/var/lib/app && echo not-a-dir > {path}/var/lib/app")
        r = lab_boot.boot(lab, lab_boot.BootSpec(path, node_id="5", timeout=BOOT_TIMEOUT))
    finally:
        _remove(lab, path)
    assert r.reached, _explain(r)
    assert r.node_setup == "incomplete" and not r.ok, _explain(r)
    assert "qrmfs-init could not set up the node" in (r.error or "")
    assert "/var/lib/app is not a directory" in (r.error or "")


def test_a_missing_image_is_reported_without_booting(lab):
    r = lab_boot.boot(lab, lab_boot.BootSpec(f"/exports/boot_missing_{uuid.uuid4().hex[:8]}", timeout=60,
                                               visible_timeout=3))
    assert not r.reached and not r.ok
    assert r.state == "image not visible over NFS"
    assert "does the image exist" in (r.error or "")


def test_an_image_without_init_fails_fast_with_the_initramfs_reason(lab):
    path = f"/exports/boot_noinit_{uuid.uuid4().hex[:8]}"
    _on(lab, "storage", f"mkdir -p {path}/sbin {path}/run {path}/etc && echo not-an-init > {path}/sbin/README")
    try:
        r = lab_boot.boot(lab, lab_boot.BootSpec(path, timeout=120))
    finally:
        _on(lab, "storage", f"rm -rf {path}")
    assert not r.reached
    assert r.state.startswith("initramfs: "), _explain(r)
    assert "neither /sbin/qrmfs-init nor /sbin/init" in (r.error or "")
    assert r.seconds < 100, "a fatal initramfs error powers the guest off at once"
    assert "QRMFS-BOOT FATAL" in r.log_tail


def test_cli_boot_reports_json_and_exit_code(lab, plain_image):
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "lab", "boot", "-t", f"storage:{plain_image}", "--node-id", "9",
                        "--json", "--timeout", str(BOOT_TIMEOUT)], capture_output=True, text=True,
                       timeout=BOOT_TIMEOUT + 120, cwd=repo)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["reached"] and out["ok"] and out["state"] == "multi-user.target" and out["node_id"] == "9"
    bad = subprocess.run([sys.executable, "-m", "lab", "boot", "-t", "source:/exports/x"], capture_output=True,
                         text=True, cwd=repo, timeout=60)
    assert bad.returncode != 0 and "only from its storage" in bad.stderr
