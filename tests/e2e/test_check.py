"""qrmfs check against the lab: all green on the real lab, and each check fails for real when its fault is
injected (a stopped source, a full storage, a storage without xattr support, a wrong password, a changed
host key, rsync missing, an unwritable spool)."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from lab import lab as _lab
from qrmfs import openqrm

from .helpers import mock_state, qrmfs, run_on, write_config

pytestmark = pytest.mark.e2e


def checks(r: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    """The --json envelope's checks by name (asserting the envelope's shape on the way)."""
    doc = json.loads(r.stdout)
    assert doc["schema"] == 1 and doc["command"] == "check"
    assert doc["ok"] == (r.returncode == 0)
    return {c["name"]: c for c in doc["result"]["checks"]}


def statuses(r: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return {name: c["status"] for name, c in checks(r).items()}


def scratch_left(lab: dict[str, Any]) -> list[str]:
    out = run_on(lab, "storage", "find /exports -maxdepth 3 -name '.qrmfs-check-*'").stdout.decode()
    return out.split()


def test_all_checks_pass_on_the_lab(lab, cfg, mock):
    r = qrmfs("check", "-t", "storage:/exports/imgcheck", "-l", "source:/", "--json", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    got = checks(r)
    assert {n: c["status"] for n, c in got.items() if c["status"] != "ok"} == {}
    for name in ("config", "source source:/ ssh", "source source:/ rsync", "source source:/ size",
                 "storage storage ssh", "storage storage rsync", "storage storage python3",
                 "storage storage export root",
                 "storage storage free space", "storage storage hard links", "storage storage ACLs",
                 "storage storage xattrs", "storage storage security.capability", "openqrm", "spool",
                 "storage storage -> source source:/ ssh"):
        assert name in got, name
    assert re.fullmatch(r"rsync \d+\.\d+\.\d+", got["storage storage rsync"]["message"])
    assert re.fullmatch(r"python3 3\.\d+\.\d+", got["storage storage python3"]["message"])
    # the source's size comes from du: the lab source is a few hundred MiB (its 1 GiB sparse file is sparse)
    assert 50 * 2**20 < got["source source:/ size"]["data"]["bytes"] < 2**30
    assert got["storage storage free space"]["data"]["need"] == got["source source:/ size"]["data"]["bytes"]
    assert scratch_left(lab) == []
    # the openQRM probe changed nothing on the server
    state = mock_state(mock)
    assert state["images"] == [] and state["events"] == []
    assert [q["authorized_user"] for q in state["requests"]] == ["openqrm"]
    # text mode: one line per check, then the verdict
    t = qrmfs("check", "-t", "storage", "-l", "source:/", config=cfg)
    assert t.returncode == 0
    lines = t.stdout.splitlines()
    assert lines[-1] == "all checks passed"
    assert all(re.match(r"(ok|warn|fail) +\S", ln) for ln in lines[:-1])
    assert _lab.OPENQRM_PASSWORD not in r.stdout + r.stderr + t.stdout + t.stderr


def test_default_checks_every_configured_storage_and_host(lab, cfg):
    r = qrmfs("check", "--json", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    got = statuses(r)
    assert got["source source:/ ssh"] == "ok" and got["storage storage ssh"] == "ok"


@pytest.fixture
def source_container(lab: dict[str, Any]) -> Iterator[Any]:
    c = docker.from_env().containers.get(lab["hosts"]["source"]["container_id"])
    yield c
    c.reload()
    if c.status != "running":
        c.start()
    # Wait for readiness (lab.up probes ssh, NFS and HTTP with a deadline) and refresh the shared lab info.
    info = _lab.up(lab["name"])
    lab.update(info)


def test_stopped_source_fails_its_ssh_check(lab, tmp_path, source_container):
    source_container.stop(timeout=2)
    cfg = write_config(lab, tmp_path)
    started = time.monotonic()
    r = qrmfs("check", "-l", "source:/", "--json", config=cfg, timeout=120)
    assert r.returncode == 15, r.stdout + r.stderr
    c = checks(r)["source source:/ ssh"]
    assert c["status"] == "fail"
    assert "source host source" in c["message"] and "unreachable" in c["message"], c["message"]
    assert time.monotonic() - started < 60
    # the storage side still checks out: only the source fails
    assert statuses(r)["storage storage ssh"] == "ok"
    text = qrmfs("check", "-l", "source:/", config=cfg, timeout=120)
    assert re.search(r"^fail source source:/ ssh: source host source is unreachable", text.stdout, re.M), text.stdout


@pytest.fixture
def mounted(lab: dict[str, Any]) -> Iterator[Any]:
    """Mount a scratch filesystem below the storage's export root (the storage container has SYS_ADMIN);
    unmounted and removed afterwards."""
    made: list[str] = []

    def mount(fstype: str, options: str | None = None) -> str:
        d = f"/exports/chk_{fstype}_{uuid.uuid4().hex[:6]}"
        opts = f"-o {options} " if options else ""
        run_on(lab, "storage", f"mkdir {d} && mount -t {fstype} {opts}{fstype} {d}")
        made.append(d)
        return d

    yield mount
    for d in made:
        run_on(lab, "storage", f"umount {d}; rmdir {d}", check=False)


def test_storage_without_room_for_the_source_fails_free_space(lab, cfg, mounted):
    d = mounted("tmpfs", "size=2m")
    r = qrmfs("check", "-t", f"storage:{d}/img", "-l", "source:/", "--json", config=cfg)
    assert r.returncode == 15, r.stdout + r.stderr
    got = checks(r)
    c = got[f"storage storage:{d} free space"]
    assert c["status"] == "fail"
    assert c["message"].startswith(f"2.0 MiB free in {d}, but source source:/ needs about ")
    # the rest of that filesystem is fine: tmpfs keeps hard links, ACLs and xattrs
    assert got[f"storage storage:{d} xattrs"]["status"] == "ok"
    assert scratch_left(lab) == []


def test_a_full_storage_fails_the_write_probe(lab, cfg, mounted):
    d = mounted("tmpfs", "size=1m")
    run_on(lab, "storage", f"dd if=/dev/zero of={d}/fill bs=64k 2>/dev/null; test $(stat -f -c %a {d}) -eq 0")
    r = qrmfs("check", "-t", f"storage:{d}/img", "--json", config=cfg)
    assert r.returncode == 15, r.stdout + r.stderr
    got = checks(r)
    assert got[f"storage storage:{d} free space"]["data"]["free"] == 0
    c = got[f"storage storage:{d} writable"]
    assert c["status"] == "fail" and "No space left on device" in c["message"], c["message"]
    assert scratch_left(lab) == []


def test_storage_without_xattr_support_fails_acl_xattr_and_capability(lab, cfg, mounted):
    # ramfs keeps no extended attributes at all (tmpfs does): the probe must see that for real.
    d = mounted("ramfs")
    r = qrmfs("check", "-t", f"storage:{d}/img", "-l", "source:/", "--json", config=cfg)
    assert r.returncode == 15, r.stdout + r.stderr
    got = checks(r)
    for what in ("ACLs", "xattrs", "security.capability"):
        c = got[f"storage storage:{d} {what}"]
        assert c["status"] == "fail", c
        assert c["message"].startswith(f"{d} does not accept {what} (Operation not supported)"), c["message"]
    assert got[f"storage storage:{d} hard links"]["status"] == "ok"
    assert got[f"storage storage:{d} free space"]["status"] == "warn"  # ramfs reports no size
    assert scratch_left(lab) == []
    assert run_on(lab, "storage", f"ls -A {d}").stdout == b""


def test_wrong_password_fails_the_openqrm_check(lab, cfg, mock, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("not-the-password\n")
    r = qrmfs("check", "-t", "storage", "--password-file", str(pw), "--json", config=cfg)
    assert r.returncode == 15, r.stdout + r.stderr
    c = checks(r)["openqrm"]
    assert c["status"] == "fail"
    assert c["message"] == f"openQRM at {lab['openqrm_mock']['url']} refused the credentials of user 'openqrm' (401)"
    assert "not-the-password" not in r.stdout + r.stderr
    # a user who logs in but is no administrator cannot register images either
    viewer = lab["openqrm"]["viewer"]
    r = qrmfs("check", "-t", "storage", "-u", viewer["user"], "--password-file", viewer["password_file"], "--json",
              config=cfg)
    assert r.returncode == 15
    assert "is not an administrator (403)" in checks(r)["openqrm"]["message"]
    assert mock_state(mock)["images"] == []


def test_unreachable_openqrm_fails(lab, cfg):
    # the config's own URL (its password is never sent to an http host the config does not name)
    text = open(cfg).read()
    open(cfg, "w").write(text.replace(f'url = "{lab["openqrm"]["url"]}"', 'url = "http://127.0.0.1:9/openqrm"'))
    r = qrmfs("check", "-t", "storage", "--json", config=cfg)
    assert r.returncode == 15
    c = checks(r)["openqrm"]
    assert c["status"] == "fail" and c["message"].startswith("http://127.0.0.1:9/openqrm does not answer")


def test_changed_host_key_fails_the_ssh_checks(lab, tmp_path):
    """A known_hosts that pins other keys under the lab's addresses: storage and source are both refused."""
    kh = tmp_path / "known_hosts"
    src_key = (Path(lab["state_dir"]) / "hosts/source/ssh_host_ed25519_key.pub").read_text().split()[:2]
    sto_key = (Path(lab["state_dir"]) / "hosts/storage/ssh_host_ed25519_key.pub").read_text().split()[:2]
    kh.write_text(f"{lab['hosts']['storage']['address']} {' '.join(src_key)}\n"
                  f"{lab['hosts']['source']['address']} {' '.join(sto_key)}\n")
    cfg = Path(write_config(lab, tmp_path))
    cfg.write_text(cfg.read_text().replace(lab["ssh"]["known_hosts"], str(kh)))
    r = qrmfs("check", "-t", "storage", "-l", "source:/", "--json", config=str(cfg))
    assert r.returncode == 15, r.stdout + r.stderr
    got = checks(r)
    for name, who in (("storage storage ssh", "storage server storage"), ("source source:/ ssh", "source host source")):
        assert got[name]["status"] == "fail"
        assert got[name]["message"].startswith(f"the host key of {who} ")
        assert f"differs from the one pinned in {kh}" in got[name]["message"]
    assert "storage storage rsync" not in got  # nothing further is tried on a host that is not verified
    # and a host that is not pinned at all
    kh.write_text("")
    r = qrmfs("check", "-t", "storage", "--json", config=str(cfg))
    assert r.returncode == 15
    assert "is pinned in" in checks(r)["storage storage ssh"]["message"]
    assert checks(r)["storage storage ssh"]["message"].startswith("no host key of storage server storage")


def test_storage_that_cannot_log_in_to_the_source_fails_the_hop(lab, cfg):
    """The ssh route's pull: we reach the source, but the source refuses our key when it comes from the storage
    server's address (an authorized_keys from= rule, read by sshd at each login)."""
    ak = Path(lab["state_dir"]) / "hosts" / "source" / "authorized_keys"
    original = ak.read_text()
    ak.write_text(f'from="!{lab["hosts"]["storage"]["address"]},*" {original}')
    try:
        r = qrmfs("check", "-t", "storage", "-l", "source:/", "--json", config=cfg)
    finally:
        ak.write_text(original)
    assert r.returncode == 15, r.stdout + r.stderr
    got = checks(r)
    assert got["source source:/ ssh"]["status"] == "ok"
    c = got["storage storage -> source source:/ ssh"]
    assert c["status"] == "fail"
    assert c["message"] == (f"from storage server storage: root@{lab['hosts']['source']['address']} refused our "
                            "ssh key (Permission denied)")
    assert run_on(lab, "storage", "ls -A /tmp").stdout.decode().count(".qrmfs-check-known_hosts-") == 0


def test_storage_refusing_connections_fails_and_skips_the_hop(lab, tmp_path):
    cfg = Path(write_config(lab, tmp_path))
    addr = lab["hosts"]["storage"]["address"]
    cfg.write_text(cfg.read_text().replace(f'[storage.storage]\naddress = "{addr}"\nssh_user = "root"\nssh_port = 22',
                                           '[storage.storage]\naddress = "127.0.0.1"\nssh_user = "root"\nssh_port = 9'))
    r = qrmfs("check", "-l", "source:/", "--json", config=str(cfg))
    assert r.returncode == 15
    got = checks(r)
    assert got["storage storage ssh"]["message"] == "nothing accepts ssh at 127.0.0.1 port 9 (connection refused)"
    assert got["source source:/ ssh"]["status"] == "ok"
    assert not [n for n in got if n.startswith("storage storage ") and n != "storage storage ssh"]


def test_missing_rsync_on_the_source_fails(lab, cfg):
    run_on(lab, "source", "mv /usr/bin/rsync /usr/bin/rsync.qrmfs-test")
    try:
        r = qrmfs("check", "-l", "source:/", "--json", config=cfg)
    finally:
        run_on(lab, "source", "mv /usr/bin/rsync.qrmfs-test /usr/bin/rsync")
    assert r.returncode == 15, r.stdout + r.stderr
    got = checks(r)
    assert got["source source:/ ssh"]["status"] == "ok"
    assert got["source source:/ rsync"]["status"] == "fail"
    assert got["source source:/ rsync"]["message"].startswith("rsync is not installed on ")


def test_spool_pending_jobs_warn_and_an_unwritable_spool_fails(lab, tmp_path):
    cfg = Path(write_config(lab, tmp_path))
    spool = openqrm.Spool(str(tmp_path / "spool"))
    job = openqrm.Job("http://127.0.0.1:9/openqrm", "openqrm", "waiting_img", "storage:/exports/waiting_img",
                      [openqrm.event("create_image_waiting_img", 9, "x")])
    spool.save(job)
    r = qrmfs("check", "-t", "storage", "--json", config=str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr  # pending is a warning, not a failure
    c = checks(r)["spool"]
    assert c["status"] == "warn"
    assert f"{job.id} (waiting_img)" in c["message"] and "qrmfs flush" in c["message"]
    assert [p["id"] for p in c["data"]["pending"]] == [job.id]
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "spool"), "/dev/null/spool"))
    r = qrmfs("check", "-t", "storage", "--json", config=str(cfg))
    assert r.returncode == 15
    assert checks(r)["spool"]["status"] == "fail"


def test_bad_input_is_one_line_and_exit_2(lab, cfg):
    r = qrmfs("check", "-t", "storage:/etc/img", config=cfg)
    assert r.returncode == 2
    assert r.stderr.strip() == ("qrmfs: error: target storage:/etc/img is not below the export root /exports "
                                "of storage server storage")
    assert r.stdout == ""


def test_unparsable_config_fails_the_config_check(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[storage.x\n")
    r = qrmfs("check", "--json", config=str(bad))
    assert r.returncode == 15
    got = checks(r)
    assert list(got) == ["config"] and got["config"]["status"] == "fail"
    assert got["config"]["message"].startswith(f"config {bad}: ")


def test_no_gnu_tar_on_the_source_is_a_warning_and_a_create_still_copies_with_rsync(lab, cfg, image_path, on_storage):
    run_on(lab, "source", "mv /usr/bin/tar /usr/bin/tar.qrmfs-test")
    try:
        r = qrmfs("check", "-l", "source:/srv", "--json", config=cfg)
        made = qrmfs("create", "-t", f"storage:{image_path}", "-l", "source:/srv", "-o", config=cfg)
    finally:
        run_on(lab, "source", "mv /usr/bin/tar.qrmfs-test /usr/bin/tar")
    assert r.returncode == 0, r.stdout + r.stderr
    got = checks(r)
    assert got["source source:/srv tar"]["status"] == "warn"
    assert "falls back to rsync" in got["source source:/srv tar"]["message"]
    assert got["storage storage tar"]["status"] == "ok"
    assert made.returncode == 0, made.stderr
    assert "the tar stream did not end cleanly" in made.stderr and "rsync repairs the copy" in made.stderr
    on_storage(f"test -d {image_path}/fixture && test -f {image_path}/.qrmfs/manifest.json")
