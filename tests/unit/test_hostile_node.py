"""Nothing in an image is trusted (issue 26, item 1): a node writes to its NFS root as root, so anything qrmfs
opens, renames, reads or writes inside an image may have been replaced by a symlink (to another image's
state), a FIFO, a file hard-linked elsewhere. Real qrmfs runs against a local storage server (no docker):
each command against a planted image is refused naming the path or leaves the planted entry alone, and the
other image on the export is never read, moved, changed or shown through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Plant = Callable[[Path, Path], str]  # (att, vic) -> the planted path qrmfs must name


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qrmfs", *args], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.fixture
def export(tmp_path: Path) -> dict[str, Any]:
    """Two images, vic and att, made by qrmfs on a local storage server; vic has a node's private host key."""
    root, src = tmp_path / "exports", tmp_path / "src"
    root.mkdir()
    (src / "etc").mkdir(parents=True)
    (src / "etc/hostname").write_text("src\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'spool_dir = "{tmp_path / "spool"}"\nkeep_generations = 2\n'
                   f'[storage.local]\naddress = "local"\nexport_root = "{root}"\n')
    env = {**os.environ, "HOME": str(tmp_path), "QRMFS_PASSWORD": ""}
    for name in ("vic", "att"):
        r = _run(env, "create", "-t", f"local:{root}/{name}", "-l", str(src), "-o", "--config", str(cfg))
        assert r.returncode == 0, r.stderr
    r = _run(env, "update", "-t", f"local:{root}/att", "-l", str(src), "-o", "--config", str(cfg))
    assert r.returncode == 0, r.stderr  # att has an earlier generation (rollback, gc, list --generations)
    key = root / "vic/.qrmfs/nodes/nodeV/etc/ssh/ssh_host_ed25519_key"
    key.parent.mkdir(parents=True)
    key.write_text("KEY\n")
    return {"root": root, "src": src, "cfg": str(cfg), "env": env, "key": key}


def _snapshot(top: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry below top: type, mode, content or link target (what a change would show)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            kind = "l" if p.is_symlink() else "d" if p.is_dir() else "f"
            body = os.readlink(p) if kind == "l" else p.read_text(errors="replace") if kind == "f" else ""
            out[str(p.relative_to(top))] = (kind, st.st_mode, body)
    return out


def _symlinked_qrmfs(att: Path, vic: Path) -> str:
    """The issue's reproduction 1: att's /.qrmfs replaced by a symlink to vic's."""
    (att / ".qrmfs").rename(att / ".qrmfs.orig")
    os.symlink(vic / ".qrmfs", att / ".qrmfs")
    return f"{att}/.qrmfs is a symlink"


def _symlinked_nodes(att: Path, vic: Path) -> str:
    os.symlink(vic / ".qrmfs/nodes", att / ".qrmfs/nodes")
    return f"{att}/.qrmfs/nodes is a symlink"


def _symlinked_manifest(att: Path, vic: Path) -> str:
    m = att / ".qrmfs/manifest.json"
    m.rename(att / ".qrmfs/manifest.orig")
    os.symlink(vic / ".qrmfs/manifest.json", m)
    return f"{m} is a symlink"


def _fifo_manifest(att: Path, vic: Path) -> str:
    m = att / ".qrmfs/manifest.json"
    m.rename(att / ".qrmfs/manifest.orig")
    os.mkfifo(m)
    return f"{m} is a special file"


PLANTS = [_symlinked_qrmfs, _symlinked_nodes, _symlinked_manifest, _fifo_manifest]


@pytest.mark.parametrize("plant", PLANTS, ids=lambda p: p.__name__.strip("_"))
def test_every_command_against_an_image_a_node_made_strange(export: dict[str, Any], plant: Plant) -> None:
    root, cfg, env = export["root"], export["cfg"], export["env"]
    att, vic = root / "att", root / "vic"
    named = plant(att, vic)
    vic_before = _snapshot(vic)
    t = f"local:{root}/att"
    commands = [
        ("update", "-t", t, "-l", str(export["src"]), "-o"),
        ("rollback", "-t", t, "-o"),
        ("validate", "-t", t),
        ("validate", "-t", t, "--fix"),
        ("clone", "-s", "copy", "--from", t, "-t", f"local:{root}/copy", "-o"),
        ("list", "--generations", "-t", t),
        ("remove", "-t", t, "-o", "--yes"),
    ]
    for args in commands:
        r = _run(env, *args, "--config", cfg)
        assert "Traceback" not in r.stderr, (args, r.stderr)
        if args[0] in ("update", "rollback"):  # they read the manifest and move node state: refused, named
            assert r.returncode != 0, (args, r.stdout, r.stderr)
            assert named in r.stderr, (args, r.stderr)  # one clear message naming the planted path
        # the others refuse it the same way, or never go through it (validate reads no node state; remove
        # unlinks a symlink, never follows it)
        assert named in r.stderr or r.returncode in (0, 12), (args, r.stderr)
        assert _snapshot(vic) == vic_before, args  # nothing of vic moved, changed or removed
        assert export["key"].read_text() == "KEY\n"
        assert not list(root.glob(".att.qrmfs-journal")), args  # nothing half-done waits for the next lock
        assert "KEY" not in r.stdout + r.stderr and "nodeV" not in r.stdout + r.stderr  # nor shown
    for args in (("list", "--json"), ("gc", "local", "--json")):
        r = _run(env, *args, "--config", cfg)
        assert "Traceback" not in r.stderr and r.returncode in (0, 1), (args, r.stderr)
        assert "KEY" not in r.stdout and "nodeV" not in r.stdout
        assert _snapshot(vic) == vic_before, args
    listed = json.loads(_run(env, "list", "--json", "--config", cfg).stdout)["result"]["images"]
    assert [i["name"] for i in listed if i["path"] == str(vic)] == ["vic"]
    assert not (root / "copy").exists() or _run(env, "validate", "-t", f"local:{root}/copy", "--config", cfg
                                                ).returncode in (0, 12)


def test_a_directory_named_like_a_generation_is_foreign(export: dict[str, Any]) -> None:
    """Issue 26, reproduction 5: `.att.qrmfs-gen-²` (int('²') crashed update, rollback and list --generations),
    and a well-formed generation name qrmfs did not make (no manifest of its own): neither crashes anything,
    neither is pruned, rolled back to, collected or deleted."""
    root, cfg, env = export["root"], export["cfg"], export["env"]
    t = f"local:{root}/att"
    odd, fake = root / ".att.qrmfs-gen-²", root / ".att.qrmfs-gen-900"
    for d in (odd, fake):
        d.mkdir()
        (d / "mine").write_text("an operator's\n")
    for args in (("list", "--generations", "-t", t), ("update", "-t", t, "-l", str(export["src"]), "-o"),
                 ("update", "-t", t, "-l", str(export["src"]), "-o"), ("rollback", "-t", t, "-o"),
                 ("list",), ("gc", "local"), ("remove", "-t", t, "-o", "--yes")):
        r = _run(env, *args, "--config", cfg)
        assert "Traceback" not in r.stderr, (args, r.stderr)
        assert r.returncode == 0, (args, r.stderr)
        for d in (odd, fake):
            assert (d / "mine").read_text() == "an operator's\n", args
        if args[0] == "list" and len(args) == 1:
            listed = _run(env, "list", "--config", cfg).stdout
            for d in (odd, fake):  # shown, as what it is
                assert f"local:{d}  foreign" in listed and "not made by qrmfs: left alone" in listed, listed
    assert not (root / "att").exists()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".att.") and not p.name.endswith("-lock")) == [
        fake.name, odd.name]
