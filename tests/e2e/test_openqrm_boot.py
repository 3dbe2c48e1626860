"""A node boots a qrmfs image the openQRM way (issue 27): openQRM 5.3.60's own linuxrc and
root-mount.nfs-deployment, unmodified, with the node's parameters from the lab's real openQRM server.

`qrmfs create` (registered) is all the operator does; the lab does what openQRM's install and an administrator
do (the kernel, the node's resource, an appliance of node, image and kernel: lab/boot/openqrm.py). Three TCG
boots (about 4-5 minutes each here): a systemd image, `qrmfs update` while it runs, its reboot into the new
generation; a SysV image.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from lab import boot as lab_boot
from lab import lab as _lab

from .helpers import qrmfs, result_of, run_on

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


def _boot(lab: dict[str, Any], path: str, script: str = SCRIPT) -> lab_boot.BootResult:
    r = lab_boot.boot(lab, lab_boot.BootSpec(path, script=script, timeout=BOOT_TIMEOUT, openqrm=True,
                                             forward_ssh=False, shutdown_timeout=30))
    assert r.ok, (f"state={r.state} error={r.error}\nscript rc={r.script_rc}:\n{r.script_output}\n"
                  f"--- log {r.log_path} ---\n{r.log_tail}")
    assert r.script_rc == 0, r.script_output
    return r


def test_registered_image_boots_through_openqrm_linuxrc_is_updated_running_and_reboots_into_it(
        lab: dict[str, Any], on_source: Any) -> None:
    name = f"oqboot_{uuid.uuid4().hex[:8]}"
    path = f"{lab['hosts']['storage']['export_root']}/{name}"
    storage = lab["hosts"]["storage"]["address"]
    first, second = f"first-{uuid.uuid4().hex[:8]}", f"second-{uuid.uuid4().hex[:8]}"
    on_source(f"echo {first} > {MARKER}")
    try:
        r = qrmfs("create", "-t", f"storage:{path}", "-l", "source:/", config=lab["config"])
        assert r.returncode == 0, r.stderr

        def update() -> str:
            on_source(f"echo {second} > {MARKER}")
            u = qrmfs("update", "-t", f"storage:{path}", "--json", config=lab["config"])
            assert u.returncode == 0, u.stderr
            return str(result_of(u)["previous"])

        # the node boots and keeps running while qrmfs makes a new generation of its image
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(_boot, lab, path, WHILE_UPDATED)
            deadline = time.monotonic() + BOOT_TIMEOUT
            while run_on(lab, "storage", f"test -e {path}{RUN_DIR}/ready", check=False).returncode != 0:
                assert not running.done(), running.result()
                assert time.monotonic() < deadline, "the node never said ready"
                time.sleep(1)
            booted = update()
            run_on(lab, "storage", f"touch {booted}{RUN_DIR}/go")
            boot1 = running.result()
        out = _fields(boot1.script_output)
        # it ran on the generation it booted until it powered off: readable, its reader alive, programs run
        assert {k: out.get(k) for k in ("go", "reader", "errors", "marker_after")} == {
            "go": "seen", "reader": "alive", "errors": "0", "marker_after": first}, out
        assert out["runs"] == out["expected"] and len(out["runs"]) == 8, out
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
