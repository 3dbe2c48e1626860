"""Registration faults against the lab (issue 10): the real qrmfs CLI, the real storage server, the openQRM
mock with its fault injection. A qrmfs killed mid-new_image, remove by address dropping what was spooled
under the config name, bad settings touching nothing, and the password in no argv on any host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from lab import lab as _lab

from .helpers import exports_listing, mock_state, qrmfs, result_of, run_on, write_config

pytestmark = pytest.mark.e2e


def _name(path: str) -> str:
    return path.rsplit("/", 1)[1]


def _spool(tmp_path: Any) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "spool").glob("*.json"))]


def _wait(what: str, probe: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = probe()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_killed_while_new_image_is_in_flight_then_flush_leaves_one_record(lab, mock, cfg, image_path, tmp_path):
    """openQRM takes new_image and never answers; qrmfs (with its ssh children) is killed right then. The
    spool says "maybe delivered", and the next flush makes sure the server ends with exactly one record."""
    mock.post("/_mock/fault", json={"mode": "hang", "path": "image-action"}).raise_for_status()
    argv = [sys.executable, "-m", "qrmfs", "create", "-t", f"storage:{image_path}", "-l", "source:/srv", "-u",
            "openqrm", "--config", cfg]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait("new_image reaches the mock", lambda: any(
            r["query"].get("image_command") == "new_image" for r in mock_state(mock)["requests"]), timeout=300)
        (job,) = _spool(tmp_path)
        new = [r for r in job["requests"] if r["params"].get("image_command") == "new_image"]
        assert new and new[0]["maybe_delivered"] is True  # written before the request went out
        os.killpg(p.pid, signal.SIGKILL)  # qrmfs and every child of it: a crash
        p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    (job,) = _spool(tmp_path)
    assert [r["maybe_delivered"] for r in job["requests"] if r["params"].get("image_command") == "new_image"] == [
        True]
    # the server side of the same fault: it did apply the request after all (as a real server may)
    mock.delete("/_mock/fault").raise_for_status()
    params = next(r["params"] for r in job["requests"] if r["params"].get("image_command") == "new_image")
    httpx.get(lab["openqrm_mock"]["url"] + "/base/server/image/image-action.php", params=params, timeout=10,
              auth=("openqrm", lab["openqrm"]["password"])).raise_for_status()
    assert [i["image_name"] for i in mock_state(mock)["images"]] == [_name(image_path)]
    r = qrmfs("flush", "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    assert result_of(r)["delivered"] == [job["id"]]
    image_cmds = [q["query"].get("image_command") for q in mock_state(mock)["requests"]
                  if "image_command" in q["query"]]
    assert image_cmds[-2:] == ["remove_by_name", "new_image"]
    assert [i["image_name"] for i in mock_state(mock)["images"]] == [_name(image_path)]  # exactly one
    assert _spool(tmp_path) == []


def test_remove_by_address_drops_what_was_spooled_under_the_config_name(lab, mock, cfg, image_path, tmp_path):
    mock.post("/_mock/fault", json={"mode": "500", "path": "image-action"}).raise_for_status()
    r = qrmfs("create", "-t", f"storage:{image_path}", "-l", "source:/srv", "-u", "openqrm", "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    assert result_of(r)["registration"]["state"] == "pending"
    (job,) = _spool(tmp_path)
    addr = lab["hosts"]["storage"]["address"]
    assert job["target"] == f"storage:{image_path}"
    assert job["storage"] == {"address": addr, "port": 22, "path": image_path}
    r = qrmfs("remove", "-t", f"root@{addr}:{image_path}", "--yes", "-o", config=cfg)
    assert r.returncode == 0, r.stderr
    assert f"dropped the spooled registration {job['id']}" in r.stderr
    assert _spool(tmp_path) == [] and not list((tmp_path / "spool").glob("*.lock"))
    mock.delete("/_mock/fault").raise_for_status()
    r = qrmfs("flush", "--json", config=cfg)
    out = result_of(r)
    assert r.returncode == 0 and (out["delivered"], out["pending"]) == ([], [])
    assert mock_state(mock)["images"] == []  # the removed image never reaches openQRM


@pytest.mark.parametrize(("setting", "message"), [
    ("retries = -1", "config: openqrm.retries must be 0-100, not -1"),
    ("backoff = -1", "config: openqrm.backoff must be a number >= 0, not -1"),
    ("timeout = 0", "config: openqrm.timeout must be a number > 0, not 0"),
])
def test_bad_openqrm_settings_exit_3_before_anything(lab, mock, image_path, tmp_path, setting, message):
    path = write_config(lab, tmp_path, server="openqrm_mock")
    text = open(path).read()
    key = setting.split()[0]
    lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key} =")]
    i = lines.index("[openqrm]")
    lines.insert(i + 1, setting)
    open(path, "w").write("\n".join(lines) + "\n")
    before = exports_listing(lab)
    r = qrmfs("create", "-t", f"storage:{image_path}", "-l", "source:/srv", "-u", "openqrm", config=path)
    assert r.returncode == 3
    assert r.stderr.splitlines() == [f"qrmfs: error: {message}"]
    assert exports_listing(lab) == before
    assert mock_state(mock)["requests"] == [] and not (tmp_path / "spool").exists()


def test_bad_openqrm_url_option_exits_2_before_anything(lab, mock, cfg, image_path, tmp_path):
    before = exports_listing(lab)
    r = qrmfs("create", "-t", f"storage:{image_path}", "-l", "source:/srv", "-u", "openqrm", "--openqrm-url",
              "notaurl", config=cfg)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["qrmfs: error: invalid --openqrm-url 'notaurl': expected "
                                     "http(s)://HOST[:PORT]/PATH"]
    assert exports_listing(lab) == before and mock_state(mock)["requests"] == []


def test_hostile_target_component_touches_nothing_on_the_storage_server(lab, cfg, on_storage):
    before = exports_listing(lab)
    r = qrmfs("create", "-t", "storage:/exports/x;touch /tmp/p/img", "-l", "source:/srv", "-o", config=cfg)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and "component 'x;touch '" in r.stderr
    assert exports_listing(lab) == before
    assert on_storage("test -e /tmp/p && echo yes || echo no").stdout.decode().strip() == "no"


class _ArgvSampler:
    """Every process's argv on a lab host, over and over, read as it comes (a set of distinct lines)."""

    def __init__(self, info: dict[str, Any], role: str) -> None:
        import threading

        loop = "while :; do for f in /proc/[0-9]*/cmdline; do tr '\\000' ' ' < $f 2>/dev/null; echo; done; done"
        self.proc = subprocess.Popen([*_lab.ssh_argv(info, role), loop], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.seen: set[str] = set()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.seen.add(line.decode(errors="replace"))

    def stop(self) -> str:
        self.proc.kill()
        self.proc.wait(10)
        self.thread.join(10)
        return "".join(sorted(self.seen))


def test_the_password_in_no_argv_on_any_host_nor_in_the_image_or_a_url(lab, mock, cfg, image_path, tmp_path):
    pw = lab["openqrm"]["password"]
    samplers = {role: _ArgvSampler(lab, role) for role in ("storage", "source")}
    local: set[str] = set()
    try:
        # the whole source root: its copy lasts long enough (seconds, even as a tar stream) for the samplers,
        # which read every process's argv in a loop, to see both ends of it
        p = subprocess.Popen([sys.executable, "-m", "qrmfs", "create", "-t", f"storage:{image_path}", "-l",
                              "source:/", "-u", "openqrm", "-v", "--config", cfg],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while p.poll() is None:
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        local.add(open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"))
                    except OSError:
                        pass
        out, err = p.communicate()
    finally:
        remote = {}
        for role, sampler in samplers.items():
            remote[role] = sampler.stop()
    assert p.returncode == 0, err
    # the samplers saw the copy: the tar stream's two ends (or an rsync)
    assert "tar --extract" in remote["storage"] or "rsync" in remote["storage"], remote["storage"][-2000:]
    assert "tar --create" in remote["source"] or "rsync" in remote["source"], remote["source"][-2000:]
    assert any("qrmfs" in a and "create" in a for a in local)
    for where, text in (("local argv", "\n".join(local)), ("storage argv", remote["storage"]),
                        ("source argv", remote["source"]), ("stdout", out), ("stderr -v", err)):
        assert pw not in text, where
    name = _name(image_path)
    found = run_on(lab, "storage", f"grep -rlF -- {pw} {image_path}/.qrmfs /exports/.{name}.qrmfs-* || true")
    assert found.stdout.decode().strip() == ""
    reqs = mock_state(mock)["requests"]
    assert all(pw not in json.dumps(r["query"]) for r in reqs)  # never in a URL
    assert {(r["path"].rsplit("/", 1)[1], r["authorized_user"]) for r in reqs} == {
        ("resource-monitor.php", None), ("image-action.php", "openqrm")}


def test_validate_reports_a_node_conf_path_qrmfs_init_would_skip(lab, cfg, image_path, on_storage):
    r = qrmfs("create", "-t", f"storage:{image_path}", "-l", "source:/srv", "-o", "--private-add", "/var/lib/app",
              config=cfg)
    assert r.returncode == 0, r.stderr
    assert qrmfs("create", "-t", f"storage:{image_path}_x", "-l", "source:/srv", "-o", "--private-add",
                 "/srv/a:b", config=cfg).returncode == 2  # refused at create
    on_storage(f"sed -i \"s|^QRMFS_PRIVATE='/var/lib/app'|QRMFS_PRIVATE='/var/lib/app /srv/a:b'|\" "
               f"{image_path}/etc/qrmfs/node.conf && grep -q a:b {image_path}/etc/qrmfs/node.conf")
    r = qrmfs("validate", "-t", f"storage:{image_path}", "--json", config=cfg)
    assert r.returncode == 12, r.stdout + r.stderr
    findings = result_of(r, ok=False)["findings"]
    found = {(f["path"], f["fixable"]) for f in findings if f["step"] == "node-init"}
    assert ("/srv/a:b", False) in found, found
    assert any("qrmfs-init skips it at boot" in f["problem"] for f in findings)


# --- a node does not see the other nodes' state (a real diskless boot in QEMU) ---------------------------

HIDDEN_SCRIPT = r"""
echo "nodes=$(ls -A /.qrmfs/nodes | tr '\n' ' ')"
cat /.qrmfs/nodes/1/machine-id >/dev/null 2>&1 && echo "leak=yes"
touch /.qrmfs/nodes/x 2>/dev/null && echo "writable=yes"
echo "hider=$(findmnt -n -o FSTYPE,OPTIONS /.qrmfs/nodes | cut -d, -f1)"
echo "self-mid=$(cat /.qrmfs/node/machine-id)"
echo "mid=$(cat /etc/machine-id)"
echo "app=$(ls -A /var/lib/app | sort | tr '\n' ' ')"
echo "node $(hostname)" > /var/lib/app/mine && echo "wrote-mine=yes"
sync
"""


@pytest.mark.boot
def test_a_booted_node_sees_none_of_the_other_nodes_state(lab, image_path):
    from lab import boot as lab_boot

    r = qrmfs("create", "-t", f"storage:{image_path}", "-l", "source:/", "-o", "--shared", "--private-add",
              "/var/lib/app", config=lab["config"])
    assert r.returncode == 0, r.stderr
    timeout = float(os.environ.get("QRMFS_BOOT_TIMEOUT", "480"))
    first = lab_boot.boot(lab, lab_boot.BootSpec(image_path, node_id="1", timeout=timeout))
    assert first.reached, first.log_tail
    on_disk = run_on(lab, "storage", f"ls -A {image_path}/.qrmfs/nodes/1").stdout.decode().split()
    assert "machine-id" in on_disk  # node 1's state exists in the image: there is something to hide
    second = lab_boot.boot(lab, lab_boot.BootSpec(image_path, node_id="2", script=HIDDEN_SCRIPT, timeout=timeout))
    assert second.reached and second.script_rc == 0, (second.state, second.script_output, second.log_tail)
    f = dict(line.split("=", 1) for line in second.script_output.splitlines() if "=" in line)
    assert f["nodes"] == "" and "leak" not in f and "writable" not in f, f
    assert f["hider"].split() == ["tmpfs", "ro"], f
    assert f["self-mid"] == f["mid"] and len(f["mid"]) == 32, f  # its own state is where it needs it
    assert f["app"].split() == ["global", "seed.txt"], f  # seeded from the image for node 2
    assert f["wrote-mine"] == "yes"
    with open(second.log_path, errors="replace") as log:
        assert "the other nodes' state is hidden" in log.read()
    # the private write went to node 2's own state, not into the image or node 1's
    s = run_on(lab, "storage", f"cat {image_path}/.qrmfs/nodes/2/var/lib/app/mine; "
                               f"test ! -e {image_path}/var/lib/app/mine && test ! -e "
                               f"{image_path}/.qrmfs/nodes/1/var/lib/app/mine && echo apart").stdout.decode()
    assert s.split("\n")[-2] == "apart", s
