"""The kernel NFS server's path of an image's own export (agent/exports.py), on real files: a temporary
/etc/exports and a stand-in `exportfs` on PATH that records its argv and lists what the file exports (the kernel
NFS server cannot run on these machines). ganesha's path runs against the real nfs-ganesha in the lab
(tests/e2e/test_image_exports.py)."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import sys
from pathlib import Path

import pytest

from qrmfs.agent import exports as X
from qrmfs.agent.protocol import AgentError, ErrorKind
from qrmfs.config import SshHost, Storage
from qrmfs.errors import RefusedError
from qrmfs.runner import Runner
from qrmfs.storage import StorageSide

LINE = "rw,insecure,no_root_squash,async,no_subtree_check"
FOREIGN = ("# the operator's own exports\n"
           "/srv/home\t10.0.0.0/24(rw,sync)\n"
           "\n"
           '"/srv/with space"  host1(ro)\n')

# What the stand-in does: `-v` prints each exported path of $FAKE_EXPORTS the way exportfs -v does (the path, then
# its client); every call is appended to $FAKE_EXPORTFS_LOG; $FAKE_EXPORTFS_FAIL makes it fail as exportfs does.
FAKE = """#!{python}
import os, sys
with open(os.environ["FAKE_EXPORTFS_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_EXPORTFS_FAIL"):
    sys.stderr.write("exportfs: /etc/exports:3: unknown keyword\\n")
    sys.exit(1)
if sys.argv[1:] == ["-v"]:
    for line in open(os.environ["FAKE_EXPORTS"]):
        if line.strip() and not line.startswith("#"):
            path, client = line.split(None, 1)
            print(path + "\\n\\t\\t" + client.strip())
"""


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary /etc/exports with the operator's own lines, and the stand-in exportfs first on PATH."""
    etc, bin_ = tmp_path / "etc", tmp_path / "bin"
    etc.mkdir()
    bin_.mkdir()
    table = etc / "exports"
    table.write_text(FOREIGN)
    table.chmod(0o640)
    fake = bin_ / "exportfs"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_EXPORTS", str(table))
    monkeypatch.setenv("FAKE_EXPORTFS_LOG", str(tmp_path / "exportfs.log"))
    return table


def calls(table: Path) -> list[str]:
    log = table.parent.parent / "exportfs.log"
    return log.read_text().splitlines() if log.exists() else []


def image(root: Path, name: str) -> str:
    (root / name).mkdir()
    return str(root / name)


def export(root: Path, table: Path, path: str, action: str = "add") -> X.P.Exported:
    return X.op_export(path, str(root), action, "kernel", "10.0.0.5", str(table))


def test_add_appends_openqrms_line_and_leaves_every_other_line_as_it_was(root: Path, kernel: Path) -> None:
    path = image(root, "img1")
    before = kernel.stat()
    done = export(root, kernel, path)
    assert kernel.read_text() == FOREIGN + f"{path}\t10.0.0.5({LINE})\n"
    assert (done.state, done.kind, done.path) == ("exported", "kernel", path)
    assert calls(kernel) == ["-r", "-v"]  # exported, then seen in exportfs's own listing
    after = kernel.stat()
    assert after.st_ino != before.st_ino  # replaced by rename, never written in place
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert sorted(p.name for p in kernel.parent.iterdir()) == [".exports.qrmfs-lock", "exports"]  # no temp left


def test_add_is_idempotent_and_keeps_a_line_openqrm_rewrote(root: Path, kernel: Path) -> None:
    path = image(root, "img1")
    export(root, kernel, path)
    first = kernel.read_text()
    export(root, kernel, path)
    assert kernel.read_text() == first
    # openQRM's per-boot `auth` rewrites the client of the line: qrmfs keeps it, and adds no second line
    authed = first.replace("10.0.0.5(", "192.168.7.23(")
    kernel.write_text(authed)
    export(root, kernel, path)
    assert kernel.read_text() == authed


def test_remove_takes_only_the_images_own_line(root: Path, kernel: Path) -> None:
    path, other = image(root, "img1"), image(root, "img2")
    export(root, kernel, path)
    export(root, kernel, other)
    with kernel.open("a") as f:
        f.write(f"{path}/sub\t*(ro)\n")  # a foreign export below the image's path
    os.rmdir(path)
    done = export(root, kernel, path, "remove")
    assert done.state == "absent"
    assert kernel.read_text() == FOREIGN + f"{other}\t10.0.0.5({LINE})\n{path}/sub\t*(ro)\n"
    assert calls(kernel)[-2:] == ["-r", "-v"]


def test_remove_is_refused_while_the_image_exists(root: Path, kernel: Path) -> None:
    path = image(root, "img1")
    export(root, kernel, path)
    text = kernel.read_text()
    with pytest.raises(AgentError) as e:
        export(root, kernel, path, "remove")
    assert e.value.kind is ErrorKind.REFUSED
    assert kernel.read_text() == text


def test_refresh_flushes_the_kernels_export_caches(root: Path, kernel: Path) -> None:
    path = image(root, "img1")
    export(root, kernel, path)
    export(root, kernel, path, "refresh")
    assert calls(kernel) == ["-r", "-v", "-r", "-f", "-v"]


def test_a_failing_exportfs_is_an_error_with_its_message(root: Path, kernel: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = image(root, "img1")
    monkeypatch.setenv("FAKE_EXPORTFS_FAIL", "1")
    with pytest.raises(AgentError, match="exportfs -r` exited 1: exportfs: /etc/exports:3: unknown keyword"):
        export(root, kernel, path)


def test_an_export_the_server_does_not_list_is_not_reported_done(root: Path, kernel: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    path = image(root, "img1")
    monkeypatch.setenv("FAKE_EXPORTS", str(tmp_path / "etc" / "other"))  # what exportfs -v lists: not our file
    (tmp_path / "etc" / "other").write_text("")
    with pytest.raises(AgentError, match="does not list .*img1 after it was exported"):
        export(root, kernel, path)


def test_a_failed_edit_leaves_the_file_as_it_was(kernel: Path) -> None:
    def broken(lines: list[str]) -> list[str]:
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        X.rewrite(str(kernel), broken)
    assert kernel.read_text() == FOREIGN
    assert sorted(p.name for p in kernel.parent.iterdir()) == [".exports.qrmfs-lock", "exports"]


@pytest.mark.parametrize(("path", "clients"), [
    ("/elsewhere/img", "10.0.0.5"), ("{root}/img 1", "10.0.0.5"), ("{root}/../etc", "10.0.0.5"),
    ("{root}/img1", "* (rw)"), ("{root}/img1", "a;b"), ("{root}/img1", "a#b")])
def test_bad_paths_and_clients_never_reach_the_file(root: Path, kernel: Path, path: str, clients: str) -> None:
    image(root, "img1")
    with pytest.raises(AgentError):
        X.op_export(path.format(root=root), str(root), "add", "kernel", clients, str(kernel))
    assert kernel.read_text() == FOREIGN
    assert calls(kernel) == []


def _adder(table: str, paths: list[str]) -> None:
    for p in paths:
        X.rewrite(table, lambda lines, p=p: [*lines, X.kernel_line(p, "10.0.0.5")])


def test_two_processes_editing_at_once_lose_no_line(root: Path, kernel: Path) -> None:
    """Each edit reads, changes and replaces the file: without the lock, one process's rename would drop the
    other's line written since it read."""
    ctx = multiprocessing.get_context("fork")
    mine = [[f"{root}/p{n}_{i}" for i in range(150)] for n in range(2)]
    procs = [ctx.Process(target=_adder, args=(str(kernel), paths)) for paths in mine]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    lines = kernel.read_text().splitlines()
    assert sorted(X.line_path(ln) for ln in lines[4:]) == sorted(p for paths in mine for p in paths)
    assert kernel.read_text().startswith(FOREIGN)


def test_the_storage_side_exports_through_the_agent(root: Path, kernel: Path) -> None:
    """The whole path: config fields -> the request -> the agent process -> the file and exportfs."""
    path = image(root, "img1")
    side = StorageSide(Storage("local", SshHost("local"), str(root), exports="kernel", export_clients="10.0.0.0/24",
                               exports_file=str(kernel)),
                       Runner(env={k: os.environ[k] for k in ("PATH", "FAKE_EXPORTS", "FAKE_EXPORTFS_LOG")}))
    try:
        assert side.export(path, "add").state == "exported"
        assert side.export(path, "show").state == "exported"
        assert kernel.read_text().endswith(f"{path}\t10.0.0.0/24({LINE})\n")
        os.rmdir(path)
        assert side.export(path, "remove").state == "absent"
        assert kernel.read_text() == FOREIGN
        with pytest.raises(RefusedError):
            side.export(f"{root}/../x", "show")
    finally:
        side.close()


def test_a_new_generation_shows_stale_until_its_export_was_refreshed(root: Path, kernel: Path) -> None:
    """The export seen for the image's current generation is recorded in its manifest: a generation published
    since (its manifest has another generation id) shows `stale` until refresh, which validate --fix runs."""
    path = image(root, "img1")
    manifest = Path(path) / ".qrmfs" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"image": "img1", "generation": {"id": "g1"}}))
    assert export(root, kernel, path).state == "exported"
    assert json.loads(manifest.read_text())["export"]["generation"] == "g1"
    manifest.write_text(json.dumps({"image": "img1", "generation": {"id": "g2"}}))  # as a publish leaves it
    assert export(root, kernel, path, "show").state == "stale"
    assert export(root, kernel, path, "refresh").state == "exported"
    assert export(root, kernel, path, "show").state == "exported"
