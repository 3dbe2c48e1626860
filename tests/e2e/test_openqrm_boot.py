"""A node boots a qrmfs image the openQRM way (issue 27): openQRM 5.3.60's own linuxrc and
root-mount.nfs-deployment, unmodified, with the node's parameters from the lab's real openQRM server.

`qrmfs create` (registered) is all the operator does; the lab does what openQRM's install and an administrator
do (the kernel, the node's resource, an appliance of node, image and kernel: lab/boot/openqrm.py). Three TCG
boots (about 4-5 minutes each here): a systemd image, `qrmfs update` while it runs, its reboot into the new
generation; a SysV image.

The images have a private directory, so qrmfs-init runs on them (issue 27): linuxrc starts /sbin/init, which
leads to qrmfs-init, which binds the node's private directory, reports the generation it runs (its `running`
and `alive` records, which `qrmfs list --generations` shows) and then starts the distribution's init. Each first
boot ends with the image's own `reboot` command, which on SysV init goes through `shutdown` and `/sbin/init 6`.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lab import boot as lab_boot
from lab import lab as _lab

from .helpers import qrmfs, result_of, run_on

pytestmark = [pytest.mark.e2e, pytest.mark.boot]

BOOT_TIMEOUT = float(os.environ.get("QRMFS_BOOT_TIMEOUT", "600"))
MARKER = "/etc/qrmfs-openqrm-boot-marker"
PRIVATE = "/var/lib/qrmfs-openqrm-private"  # --private-add: qrmfs-init binds the node's own copy over it
NODE = lab_boot.DEFAULT_MAC.replace(":", "").lower()  # qrmfs-init's node id without qrmfs.node=: the MAC

# Run by the lab's probe inside the booted node (the lab's openqrm-client stand-in starts it).
SCRIPT = rf"""
awk '$2 == "/" && $3 ~ /^nfs/ {{print "root=" $1; print "type=" $3; print "opts=" $4; exit}}' /proc/mounts
echo "marker=$(cat {MARKER} 2>/dev/null || echo none)"
. /var/openqrm/openqrm-resource.conf
echo "resource_id=$resource_id"
echo "image_name=$image_name"
echo "sbin_init=$(readlink /sbin/init)"
echo "pid1=$(readlink /proc/1/exe)"
echo "pid1_name=$(cat /proc/1/comm)"
echo "private=$(awk '$5 == "{PRIVATE}" {{print "bound"}}' /proc/self/mountinfo)"
echo "running=$(cat /.qrmfs/node/running 2>/dev/null || echo none)"
echo "generation=$(cat /.qrmfs/generation)"
/sbin/init q && echo "telinit=ok"
"""

# The first boot then keeps running: a reader starts, the node says ready in its root, waits for the test's go
# (written, after `qrmfs update`, into the generation it booted, now the previous one), and checks itself.
RUN_DIR = "/var/lib/qrmfs-openqrm-run"
WHILE_UPDATED = SCRIPT + rf"""
( while :; do cat /etc/os-release /usr/bin/env >/dev/null || echo "read failed" >> {RUN_DIR}/errors;
  sleep 0.5; done ) &
reader=$!
mkdir -p {RUN_DIR} && echo up > {RUN_DIR}/ready && sync
i=0
while [ ! -e {RUN_DIR}/go ] && [ $i -lt 600 ]; do sleep 0.5; i=$((i+1)); done
echo "go=$(test -e {RUN_DIR}/go && echo seen || echo timeout)"
kill -0 $reader && echo "reader=alive"
echo "errors=$(cat {RUN_DIR}/errors 2>/dev/null | wc -l)"
echo "marker_after=$(cat {MARKER} 2>/dev/null || echo none)"
echo "runs=$(/usr/bin/md5sum {MARKER} | /usr/bin/cut -c1-8)"
echo "expected=$(echo $(cat {MARKER}) | /usr/bin/md5sum | /usr/bin/cut -c1-8)"
kill $reader
"""


def _fields(output: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in output.splitlines() if re.match(r"^\w+=", ln))


def _boot(lab: dict[str, Any], path: str, script: str = SCRIPT, reboot: bool = False) -> lab_boot.BootResult:
    r = lab_boot.boot(lab, lab_boot.BootSpec(path, script=script, timeout=BOOT_TIMEOUT, openqrm=True,
                                             forward_ssh=False, shutdown_timeout=180 if reboot else 30,
                                             reboot=reboot))
    assert r.ok, (f"state={r.state} error={r.error}\nscript rc={r.script_rc}:\n{r.script_output}\n"
                  f"--- log {r.log_path} ---\n{r.log_tail}")
    assert r.script_rc == 0, r.script_output
    return r


def _ran_qrmfs_init(r: lab_boot.BootResult, out: dict[str, str], init: str) -> None:
    """qrmfs-init ran behind /sbin/init (its console verdict, the private directory bound, the generation it runs
    reported) and then started the distribution's init as PID 1; /sbin/init run as a command (`init q`) reached
    that init as telinit."""
    assert r.node_setup == "complete", r.log_path
    assert out["sbin_init"] == "/sbin/qrmfs-init" and out["private"] == "bound", out
    assert out["running"] == out["generation"], out
    assert out["pid1"] == init and out["telinit"] == "ok", out


def _rebooted(r: lab_boot.BootResult, sysv: bool = False) -> None:
    """The node's `reboot` ran to its end: the kernel restarted the machine after an orderly shutdown (SysV: init
    switched to runlevel 6, asked by shutdown through /sbin/init, which leads to qrmfs-init, which handed it on)."""
    assert r.clean_shutdown, r.log_path
    log = Path(r.log_path).read_text(errors="replace")
    assert "reboot: Restarting system" in log, r.log_path
    assert not sysv or "Switching to runlevel: 6" in log, r.log_path


def _nodes(lab_config: str, path: str) -> dict[str, list[str]]:
    """`qrmfs list --generations --json`: the nodes running each generation (by id) of the image."""
    r = qrmfs("list", "--generations", "-t", f"storage:{path}", "--json", config=lab_config)
    assert r.returncode == 0, r.stderr
    (image,) = result_of(r)["images"]
    return {g["id"]: [n["node"] for n in g["nodes"]] for g in image["generations"]}


def test_registered_image_boots_through_openqrm_linuxrc_is_updated_running_and_reboots_into_it(
        lab: dict[str, Any], on_source: Any) -> None:
    name = f"oqboot_{uuid.uuid4().hex[:8]}"
    path = f"{lab['hosts']['storage']['export_root']}/{name}"
    storage = lab["hosts"]["storage"]["address"]
    first, second = f"first-{uuid.uuid4().hex[:8]}", f"second-{uuid.uuid4().hex[:8]}"
    on_source(f"echo {first} > {MARKER}")
    try:
        r = qrmfs("create", "-t", f"storage:{path}", "-l", "source:/", "--private-add", PRIVATE, config=lab["config"])
        assert r.returncode == 0, r.stderr
        gen1 = run_on(lab, "storage", f"cat {path}/.qrmfs/generation").stdout.decode().strip()

        def update() -> str:
            on_source(f"echo {second} > {MARKER}")
            u = qrmfs("update", "-t", f"storage:{path}", "--json", config=lab["config"])
            assert u.returncode == 0, u.stderr
            return str(result_of(u)["previous"])

        # the node boots and keeps running while qrmfs makes a new generation of its image
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(_boot, lab, path, WHILE_UPDATED, True)
            deadline = time.monotonic() + BOOT_TIMEOUT
            while run_on(lab, "storage", f"test -e {path}{RUN_DIR}/ready", check=False).returncode != 0:
                assert not running.done(), running.result()
                assert time.monotonic() < deadline, "the node never said ready"
                time.sleep(1)
            # the running node's record, as qrmfs-init wrote it into the image on the storage server, and as
            # qrmfs lists it: the node runs the generation it booted
            record = run_on(lab, "storage", f"cat {path}/.qrmfs/nodes/{NODE}/running && "
                                            f"test -f {path}/.qrmfs/nodes/{NODE}/alive").stdout.decode()
            assert record.strip() == gen1, record
            assert _nodes(lab["config"], path)[gen1] == [NODE]
            booted = update()
            held = _nodes(lab["config"], path)
            assert held[gen1] == [NODE] and len(held) == 2, held  # the previous generation, held by the node
            run_on(lab, "storage", f"touch {booted}{RUN_DIR}/go")
            boot1 = running.result()
        out = _fields(boot1.script_output)
        # it ran on the generation it booted until it powered off: readable, its reader alive, programs run
        assert {k: out.get(k) for k in ("go", "reader", "errors", "marker_after")} == {
            "go": "seen", "reader": "alive", "errors": "0", "marker_after": first}, out
        assert out["runs"] == out["expected"] and len(out["runs"]) == 8, out
        _ran_qrmfs_init(boot1, out, "/usr/lib/systemd/systemd")
        assert out["generation"] == gen1, out
        _rebooted(boot1)
        # the root root-mount.nfs-deployment mounted: <storage>:<image_rootdevice>, NFS, nolock
        assert out["root"] == f"{storage}:{path}", out
        assert out["type"] == "nfs" and "nolock" in out["opts"].split(","), out
        assert out["marker"] == first
        assert boot1.openqrm is not None
        assert boot1.openqrm["image_type"] == "nfs-deployment"
        assert boot1.openqrm["root"] == f"{storage}:{path}"
        assert out["image_name"] == name and out["resource_id"] == str(boot1.openqrm["resource_id"])
        assert boot1.init == "systemd" and boot1.system_state in ("running", "degraded"), boot1.system_state

        # the real server's database: the node's resource, assigned the image; the image's own events
        rows = _lab.openqrm_sql(lab["name"], "SELECT resource_mac, resource_ip, resource_imageid, resource_image "
                                f"FROM resource_info WHERE resource_id={int(boot1.openqrm['resource_id'])}")
        assert len(rows) == 1 and rows[0]["resource_image"] == name, rows
        assert rows[0]["resource_mac"] == lab_boot.DEFAULT_MAC.upper()
        assert rows[0]["resource_imageid"] == str(boot1.openqrm["image_id"])
        names = {e["event_name"] for e in _lab.events(lab["name"])}
        assert f"create_image_{name}" in names, sorted(n for n in names if n and name in n)

        # the new generation: the next boot of the same node finds it
        boot2 = _boot(lab, path)
        out = _fields(boot2.script_output)
        assert out["marker"] == second and out["root"] == f"{storage}:{path}", out
        _ran_qrmfs_init(boot2, out, "/usr/lib/systemd/systemd")
        held = _nodes(lab["config"], path)
        assert out["generation"] != gen1 and held[out["generation"]] == [NODE], (out, held)
        assert held.get(gen1, []) == [], held  # rebooted into the new generation: the one it ran is free
        assert boot2.openqrm is not None and boot2.openqrm["resource_id"] == boot1.openqrm["resource_id"]
        assert f"update_image_{name}" in {e["event_name"] for e in _lab.events(lab["name"])}
    finally:
        on_source(f"rm -f {MARKER}")
        qrmfs("remove", "-t", f"storage:{path}", "--yes", "--running-nodes-ok", config=lab["config"])


def test_a_sysv_image_boots_through_openqrm_linuxrc_to_runlevel_3(lab: dict[str, Any]) -> None:
    srclab = _lab.up(sources=["sysv"])
    name = f"oqsysv_{uuid.uuid4().hex[:8]}"
    path = f"{srclab['hosts']['storage']['export_root']}/{name}"
    try:
        r = qrmfs("create", "-t", f"storage:{path}", "-l", "sysv:/", "--hostname", "sysvnode",
                  "--private-add", PRIVATE, config=srclab["config"])
        assert r.returncode == 0, r.stderr
        boot = _boot(srclab, path, reboot=True)
        assert (boot.init, boot.state, boot.rc_done) == ("sysv", "runlevel 3", True)
        _rebooted(boot, sysv=True)
        out = _fields(boot.script_output)
        _ran_qrmfs_init(boot, out, "/usr/lib/qrmfs/init")
        assert out["pid1_name"] == "init", out  # SysV init's own name, as ps and pidof show it
        assert _nodes(srclab["config"], path)[out["generation"]] == [NODE]
        assert out["root"] == f"{srclab['hosts']['storage']['address']}:{path}", out
        assert out["type"] == "nfs" and "nolock" in out["opts"].split(","), out
        assert out["image_name"] == name
    finally:
        qrmfs("remove", "-t", f"storage:{path}", "--yes", "--running-nodes-ok", config=srclab["config"])
