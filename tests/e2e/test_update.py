"""update, rollback and generations against the lab: node data across updates and a rollback, the openQRM
record kept (events only), dry-run, a real SIGKILL of qrmfs mid-update, and a running node across an update
and a rollback (QEMU boots)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from qrmfs import jobs

from .helpers import exports_listing, qrmfs, real_events, real_images, result_of, run_on

pytestmark = pytest.mark.e2e

NODE_FILE = ".qrmfs/nodes/1/var/lib/app/state"


@pytest.fixture
def scratch(lab: dict[str, Any]) -> Iterator[str]:
    """A small root-like tree on the source host that a test may change (the fixture area is never touched)."""
    d = f"/srv/upd-{uuid.uuid4().hex[:6]}"
    run_on(lab, "source", f"mkdir -p {d}/etc {d}/usr/bin {d}/var/lib/app {d}/sbin && echo v1 > {d}/usr/bin/tool "
                          f"&& echo hello > {d}/etc/motd && printf '#!/bin/sh\\n' > {d}/sbin/init "
                          f"&& chmod 755 {d}/sbin/init && head -c 3000000 /dev/urandom > {d}/usr/bin/blob")
    yield d
    run_on(lab, "source", f"rm -rf {d}", check=False)


def _manifest(on_storage: Any, path: str) -> dict[str, Any]:
    return json.loads(on_storage(f"cat {path}/.qrmfs/manifest.json").stdout)


def test_node_data_kept_across_two_updates_and_a_rollback_one_openqrm_record(
        lab, cfg, scratch, image_path, on_source, on_storage):
    t = f"storage:{image_path}"
    name = os.path.basename(image_path)
    r = qrmfs("create", "-t", t, "-l", f"source:{scratch}", "--shared", "--private-add", "/var/lib/app", config=cfg)
    assert r.returncode == 0, r.stderr
    [record] = real_images(lab, name)
    on_storage(f"mkdir -p {image_path}/.qrmfs/nodes/1/var/lib/app && echo node-one > {image_path}/{NODE_FILE}")

    on_source(f"echo v2 > {scratch}/usr/bin/tool && rm {scratch}/etc/motd")
    r = qrmfs("update", "-t", t, "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    out = result_of(r)
    assert out["command"] == "update" and out["registration"]["state"] == "sent"
    on_storage(f"test \"$(cat {image_path}/usr/bin/tool)\" = v2 && test ! -e {image_path}/etc/motd && "
               f"test \"$(cat {image_path}/{NODE_FILE})\" = node-one")
    on_storage(f"echo node-one-later > {image_path}/{NODE_FILE}")  # the node writes between updates
    on_source(f"echo v3 > {scratch}/usr/bin/tool")
    r = qrmfs("update", "-t", t, config=cfg)
    assert r.returncode == 0, r.stderr
    on_storage(f"test \"$(cat {image_path}/usr/bin/tool)\" = v3 && "
               f"test \"$(cat {image_path}/{NODE_FILE})\" = node-one-later")
    r = qrmfs("rollback", "-t", t, "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    on_storage(f"test \"$(cat {image_path}/usr/bin/tool)\" = v2 && "
               f"test \"$(cat {image_path}/{NODE_FILE})\" = node-one-later")
    # keep_generations = 1 (the default): the image and one earlier generation, and on XFS the spare (the
    # pruned generation the next update starts from), nothing else
    reflinks = lab["hosts"]["storage"]["export_kind"] == "xfs"  # the lab's /exports: XFS (default) or ext4
    assert [e for e in exports_listing(lab) if name in e and not e.endswith("qrmfs-lock")] == sorted(
        [name, f".{name}.qrmfs-gen-3", *([f".{name}.qrmfs-spare"] if reflinks else [])])

    # the real openQRM's database: the same record (never a second one, never a new id: nothing it shows
    # changed, so update and rollback sent events only); every 9 paired by its 10 (stored as 5). openQRM keeps
    # one row per equal event: the second update's "Finished" only renewed the first one's time
    assert real_images(lab, name) == [record]
    events = real_events(lab, name)
    update, rollback = jobs.event_name("update", name), jobs.event_name("rollback", name)
    assert events.count((update, 5)) == 3 and events.count((rollback, 5)) == 2
    assert [p for _, p in events] == [5] * len(events)

    r = qrmfs("list", "--generations", "-t", t, "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    rows = result_of(r)["images"][0]["generations"]
    assert [g["role"] for g in rows] == ["current", "generation"]
    assert rows[0]["made_by"] == "update" and rows[0]["base_copy"] == ("reflink" if reflinks else "copy")
    assert rows[0]["source"] == f"source:{scratch}" and rows[0]["changes"]["changed"] >= 1
    if not reflinks:
        assert all(g["cost"] > 3_000_000 for g in rows)  # plain copies: each generation holds its own blob


def test_update_dry_run_prints_changes_and_touches_nothing(lab, cfg, scratch, image_path, on_source, on_storage):
    t = f"storage:{image_path}"
    assert qrmfs("create", "-t", t, "-l", f"source:{scratch}", "-o", config=cfg).returncode == 0
    on_source(f"echo v2 > {scratch}/usr/bin/tool && echo n > {scratch}/etc/new && rm {scratch}/etc/motd")
    before = (exports_listing(lab), on_storage(f"cd {image_path} && find . -printf '%p %i %s %T@ %C@\\n' | sort")
              .stdout)
    r = qrmfs("update", "-t", t, "--dry-run", "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    out = result_of(r)
    assert out["counts"] == {"changed": 1, "deleted": 1, "new": 1}
    assert {c["path"] for c in out["changes"]} == {"/usr/bin/tool", "/etc/new", "/etc/motd"}
    after = (exports_listing(lab), on_storage(f"cd {image_path} && find . -printf '%p %i %s %T@ %C@\\n' | sort")
             .stdout)
    assert after == before


def test_sigkill_of_qrmfs_mid_update_leaves_image_and_node_data(lab, cfg, scratch, image_path, on_source,
                                                                 on_storage):
    t = f"storage:{image_path}"
    name = os.path.basename(image_path)
    r = qrmfs("create", "-t", t, "-l", f"source:{scratch}", "-o", "--shared", "--private-add", "/var/lib/app",
              config=cfg)
    assert r.returncode == 0, r.stderr
    on_storage(f"mkdir -p {image_path}/.qrmfs/nodes/1/var/lib/app && echo node-one > {image_path}/{NODE_FILE}")
    old = on_storage(f"md5sum {image_path}/usr/bin/blob").stdout.decode().split()[0]
    on_source(f"head -c 200000000 /dev/urandom > {scratch}/usr/bin/blob && echo v2 > {scratch}/usr/bin/tool")
    p = subprocess.Popen([sys.executable, "-m", "qrmfs", "update", "-t", t, "--config", cfg],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the new generation's copy is under way
        if any(".qrmfs-staging-" in e and name in e for e in exports_listing(lab)):
            break
        assert p.poll() is None, p.communicate()
    else:
        pytest.fail("no staging directory appeared")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    # the image is the old one, whole, with its node data, whatever the storage side still finishes
    on_storage(f"test \"$(cat {image_path}/usr/bin/tool)\" = v1 && test \"$(cat {image_path}/{NODE_FILE})\" = node-one"
               f" && test -f {image_path}/.qrmfs/manifest.json && echo '{old}  {image_path}/usr/bin/blob' | md5sum -c")
    # the next update (it waits for nothing: the killed run's lock died with its helper's stdin) succeeds
    deadline = time.monotonic() + 60
    while True:
        r = qrmfs("update", "-t", t, config=cfg)
        if r.returncode != 6 or time.monotonic() > deadline:  # 6: the killed run's storage side still holds it
            break
    assert r.returncode == 0, r.stderr
    on_storage(f"test \"$(cat {image_path}/usr/bin/tool)\" = v2 && test \"$(cat {image_path}/{NODE_FILE})\" = node-one")
    assert not [e for e in exports_listing(lab) if name in e and ("staging" in e or "journal" in e)]


# --- a running node across an update and a rollback (QEMU/TCG boots) ------------------------------------

BOOT_TIMEOUT = float(os.environ.get("QRMFS_BOOT_TIMEOUT", "480"))
MARKER = "/etc/qrmfs-update-marker"
# The node mounts as openQRM's root-mount.nfs-deployment does (`mount -t nfs -o rw,nolock`: NFSv3 through the
# image's own ganesha export): its handles must stay valid when qrmfs re-adds the export after the exchange, and
# after a reboot it gets the current generation only because qrmfs told ganesha (tests/e2e/test_image_exports.py).
MOUNT = "openqrm"

# Runs inside the node: start a reader before the update, say "ready" in the node's private dir, wait for the
# test's "go" (written there after the update or rollback), then check that the node still works.
RUNNING_SCRIPT = r"""
exec 3</usr/bin/env
( while :; do cat /etc/os-release /usr/bin/env >/dev/null || echo "read failed" >> /var/lib/app/errors;
  sleep 0.5; done ) &
reader=$!
echo "marker-before=$(cat MARKER 2>/dev/null || echo none)"
echo up > /var/lib/app/ready && sync
i=0
while [ ! -e /var/lib/app/go ] && [ $i -lt 600 ]; do sleep 0.5; i=$((i+1)); done
echo "go=$(test -e /var/lib/app/go && echo seen || echo timeout)"
sleep 2
kill -0 $reader && echo "reader=alive"
echo "errors=$(cat /var/lib/app/errors 2>/dev/null | wc -l)"
ls /usr/bin /etc /var/lib >/dev/null && echo "root=readable"
echo "env-fd=$(head -c 4 <&3 | od -An -c | tr -d ' ')"
echo "os-release=$(grep -c ID= /etc/os-release)"
echo "marker-after=$(cat MARKER 2>/dev/null || echo none)"
echo "write=$(echo still > /var/lib/app/after && cat /var/lib/app/after)"
kill $reader
""".replace("MARKER", MARKER)

REBOOT_SCRIPT = r"""
echo "marker=$(cat MARKER 2>/dev/null || echo none)"
echo "after=$(cat /var/lib/app/after 2>/dev/null || echo none)"
""".replace("MARKER", MARKER)


def _facts(r: Any) -> dict[str, str]:
    return dict(line.split("=", 1) for line in r.script_output.splitlines() if "=" in line)


def _while_running(lab: dict[str, Any], image: str, change: Any) -> tuple[dict[str, str], bool]:
    """Boot node 1, and while it runs (after it said ready) call change(), which returns where the node's
    generation went; then let it check itself. Returns its facts and whether its /var/lib/app was private
    (qrmfs-init bound /.qrmfs/nodes/1/var/lib/app over it) or the image's own directory."""
    from concurrent.futures import ThreadPoolExecutor

    from lab import boot as lab_boot

    private = f"{image}/.qrmfs/nodes/1/var/lib/app"
    shared = f"{image}/var/lib/app"
    for d in (private, shared):
        run_on(lab, "storage", f"rm -f {d}/ready {d}/go {d}/errors {d}/after", check=False)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(lab_boot.boot, lab, lab_boot.BootSpec(image, node_id="1", script=RUNNING_SCRIPT,
                                                                timeout=BOOT_TIMEOUT, mount=MOUNT))
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            found = [d for d in (private, shared) if run_on(lab, "storage", f"test -e {d}/ready",
                                                            check=False).returncode == 0]
            if found:
                break
            assert not fut.done(), fut.result()
            assert time.monotonic() < deadline, "the node never said ready"
            time.sleep(1)
        is_private = found[0] == private
        went = change()
        # private: the node state moved along (same directory, same inode); else the node's /var/lib/app is
        # the one of the generation it booted, which now lies at `went`
        run_on(lab, "storage", f"touch {private if is_private else went + '/var/lib/app'}/go")
        r = fut.result()
    assert r.reached and r.script_rc == 0, (r.state, r.error, r.script_output, r.log_tail)
    return _facts(r), is_private


@pytest.mark.boot
def test_a_running_node_survives_an_update_and_a_rollback(lab, on_source):
    from lab import boot as lab_boot

    cfg = lab["config"]
    name = f"upd_boot_{uuid.uuid4().hex[:8]}"
    image = f"{lab['hosts']['storage']['export_root']}/{name}"
    t = f"storage:{image}"
    on_source(f"rm -f {MARKER}")
    r = qrmfs("create", "-t", t, "-l", "source:/", "-o", "--shared", "--private-add", "/var/lib/app", config=cfg)
    assert r.returncode == 0, r.stderr
    try:
        def update() -> str:
            on_source(f"echo generation-two > {MARKER}")
            u = qrmfs("update", "-t", t, "--json", config=cfg)
            assert u.returncode == 0, u.stderr
            return str(result_of(u)["previous"])

        f, private = _while_running(lab, image, update)
        # it runs on the generation it booted until it reboots: readable, its reader alive, no stale handles
        assert f == {"marker-before": "none", "go": "seen", "reader": "alive", "errors": "0", "root": "readable",
                     "env-fd": "177ELF", "os-release": f["os-release"], "marker-after": "none",
                     "write": "still"}, f
        r2 = lab_boot.boot(lab, lab_boot.BootSpec(image, node_id="1", script=REBOOT_SCRIPT, timeout=BOOT_TIMEOUT,
                                                 mount=MOUNT))
        assert r2.reached and r2.script_rc == 0, r2.log_tail
        assert _facts(r2) == {"marker": "generation-two", "after": "still" if private else "none"}

        def rollback() -> str:
            u = qrmfs("rollback", "-t", t, "--json", config=cfg)
            assert u.returncode == 0, u.stderr
            return str(result_of(u)["kept_as"])

        f, private = _while_running(lab, image, rollback)
        assert f["marker-before"] == "generation-two" and f["marker-after"] == "generation-two", f
        assert (f["go"], f["reader"], f["errors"], f["root"], f["write"]) == ("seen", "alive", "0", "readable",
                                                                              "still"), f
        r3 = lab_boot.boot(lab, lab_boot.BootSpec(image, node_id="1", script=REBOOT_SCRIPT, timeout=BOOT_TIMEOUT,
                                                 mount=MOUNT))
        assert r3.reached and r3.script_rc == 0, r3.log_tail
        assert _facts(r3) == {"marker": "none", "after": "still"}  # private, or written into this very tree
        print(f"\nrunning node across update and rollback: private dirs {'bound' if private else 'NOT bound'}")
    finally:
        on_source(f"rm -f {MARKER}", check=False)
        qrmfs("remove", "-t", t, "--yes", "-o", config=cfg)


def test_on_the_ext4_export_spare_always_makes_the_third_update_start_from_the_pruned_generation(
        lab, cfg, scratch, on_source, on_storage):
    """`spare = "always"` on /exports-plain (ext4, no reflinks): the second update keeps the generation it
    prunes as the spare, the third starts from it (no copy of the image), its tree is the source's, node data
    moved in, and `remove` deletes the spare with the image."""
    name = f"sp_{uuid.uuid4().hex[:8]}"
    path, t = f"/exports-plain/{name}", f"plain:/exports-plain/{name}"
    with open(cfg) as f:
        text = f.read()
    with open(cfg, "w") as f:
        f.write('spare = "always"\n' + text)
    try:
        r = qrmfs("create", "-t", t, "-l", f"source:{scratch}", "-o", "--shared", "--private-add", "/var/lib/app",
                  config=cfg)
        assert r.returncode == 0, r.stderr
        on_storage(f"mkdir -p {path}/.qrmfs/nodes/1/var/lib/app && echo node-one > {path}/{NODE_FILE}")
        for v in ("v2", "v3", "v4"):
            on_source(f"echo {v} > {scratch}/usr/bin/tool")
            r = qrmfs("update", "-t", t, config=cfg)
            assert r.returncode == 0, r.stderr
        gen = _manifest(on_storage, path)["generation"]
        assert gen["base_copy"]["method"] == "recycled" and gen["changes"]["changed"] == 1, gen
        on_storage(f"test \"$(cat {path}/usr/bin/tool)\" = v4 && test \"$(cat {path}/{NODE_FILE})\" = node-one")
        listing = on_storage(f"ls -a /exports-plain | grep {name}").stdout.decode().split()
        assert sorted(e for e in listing if not e.endswith("qrmfs-lock")) == sorted(
            [name, f".{name}.qrmfs-gen-3", f".{name}.qrmfs-spare"])
        r = qrmfs("remove", "-t", t, "--yes", config=cfg)
        assert r.returncode == 0, r.stderr
        assert on_storage(f"ls -a /exports-plain | grep -c {name} || true").stdout.decode().strip() == "0"
    finally:
        on_storage(f"rm -rf {path} /exports-plain/.{name}.qrmfs-*", check=False)
