"""qrmfs/agent/gens.py: counting what changed against the image when an update started from its spare."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from qrmfs.agent import gens
from qrmfs.agent.protocol import AgentError


def _tree(top: Path) -> None:
    for d in ("etc", "usr/bin", "var/old/sub", ".qrmfs/nodes/1"):
        (top / d).mkdir(parents=True)
    (top / "etc/motd").write_text("hello\n")
    (top / "etc/fstab").write_text("prepared\n")
    (top / "usr/bin/tool").write_text("v1\n")
    (top / "usr/bin/mode").write_text("same\n")
    (top / "var/old/sub/a").write_text("a\n")
    (top / "var/old/b").write_text("b\n")
    (top / ".qrmfs/manifest.json").write_text("{}\n")
    os.symlink("tool", top / "usr/bin/link")


def test_rebase_counts_the_staging_copy_against_the_image(tmp_path: Path) -> None:
    image, staging = tmp_path / "img1", tmp_path / ".img1.qrmfs-staging-t"
    _tree(image)
    shutil.copytree(image, staging, symlinks=True)
    for p in ("usr/bin/tool", "usr/bin/mode", "var/old/b", "var/old/sub/a"):  # copytree keeps times
        shutil.copystat(image / p, staging / p)
    (staging / "usr/bin/tool").write_text("v2, longer\n")                 # changed (content)
    (staging / "usr/bin/mode").chmod(0o700)                               # metadata
    os.unlink(staging / "usr/bin/link")
    os.symlink("elsewhere", staging / "usr/bin/link")                     # changed (link target)
    shutil.rmtree(staging / "var/old")                                    # deleted: var/old, sub, sub/a, b
    (staging / "srv/new").mkdir(parents=True)                             # new: srv, srv/new, srv/new/f
    (staging / "srv/new/f").write_text("f\n")
    (staging / "etc/fstab").write_text("the source's, prepared again later\n")  # prepared: not counted
    shutil.rmtree(staging / ".qrmfs")                                     # /.qrmfs: never counted
    got = gens.op_rebase(str(image), str(tmp_path), str(staging), ["/etc/fstab"])
    assert got.counts == {"new": 3, "changed": 2, "metadata": 1, "deleted": 4}
    same = tmp_path / ".img1.qrmfs-staging-u"
    shutil.copytree(image, same, symlinks=True, copy_function=shutil.copy2)
    assert gens.op_rebase(str(image), str(tmp_path), str(same), []).counts == {
        "new": 0, "changed": 0, "metadata": 0, "deleted": 0}
    with pytest.raises(AgentError, match="not a staging directory"):
        gens.op_rebase(str(image), str(tmp_path), str(image / "etc"), [])


def test_rebase_in_two_processes_counts_what_one_walk_counts(tmp_path: Path) -> None:
    """The comparison is split by directory between this process and a forked one: the sum is one walk's."""
    image, staging = tmp_path / "img1", tmp_path / ".img1.qrmfs-staging-t"
    for i in range(40):
        d = image / f"d{i}" / "sub"
        d.mkdir(parents=True)
        for j in range(5):
            (d / f"f{j}").write_text(f"{i}.{j}\n")
    shutil.copytree(image, staging, symlinks=True, copy_function=shutil.copy2)
    for i in range(0, 40, 3):
        (staging / f"d{i}/sub/f0").write_text("changed, longer\n")
        (staging / f"d{i}/sub/f1").chmod(0o600)
    for i in range(0, 40, 7):
        shutil.rmtree(staging / f"d{i}/sub")
        (staging / f"d{i}/n{i}").write_text("new\n")
    done: frozenset[str] = frozenset()
    one = gens._rebase_share(str(image), str(staging), done, 0, 1)
    assert one == {"new": 6, "changed": 12, "metadata": 12, "deleted": 36}
    assert gens.op_rebase(str(image), str(tmp_path), str(staging), []).counts == one
    halves = [gens._rebase_share(str(image), str(staging), done, k, 2) for k in (0, 1)]
    assert all(sum(h.values()) for h in halves)  # both shares had work
