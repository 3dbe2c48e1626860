"""Faults injected for real against a local storage server (issue 26, item 4's list): SIGKILL during `rollback`
(the agent dies at each step of the journaled publish) and during `gc` (qrmfs killed while it deletes a
leftover), the export filling up during an update (a tmpfs export of a few MiB), and a generation directory
owned by another user (qrmfs run as an unprivileged user)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

NODE_FILE = ".qrmfs/nodes/1/var/lib/app/state"


def _qrmfs(s: dict[str, Any], *args: str, env: dict[str, str] | None = None,
           user: int | None = None) -> subprocess.CompletedProcess[str]:
    python, extra = sys.executable, {}
    if user is not None:  # this interpreter may lie where that user cannot go: the system's, with our packages
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
        extra = {"PYTHONPATH": os.pathsep.join([s["cwd"], *(p for p in sys.path if p.endswith("site-packages"))])}
    return subprocess.run([python, "-m", "qrmfs", *args, "--config", str(s["cfg"])], capture_output=True,
                          text=True, timeout=300, env={**s["env"], **extra, **(env or {})}, user=user, group=user,
                          extra_groups=[] if user is not None else None, cwd=s["cwd"] if user is None else "/")


def _setup(top: Path, root: Path, keep: int = 1) -> dict[str, Any]:
    src = top / "src"
    for d in ("etc", "usr/bin", "var/lib/app", "sbin"):
        (src / d).mkdir(parents=True, exist_ok=True)
    (src / "etc/hostname").write_text("src\n")
    (src / "usr/bin/tool").write_text("version 1\n")
    cfg = top / "c.toml"
    cfg.write_text(f'spool_dir = "{top / "spool"}"\nkeep_generations = {keep}\n[storage.local]\naddress = "local"\n'
                   f'export_root = "{root}"\n')
    env = {**os.environ, "HOME": str(top), "QRMFS_PASSWORD": "", "QRMFS_PIN_DIR": str(top / "pins")}
    env.pop("QRMFS_TEST_CRASH_AT", None)
    return {"top": top, "root": root, "src": src, "cfg": cfg, "env": env, "img": root / "img1",
            "t": f"local:{root}/img1", "cwd": str(Path(__file__).parents[2])}


def _create(s: dict[str, Any], user: int | None = None) -> None:
    r = _qrmfs(s, "create", "-t", s["t"], "-l", str(s["src"]), "-o", "--private-add", "/var/lib/app", user=user)
    assert r.returncode == 0, r.stderr
    node = s["img"] / NODE_FILE
    node.parent.mkdir(parents=True)
    node.write_text("node 1 state\n")
    if user is not None:  # a node's files, as that user's
        for p in (s["img"] / ".qrmfs/nodes").rglob("*"):
            os.chown(p, user, user)
        os.chown(s["img"] / ".qrmfs/nodes", user, user)


def _update(s: dict[str, Any], content: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    (s["src"] / "usr/bin/tool").write_text(content)
    return _qrmfs(s, "update", "-t", s["t"], "-l", str(s["src"]), "-o", **kw)


def _tree(top: Path) -> dict[str, str]:
    """Every file's content and every link's target, /.qrmfs left out."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not (dirpath == str(top) and d == ".qrmfs")]
        for n in filenames:
            p = Path(dirpath, n)
            out[str(p.relative_to(top))] = os.readlink(p) if p.is_symlink() else p.read_bytes().hex()
    return out


@pytest.mark.parametrize("step", ["journal", "nodes", "swap", "retire", "prune"])
def test_sigkill_during_rollback_at_each_step_is_finished_by_the_next_lock(tmp_path: Path, step: str) -> None:
    s = _setup(tmp_path, tmp_path / "exports")
    s["root"].mkdir()
    _create(s)
    first = _tree(s["img"])
    assert _update(s, "version 2\n").returncode == 0
    r = _qrmfs(s, "rollback", "-t", s["t"], "-o", env={"QRMFS_TEST_CRASH_AT": step})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr  # its agent was killed mid-publish
    assert (s["root"] / ".img1.qrmfs-journal").exists()
    r = _qrmfs(s, "gc", "local")  # the next lock on the image (here gc's) finishes the rollback
    assert r.returncode == 0, r.stderr
    assert not (s["root"] / ".img1.qrmfs-journal").exists()
    r = _qrmfs(s, "list", "--generations", "-t", s["t"], "--json")
    assert r.returncode == 0, r.stderr
    assert _tree(s["img"]) == first  # rolled back, whole
    assert (s["img"] / NODE_FILE).read_text() == "node 1 state\n"  # node state moved with it, never lost
    gens = json.loads(r.stdout)["result"]["images"][0]["generations"]
    assert [g["role"] for g in gens] == ["current", "generation"]
    assert (Path(gens[1]["path"]) / "usr/bin/tool").read_text() == "version 2\n"
    assert not [e for e in os.listdir(s["root"]) if "staging" in e or "removing" in e]


def test_sigkill_during_gc_leaves_the_image_and_the_next_gc_finishes(tmp_path: Path) -> None:
    s = _setup(tmp_path, tmp_path / "exports")
    s["root"].mkdir()
    _create(s)
    before = _tree(s["img"])
    left = s["root"] / ".img1.qrmfs-staging-deadbeef00"  # what a killed update leaves: many files
    for i in range(40):
        d = left / f"d{i}"
        d.mkdir(parents=True)
        for j in range(250):
            (d / f"f{j}").write_bytes(b"x")
    total = sum(len(files) for _d, _s, files in os.walk(left))
    p = subprocess.Popen([sys.executable, "-m", "qrmfs", "gc", "local", "--config", str(s["cfg"])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=s["env"], cwd=s["cwd"])
    while p.poll() is None:  # ready: the deletion has begun (fewer files than there were)
        try:
            if sum(len(files) for _d, _s, files in os.walk(left)) < total:
                break
        except FileNotFoundError:
            break
    p.kill()
    p.communicate(timeout=60)
    assert _tree(s["img"]) == before and (s["img"] / NODE_FILE).read_text() == "node 1 state\n"
    r = _qrmfs(s, "gc", "local")  # the lock is free (its agent died with it), the rest goes
    assert r.returncode == 0, r.stderr
    assert not left.exists()
    assert _tree(s["img"]) == before
    assert sorted(os.listdir(s["root"])) == [".img1.qrmfs-lock", "img1"]


@pytest.fixture
def small_export(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 6 MiB as the export: it fills up for real."""
    root = tmp_path / "exports"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "qrmfs-test", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_the_export_filling_up_during_an_update_keeps_the_image(tmp_path: Path, small_export: Path) -> None:
    s = _setup(tmp_path, small_export, keep=1)
    _create(s)
    before = _tree(s["img"])
    (s["src"] / "usr/bin/big").write_bytes(os.urandom(8 << 20))  # more than the export holds
    r = _update(s, "version 2\n")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "No space left on device" in r.stderr
    assert _tree(s["img"]) == before and (s["img"] / NODE_FILE).read_text() == "node 1 state\n"
    assert sorted(os.listdir(small_export)) == [".img1.qrmfs-lock", "img1"]  # no staging copy, no journal
    (s["src"] / "usr/bin/big").unlink()
    r = _update(s, "version 3\n")  # the lock was released, the space given back
    assert r.returncode == 0, r.stderr
    assert (s["img"] / "usr/bin/tool").read_text() == "version 3\n"


@pytest.fixture
def unprivileged() -> Iterator[Path]:
    """A directory an unprivileged user (nobody) works in."""
    top = Path(tempfile.mkdtemp(prefix="qrmfs-nobody-"))
    top.chmod(0o755)
    os.chown(top, 65534, 65534)
    try:
        yield top
    finally:
        shutil.rmtree(top)


def test_a_generation_owned_by_another_user_refuses_the_whole_remove(unprivileged: Path) -> None:
    """qrmfs as an unprivileged user; one of its image's generations holds a directory of another user (root),
    which it cannot empty: remove refuses before anything is deleted, naming it; an update keeps going (the
    generation it cannot prune is named and kept)."""
    s = _setup(unprivileged, unprivileged / "exports", keep=1)
    s["root"].mkdir()
    for p in unprivileged.rglob("*"):
        os.chown(p, 65534, 65534, follow_symlinks=False)
    _create(s, user=65534)
    r = _update(s, "version 2\n", user=65534)
    assert r.returncode == 0, r.stderr
    (gen,) = sorted(s["root"].glob(".img1.qrmfs-gen-*"))
    theirs = gen / "var/lib/theirs"
    theirs.mkdir()
    (theirs / "f").write_text("root's\n")  # made by root: nobody may not delete it
    theirs.chmod(0o755)
    r = _qrmfs(s, "remove", "-t", s["t"], "-o", "--yes", user=65534)
    assert r.returncode == 11, r.stderr
    assert f"{theirs} (owned by uid 0, mode 755) may not be changed" in r.stderr and "nothing was removed" in r.stderr
    assert (s["img"] / ".qrmfs/manifest.json").is_file() and (gen / ".qrmfs/manifest.json").is_file()
    assert (s["img"] / NODE_FILE).read_text() == "node 1 state\n"
    r = _update(s, "version 3\n", user=65534)  # prune cannot delete it: named, kept, the update done
    assert r.returncode == 0, r.stderr
    assert "could not be deleted" in r.stderr and (s["img"] / "usr/bin/tool").read_text() == "version 3\n"
    assert not [e for e in os.listdir(s["root"]) if "staging" in e or "journal" in e]
