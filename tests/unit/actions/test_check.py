"""qrmfs check without docker: a `local` storage server and a local source directory in tmp, the storage
probe run for real on this machine's filesystem, the ssh failure messages, the --json envelope."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qrmfs import cli, openqrm
from qrmfs.actions import check
from qrmfs.config import SshHost
from qrmfs.results import envelope


@pytest.fixture
def env(tmp_path: Path, isolated_home: Path) -> dict[str, Path]:
    root = tmp_path / "exports"
    root.mkdir()
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "big").write_bytes(os.urandom(256 * 1024))
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'spool_dir = "{tmp_path}/spool"\n\n[storage.local]\naddress = "local"\n'
                   f'export_root = "{root}"\n\n[openqrm]\nurl = "http://127.0.0.1:9/openqrm"\nuser = "openqrm"\n')
    return {"tmp": tmp_path, "root": root, "src": src, "cfg": cfg}


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def probe(directory: str, root: str) -> dict[str, object]:
    r = subprocess.run([sys.executable, "-c", check.PROBE, directory, root], capture_output=True, text=True,
                       timeout=60, check=True)
    return json.loads(r.stdout)


def test_probe_on_this_filesystem_accepts_everything_and_leaves_nothing(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("security.capability needs root (CAP_SETFCAP)")
    p = probe(str(tmp_path), str(tmp_path))
    assert p["root_exists"] and p["probed"] == str(tmp_path)
    assert {k: p[k] for k in ("write", "hardlink", "acl", "xattr", "capability")} == dict.fromkeys(
        ("write", "hardlink", "acl", "xattr", "capability"))
    assert p["free"] > 0 and p["scratch_left"] is False
    assert list(tmp_path.iterdir()) == []


def test_probe_walks_up_to_the_nearest_existing_directory_inside_the_root(tmp_path):
    p = probe(str(tmp_path / "a" / "b"), str(tmp_path))
    assert p["probed"] == str(tmp_path)
    p = probe(str(tmp_path / "nowhere"), str(tmp_path / "missing-root"))
    assert p == {"python": p["python"], "dir": str(tmp_path / "nowhere"), "root_exists": False}


def test_probe_parameters_are_argv_not_program_text(tmp_path):
    odd = tmp_path / "x'; import os; os.system('touch PWNED') #"
    odd.mkdir()
    p = probe(str(odd), str(tmp_path))
    assert p["probed"] == str(odd)
    assert not Path("PWNED").exists() and not (tmp_path / "PWNED").exists()


def test_check_local_storage_and_source(env, capsys):
    if os.geteuid() != 0:
        pytest.skip("security.capability needs root (CAP_SETFCAP)")
    code, out, err = run(["check", "-t", f"local:{env['root']}/img", "-l", str(env["src"]), "--json",
                          "--config", str(env["cfg"])], capsys)
    doc = json.loads(out)
    assert (doc["schema"], doc["command"], doc["ok"], code) == (1, "check", True, 0), out + err
    got = {c["name"]: c for c in doc["result"]["checks"]}
    src = f"source {env['src']}"
    assert got[src]["status"] == "ok" and got[src]["message"].startswith("local directory; rsync ")
    assert got[f"{src} size"]["data"]["bytes"] >= 256 * 1024
    assert got["storage local export root"]["message"] == f"{env['root']} exists"
    assert got["storage local free space"]["data"]["need"] == got[f"{src} size"]["data"]["bytes"]
    for what in ("hard links", "ACLs", "xattrs", "security.capability"):
        assert got[f"storage local {what}"]["status"] == "ok"
    assert "storage local ssh" not in got  # a local storage server needs no ssh
    # openQRM configured without a password: nothing to check the credentials with, a warning
    assert got["openqrm"]["status"] == "warn"
    assert got["spool"]["status"] == "ok"
    assert list(env["root"].iterdir()) == []  # the scratch directory is gone


def test_check_a_directory_create_would_make(env, capsys):
    code, out, err = run(["check", "-t", f"local:{env['root']}/sub/img", "--config", str(env["cfg"])], capsys)
    assert (f"ok   storage local:{env['root']}/sub export root: {env['root']} exists; {env['root']}/sub does not "
            f"yet (create makes it), probed {env['root']}") in out.splitlines()
    assert not (env["root"] / "sub").exists()


def test_check_text_is_one_line_per_check(env, capsys):
    code, out, err = run(["check", "-t", "local", "-l", str(env["src"]), "--config", str(env["cfg"])], capsys)
    lines = out.splitlines()
    assert lines[0] == f"ok   config: {env['cfg']}: 1 storage server(s), 0 host(s)"
    assert all(ln[:5] in ("ok   ", "warn ", "fail ") for ln in lines[:-1])
    assert lines[-1] in ("all checks passed",) or lines[-1].endswith("warning(s)")
    assert "\x1b[" not in out + err  # plain text when not on a terminal


def test_check_fails_on_a_missing_source_and_a_closed_openqrm_port(env, capsys, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    code, out, err = run(["check", "-t", "local", "-l", str(env["tmp"] / "nosuchdir"), "--password-file", str(pw),
                          "--config", str(env["cfg"])], capsys)
    assert code == 15
    assert f"fail source {env['tmp']}/nosuchdir: {env['tmp']}/nosuchdir is not a directory on this machine" in out
    assert "fail openqrm: http://127.0.0.1:9/openqrm does not answer" in out


def test_missing_export_root_fails(env, capsys):
    env["root"].rmdir()
    code, out, err = run(["check", "-t", "local", "--config", str(env["cfg"])], capsys)
    assert code == 15
    assert f"fail storage local export root: {env['root']} does not exist on local" in out


def test_bad_input_exit_2_nothing_checked(env, capsys):
    code, out, err = run(["check", "-t", "local:relative/img", "--config", str(env["cfg"])], capsys)
    assert code == 2 and out == ""
    assert err.startswith("qrmfs: error: invalid path in target")


H = SshHost("nas1.lan", "root", 2222)


@pytest.mark.parametrize(("stderr", "start"), [
    ("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed.",
     "the host key of storage server nas1 (nas1.lan) differs from the one pinned in /kh"),
    ("No ED25519 host key is known for [nas1.lan]:2222 and you have requested strict checking.\n"
     "Host key verification failed.", "no host key of storage server nas1 (nas1.lan) is pinned in /kh"),
    ("root@nas1.lan: Permission denied (publickey).", "root@nas1.lan refused our ssh key"),
    ("ssh: connect to host nas1.lan port 2222: Connection refused", "nothing accepts ssh at nas1.lan port 2222"),
    ("ssh: connect to host nas1.lan port 2222: No route to host",
     "storage server nas1 is unreachable at nas1.lan port 2222 (No route to host)"),
    ("ssh: connect to host nas1.lan port 2222: Connection timed out", "storage server nas1 is unreachable"),
])
def test_ssh_problem_names_the_cause(stderr, start):
    assert check.ssh_problem(stderr, "storage server nas1", H, "/kh").startswith(start)


def test_envelope_of_a_failed_check():
    r = check.Checked([check.Check("x", "fail", "broken")], failed=1, warnings=0)
    err = r.failure()
    assert err is not None and err.exit_code == 15
    assert envelope("check", r, err) == {
        "schema": 1, "ok": False, "command": "check",
        "result": {"checks": [{"name": "x", "status": "fail", "message": "broken", "data": {}}], "failed": 1,
                   "warnings": 0},
        "error": {"kind": "check_failed", "message": "1 check(s) failed", "exit_code": 15, "detail": ""}}


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (2 * 2**20, "2.0 MiB"),
                                         (int(74.04 * 2**30), "74.0 GiB"), (3 * 2**40, "3.0 TiB")])
def test_size(n, text):
    assert check._size(n) == text


def test_version_from_rsync_banner():
    assert check._version("rsync  version 3.2.7  protocol version 31\nCopyright ...") == "3.2.7"
    assert check._version("") == "?"


def test_unreadable_key_files_and_password_file_are_failed_checks(env, capsys):
    cfg = env["cfg"].read_text().replace('user = "openqrm"\n', 'user = "openqrm"\npassword_file = "/nonexistent/pw"\n')
    env["cfg"].write_text(cfg + '\n[ssh]\nidentity_file = "/nonexistent/id"\nknown_hosts = "/nonexistent/kh"\n')
    code, out, err = run(["check", "-t", "local", "--config", str(env["cfg"])], capsys)
    assert code == 15, err
    lines = out.splitlines()
    assert "fail config: [ssh] identity_file /nonexistent/id is not a readable file" in lines
    assert "fail config: [ssh] known_hosts /nonexistent/kh is not a readable file" in lines
    assert "fail openqrm: cannot read password file /nonexistent/pw: No such file or directory" in lines
    assert any(ln.startswith("ok   storage local export root") for ln in lines)  # the rest still ran


def test_an_nfs_server_that_does_not_answer_its_export_listing_fails_the_check(env, capsys):
    """exports = "kernel" where no exportfs runs (this machine has no kernel NFS server): qrmfs could export
    no image there, and check says so before a create would fail after its publish."""
    env["cfg"].write_text(env["cfg"].read_text().replace('address = "local"\n', 'address = "local"\n'
                                                         'exports = "kernel"\n'))
    code, out, err = run(["check", "-t", f"local:{env['root']}/img", "--json", "--config", str(env["cfg"])], capsys)
    got = {c["name"]: c for c in json.loads(out)["result"]["checks"]}
    assert code == 15, out + err
    assert got["storage local exports"]["status"] == "fail"
    assert got["storage local exports"]["message"].startswith("exports = 'kernel', but `exportfs -v ...` failed")


# --- an https openQRM behind a private CA ----------------------------------------------------------

def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def private_ca_openqrm(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An https server on 127.0.0.1 whose certificate a CA made here signed (in no system bundle). It answers
    check's requests as openQRM 5.3 does for administrator openqrm / pw: resource-monitor.php's post_event an
    empty 200; image-action.php 401 for its realm without (or with other) credentials, and 500 to the role
    probe (docs/openqrm.md)."""
    ca_key, ca, key, csr, cert = (tmp_path / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "1",
             "-subj", "/CN=qrmfs test CA")
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=127.0.0.1")
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "1", "-extfile", str(ext))
    want = "Basic " + base64.b64encode(b"openqrm:pw").decode()

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.startswith(f"/openqrm{openqrm.EVENT_PATH}?"):
                self.send_response(200)
            elif self.headers.get("Authorization") == want:
                self.send_response(500)
            else:
                self.send_response(401)
                self.send_header("WWW-Authenticate", f'Basic realm="{openqrm.REALM}"')
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}/openqrm", ca
    httpd.shutdown()
    httpd.server_close()


def test_check_trusts_the_private_ca_of_ca_file_as_create_does(env, capsys, tmp_path, private_ca_openqrm):
    """[openqrm] ca_file is the TLS set-up of every openQRM client of a run, check's probe included: an https
    openQRM behind a private CA answers check as it answers create. Without ca_file it is not trusted."""
    url, ca = private_ca_openqrm
    pw = tmp_path / "pw"
    pw.write_text("pw\n")
    base = env["cfg"].read_text().replace("http://127.0.0.1:9/openqrm", url)
    args = ["check", "-t", "local", "--password-file", str(pw), "--json", "--config", str(env["cfg"])]

    env["cfg"].write_text(base.replace('user = "openqrm"\n', f'user = "openqrm"\nca_file = "{ca}"\n'))
    _, out, _ = run(args, capsys)
    got = {c["name"]: c for c in json.loads(out)["result"]["checks"]}["openqrm"]
    assert (got["status"], got["message"]) == ("ok", f"{url} is openQRM, its database answers, and user 'openqrm' "
                                                     "is an administrator (shown by requests that change nothing "
                                                     "on the server)")

    env["cfg"].write_text(base)
    _, out, _ = run(args, capsys)
    got = {c["name"]: c for c in json.loads(out)["result"]["checks"]}["openqrm"]
    assert got["status"] == "fail" and "CERTIFICATE_VERIFY_FAILED" in got["message"], got


def test_the_record_values_are_required_of_the_storage_servers_checked(env, capsys, tmp_path, private_ca_openqrm):
    """`check -t NAME` asks openQRM's record values of NAME only: another configured storage server without a
    storage_id (an Ansible host's config lists every server of the fleet) fails no check of NAME's. Without -t,
    every storage server is checked, and the one without an id is named."""
    url, ca = private_ca_openqrm
    pw = tmp_path / "pw"
    pw.write_text("pw\n")
    env["cfg"].write_text(env["cfg"].read_text().replace("http://127.0.0.1:9/openqrm", url).replace(
        'user = "openqrm"\n', f'user = "openqrm"\nca_file = "{ca}"\ndeployment_id = 7\n').replace(
        'address = "local"\n', 'address = "local"\nstorage_id = 3\n')
        + '\n[storage.other]\naddress = "127.0.0.1"\nssh_port = 9\n')

    def record(*targets: str) -> dict[str, object]:
        args = ["check", *targets, "--password-file", str(pw), "--json", "--config", str(env["cfg"])]
        _, out, _ = run(args, capsys)
        return {c["name"]: c for c in json.loads(out)["result"]["checks"]}["openqrm record"]

    assert record("-t", "local")["status"] == "ok"
    got = record()
    assert got["status"] == "fail" and "no storage_id for storage server(s) other:" in got["message"], got
