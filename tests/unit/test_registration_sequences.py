"""Registrations survive every sequence (issue 26, item 3 and "Also seen"): an armed registration is delivered
once the image exists, whatever generations, rollbacks or removes came in between; `list`, the manifest and the
spool agree after any order of spooled jobs and any number of parallel flushes. Real qrmfs processes against a
local storage server and a tiny openQRM on 127.0.0.1 (no docker)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.unit import test_registration_faults as rf
from tests.unit.test_registration_faults import Server, _local_create, _local_storage, qrmfs, spool_jobs

home, server = rf.home, rf.server  # the fixtures: a home with a password file, a tiny openQRM


def _run(home: dict[str, Any], *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "qrmfs", *args], capture_output=True, text=True, timeout=300,
                       env={**home["env"], **(env or {})})
    return p.returncode, p.stdout, p.stderr


def _listed_registration(home: dict[str, Any], cfg: str) -> str:
    rc, out, err = _run(home, "list", "--json", "--config", cfg)
    assert rc == 0, err
    (row,) = json.loads(out)["result"]["images"]
    return str(row["registration"]["state"])


def _serve_again(server: Server) -> None:
    """openQRM back on the same port (the spooled jobs are bound to its URL)."""
    server.httpd = ThreadingHTTPServer(server.httpd.server_address, server.httpd.RequestHandlerClass)
    server.httpd.daemon_threads = True
    threading.Thread(target=server.httpd.serve_forever, daemon=True).start()


def _manifest(root: Path) -> dict[str, Any]:
    return dict(json.loads((root / "img1/.qrmfs/manifest.json").read_text()))


def test_killed_after_publish_then_updated_the_flush_still_registers(home: dict[str, Any], server: Server) -> None:
    """Issue 26, reproduction 3: a registered create killed right after its publish, then `update -o`, then
    flush: the image exists, so new_image is sent (once), no failure is reported, `list` says sent."""
    root, cfg, p, _err = _local_create(home, server, "after-publish")
    assert p.returncode == -signal.SIGKILL
    (job,) = spool_jobs(home)
    src = home["tmp"] / "src"
    rc, _out, err = _run(home, "update", "-t", f"local:{root}/img1", "-l", str(src), "-o", "--config", cfg)
    assert rc == 0, err
    rc, out, err = _run(home, "flush", "--json", "--config", cfg)
    assert rc == 0, err
    assert json.loads(out)["result"]["delivered"] == [job["id"]]
    assert "never published" not in err
    assert server.images == ["img1"] and server.commands().count("new_image") == 1
    assert "3" not in [r["query"].get("event_priority") for r in server.requests]  # no failure reported
    assert spool_jobs(home) == []
    assert _manifest(root)["registration"]["state"] == "sent"
    assert _listed_registration(home, cfg) == "sent"


def test_killed_after_publish_then_updated_and_rolled_back_the_flush_still_registers(
        home: dict[str, Any], server: Server) -> None:
    """The same with an update and a rollback in between (the armed generation is current again, the update's
    generation is the newest earlier one)."""
    root, cfg, p, _err = _local_create(home, server, "after-publish")
    assert p.returncode == -signal.SIGKILL
    (job,) = spool_jobs(home)
    src = home["tmp"] / "src"
    (src / "etc" / "hostname").write_text("changed\n")
    for args in (("update", "-t", f"local:{root}/img1", "-l", str(src), "-o"),
                 ("rollback", "-t", f"local:{root}/img1", "-o")):
        rc, _out, err = _run(home, *args, "--config", cfg)
        assert rc == 0, err
    rc, out, err = _run(home, "flush", "--json", "--config", cfg)
    assert rc == 0, err
    assert json.loads(out)["result"]["delivered"] == [job["id"]]
    assert server.images == ["img1"] and "never published" not in err
    assert _listed_registration(home, cfg) == "sent"


def test_killed_after_publish_then_removed_the_registration_is_dropped_with_a_report(
        home: dict[str, Any], server: Server) -> None:
    """The image removed (-o: openQRM is not asked) before the flush: nothing to register; the registration is
    dropped by the remove, which says so, and the flush sends nothing."""
    root, cfg, p, _err = _local_create(home, server, "after-publish")
    assert p.returncode == -signal.SIGKILL
    (job,) = spool_jobs(home)
    rc, _out, err = _run(home, "remove", "-t", f"local:{root}/img1", "-o", "--yes", "--config", cfg)
    assert rc == 0, err
    assert f"dropped the spooled registration {job['id']} of the removed image" in err
    rc, out, err = _run(home, "flush", "--json", "--config", cfg)
    assert rc == 0, err
    assert json.loads(out)["result"] == {**json.loads(out)["result"], "delivered": [], "pending": []}
    assert "new_image" not in server.commands() and server.images == []
    assert spool_jobs(home) == []


def test_create_and_update_spooled_then_flushed_list_says_sent(home: dict[str, Any], server: Server) -> None:
    """Also seen: a create and an update both spooled while openQRM was down; flush delivers both, and `list`
    then says sent (it said unknown for good: the update's events-only job had replaced the create's job
    in the manifest)."""
    root, src, cfg = _local_storage(home, server)
    server.httpd.shutdown()
    server.httpd.server_close()  # openQRM is down: its port is closed
    for args in (("create", "-t", f"local:{root}/img1", "-l", str(src)),
                 ("update", "-t", f"local:{root}/img1", "-l", str(src))):
        rc, _out, err = _run(home, *args, "--config", cfg)
        assert rc == 0, err
    assert len(spool_jobs(home)) == 2
    assert _listed_registration(home, cfg) == "pending"
    _serve_again(server)
    rc, out, err = _run(home, "flush", "--json", "--config", cfg)
    assert rc == 0, err
    assert len(json.loads(out)["result"]["delivered"]) == 2
    assert server.images == ["img1"]
    assert spool_jobs(home) == []
    assert _manifest(root)["registration"]["state"] == "sent"
    assert _listed_registration(home, cfg) == "sent"


def test_two_flushes_at_once_neither_reports_a_job_the_other_delivered(home: dict[str, Any],
                                                                         server: Server) -> None:
    """Also seen: of two flushes run at once, one exited 13 "still pending 1" for a job the other delivered."""
    root, cfg, p, _err = _local_create(home, server, "after-publish")
    assert p.returncode == -signal.SIGKILL
    server.delay = 0.5  # the delivery takes a while: the second flush finds the job claimed
    a, b = qrmfs(home, "flush", "--json", "--config", cfg), qrmfs(home, "flush", "--json", "--config", cfg)
    outs = [p.communicate(timeout=120) for p in (a, b)]
    assert (a.returncode, b.returncode) == (0, 0), outs
    results = [json.loads(o)["result"] for o, _e in outs]
    assert sorted(len(r["delivered"]) for r in results) == [0, 1] and all(r["pending"] == [] for r in results)
    assert server.commands().count("new_image") == 1 and spool_jobs(home) == []
    assert _listed_registration(home, cfg) == "sent"
