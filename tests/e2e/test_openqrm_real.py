"""qrmfs against the lab's real openQRM 5.3.60 server, read back from its own database: the records and events
each command leaves, a non-administrator, a database that is down, URLs that are not openQRM, and `qrmfs check`
leaving the server as it was. Small local sources: no QEMU boot, a few seconds per copy."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lab import lab as _lab
from qrmfs import jobs

from .helpers import qrmfs, result_of, run_on

pytestmark = pytest.mark.e2e


def _root(tmp_path: Path, hostname: str = "real") -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "hostname").write_text(f"{hostname}\n")
    return root


def _records(lab: dict[str, Any], name: str) -> list[dict[str, str | None]]:
    return [r for r in _lab.images(lab["name"]) if r["image_name"] == name]


def _events(lab: dict[str, Any], name: str) -> list[tuple[str | None, str | None, str | None]]:
    """qrmfs's events about name, as stored: (event_name, priority, description), in the order stored."""
    return [(e["event_name"], e["event_priority"], e["event_description"]) for e in _lab.events(lab["name"])
            if e["event_source"] == "qrmfs" and name[:20] in (e["event_name"] or "")]



def _login(lab: dict[str, Any]) -> list[str]:
    return ["-u", "openqrm", "--password-file", lab["openqrm"]["password_file"]]


@pytest.fixture
def second_path(lab: dict[str, Any], image_path: str) -> Iterator[str]:
    path = image_path + "_c"
    yield path
    run_on(lab, "storage", f"rm -rf {path} /exports/.{path.rsplit('/', 1)[1]}.qrmfs-*", check=False)


def test_every_command_leaves_what_a_real_install_shows(lab, cfg, image_path, second_path, tmp_path):
    """create, clone, update --shared (the record replaced), rollback (replaced back), remove: image_info holds
    exactly the records a real openQRM would (the nfs-deployment type, the storage's id, the path), and every
    9 is paired by its 10 in event_info."""
    name, clone = image_path.rsplit("/", 1)[1], second_path.rsplit("/", 1)[1]
    sid = str(lab["openqrm"]["storage_ids"]["storage"])
    r = qrmfs("create", "-t", f"storage:{image_path}", "-l", str(_root(tmp_path)), "-a", "x86_64", *_login(lab),
              "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    reg = result_of(r)["registration"]
    # what openQRM's answer showed: it ran new_image for an administrator; the record (read below from its
    # database) is something qrmfs cannot see, so it says "sent", never "registered"
    assert (reg["state"], reg["via"], reg["seen"]) == ("sent", "create", jobs.SEEN["new_image"])
    (rec,) = _records(lab, name)
    assert {k: rec[k] for k in ("image_type", "image_rootdevice", "image_rootfstype", "image_storageid",
                                "image_isshared", "image_capabilities")} == {
        "image_type": "nfs-deployment", "image_rootdevice": image_path, "image_rootfstype": "nfs",
        "image_storageid": sid, "image_isshared": "0", "image_capabilities": "arch=x86_64"}

    r = qrmfs("clone", "-s", clone, "-t", f"storage:{second_path}", "--from", f"storage:{image_path}",
              *_login(lab), config=cfg)
    assert r.returncode == 0, r.stderr
    (crec,) = _records(lab, clone)
    assert (crec["image_type"], crec["image_rootdevice"], crec["image_storageid"], crec["image_comment"]) == (
        "nfs-deployment", second_path, sid, f"qrmfs clone of storage:{image_path}")

    r = qrmfs("update", "-t", f"storage:{image_path}", "--shared", *_login(lab), config=cfg)
    assert r.returncode == 0, r.stderr
    (urec,) = _records(lab, name)
    assert urec["image_isshared"] == "1" and urec["image_id"] != rec["image_id"]
    assert (urec["image_type"], urec["image_storageid"], urec["image_capabilities"]) == (
        "nfs-deployment", sid, "arch=x86_64")

    r = qrmfs("rollback", "-t", f"storage:{image_path}", *_login(lab), config=cfg)
    assert r.returncode == 0, r.stderr
    (brec,) = _records(lab, name)
    assert brec["image_isshared"] == "0"

    for path in (second_path, image_path):
        r = qrmfs("remove", "-t", f"storage:{path}", "-y", *_login(lab), config=cfg)
        assert r.returncode == 0, r.stderr
        assert r.stdout == (f"removed storage:{path}; openQRM: deregistration sent ({jobs.SEEN['remove_by_name']})\n")
    assert _records(lab, name) == [] and _records(lab, clone) == []

    target = f"storage:{image_path}"
    got = _events(lab, name)
    order = ("create", "create", "update", "update", "rollback", "rollback", "remove", "remove")
    mine = [e for e in got if e[0] in {jobs.event_name(c, name) for c in order}]
    # every 9 was turned into 5 by its 10 (stored as 5): none left running; in the order qrmfs did them
    assert [(e[0], e[1]) for e in mine] == [(jobs.event_name(c, name), "5") for c in order]
    assert len(jobs.event_name("rollback", name)) == 50  # rollback_image_NAME would be longer
    assert [e[2] for e in mine[:2]] == [f"Started to create image {name} on {target}",
                                        f"Finished to create image {name} on {target}"]
    assert (jobs.event_name("clone", clone), "5", f"Finished to clone image {clone} on storage:{second_path}") in got


def test_long_names_and_failures_store_every_event(lab, cfg, tmp_path):
    """A 50-character name (remove_image_NAME would be 63 > VARCHAR(50)) and a failure whose message holds a
    quote: each event is stored, 9 paired with 10."""
    name = "L" * 38 + "_" + tmp_path.name[-11:].replace("-", "_").rjust(11, "x")
    assert len(name) == 50
    path = f"/exports/{name}"
    try:
        r = qrmfs("create", "-t", f"storage:{path}", "-l", str(_root(tmp_path)), *_login(lab), config=cfg)
        assert r.returncode == 0, r.stderr
        r = qrmfs("remove", "-t", f"storage:{path}", "-y", *_login(lab), config=cfg)
        assert r.returncode == 0, r.stderr
        bad = tmp_path / "it's gone"
        r = qrmfs("create", "-t", f"storage:{path}", "-l", str(bad), *_login(lab), config=cfg)
        assert r.returncode != 0
    finally:
        run_on(lab, "storage", f"rm -rf {path} /exports/.{name}.qrmfs-*", check=False)
    stored = [(e["event_name"] or "", e["event_priority"]) for e in _lab.events(lab["name"])
              if e["event_source"] == "qrmfs" and (e["event_description"] or "").find(name) >= 0]
    assert all(len(n) <= 50 for n, _ in stored)
    assert [p for n, p in stored if n.startswith("create_image_")][:2] == ["5", "5"]
    assert [p for n, p in stored if n.startswith("remove_image_")] == ["5", "5"]
    assert "9" not in [p for _, p in stored]


def test_a_non_administrator_is_told_and_nothing_is_registered(lab, cfg, image_path, tmp_path):
    viewer = lab["openqrm"]["viewer"]
    r = qrmfs("create", "-t", f"storage:{image_path}", "-l", str(_root(tmp_path)), "-u", viewer["user"],
              "--password-file", viewer["password_file"], config=cfg)
    assert r.returncode == 16, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("qrmfs: error:")]
    assert len(err) == 1 and "'viewer' is not an administrator" in err[0] and "waits in the spool" in err[0]
    assert _records(lab, image_path.rsplit("/", 1)[1]) == []
    spool = list((Path(cfg).parent / "spool").glob("*.json"))
    assert len(spool) == 1 and "new_image" in spool[0].read_text()
    manifest = json.loads(run_on(lab, "storage", f"cat {image_path}/.qrmfs/manifest.json").stdout)
    assert manifest["registration"]["state"] == "pending"


def test_a_database_that_is_down_fails_clearly_and_the_job_waits(lab, cfg, image_path, tmp_path):
    name = image_path.rsplit("/", 1)[1]
    _lab.openqrm_database(lab["name"], "stop")
    try:
        r = qrmfs("create", "-t", f"storage:{image_path}", "-l", str(_root(tmp_path)), *_login(lab), config=cfg)
    finally:
        _lab.openqrm_database(lab["name"], "start")
    assert r.returncode == 17, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("qrmfs: error:")]
    assert len(err) == 1 and "database is down" in err[0]
    assert _records(lab, name) == []
    f = qrmfs("flush", *_login(lab), "--json", config=cfg)
    assert f.returncode == 0, f.stderr
    (rec,) = _records(lab, name)
    assert rec["image_type"] == "nfs-deployment"


class _NotOpenQrm(BaseHTTPRequestHandler):
    def log_message(self, *a: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = b"<html><body>a web server</body></html>\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def not_openqrm() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _NotOpenQrm)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/openqrm"
    httpd.shutdown()


def test_a_url_that_is_not_openqrm_fails_clearly(lab, cfg, image_path, tmp_path, not_openqrm):
    r = qrmfs("create", "-t", f"storage:{image_path}", "-l", str(_root(tmp_path)), *_login(lab),
              "--openqrm-url", not_openqrm, config=cfg)
    assert r.returncode == 18, r.stderr
    assert "does not answer as openQRM 5.3" in r.stderr
    c = qrmfs("check", "--openqrm-url", not_openqrm, *_login(lab), "--json", config=cfg)
    assert c.returncode == 15
    (chk,) = [x for x in result_of(c, ok=False)["checks"] if x["name"] == "openqrm"]
    assert chk["status"] == "fail" and "does not answer as openQRM 5.3" in chk["message"]
    closed = qrmfs("check", "--openqrm-url", "http://127.0.0.1:9/openqrm", *_login(lab), "--json", config=cfg)
    (chk,) = [x for x in result_of(closed, ok=False)["checks"] if x["name"] == "openqrm"]
    assert chk["status"] == "fail" and "does not answer" in chk["message"]


def test_check_proves_the_role_and_leaves_the_server_as_it_was(lab, cfg):
    before = (_lab.events(lab["name"]), _lab.images(lab["name"]))
    r = qrmfs("check", *_login(lab), "--json", config=cfg)
    checks = {c["name"]: c for c in result_of(r, ok=r.returncode == 0)["checks"]}
    assert checks["openqrm"]["status"] == "ok", checks["openqrm"]
    assert "is an administrator" in checks["openqrm"]["message"]
    assert checks["openqrm record"]["status"] == "ok"
    assert (_lab.events(lab["name"]), _lab.images(lab["name"])) == before
    viewer = lab["openqrm"]["viewer"]
    v = qrmfs("check", "-u", viewer["user"], "--password-file", viewer["password_file"], "--json", config=cfg)
    (chk,) = [x for x in result_of(v, ok=False)["checks"] if x["name"] == "openqrm"]
    assert chk["status"] == "fail" and "'viewer' is not an administrator" in chk["message"]
