"""Nodes that run for weeks: a generation a running node uses is never deleted, recycled or rewritten.

One combined run (QEMU TCG boots are slow): node 1 runs an image with a private /var/lib/app (so it has
qrmfs-init). While it runs, the image gets three updates under the default config (keep_generations = 1,
spare = "reflink" on the lab's XFS export: the spare would be recycled as the next staging copy), a rollback,
and two more updates under keep_generations = 0 with spare = "never" (the generation would be deleted); a
marker in /etc changes at each. `list --generations` shows the node, `remove` is refused. Then the node checks
its root: the marker it booted, no file changed, no stale handle, programs still run. It is powered off
without a clean shutdown: its generation stays held until node_timeout, then the next update frees it. It
reboots and runs the newest generation. A node under SysV init keeps reporting once init's rc scripts ran.
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

from .helpers import qrmfs, result_of, run_on
from .test_boot import _explain, _facts

pytestmark = [pytest.mark.e2e, pytest.mark.boot]

NODE_TIMEOUT = 120      # seconds (config node_timeout): well above the node's heartbeat
HEARTBEAT = 5           # qrmfs.heartbeat= on the nodes' kernel command line
RUN_TIMEOUT = 1800      # a boot, its wait for the go, and its checks (TCG on two shared cores)
MARKER = "/etc/qrmfs-run-marker"

# Runs inside the node: what its root is before the updates, a sign on the storage server that it got there
# (in its private directory, which moves with the image), a wait for the go, what its root is after them.
HOLD_SCRIPT = r"""
snap() {
    find /etc /usr/bin -xdev -maxdepth 2 \( -type f -o -type l \) -exec stat -c '%n %s %Y %i' {} + |
        sort | md5sum | cut -d' ' -f1
}
echo "marker1=$(cat /etc/qrmfs-run-marker)"
echo "snap1=$(snap)"
sync
echo ready > /var/lib/app/phase1-ready && sync
i=0
while [ ! -e /var/lib/app/go ] && [ "$i" -lt 1500 ]; do sleep 1; i=$((i + 1)); ls /var/lib/app >/dev/null; done
echo "go=$(cat /var/lib/app/go 2>/dev/null)"
echo "marker2=$(cat /etc/qrmfs-run-marker)"
echo "snap2=$(snap)"
echo "stale=$(ls -la / /etc /usr/bin /var/lib/app 2>&1 | grep -ci 'stale')"
echo "program=$(/bin/sh -c 'echo $((6 * 7))') $(/usr/bin/md5sum /bin/ls >/dev/null && echo ran)"
echo "private=$(echo still-writable > /var/lib/app/after && cat /var/lib/app/after)"
"""
MARKER_SCRIPT = r"""
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


def _update(path: str, config: str, node: str, kept_for: bool) -> None:
    """An update; kept_for: it had to keep the node's generation beyond keep_generations, and says so."""
    r = qrmfs("update", "-t", f"storage:{path}", config=config)
    assert r.returncode == 0, r.stderr
    kept = [ln for ln in r.stderr.splitlines() if "beyond keep_generations" in ln]
    if kept_for:
        assert len(kept) == 1 and f"node {node} (since " in kept[0] and "node_timeout" in kept[0], r.stderr
    else:
        assert kept == [], r.stderr


def _spec(path: str, node: str, script: str) -> lab_boot.BootSpec:
    return lab_boot.BootSpec(path, node_id=node, script=script, timeout=RUN_TIMEOUT,
                             cmdline=(f"qrmfs.heartbeat={HEARTBEAT}",))


def _updates_and_a_rollback(lab: dict[str, Any], path: str, default: str, never: str) -> None:
    """Three updates under the default config, a rollback, two updates under keep_generations = 0 and
    spare = "never", a new marker each time, while the node runs the generation the image was made as."""
    for i in range(1, 6):
        _sh(lab, "source", f"echo {i} > {MARKER}")
        cfg = default if i <= 3 else never
        _update(path, cfg, "1", kept_for=i > 1)  # keep_generations = 1 keeps it anyway after the first
        if i == 3:
            r = qrmfs("rollback", "-t", f"storage:{path}", "-o", config=default)
            assert r.returncode == 0, r.stderr


def _operators_see_the_node(path: str, cfg: str, booted: str) -> None:
    """list --generations (--json and text): the held generation with its node, since when, what it costs."""
    g = _by_id(path, cfg, booted)
    assert g is not None and g["role"] == "generation", _gens(path, cfg)
    assert [n["node"] for n in g["nodes"]] == ["1"] and g["nodes"][0]["since"].endswith("UTC"), g
    assert g["cost"] is not None and g["cost"] > 0, g
    r = qrmfs("list", "--generations", "-t", f"storage:{path}", config=cfg)
    assert "run by node 1 since " in r.stdout, r.stdout
    # keep_generations = 0, spare = "never": the held generation is the only one left
    assert [g["role"] for g in _gens(path, cfg)] == ["current", "generation"]


def _root_unchanged(r: lab_boot.BootResult) -> None:
    """What the node saw: the marker it booted, no file changed, no stale handle, programs run."""
    assert r.reached and r.script_rc == 0, _explain(r)
    f = _facts(r)
    assert f["go"] == "go", f
    assert f["marker1"] == f["marker2"] == "0", f"its root changed under it: {f}"
    assert f["snap1"] == f["snap2"], f"files changed under the running node: {f}"
    assert f["stale"] == "0" and f["program"] == "42 ran" and f["private"] == "still-writable", f


def test_a_running_node_keeps_its_generation_through_updates_and_a_rollback(lab: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    default = _config(lab, tmp_path, "default", "")
    never = _config(lab, tmp_path, "never", 'keep_generations = 0\nspare = "never"')
    path = f"/exports/run_node_{uuid.uuid4().hex[:8]}"
    try:
        _sh(lab, "source", f"echo 0 > {MARKER}")
        r = qrmfs("create", "-t", f"storage:{path}", "-l", "source:/", "-o", "--private-add", "/var/lib/app",
                  config=default)
        assert r.returncode == 0, r.stderr
        booted = _sh(lab, "storage", f"cat {path}/.qrmfs/generation").strip()
        node = Node(lab, _spec(path, "1", HOLD_SCRIPT))
        _wait("the node ran its first checks", lambda: _exists(lab, _private(path, "1", "phase1-ready")),
              RUN_TIMEOUT, (node,))
        _updates_and_a_rollback(lab, path, default, never)
        _operators_see_the_node(path, never, booted)

        # remove is refused while a node runs the image, the node named; nothing removed
        r = qrmfs("remove", "-t", f"storage:{path}", "--yes", "-o", config=default)
        assert r.returncode != 0 and "node 1 (since " in r.stderr and "--running-nodes-ok" in r.stderr, r.stderr
        assert _exists(lab, f"{path}/etc") and _by_id(path, default, booted) is not None

        # the go: the node checks its root, then powers off (forced: no clean shutdown)
        _sh(lab, "storage", f"echo go > {_private(path, '1', 'go')}")
        _root_unchanged(node.done())
        held = _by_id(path, never, booted) or {}
        assert [n["node"] for n in held.get("nodes", [])] == ["1"], "held until node_timeout after its power-off"

        # it stopped reporting: its generation goes at the first update after node_timeout
        _wait("the node's record timed out", lambda: not (_by_id(path, never, booted) or {}).get("nodes"),
              NODE_TIMEOUT + 120)
        _sh(lab, "source", f"echo 6 > {MARKER}")
        _update(path, never, "1", kept_for=False)
        assert [g["role"] for g in _gens(path, never)] == ["current"]
        assert _sh(lab, "storage", f"ls -A {path}/.qrmfs/nodes").split() == ["1"], "its state moved along"
        assert _exists(lab, _private(path, "1", "after")), "its private data is kept"

        # it reboots: it runs the newest generation
        newest = _sh(lab, "storage", f"cat {path}/.qrmfs/generation").strip()
        again = lab_boot.boot(lab, _spec(path, "1", MARKER_SCRIPT))
        assert again.reached and again.script_rc == 0, _explain(again)
        assert _facts(again) == {"marker": "6", "generation": newest}, _explain(again)
    finally:
        run_on(lab, "source", f"rm -f {MARKER}", check=False)
        assert re.fullmatch(r"/exports/run_node_[0-9a-f]{8}", path)
        qrmfs("remove", "-t", f"storage:{path}", "--yes", "-o", "--running-nodes-ok", config=default)


SYSV_SCRIPT = r"""
alive() { stat -c %Y /.qrmfs/node/alive; }
a=$(alive)
i=0
while [ "$(alive)" = "$a" ] && [ "$i" -lt 120 ]; do sleep 1; i=$((i + 1)); done
echo "pid1=$(cat /proc/1/comm)"
echo "runlevel=$(runlevel | cut -d' ' -f2)"
echo "beat=$([ "$(alive)" -gt "$a" ] && echo yes)"
echo "running=$(cat /.qrmfs/node/running)"
echo "generation=$(cat /.qrmfs/generation)"
"""


def test_a_sysv_node_keeps_reporting_after_init_ran_its_rc_scripts(lab: dict[str, Any], tmp_path: Path) -> None:
    """The heartbeat loop qrmfs-init leaves behind outlives SysV init's boot (runlevel 3, rc scripts done)."""
    srclab = _lab.up(sources=["sysv"])
    cfg = _config(srclab, tmp_path, "default", "")
    path = f"/exports/run_node_{uuid.uuid4().hex[:8]}"
    try:
        r = qrmfs("create", "-t", f"storage:{path}", "-l", "sysv:/", "-o", "--private-add", "/var/lib/app",
                  config=cfg)
        assert r.returncode == 0, r.stderr
        gen = _sh(srclab, "storage", f"cat {path}/.qrmfs/generation").strip()
        b = lab_boot.boot(srclab, _spec(path, "2", SYSV_SCRIPT))
        assert b.reached and b.init == "sysv" and b.script_rc == 0, _explain(b)
        f = _facts(b)
        assert f["pid1"] == "init" and f["runlevel"] == "3" and f["beat"] == "yes", f
        assert f["running"] == f["generation"] == gen, f
        g = _by_id(path, cfg, gen)
        assert g is not None and [n["node"] for n in g["nodes"]] == ["2"], g
    finally:
        assert re.fullmatch(r"/exports/run_node_[0-9a-f]{8}", path)
        qrmfs("remove", "-t", f"storage:{path}", "--yes", "-o", "--running-nodes-ok", config=cfg)
