"""A node boots a qrmfs image the openQRM way (issue 27): openQRM 5.3.60's own linuxrc and
root-mount.nfs-deployment, unmodified, with the node's parameters from the lab's real openQRM server.

`qrmfs create` (registered) is all the operator does; the lab does what openQRM's install and an administrator
do (the kernel, the node's resource, an appliance of node, image and kernel: lab/boot/openqrm.py). Three TCG
boots (about 4-5 minutes each here): a systemd image, then, after `qrmfs update`, its new generation; a SysV image.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any

import pytest

from lab import boot as lab_boot
from lab import lab as _lab

from .helpers import qrmfs

pytestmark = [pytest.mark.e2e, pytest.mark.boot]

BOOT_TIMEOUT = float(os.environ.get("QRMFS_BOOT_TIMEOUT", "600"))
MARKER = "/etc/qrmfs-openqrm-boot-marker"

# Run by the lab's probe inside the booted node (the lab's openqrm-client stand-in starts it).
SCRIPT = rf"""
awk '$2 == "/" && $3 ~ /^nfs/ {{print "root=" $1; print "type=" $3; print "opts=" $4; exit}}' /proc/mounts
echo "marker=$(cat {MARKER} 2>/dev/null || echo none)"
. /var/openqrm/openqrm-resource.conf
echo "resource_id=$resource_id"
echo "image_name=$image_name"
"""


def _fields(output: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in output.splitlines() if re.match(r"^\w+=", ln))


def _boot(lab: dict[str, Any], path: str) -> lab_boot.BootResult:
    r = lab_boot.boot(lab, lab_boot.BootSpec(path, script=SCRIPT, timeout=BOOT_TIMEOUT, openqrm=True,
                                             forward_ssh=False, shutdown_timeout=30))
    assert r.ok, (f"state={r.state} error={r.error}\nscript rc={r.script_rc}:\n{r.script_output}\n"
                  f"--- log {r.log_path} ---\n{r.log_tail}")
    assert r.script_rc == 0, r.script_output
    return r


def test_registered_image_boots_through_openqrm_linuxrc_and_reboots_into_its_update(
        lab: dict[str, Any], on_source: Any) -> None:
    name = f"oqboot_{uuid.uuid4().hex[:8]}"
    path = f"{lab['hosts']['storage']['export_root']}/{name}"
    storage = lab["hosts"]["storage"]["address"]
    first, second = f"first-{uuid.uuid4().hex[:8]}", f"second-{uuid.uuid4().hex[:8]}"
    on_source(f"echo {first} > {MARKER}")
    try:
        r = qrmfs("create", "-t", f"storage:{path}", "-l", "source:/", config=lab["config"])
        assert r.returncode == 0, r.stderr

        boot1 = _boot(lab, path)
        out = _fields(boot1.script_output)
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

        # a new generation: the next boot of the same node finds it
        on_source(f"echo {second} > {MARKER}")
        r = qrmfs("update", "-t", f"storage:{path}", config=lab["config"])
        assert r.returncode == 0, r.stderr
        boot2 = _boot(lab, path)
        out = _fields(boot2.script_output)
        assert out["marker"] == second and out["root"] == f"{storage}:{path}", out
        assert boot2.openqrm is not None and boot2.openqrm["resource_id"] == boot1.openqrm["resource_id"]
        assert f"update_image_{name}" in {e["event_name"] for e in _lab.events(lab["name"])}
    finally:
        on_source(f"rm -f {MARKER}")
        qrmfs("remove", "-t", f"storage:{path}", "--yes", config=lab["config"])


def test_a_sysv_image_boots_through_openqrm_linuxrc_to_runlevel_3(lab: dict[str, Any]) -> None:
    srclab = _lab.up(sources=["sysv"])
    name = f"oqsysv_{uuid.uuid4().hex[:8]}"
    path = f"{srclab['hosts']['storage']['export_root']}/{name}"
    try:
        r = qrmfs("create", "-t", f"storage:{path}", "-l", "sysv:/", "--hostname", "sysvnode",
                  config=srclab["config"])
        assert r.returncode == 0, r.stderr
        boot = _boot(srclab, path)
        assert (boot.init, boot.state, boot.runlevel, boot.rc_done) == ("sysv", "runlevel 3", "3", True)
        out = _fields(boot.script_output)
        assert out["root"] == f"{srclab['hosts']['storage']['address']}:{path}", out
        assert out["type"] == "nfs" and "nolock" in out["opts"].split(","), out
        assert out["image_name"] == name
    finally:
        qrmfs("remove", "-t", f"storage:{path}", "--yes", config=srclab["config"])
