"""qrmfs/openqrm.py: the HTTP client against an in-process fake server (httpx.MockTransport) and the spool."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from qrmfs import jobs, openqrm
from qrmfs.config import OpenQrm, SshHost, Storage
from qrmfs.errors import NotOpenQrmError, OpenQrmDownError, RegistrationError
from qrmfs.openqrm import Client, Job, Request, Spool, Transient

URL = "http://qrm.example/openqrm"
USER, PASSWORD = "openqrm", "S3cr3t pw!'\""
OQ = OpenQrm(deployment_id=17964780252743)
NAS1 = Storage("nas1", SshHost("10.0.0.5"), storage_id=1)
FIELDS = jobs.image_fields(OQ, NAS1, name="img1", rootdevice="/exports/img1", shared=False,
                           comment="qrmfs image from src1:/", arch="x86_64", os_name=None)


class FakeQrm:
    """The openQRM 5.3 interface qrmfs speaks, answering as it does (image-action.php: a newline once it ran a
    command, for an administrator; resource-monitor.php: nothing), with scripted faults consumed one per request.

    Faults: "500", "503", "408", "429", "401", "404" answer with that status and change nothing; "viewer"
    answers as openQRM does to a user without the administrator role (200, empty, nothing done); "page" answers
    200 with an HTML page, as a server that is not openQRM;
    "connect" raises httpx.ConnectError before anything arrives; "read" / "proto" first APPLY the request,
    then kill the connection (httpx.ReadError / httpx.RemoteProtocolError), like a server that answered
    into a dead connection.
    """

    def __init__(self, faults: list[str] | None = None) -> None:
        self.faults = list(faults or [])
        self.images: list[dict[str, str]] = []
        self.events: list[dict[str, str]] = []
        self.log: list[tuple[str, str]] = []  # (what, outcome)
        self.auth: list[str | None] = []
        self.next_id = 1
        self.on_request: Callable[[httpx.Request], None] | None = None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.on_request:
            self.on_request(request)
        q = dict(request.url.params)
        what = q.get("image_command") or q.get("event_name", "?")
        self.auth.append(request.headers.get("Authorization"))
        fault = self.faults.pop(0) if self.faults else "200"
        if fault == "connect":
            self.log.append((what, "connect"))
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if fault.isdigit() and fault != "200":
            self.log.append((what, fault))
            return httpx.Response(int(fault), text="<html>error</html>")
        if fault in ("viewer", "page"):
            self.log.append((what, fault))
            return httpx.Response(200, text="" if fault == "viewer" else "<html>a web server</html>")
        answer = self.apply(request.url.path, q)
        self.log.append((what, fault if fault in ("read", "proto") else "200"))
        if fault == "read":
            raise httpx.ReadError("connection reset by peer", request=request)
        if fault == "proto":
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return httpx.Response(200, text=answer)

    def apply(self, path: str, q: dict[str, str]) -> str:
        """The request's effect; the body openQRM answers."""
        if path == "/openqrm/action/resource-monitor.php":
            if q.get("event_name"):
                self.events.append(q)
            return ""
        assert path == "/openqrm/base/server/image/image-action.php", path
        cmd = q.pop("image_command", "")
        if cmd == "new_image":
            self.images.append({"image_id": str(self.next_id), **q})
            self.next_id += 1
        if cmd == "remove_by_name":
            self.images = [i for i in self.images if i["image_name"] != q["image_name"]]
        return "\n"


def client(server: FakeQrm, sleeps: list[float], *, retries: int = 4, backoff: float = 0.5,
           user: str | None = USER, password: str | None = PASSWORD) -> Client:
    return Client(URL + "/", user, password, retries=retries, backoff=backoff, transport=server.transport(),
                  sleep=sleeps.append)


def job(*requests: Request) -> Job:
    return Job(URL, USER, "img1", "nas1:/exports/img1", list(requests))


def spool_files(d: Path) -> list[Path]:
    return sorted(d.glob("*")) if d.is_dir() else []


# --- image_fields / requests -----------------------------------------------------------------------

def test_image_fields_exact() -> None:
    assert FIELDS == {
        "image_name": "img1",
        "image_type": "17964780252743",
        "image_rootdevice": "/exports/img1",
        "image_rootfstype": "nfs",
        "image_storageid": "1",
        "image_isshared": "0",
        "image_comment": "qrmfs image from src1:/",
        "image_capabilities": "arch=x86_64",
    }


def test_request_builders() -> None:
    e = openqrm.event("create_image_img1", 9, "Started to create image img1")
    assert (e.kind, e.path, e.params) == ("event", "/action/resource-monitor.php", {
        "resource_command": "post_event", "resource_id": "0", "event_name": "create_image_img1",
        "event_priority": "9", "event_source": "qrmfs", "event_description": "Started to create image img1"})
    assert e.describe() == "event create_image_img1 (priority 9): Started to create image img1"
    r = openqrm.remove_by_name("img1")
    assert (r.path, r.params) == ("/base/server/image/image-action.php",
                                  {"image_command": "remove_by_name", "image_name": "img1"})
    n = openqrm.new_image(FIELDS)
    assert n.params == {"image_command": "new_image", **FIELDS}
    assert n.describe() == "new_image img1"


# --- send: retries and backoff --------------------------------------------------------------------

def test_send_success_first_try() -> None:
    srv, sleeps = FakeQrm(), []
    client(srv, sleeps).send(openqrm.new_image(FIELDS))
    assert sleeps == []
    assert [i["image_name"] for i in srv.images] == ["img1"]
    assert srv.images[0]["image_rootdevice"] == "/exports/img1"
    assert srv.auth == ["Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]


def test_event_is_sent_without_credentials() -> None:
    srv, sleeps = FakeQrm(), []
    client(srv, sleeps, user=None, password=None).send(openqrm.event("e", 5, "d"))
    assert srv.auth == [None]
    assert srv.events[0]["event_name"] == "e"


def test_send_retries_500_with_exponential_backoff() -> None:
    srv, sleeps = FakeQrm(["500", "503", "500"]), []
    client(srv, sleeps).send(openqrm.new_image(FIELDS))
    assert sleeps == [0.5, 1.0, 2.0]
    assert srv.log == [("new_image", "500"), ("new_image", "503"), ("new_image", "500"), ("new_image", "200")]
    assert len(srv.images) == 1


@pytest.mark.parametrize("fault", ["408", "429", "connect"])
def test_send_retries_transient(fault: str) -> None:
    srv, sleeps = FakeQrm([fault]), []
    client(srv, sleeps, backoff=0.1).send(openqrm.event("e", 5, "d"))
    assert sleeps == [0.1]
    assert len(srv.events) == 1


def test_send_gives_up_after_retries() -> None:
    srv, sleeps = FakeQrm(["connect"] * 10), []
    with pytest.raises(Transient, match="cannot connect to http://qrm.example/openqrm"):
        client(srv, sleeps, retries=4, backoff=0.5).send(openqrm.new_image(FIELDS))
    assert sleeps == [0.5, 1.0, 2.0, 4.0]  # no sleep after the last attempt
    assert len(srv.log) == 5


def test_send_no_retries() -> None:
    srv, sleeps = FakeQrm(["500"]), []
    with pytest.raises(Transient, match="answered 500"):
        client(srv, sleeps, retries=0).send(openqrm.event("e", 5, "d"))
    assert sleeps == []


@pytest.mark.parametrize(("status", "message", "code"), [
    ("401", "openQRM at http://qrm.example/openqrm refused the credentials of user 'openqrm' (401) for new_image "
            "img1", 13),
    ("viewer", "openQRM at http://qrm.example/openqrm did not run new_image img1: user 'openqrm' is not an "
               "administrator (openQRM answers 200 and logs an \"Un-Authorized access\" event); the job waits in "
               "the spool", 16),
    ("404", "http://qrm.example/openqrm does not answer as openQRM 5.3: 404 to new_image img1 (is the URL openQRM's "
            "base, e.g. http://host/openqrm?)", 18),
    ("page", "http://qrm.example/openqrm does not answer as openQRM 5.3: new_image img1 got a page of 25 bytes, "
             "where openQRM answers a newline (is the URL openQRM's base, e.g. http://host/openqrm?)", 18),
])
def test_send_does_not_retry_refusals(status: str, message: str, code: int) -> None:
    srv, sleeps = FakeQrm([status] * 5), []
    with pytest.raises(RegistrationError) as ei:
        client(srv, sleeps).send(openqrm.new_image(FIELDS))
    assert ei.value.message == message
    assert ei.value.exit_code == code
    assert sleeps == []
    assert len(srv.log) == 1
    assert srv.images == []


def test_a_page_to_an_event_is_not_openqrm() -> None:
    """openQRM's post_event answers nothing: a page means another server (the event went nowhere)."""
    srv = FakeQrm(["page"])
    with pytest.raises(NotOpenQrmError, match="where openQRM answers nothing"):
        client(srv, []).send(openqrm.event("e", 5, "d"))


def test_a_500_that_stays_with_the_database_down_is_its_own_error() -> None:
    """The last 500, and the database read answering 500 too: OpenQrmDownError (17), not a quiet spool entry."""
    srv = FakeQrm(["500", "500", "500"])
    with pytest.raises(OpenQrmDownError, match="its database is down") as ei:
        client(srv, [], retries=1).send(openqrm.new_image(FIELDS))
    assert ei.value.exit_code == 17
    assert [w for w, _ in srv.log] == ["new_image", "new_image", "?"]  # the last: post_event without a name
    assert srv.events == [] and srv.images == []


def test_a_500_with_the_database_answering_stays_transient() -> None:
    srv = FakeQrm(["500", "500"])
    with pytest.raises(Transient):
        client(srv, [], retries=1).send(openqrm.new_image(FIELDS))
    assert srv.events == [] and srv.images == []


def test_quick_client_does_not_diagnose() -> None:
    srv = FakeQrm(["500"])
    c = Client(URL, USER, PASSWORD, retries=0, transport=srv.transport(), diagnose=False)
    with pytest.raises(Transient):
        c.send(openqrm.new_image(FIELDS))
    assert len(srv.log) == 1


def test_image_request_without_credentials_sends_nothing() -> None:
    srv, sleeps = FakeQrm(), []
    with pytest.raises(RegistrationError, match="openQRM credentials are needed"):
        client(srv, sleeps, password=None).send(openqrm.new_image(FIELDS))
    assert srv.log == []


def test_remove_by_name_of_nothing_is_answered_alike() -> None:
    srv, sleeps = FakeQrm(), []
    client(srv, sleeps).send(openqrm.remove_by_name("img1"))
    assert srv.log == [("remove_by_name", "200")]
    assert sleeps == []


def test_request_urls() -> None:
    seen: list[str] = []
    srv = FakeQrm()
    srv.on_request = lambda r: seen.append(str(r.url.copy_with(query=None)))
    c = client(srv, [])
    c.send(openqrm.event("e", 5, "d"))
    c.send(openqrm.remove_by_name("x"))
    assert seen == ["http://qrm.example/openqrm/action/resource-monitor.php",
                    "http://qrm.example/openqrm/base/server/image/image-action.php"]


# --- a new_image whose fate is unknown ----------------------------------------------------------------

@pytest.mark.parametrize("death", ["read", "proto"])
def test_new_image_dying_after_send_ends_with_one_record(death: str) -> None:
    srv, sleeps = FakeQrm([death]), []
    req = openqrm.new_image(FIELDS)
    client(srv, sleeps).send(req)
    assert srv.log == [("new_image", death), ("remove_by_name", "200"), ("new_image", "200")]
    assert [i["image_name"] for i in srv.images] == ["img1"]
    assert sleeps == [0.5]
    assert req.maybe_delivered is False


def test_new_image_dying_twice_still_one_record() -> None:
    srv, sleeps = FakeQrm(["read", "500", "proto"]), []
    client(srv, sleeps).send(openqrm.new_image(FIELDS))
    assert len(srv.images) == 1
    # the remove that died after arriving is simply repeated (removing nothing is answered alike)
    assert srv.log == [("new_image", "read"), ("remove_by_name", "500"), ("remove_by_name", "proto"),
                       ("remove_by_name", "200"), ("new_image", "200")]


def test_event_death_is_not_followed_by_remove() -> None:
    srv, sleeps = FakeQrm(["read"]), []
    client(srv, sleeps).send(openqrm.event("e", 5, "d"))
    assert [w for w, _ in srv.log] == ["e", "e"]


# --- deliver + spool ----------------------------------------------------------------------------------

def _read_only_job(d: Path) -> dict[str, Any]:
    files = [p for p in spool_files(d) if p.suffix == ".json"]
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_deliver_writes_spool_before_sending_and_removes_it_after(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    seen: list[list[str]] = []
    srv = FakeQrm()
    srv.on_request = lambda r: seen.append([q["params"].get("image_command") or q["params"]["event_name"]
                                            for q in _read_only_job(d)["requests"]])
    j = job(openqrm.event("create_image_img1", 9, "Started"), openqrm.new_image(FIELDS),
            openqrm.event("create_image_img1", 10, "Finished"))
    client(srv, []).deliver(j, Spool(str(d)))
    # at each request, the spool held that request and everything after it
    assert seen == [["create_image_img1", "new_image", "create_image_img1"],
                    ["new_image", "create_image_img1"], ["create_image_img1"]]
    assert spool_files(d) == []
    assert j.requests == []
    assert len(srv.images) == 1 and len(srv.events) == 2
    assert (d.stat().st_mode & 0o777) == 0o700


def test_deliver_write_ahead_marks_new_image_in_doubt_while_sending(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    doubt: list[bool] = []
    srv = FakeQrm()
    srv.on_request = lambda r: doubt.append(_read_only_job(d)["requests"][0]["maybe_delivered"])
    client(srv, []).deliver(job(openqrm.event("e", 9, "s"), openqrm.new_image(FIELDS)), Spool(str(d)))
    assert doubt == [False, True]


def test_deliver_transient_keeps_the_unsent_rest(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    srv, sleeps = FakeQrm(["200", "connect", "connect"]), []
    j = job(openqrm.event("e", 9, "s"), openqrm.new_image(FIELDS), openqrm.event("e", 10, "f"))
    with pytest.raises(Transient):
        client(srv, sleeps, retries=1).deliver(j, Spool(str(d)))
    saved = _read_only_job(d)
    assert [r["params"].get("image_command") or r["params"]["event_priority"] for r in saved["requests"]] == [
        "new_image", "10"]
    assert saved["requests"][0]["maybe_delivered"] is False  # refused connections delivered nothing
    assert (saved["id"], saved["image"], saved["url"], saved["user"]) == (j.id, "img1", URL, USER)
    assert len(srv.events) == 1 and srv.images == []
    assert [p.name for p in spool_files(d)] == [f"{j.id}.json"]  # no temporary file left behind


def test_deliver_refusal_keeps_the_unsent_rest(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    srv = FakeQrm(["200", "401"])
    j = job(openqrm.event("e", 9, "s"), openqrm.new_image(FIELDS), openqrm.event("e", 10, "f"))
    with pytest.raises(RegistrationError):
        client(srv, []).deliver(j, Spool(str(d)))
    assert len(_read_only_job(d)["requests"]) == 2


def test_death_after_send_then_server_gone_then_reloaded_job_gives_one_record(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    srv = FakeQrm(["read", "connect", "connect"])
    with pytest.raises(Transient):
        client(srv, [], retries=2).deliver(job(openqrm.new_image(FIELDS)), Spool(str(d)))
    assert len(srv.images) == 1  # it did arrive
    assert _read_only_job(d)["requests"][0]["maybe_delivered"] is True
    (reloaded,) = Spool(str(d)).jobs()
    assert reloaded.requests[0].maybe_delivered is True
    srv.log.clear()
    client(srv, []).deliver(reloaded, Spool(str(d)))
    assert srv.log == [("remove_by_name", "200"), ("new_image", "200")]
    assert [i["image_name"] for i in srv.images] == ["img1"]
    assert spool_files(d) == []


def test_job_from_spool_in_doubt_after_a_crash(tmp_path: Path) -> None:
    # the previous qrmfs died while sending: the write-ahead spool says "in doubt", the server has the record
    d = tmp_path / "spool"
    srv = FakeQrm()
    srv.apply("/openqrm/base/server/image/image-action.php", {"image_command": "new_image", **FIELDS})
    crashed = job(openqrm.new_image(FIELDS), openqrm.event("create_image_img1", 10, "Finished"))
    crashed.requests[0].maybe_delivered = True
    Spool(str(d)).save(crashed)
    (j,) = Spool(str(d)).jobs()
    client(srv, []).deliver(j, Spool(str(d)))
    assert [w for w, _ in srv.log] == ["remove_by_name", "new_image", "create_image_img1"]
    assert len(srv.images) == 1
    assert spool_files(d) == []


def test_password_never_in_spool(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    texts: list[str] = []
    srv = FakeQrm(["read", "500", "connect", "connect"])
    srv.on_request = lambda r: texts.extend(p.read_text() for p in spool_files(d))
    j = job(openqrm.event("e", 9, "s"), openqrm.new_image(FIELDS))
    with pytest.raises(Transient):
        client(srv, [], retries=2).deliver(j, Spool(str(d)))
    texts.extend(p.read_text() for p in spool_files(d))
    assert texts
    b64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for t in texts:
        assert PASSWORD not in t and "S3cr3t" not in t and b64 not in t
        assert "password" not in json.loads(t)
    assert "S3cr3t" not in json.dumps(openqrm.public(j))


def test_spool_jobs_sorted_and_corrupt_files_skipped(tmp_path: Path) -> None:
    s = Spool(str(tmp_path / "sp"))
    assert s.jobs() == []
    a, b = job(openqrm.event("a", 5, "x")), job(openqrm.event("b", 5, "y"))
    a.created, b.created = 200.0, 100.0
    s.save(a)
    s.save(b)
    (tmp_path / "sp" / "broken.json").write_text("{not json")
    (tmp_path / "sp" / "other.json").write_text('{"id": "x"}')
    assert [j.id for j in s.jobs()] == [b.id, a.id]
    s.drop(b)
    s.drop(b)  # twice is fine
    assert [j.id for j in s.jobs()] == [a.id]


def test_job_json_round_trip() -> None:
    j = job(openqrm.new_image(FIELDS))
    j.requests[0].maybe_delivered = True
    assert Job.from_json(j.to_json()) == j


def test_public_view() -> None:
    j = job(openqrm.new_image(FIELDS), openqrm.event("e", 10, "done"))
    assert openqrm.public(j) == {"id": j.id, "image": "img1", "target": "nas1:/exports/img1", "url": URL,
                                 "auth": None, "storage": None,
                                 "pending": ["new_image img1", "event e (priority 10): done"]}


# --- claims: one qrmfs process at a time per job ------------------------------------------------------

def test_claim_is_exclusive_and_released(tmp_path: Path) -> None:
    s = Spool(str(tmp_path / "sp"))
    c = s.claim("j1")
    assert c is not None
    assert s.claim("j1") is None  # a second open file description cannot take it (as another process)
    assert s.claim("j2") is not None
    c.release()
    c2 = s.claim("j1")
    assert c2 is not None
    c2.release(unlink=True)
    assert not (tmp_path / "sp" / "j1.lock").exists()


def test_claim_waits_with_a_deadline(tmp_path: Path) -> None:
    import time

    s = Spool(str(tmp_path / "sp"))
    held = s.claim("j1")
    t0 = time.monotonic()
    assert s.claim("j1", wait=0.3) is None
    assert 0.3 <= time.monotonic() - t0 < 3
    assert held is not None
    held.release()


def test_claim_never_trusts_an_unlinked_lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder that unlinks the lock file while holding it: a waiter that had opened the old file must not
    believe it holds the job; it retries on the path's current file."""
    import os as _os

    s = Spool(str(tmp_path / "sp"))
    s.dir.mkdir(parents=True)
    path = s.dir / "j1.lock"
    real_open = _os.open
    calls = {"n": 0}

    def open_then_replace(p: Any, flags: int, mode: int = 0o777) -> int:
        fd = real_open(p, flags, mode)
        calls["n"] += 1
        if calls["n"] == 1:  # between our open and our flock, the file at the path is replaced
            path.unlink()
            path.write_text("")
        return fd

    monkeypatch.setattr(openqrm.os, "open", open_then_replace)
    c = s.claim("j1")
    assert c is not None and calls["n"] == 2
    assert c.fd is not None and _os.fstat(c.fd).st_ino == path.stat().st_ino


def test_deliver_refuses_a_job_of_another_url(tmp_path: Path) -> None:
    srv = FakeQrm()
    j = Job("http://elsewhere/openqrm", USER, "img1", "nas1:/exports/img1", [openqrm.new_image(FIELDS)])
    with pytest.raises(RegistrationError, match="belongs to http://elsewhere/openqrm"):
        client(srv, []).deliver(j, Spool(str(tmp_path / "sp")))
    assert srv.log == []


def test_job_loads_without_the_new_fields(tmp_path: Path) -> None:
    """Spool files written before jobs were bound (no auth, no storage) still load."""
    d = json.loads(job(openqrm.new_image(FIELDS)).to_json())
    del d["auth"], d["storage"]
    j = Job.from_json(json.dumps(d))
    assert (j.auth, j.storage) == (None, None)
