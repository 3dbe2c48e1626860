"""Stopping qrmfs mid-copy, for real: SIGINT and SIGTERM (Ctrl-C, systemd, `timeout`, CI) and SIGKILL.

Whatever stops it, nothing of ours goes on running, on this machine or on the storage server; nothing looks like
an image; and what a SIGKILL had to leave behind is removed, and named, by the next run on that image."""

from __future__ import annotations

import os
import posixpath
import signal
import subprocess
import sys
from typing import Any

import pytest

from .helpers import exports_listing, qrmfs, run_on, until

pytestmark = pytest.mark.e2e


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = open(f"/proc/{p}/task/{p}/children").read().split()
        except OSError:
            continue
        for k in map(int, kids):
            out.add(k)
            todo.append(k)
    return out


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False


def _storage_rsyncs(lab: dict[str, Any], name: str) -> list[str]:
    r = run_on(lab, "storage", f"pgrep -af '(rsync|tar --extract).*[.]{name}[.]qrmfs-staging' || true")
    return [ln for ln in r.stdout.decode().splitlines() if ln.strip()]


def _start_create(cfg: str, image_path: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "qrmfs", "create", "-t", f"storage:{image_path}", "-l", "source:/", "-o",
            "--config", cfg]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _copying(lab: dict[str, Any], p: subprocess.Popen[str], name: str) -> set[int]:
    """Wait until the storage server's rsync copies into the staging dir; return qrmfs's child processes."""
    def ready() -> bool:
        assert p.poll() is None, p.communicate()
        return bool(_storage_rsyncs(lab, name))
    until("the storage-side rsync runs", ready)
    return _descendants(p.pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_the_copy_clean_up_and_say_so(lab, cfg, image_path, sig):
    name = posixpath.basename(image_path)
    p = _start_create(cfg, image_path)
    children = _copying(lab, p, name)
    assert children, "qrmfs runs its ssh and ssh-agent as children"
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert f"interrupted by {sig.name}" in err and "removed the unfinished copy" in err
    assert _storage_rsyncs(lab, name) == []
    assert [_cmdline(c) for c in children if _alive(c)] == []
    assert [n for n in exports_listing(lab) if name in n and not n.endswith(".qrmfs-lock")] == []
    # the lock is free again: a new run goes through
    assert qrmfs("create", "-t", f"storage:{image_path}", "-l", "source:/srv", "-o", config=cfg).returncode == 0


def test_sigkill_leaves_nothing_running_and_the_next_run_cleans_up(lab, cfg, image_path):
    name = posixpath.basename(image_path)
    p = _start_create(cfg, image_path)
    children = _copying(lab, p, name)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    # qrmfs's children die with it; the storage side notices the closed connection and stops the copy
    until("qrmfs's children are gone", lambda: not [c for c in children if _alive(c)], 30)
    until("the storage-side rsync is gone", lambda: _storage_rsyncs(lab, name) == [], 30)
    left = [n for n in exports_listing(lab) if f".{name}.qrmfs-staging-" in n]
    assert left, "a SIGKILL leaves the staging copy (nothing ran to remove it)"
    assert not [n for n in exports_listing(lab) if n == name]  # never under the image's name
    r = qrmfs("create", "-t", f"storage:{image_path}", "-l", "source:/srv", "-o", config=cfg)
    assert r.returncode == 0, r.stderr
    assert f"removed /exports/{left[0]}, left by an earlier qrmfs run" in r.stderr
    assert [n for n in exports_listing(lab) if f".{name}.qrmfs-staging-" in n] == []
