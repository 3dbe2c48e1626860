"""Removes are all or nothing (issue 26, item 2): every tree of an image (the image, its generations, its spare,
staging copies) is checked before anything is deleted; a refused remove leaves the image whole and registered;
a remove that started finishes after a crash, at the next lock. Real qrmfs runs against a local storage server,
a real tmpfs mounted inside a generation, a real process holding one, a tiny openQRM on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit import test_registration_faults as rf
from tests.unit.test_registration_faults import Server, _local_storage

home, server = rf.home, rf.server  # the fixtures: a home with a password file, a tiny openQRM


def _run(home: dict[str, Any], *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qrmfs", *args], capture_output=True, text=True, timeout=300,
                          env={**home["env"], **(env or {})})


@pytest.fixture
def image(home: dict[str, Any], server: Server) -> Iterator[dict[str, Any]]:
    """A registered image with two earlier generations (keep_generations 2)."""
    root, src, cfg = _local_storage(home, server)
    with open(cfg, "r+") as f:
        text = f.read()
        f.seek(0)
        f.write("keep_generations = 2\n" + text)
    t = f"local:{root}/img1"
    for args in (("create", "-t", t, "-l", str(src)), ("update", "-t", t, "-l", str(src)),
                 ("update", "-t", t, "-l", str(src))):
        r = _run(home, *args, "--config", cfg)
        assert r.returncode == 0, r.stderr
    gens = sorted(root.glob(".img1.qrmfs-gen-*"))
    assert len(gens) == 2 and server.images == ["img1"]
    yield {"root": root, "cfg": cfg, "t": t, "gens": gens}


def _whole(root: Path, gens: list[Path]) -> None:
    assert json.loads((root / "img1/.qrmfs/manifest.json").read_text())["image"] == "img1"
    for g in gens:
        assert (g / ".qrmfs/manifest.json").is_file() and (g / "etc/hostname").is_file()


def test_a_mount_in_an_earlier_generation_refuses_the_whole_remove(home: dict[str, Any], server: Server,
                                                                  image: dict[str, Any]) -> None:
    """Issue 26, reproduction 2: it deleted the image, then refused the generation (exit 11), leaving the
    openQRM record and sending no failure event."""
    root, gens = image["root"], image["gens"]
    mnt = gens[0] / "mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "qrmfs-test", str(mnt)], check=True)
    try:
        r = _run(home, "remove", "-t", image["t"], "--yes", "--config", image["cfg"])
        assert r.returncode == 11, r.stderr
        assert f"{gens[0]} has mounts under it: {mnt}" in r.stderr
        _whole(root, gens)  # the image and every generation whole
        assert server.images == ["img1"] and "remove_by_name" not in server.commands()  # still registered
        assert not (root / ".img1.qrmfs-journal").exists()
        assert rf.spool_jobs(home) == []  # no deregistration waits for a remove that did not happen
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    r = _run(home, "remove", "-t", image["t"], "--yes", "--config", image["cfg"])
    assert r.returncode == 0, r.stderr
    assert server.images == [] and [p.name for p in root.iterdir()] == []


def test_a_process_in_an_earlier_generation_refuses_the_whole_remove(home: dict[str, Any], server: Server,
                                                                    image: dict[str, Any]) -> None:
    root, gens = image["root"], image["gens"]
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], cwd=gens[-1],
                              stdin=subprocess.PIPE)
    try:
        r = _run(home, "remove", "-t", image["t"], "--yes", "--config", image["cfg"])
        assert r.returncode == 11, r.stderr
        assert f"{gens[-1]} is in use by pid {holder.pid}" in r.stderr
        _whole(root, gens)
        assert server.images == ["img1"]
    finally:
        holder.communicate(b"")


def test_a_remove_killed_after_the_image_went_finishes_at_the_next_lock(home: dict[str, Any], server: Server,
                                                                       image: dict[str, Any]) -> None:
    root = image["root"]
    r = _run(home, "remove", "-t", image["t"], "-o", "--yes", "--config", image["cfg"],
             env={"QRMFS_TEST_CRASH_AT": "remove-image"})
    assert r.returncode != 0 and r.returncode != -signal.SIGKILL
    assert not (root / "img1").exists() and (root / ".img1.qrmfs-journal").exists()  # the agent died mid-way
    r = _run(home, "gc", "local", "--config", image["cfg"])
    assert r.returncode == 0, r.stderr
    assert [p.name for p in root.iterdir()] == []  # every generation, the journal, the lock: all gone
    assert os.listdir(root) == []


def test_a_registered_remove_killed_after_the_image_went_deregisters_at_the_next_flush(
        home: dict[str, Any], server: Server, image: dict[str, Any]) -> None:
    """The openQRM record goes exactly when the image is gone: the deregistration is written ahead, so a remove
    whose agent died after the image's name went (the record used to stay for good) is deregistered by the
    next flush, once its lock has finished the remove."""
    root = image["root"]
    r = _run(home, "remove", "-t", image["t"], "--yes", "--config", image["cfg"],
             env={"QRMFS_TEST_CRASH_AT": "remove-image"})
    assert r.returncode != 0 and not (root / "img1").exists()
    assert server.images == ["img1"]  # not sent yet: the remove did not finish
    (job,) = rf.spool_jobs(home)
    assert [q["params"].get("image_command") for q in job["requests"] if q["kind"] == "image"] == ["remove_by_name"]
    r = _run(home, "flush", "--config", image["cfg"])
    assert r.returncode == 0, r.stderr
    assert server.images == [] and server.commands().count("remove_by_name") == 1
    assert rf.spool_jobs(home) == [] and os.listdir(root) == []
