"""Registration faults with real processes and a real HTTP server on 127.0.0.1 (no docker):
two `qrmfs flush` at once, a qrmfs killed between sending new_image and removing it from the spool, jobs
bound to their URL and credentials' source, and the password's whereabouts while a real create runs."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from qrmfs import jobs, openqrm
from qrmfs.config import OpenQrm, SshHost, Storage
from qrmfs.openqrm import Job, Spool

USER, PASSWORD = "openqrm", "Tr4p-S3cret"
FIELDS = jobs.image_fields(OpenQrm(deployment_id=2), Storage("nas1", SshHost("10.0.0.5"), storage_id=1),
                           name="img1", rootdevice="/exports/img1", shared=False, comment="c", arch=None,
                           os_name=None)


class Server:
    """A tiny openQRM 5.3: events (answered with nothing), new_image / remove_by_name with HTTP Basic (answered
    with image-action.php's newline); records every request with its raw Authorization header.
    delay: seconds before each answer; hang_new_image: hold new_image (after
    applying it) until released, like a server whose answer never comes back."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.images: list[str] = []
        self.delay = 0.0
        self.hang_new_image = False
        self.got_new_image = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        srv = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                u = urlsplit(self.path)
                q = dict(parse_qsl(u.query, keep_blank_values=True))
                auth = self.headers.get("Authorization")
                cmd = q.get("image_command")
                with srv.lock:
                    srv.requests.append({"path": u.path, "query": q, "raw": self.path, "auth": auth})
                    status = 200
                    if cmd:
                        want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                        if auth != want:
                            status = 401
                        elif cmd == "new_image":
                            srv.images.append(q["image_name"])
                        elif cmd == "remove_by_name":
                            srv.images = [i for i in srv.images if i != q["image_name"]]
                if cmd == "new_image" and srv.hang_new_image:
                    srv.got_new_image.set()
                    srv.release.wait(60)
                    return  # no answer at all: the connection just closes
                time.sleep(srv.delay)
                body = b"\n" if cmd and status == 200 else b""
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/openqrm"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def commands(self) -> list[str]:
        with self.lock:
            return [r["query"].get("image_command") or r["query"].get("event_name", "?") for r in self.requests]

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


@pytest.fixture
def home(tmp_path: Path) -> dict[str, Any]:
    pwfile = tmp_path / "pw"
    pwfile.write_text(PASSWORD + "\n")
    return {"tmp": tmp_path, "spool": tmp_path / "spool", "pwfile": pwfile,
            "env": {**os.environ, "HOME": str(tmp_path), "QRMFS_PASSWORD": ""}}


def config(home: dict[str, Any], url: str, name: str = "c.toml", extra: str = "") -> str:
    p = home["tmp"] / name
    p.write_text(f'spool_dir = "{home["spool"]}"\n{extra}\n[openqrm]\nurl = "{url}"\nuser = "{USER}"\n'
                 f'password_file = "{home["pwfile"]}"\ntimeout = 20\nretries = 0\nbackoff = 0\n'
                 'deployment_id = 2\n')
    return str(p)


def config_auth(home: dict[str, Any], cfg: str) -> str:
    """What a job made with this config's password_file is bound to (as resolve_credentials names it)."""
    return f"{USER} via config {cfg} [openqrm] password_file {home['pwfile']}"


def qrmfs(home: dict[str, Any], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "qrmfs", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=home["env"])


def spooled(home: dict[str, Any], url: str, auth: str | None, name: str = "img1") -> Job:
    fields = {**FIELDS, "image_name": name}
    j = Job(url, USER, name, f"nas1:/exports/{name}", [openqrm.event(f"create_image_{name}", 9, "s"),
                                                      openqrm.new_image(fields),
                                                      openqrm.event(f"create_image_{name}", 10, "f")],
            auth=auth)
    Spool(str(home["spool"])).save(j)
    return j


def spool_jobs(home: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(home["spool"].glob("*.json"))]


# --- the spool lock: two flushes at once -------------------------------------------------------------

def test_two_flushes_at_once_deliver_each_job_once(home: dict[str, Any], server: Server) -> None:
    cfg = config(home, server.url)
    names = [f"img{i}" for i in range(4)]
    for n in names:
        spooled(home, server.url, config_auth(home, cfg), n)
    server.delay = 0.15  # each delivery takes a while, so the two processes overlap
    a, b = qrmfs(home, "flush", "--config", cfg), qrmfs(home, "flush", "--config", cfg)
    outs = [p.communicate(timeout=120) for p in (a, b)]
    assert sorted(server.images) == names, outs
    assert sorted(c for c in server.commands() if c == "new_image") == ["new_image"] * 4  # never twice
    assert spool_jobs(home) == []
    assert not list(home["spool"].glob("*.lock"))  # each delivered job's lock file went with it
    assert {a.returncode, b.returncode} <= {0, 13}


# --- the write-ahead mark: a process killed between send and removal ----------------------------------

def test_killed_during_new_image_leaves_it_in_doubt_and_the_retry_leaves_one_record(
        home: dict[str, Any], server: Server) -> None:
    cfg = config(home, server.url)
    spooled(home, server.url, config_auth(home, cfg))
    server.hang_new_image = True
    p = qrmfs(home, "flush", "--config", cfg)
    assert server.got_new_image.wait(60), p.communicate(timeout=5)
    (job,) = spool_jobs(home)
    assert job["requests"][0]["params"]["image_command"] == "new_image"
    assert job["requests"][0]["maybe_delivered"] is True  # written before the request was sent
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    (job,) = spool_jobs(home)
    assert job["requests"][0]["maybe_delivered"] is True  # survives the crash
    assert server.images == ["img1"]  # the server took it
    server.hang_new_image = False
    server.release.set()
    q = qrmfs(home, "flush", "--config", cfg)
    out, err = q.communicate(timeout=60)
    assert q.returncode == 0, err
    assert server.commands()[-3:] == ["remove_by_name", "new_image", "create_image_img1"]
    assert server.images == ["img1"]  # exactly one record
    assert spool_jobs(home) == []


def test_crash_after_the_answer_before_removal_keeps_the_mark(tmp_path: Path) -> None:
    """The answer came back, then qrmfs died before the request left the spool: still in doubt on disk."""
    import httpx

    from qrmfs.openqrm import Client

    images: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        q = dict(request.url.params)
        if q.get("image_command") == "new_image":
            images.append(q["image_name"])
            raise KeyboardInterrupt  # the process dies as soon as the request has been taken
        return httpx.Response(200)

    spool = Spool(str(tmp_path / "spool"))
    j = Job("http://q/openqrm", USER, "img1", "nas1:/exports/img1", [openqrm.new_image(FIELDS)])
    with pytest.raises(KeyboardInterrupt):
        Client("http://q/openqrm", USER, PASSWORD, transport=httpx.MockTransport(handler)).deliver(j, spool)
    (saved,) = spool.jobs()
    assert saved.requests[0].maybe_delivered is True
    sent: list[str] = []

    def again(request: httpx.Request) -> httpx.Response:
        q = dict(request.url.params)
        sent.append(q["image_command"])
        return httpx.Response(200, text="\n")  # image-action.php, having run the command

    Client("http://q/openqrm", USER, PASSWORD, transport=httpx.MockTransport(again)).deliver(saved, spool)
    assert sent == ["remove_by_name", "new_image"]


# --- jobs bound to their URL and credentials ---------------------------------------------------------

def test_job_is_never_sent_to_another_url_nor_with_other_credentials(home: dict[str, Any], server: Server) -> None:
    typo = Server()  # the mistyped URL of an earlier run: it must receive nothing, ever
    try:
        cfg = config(home, server.url)
        spooled(home, typo.url, config_auth(home, cfg), "typo_img")
        spooled(home, server.url, f"{USER} via --password-file /somewhere/else", "other_creds")
        p = qrmfs(home, "flush", "--config", cfg)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 13
        assert typo.requests == [] and server.requests == []
        assert f"it is bound to {typo.url}" in err
        assert f"it is bound to the credentials of {USER} via --password-file /somewhere/else" in err
        assert PASSWORD not in out + err
        assert len(spool_jobs(home)) == 2
        # the operator sends the typo job on purpose: only with the credentials it was made with
        p = qrmfs(home, "flush", "--config", cfg, "--openqrm-url", typo.url)
        p.communicate(timeout=60)
        assert typo.images == ["typo_img"] and server.requests == []
    finally:
        typo.close()


def test_plain_http_with_a_password_warns(home: dict[str, Any], server: Server) -> None:
    cfg = config(home, server.url)
    spooled(home, server.url, config_auth(home, cfg))
    p = qrmfs(home, "flush", "--config", cfg)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert f"the openQRM URL {server.url} is plain http: the password crosses the network in clear" in err


def test_config_password_is_not_sent_in_clear_to_an_unconfigured_host(home: dict[str, Any]) -> None:
    cfg = config(home, "http://127.0.0.1:9/openqrm")
    p = qrmfs(home, "flush", "--config", cfg, "--openqrm-url", "http://localhost:9/openqrm")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert err.splitlines() == ["qrmfs: error: refusing to send the password of the config's [openqrm] "
                                "password_file in clear (http) to localhost, which the config does not name: "
                                "use https, or give the password for that server with --password-file"]


# --- TLS: verified by default, [openqrm] ca_file ------------------------------------------------------

@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    import ssl

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    s = Server()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    s.httpd.socket = ctx.wrap_socket(s.httpd.socket, server_side=True)
    yield s.url.replace("http://", "https://"), cert
    s.close()


def test_tls_is_verified_and_ca_file_trusts_a_private_ca(tls_server: tuple[str, Path]) -> None:
    from qrmfs.openqrm import Client, Transient

    url, cert = tls_server
    with pytest.raises(Transient, match="CERTIFICATE_VERIFY_FAILED"):
        Client(url, USER, PASSWORD, retries=0).send_once(openqrm.new_image(FIELDS))
    Client(url, USER, PASSWORD, retries=0, ca_file=str(cert)).send_once(openqrm.new_image(FIELDS))


def test_a_plain_http_client_trusts_no_ca_and_a_run_makes_each_tls_context_once(
        tls_server: tuple[str, Path]) -> None:
    """A plain-http URL's client never loads CAs (20-40 ms each): its TLS context trusts none, so if it ever
    spoke TLS it would refuse every certificate, even one a ca_file trusts. Contexts are made once a run."""
    import ssl

    import httpx

    from qrmfs.openqrm import _tls

    url, cert = tls_server
    plain = _tls(False, None)
    assert plain.verify_mode == ssl.CERT_REQUIRED and plain.check_hostname
    assert plain.cert_store_stats()["x509_ca"] == 0
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"), httpx.Client(verify=plain) as c:
        c.get(url + "/")
    with httpx.Client(verify=_tls(True, str(cert))) as c:
        assert c.get(url + "/").status_code > 0
    assert _tls(True, str(cert)) is _tls(True, str(cert)) and _tls(True, None) is _tls(True, None)
    assert _tls(True, None).cert_store_stats()["x509_ca"] > 0


def _local_storage(home: dict[str, Any], server: Server) -> tuple[Path, Path, str]:
    """An empty export on a `local` storage server, a tiny source tree, and a config for both and the server."""
    tmp = home["tmp"]
    root, src = tmp / "exports", tmp / "src"
    root.mkdir()
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("src\n")
    cfg = config(home, server.url,
                 extra=f'[storage.local]\naddress = "local"\nexport_root = "{root}"\nstorage_id = 1\n')
    return root, src, cfg


# --- the password while a real create runs ------------------------------------------------------------

def test_password_in_no_argv_output_spool_manifest_or_url_while_create_runs(home: dict[str, Any],
                                                                           server: Server) -> None:
    root, src, cfg = _local_storage(home, server)
    server.delay = 0.05
    seen_argv: set[str] = set()
    done = threading.Event()

    def sample() -> None:  # every process's argv, over and over, while qrmfs runs
        while not done.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        seen_argv.add(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
                    except OSError:
                        pass
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    p = qrmfs(home, "create", "-t", f"local:{root}/img1", "-l", str(src), "-v", "--config", cfg)
    out, err = p.communicate(timeout=300)
    done.set()
    t.join()
    assert p.returncode == 0, err
    assert any("rsync" in a for a in seen_argv)  # the sampler did see qrmfs's children
    b64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for text in (*seen_argv, out, err, (root / "img1/.qrmfs/manifest.json").read_text(),
                 *(p.read_text() for p in home["spool"].glob("*") if p.is_file())):
        assert PASSWORD not in text and b64 not in text
    auths = [(r["query"].get("image_command") or "event", r["auth"]) for r in server.requests]
    assert auths == [("event", None), ("new_image", "Basic " + b64), ("event", None)]  # only where needed
    assert all(PASSWORD not in r["raw"] for r in server.requests)  # never in a URL
    assert server.images == ["img1"]


# --- jobs matched by storage identity, whatever the spelling ------------------------------------------

def test_same_image_by_storage_identity_and_path() -> None:
    from qrmfs import config
    from qrmfs.actions.common import storage_identity
    from qrmfs.actions.delivery import same_image
    from qrmfs.model import Target

    cfg = config.parse({"storage": {"nas1": {"address": "10.0.0.5"}, "nas2": {"address": "10.0.0.5",
                                                                                "ssh_port": 2222}}})
    j = Job("http://q/openqrm", USER, "img", "nas1:/exports/img", [])
    for spelling, same in [("nas1:/exports/img", True), ("10.0.0.5:/exports/img", True),
                           ("root@10.0.0.5:/exports/img", True), ("10.0.0.6:/exports/img", False),
                           ("nas1:/exports/img2", False), ("nas2:/exports/img", False)]:
        assert same_image(cfg, j, Target.parse(spelling)) is same, spelling
    # a job records the identity when it is made: a later config change does not move it
    j.storage = storage_identity(cfg, j.target)
    moved = config.parse({"storage": {"nas1": {"address": "10.9.9.9"}}})
    assert same_image(moved, j, Target.parse("10.0.0.5:/exports/img"))
    assert not same_image(moved, j, Target.parse("nas1:/exports/img"))


# --- SIGKILL at the publish: the registration is written ahead, never lost, never sent for nothing ----------

def _local_create(home: dict[str, Any], server: Server, crash_at: str
                  ) -> tuple[Path, str, subprocess.Popen[str], str]:
    """A create on a local storage server, stopped at `crash_at` ($QRMFS_TEST_CRASH_AT); its stderr."""
    root, src, cfg = _local_storage(home, server)
    p = subprocess.Popen([sys.executable, "-m", "qrmfs", "create", "-t", f"local:{root}/img1", "-l", str(src),
                          "--config", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**home["env"], "QRMFS_TEST_CRASH_AT": crash_at})
    _out, err = p.communicate(timeout=300)
    return root, cfg, p, err


def test_killed_right_after_the_publish_the_next_flush_registers_once(home: dict[str, Any], server: Server) -> None:
    root, cfg, p, _err = _local_create(home, server, "after-publish")
    assert p.returncode == -signal.SIGKILL
    assert (root / "img1/.qrmfs/manifest.json").is_file()  # published, complete
    assert "new_image" not in server.commands()
    (job,) = spool_jobs(home)  # written ahead: the registration survived the kill
    assert job["publish"] is not None and [r["params"].get("image_command") for r in job["requests"]
                                           if r["kind"] == "image"] == ["new_image"]
    manifest = json.loads((root / "img1/.qrmfs/manifest.json").read_text())
    assert manifest["registration"] == {"state": "pending", "spool_job": job["id"]}
    f = qrmfs(home, "flush", "--json", "--config", cfg)
    out, err = f.communicate(timeout=120)
    assert f.returncode == 0, err
    assert json.loads(out)["result"]["delivered"] == [job["id"]]
    assert server.images == ["img1"] and server.commands().count("new_image") == 1
    assert spool_jobs(home) == []
    reg = json.loads((root / "img1/.qrmfs/manifest.json").read_text())["registration"]
    assert (reg["state"], reg["via"]) == ("sent", f"flush of spool job {job['id']}")


def test_killed_right_before_the_publish_nothing_is_registered(home: dict[str, Any], server: Server) -> None:
    root, cfg, p, _err = _local_create(home, server, "before-publish")
    assert p.returncode == -signal.SIGKILL
    assert not (root / "img1").exists()  # no image under the name
    (staging,) = [n for n in os.listdir(root) if ".qrmfs-staging-" in n]  # the unfinished copy: a leftover
    (job,) = spool_jobs(home)
    assert job["publish"] is not None
    f = qrmfs(home, "flush", "--json", "--config", cfg)
    out, err = f.communicate(timeout=120)
    assert f.returncode == 0, err
    assert json.loads(out)["result"]["delivered"] == [job["id"]]
    assert f"removed {root}/{staging}, left by an earlier qrmfs run" in err  # named, under the image's lock
    assert "was never published" in err
    assert "new_image" not in server.commands() and server.images == []  # never registered
    assert server.commands()[-2:] == ["create_image_img1", "create_image_img1"]
    assert [r["query"]["event_priority"] for r in server.requests][-2:] == ["3", "10"]  # the failure, reported
    assert spool_jobs(home) == [] and os.listdir(root) == []  # nothing left, not even the lock file


@pytest.mark.parametrize("sig", ["TERM", "INT"])
@pytest.mark.parametrize("step", ["before-prepare", "before-publish", "after-publish", "register"])
def test_sigterm_and_sigint_at_each_phase(home: dict[str, Any], server: Server, step: str, sig: str) -> None:
    """SIGTERM (systemd, `timeout`, CI) and SIGINT (Ctrl-C) at each phase after the copy: the documented exit
    code and message; before the publish no image and no staging copy (the registration is never sent, the
    failure is reported); after it a complete image whose registration waits in the spool and is sent exactly
    once by the next flush. (Mid-copy: tests/e2e/test_signals.py.)"""
    root, cfg, p, err = _local_create(home, server, f"{step}:{sig}")
    assert p.returncode == (143 if sig == "TERM" else 130), err
    assert f"interrupted by SIG{sig}" in err and "Traceback" not in err
    published = step in ("after-publish", "register")
    if not published:
        assert [n for n in os.listdir(root) if not n.endswith(".qrmfs-lock")] == []  # no image, no staging
        assert "removed the unfinished copy" in err
        assert "new_image" not in server.commands() and server.images == []
        assert [r["query"]["event_priority"] for r in server.requests][-2:] == ["3", "10"]  # reported, ended
        assert spool_jobs(home) == []
        return
    assert (root / "img1/.qrmfs/manifest.json").is_file()  # published and complete
    assert "new_image" not in server.commands()  # the run was stopped before it sent the registration ...
    (job,) = spool_jobs(home)  # ... which waits in the spool
    f = qrmfs(home, "flush", "--json", "--config", cfg)
    out, ferr = f.communicate(timeout=120)
    assert f.returncode == 0, ferr
    assert json.loads(out)["result"]["delivered"] == [job["id"]]
    assert server.images == ["img1"] and server.commands().count("new_image") == 1  # exactly once
    assert spool_jobs(home) == []


def test_killed_during_the_preparation_leaves_no_image_and_nothing_registered(home: dict[str, Any],
                                                                               server: Server) -> None:
    """SIGKILL after the copy, before the preparation (the registration is not armed yet): no image under the
    name, the unfinished copy a visible leftover that the next run on the image removes and names."""
    root, cfg, p, _err = _local_create(home, server, "before-prepare")
    assert p.returncode == -signal.SIGKILL
    assert not (root / "img1").exists()
    (staging,) = [n for n in os.listdir(root) if ".qrmfs-staging-" in n]
    assert "new_image" not in server.commands() and server.images == []
    assert all(job["publish"] is None for job in spool_jobs(home))  # nothing armed: never a registration
    g = qrmfs(home, "gc", "--json", "--config", cfg)
    out, err = g.communicate(timeout=120)
    assert g.returncode == 0, err
    assert str(root / staging) in json.loads(out)["result"]["removed"]
    assert not (root / staging).exists() and "new_image" not in server.commands()
