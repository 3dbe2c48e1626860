"""Nodes that run for weeks: a generation a running node uses is never deleted, recycled or rewritten.

One combined run (QEMU TCG boots are slow) on an image of the lab's `dual` source (Debian 12 with both inits:
SysV init is /sbin/init, systemd beside it), made with --shared and a private /var/lib/app (so it has
qrmfs-init). Node 2 boots it under SysV init; after one update, node 1 boots the next generation under
systemd (qrmfs.init=/lib/systemd/systemd): two nodes of one image, two generations, at once. While both run,
the image gets three more updates under the default config (keep_generations = 1, spare = "reflink" on the
lab's XFS export: the spare would be recycled as the next staging copy), a rollback, and two updates under
keep_generations = 0 with spare = "never" (the generation would be deleted); a marker in /etc changes at
each. `list --generations` shows both nodes on their generations, `remove` is refused naming both.
Node 1 checks its root (the marker it booted, no file changed, no stale handle, programs run), is powered off
without a clean shutdown and reboots: it runs the newest generation, and the one it held goes at the next
`gc` (node 2's is kept: it still runs). `validate --fix` of the image node 1 now runs is refused. Node 2
checks its root after everything (and that its heartbeat outlived SysV init's rc scripts), is powered off:
its generation stays held until node_timeout, then the next update frees it; `validate --fix` then repairs.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from lab import boot as lab_boot
from lab import lab as _lab
from qrmfs.agent.steps import MTAB_OK

from .helpers import qrmfs, result_of, run_on
from .test_boot import _explain, _facts

pytestmark = [pytest.mark.e2e, pytest.mark.boot]

NODE_TIMEOUT = 120      # seconds (config node_timeout): well above the node's heartbeat
HEARTBEAT = 5           # qrmfs.heartbeat= on the nodes' kernel command line
RUN_TIMEOUT = 1800      # a boot, its wait for the go, and its checks (TCG on two shared cores)
MARKER = "/etc/qrmfs-run-marker"
SOURCE = "dual"         # the lab source with both inits (lab/images/sources/dual)
SYSTEMD = "/lib/systemd/systemd"

# Runs inside the node: what its root is before the updates, a sign on the storage server that it got there
# (in its private directory, which moves with the image), a wait for the go, what its root is after them.
HOLD_SCRIPT = r"""
snap() {
    find /etc /usr/bin -xdev -maxdepth 2 \( -type f -o -type l \) -exec stat -c '%n %s %Y %i' {} + |
        sort | md5sum | cut -d' ' -f1
}
alive() { stat -c %Y /.qrmfs/node/alive; }
echo "pid1=$(cat /proc/1/comm)"
echo "runlevel=$(runlevel | cut -d' ' -f2)"
echo "running=$(cat /.qrmfs/node/running)"
echo "generation=$(cat /.qrmfs/generation)"
echo "marker1=$(cat /etc/qrmfs-run-marker)"
echo "snap1=$(snap)"
a=$(alive)
sync
echo ready > /var/lib/app/phase1-ready && sync
i=0
# every 3 s, with the shell's own readdir (a glob): each process a waiting guest starts costs a TCG host core
while [ ! -e /var/lib/app/go ] && [ "$i" -lt 500 ]; do sleep 3; i=$((i + 1)); for f in /var/lib/app/*; do :; done; done
echo "go=$(cat /var/lib/app/go 2>/dev/null)"
echo "beat=$([ "$(alive)" -gt "$a" ] && echo yes)"
echo "marker2=$(cat /etc/qrmfs-run-marker)"
echo "snap2=$(snap)"
echo "stale=$(ls -la / /etc /usr/bin /var/lib/app 2>&1 | grep -ci 'stale')"
echo "program=$(/bin/sh -c 'echo $((6 * 7))') $(/usr/bin/md5sum /bin/ls >/dev/null && echo ran)"
echo "private=$(echo still-writable > /var/lib/app/after && cat /var/lib/app/after)"
"""
MARKER_SCRIPT = r"""
echo "pid1=$(cat /proc/1/comm)"
echo "marker=$(cat /etc/qrmfs-run-marker)"
echo "generation=$(cat /.qrmfs/generation)"
"""


def _config(lab: dict[str, Any], tmp: Path, name: str, extra: str) -> str:
    """The lab's config with top-level keys put first (a TOML table would otherwise swallow them)."""
    path = tmp / f"{name}.toml"
    path.write_text(f"node_timeout = {NODE_TIMEOUT}\n{extra}\n" + Path(lab["config"]).read_text())
    return str(path)


def _sh(lab: dict[str, Any], role: str, script: str) -> str:
    return run_on(lab, role, script).stdout.decode()


def _gens(path: str, config: str) -> list[dict[str, Any]]:
    r = qrmfs("list", "--generations", "-t", f"storage:{path}", "--json", config=config)
    assert r.returncode == 0, r.stderr
    images = result_of(r)["images"]
    assert len(images) == 1
    gens: list[dict[str, Any]] = images[0]["generations"]
    return gens


def _by_id(path: str, config: str, gen_id: str) -> dict[str, Any] | None:
    return next((g for g in _gens(path, config) if g["id"] == gen_id), None)


class Node:
    """A boot in a thread (boot() returns when the guest powered off)."""

    def __init__(self, lab: dict[str, Any], spec: lab_boot.BootSpec) -> None:
        self.result: lab_boot.BootResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(lab, spec), daemon=True)
        self.thread.start()

    def _run(self, lab: dict[str, Any], spec: lab_boot.BootSpec) -> None:
        try:
            self.result = lab_boot.boot(lab, spec)
        except BaseException as e:  # handed to the test's thread
            self.error = e

    def done(self) -> lab_boot.BootResult:
        self.thread.join(RUN_TIMEOUT + 300)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "the boot did not end"
        return self.result


def _wait(what: str, check: Any, timeout: float, nodes: tuple[Node, ...] = ()) -> Any:
    """Poll (every 2 s: each check is an ssh round trip) until check() is true; a boot that ended meanwhile
    fails at once, with its console."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        for n in nodes:
            if not n.thread.is_alive():
                r = n.done()
                raise AssertionError(f"a node ended while waiting until {what}: {_explain(r)}")
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(2)


def _exists(lab: dict[str, Any], path: str) -> bool:
    return run_on(lab, "storage", f"test -e {path}", check=False).returncode == 0


def _private(image: str, node: str, name: str) -> str:
    """A file of the node's private /var/lib/app, on the storage server (its state moves with the image)."""
    return f"{image}/.qrmfs/nodes/{node}/var/lib/app/{name}"


def _update(path: str, config: str, kept_for: set[str]) -> None:
    """An update; kept_for: the nodes whose generations it had to keep beyond keep_generations (one each), and
    says so."""
    r = qrmfs("update", "-t", f"storage:{path}", config=config)
    assert r.returncode == 0, r.stderr
    kept = [ln for ln in r.stderr.splitlines() if "beyond keep_generations" in ln]
    named = {m for ln in kept for m in re.findall(r"node (\S+) \(since ", ln)}
    assert len(kept) == len(kept_for) and named == kept_for, r.stderr
    assert all("1 node(s) run it" in ln and "node_timeout" in ln for ln in kept), r.stderr


def _spec(path: str, node: str, script: str, init: str | None = None) -> lab_boot.BootSpec:
    """A boot of node `node`; init: the real init qrmfs-init execs (qrmfs.init=), else the image's /sbin/init."""
    return lab_boot.BootSpec(path, node_id=node, script=script, timeout=RUN_TIMEOUT,
                             cmdline=(f"qrmfs.heartbeat={HEARTBEAT}", *((f"qrmfs.init={init}",) if init else ())))


def _new_marker(lab: dict[str, Any], i: int) -> None:
    _sh(lab, SOURCE, f"echo {i} > {MARKER}")


def _updates_and_a_rollback(lab: dict[str, Any], path: str, default: str, never: str) -> None:
    """Three updates under the default config, a rollback, two updates under keep_generations = 0 and
    spare = "never", a new marker each time, while node 2 runs the generation the image was made as and node 1
    the one after it (keep_generations = 1 keeps node 1's anyway after the first)."""
    for i in range(2, 7):
        _new_marker(lab, i)
        _update(path, default if i <= 4 else never, {"2"} if i == 2 else {"1", "2"})
        if i == 4:
            r = qrmfs("rollback", "-t", f"storage:{path}", "-o", config=default)
            assert r.returncode == 0, r.stderr


def _operators_see_the_nodes(path: str, cfg: str, held: dict[str, str]) -> None:
    """list --generations (--json and text): each held generation with its node ({generation id: node}), since
    when, what it costs."""
    for gen_id, node in held.items():
        g = _by_id(path, cfg, gen_id)
        assert g is not None and g["role"] == "generation", _gens(path, cfg)
        assert [n["node"] for n in g["nodes"]] == [node] and g["nodes"][0]["since"].endswith("UTC"), g
        assert g["cost"] is not None and g["cost"] > 0, g
    r = qrmfs("list", "--generations", "-t", f"storage:{path}", config=cfg)
    assert all(f"run by node {n} since " in r.stdout for n in held.values()), r.stdout
    # keep_generations = 0, spare = "never": the held generations are the only ones left
    assert [g["role"] for g in _gens(path, cfg)] == ["current", "generation", "generation"]


def _root_unchanged(r: lab_boot.BootResult, marker: str, gen_id: str) -> dict[str, str]:
    """What the node saw: the generation and marker it booted, no file changed, no stale handle, programs run,
    its heartbeat went on."""
    assert r.reached and r.script_rc == 0, _explain(r)
    f = _facts(r)
    assert f["go"] == "go" and f["running"] == f["generation"] == gen_id, f
    assert f["marker1"] == f["marker2"] == marker, f"its root changed under it: {f}"
    assert f["snap1"] == f["snap2"], f"files changed under the running node: {f}"
    assert f["stale"] == "0" and f["program"] == "42 ran" and f["private"] == "still-writable", f
    assert f["beat"] == "yes", f"its heartbeat stopped: {f}"
    return f


def _current(lab: dict[str, Any], path: str) -> str:
    return _sh(lab, "storage", f"cat {path}/.qrmfs/generation").strip()


def test_two_nodes_of_a_shared_image_one_under_sysv_keep_their_generations_through_updates_and_a_rollback(
        lab: dict[str, Any], tmp_path: Path) -> None:
    srclab = _lab.up(sources=[SOURCE])
    default = _config(srclab, tmp_path, "default", "")
    never = _config(srclab, tmp_path, "never", 'keep_generations = 0\nspare = "never"')
    path = f"/exports/run_node_{uuid.uuid4().hex[:8]}"
    try:
        _new_marker(srclab, 0)
        r = qrmfs("create", "-t", f"storage:{path}", "-l", f"{SOURCE}:/", "-o", "--shared", "--private-add",
                  "/var/lib/app", config=default)
        assert r.returncode == 0, r.stderr
        gen0 = _current(srclab, path)
        sysv = Node(srclab, _spec(path, "2", HOLD_SCRIPT))  # /sbin/init: SysV init
        _wait("node 2 ran its first checks", lambda: _exists(srclab, _private(path, "2", "phase1-ready")),
              RUN_TIMEOUT, (sysv,))
        _new_marker(srclab, 1)
        _update(path, default, set())
        gen1 = _current(srclab, path)
        systemd = Node(srclab, _spec(path, "1", HOLD_SCRIPT, SYSTEMD))
        _wait("node 1 ran its first checks", lambda: _exists(srclab, _private(path, "1", "phase1-ready")),
              RUN_TIMEOUT, (sysv, systemd))
        _updates_and_a_rollback(srclab, path, default, never)
        _operators_see_the_nodes(path, never, {gen0: "2", gen1: "1"})
        held0 = (_by_id(path, never, gen0) or {})["path"]

        # remove is refused while nodes run the image, the nodes named; nothing removed
        r = qrmfs("remove", "-t", f"storage:{path}", "--yes", "-o", config=default)
        assert r.returncode != 0 and "--running-nodes-ok" in r.stderr, r.stderr
        assert "node 1 (since " in r.stderr and "node 2 (since " in r.stderr, r.stderr
        assert _exists(srclab, f"{path}/etc") and _by_id(path, default, gen0) and _by_id(path, default, gen1)

        # node 1's go: it checks its root, then powers off (forced: no clean shutdown) and reboots under systemd
        _sh(srclab, "storage", f"echo go > {_private(path, '1', 'go')}")
        f = _root_unchanged(systemd.done(), "1", gen1)
        assert f["pid1"] == "systemd", f
        newest = _current(srclab, path)
        again = lab_boot.boot(srclab, _spec(path, "1", MARKER_SCRIPT, SYSTEMD))
        assert again.reached and again.script_rc == 0, _explain(again)
        assert _facts(again) == {"pid1": "systemd", "marker": "6", "generation": newest}, _explain(again)

        # validate --fix never rewrites the image node 1 now runs: refused, node named, nothing changed
        _sh(srclab, "storage", f"rm {path}/etc/mtab && echo a-file > {path}/etc/mtab")
        r = qrmfs("validate", "-t", f"storage:{path}", "--fix", config=never)
        assert r.returncode != 0 and "node 1 (since " in r.stderr and "qrmfs update" in r.stderr, r.stderr
        assert _sh(srclab, "storage", f"cat {path}/etc/mtab").strip() == "a-file"

        # the generation node 1 held goes at the next gc (node 2's stays: it runs)
        rows = _gens(path, never)
        assert [n["node"] for n in rows[0]["nodes"]] == ["1"] and _by_id(path, never, gen1) is not None, rows
        held1 = (_by_id(path, never, gen1) or {})["path"]
        r = qrmfs("gc", "storage", config=never)
        assert r.returncode == 0, r.stderr
        assert not _exists(srclab, held1) and _exists(srclab, f"{held0}/etc"), r.stderr
        assert [(g["id"], [n["node"] for n in g["nodes"]]) for g in _gens(path, never)] == [
            (newest, ["1"]), (gen0, ["2"])]

        # node 2's go: after all of it, its root is the one it booted, under SysV init (runlevel 3, its rc
        # scripts done before the probe started the script: the heartbeat outlived them)
        _sh(srclab, "storage", f"echo go > {_private(path, '2', 'go')}")
        b = sysv.done()
        f = _root_unchanged(b, "0", gen0)
        assert b.init == "sysv" and f["pid1"] == "init" and f["runlevel"] == "3", (b.init, f)
        held = _by_id(path, never, gen0) or {}
        assert [n["node"] for n in held.get("nodes", [])] == ["2"], "held until node_timeout after its power-off"

        # it stopped reporting: its generation goes at the first update after node_timeout; validate --fix
        # repairs the image in place once no node runs it
        _wait("node 2's record timed out", lambda: not (_by_id(path, never, gen0) or {}).get("nodes"),
              NODE_TIMEOUT + 120)
        r = qrmfs("validate", "-t", f"storage:{path}", "--fix", config=never)
        assert r.returncode == 0, r.stderr
        assert _sh(srclab, "storage", f"readlink {path}/etc/mtab").strip() in MTAB_OK
        _new_marker(srclab, 7)
        _update(path, never, set())
        assert [g["role"] for g in _gens(path, never)] == ["current"] and not _exists(srclab, held0)
        assert _sh(srclab, "storage", f"ls -A {path}/.qrmfs/nodes").split() == ["1", "2"], "their state moved along"
        assert _exists(srclab, _private(path, "1", "after")) and _exists(srclab, _private(path, "2", "after")), \
            "their private data is kept"
    finally:
        run_on(srclab, SOURCE, f"rm -f {MARKER}", check=False)
        assert re.fullmatch(r"/exports/run_node_[0-9a-f]{8}", path)
        qrmfs("remove", "-t", f"storage:{path}", "--yes", "-o", "--running-nodes-ok", config=default)
