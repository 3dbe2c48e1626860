"""qrmfs/agent/treediff.py: counting what changed against the image when an update started from its spare."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from qrmfs.agent import treediff
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
    got = treediff.op_rebase(str(image), str(tmp_path), str(staging), ["/etc/fstab"])
    assert got.counts == {"new": 3, "changed": 2, "metadata": 1, "deleted": 4}
    same = tmp_path / ".img1.qrmfs-staging-u"
    shutil.copytree(image, same, symlinks=True, copy_function=shutil.copy2)
    assert treediff.op_rebase(str(image), str(tmp_path), str(same), []).counts == {
        "new": 0, "changed": 0, "metadata": 0, "deleted": 0}
    with pytest.raises(AgentError, match="not a staging directory"):
        treediff.op_rebase(str(image), str(tmp_path), str(image / "etc"), [])


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
    one = treediff._rebase_share(str(image), str(staging), done, 0, 1)
    assert one == {"new": 6, "changed": 12, "metadata": 12, "deleted": 36}
    assert treediff.op_rebase(str(image), str(tmp_path), str(staging), []).counts == one
    halves = [treediff._rebase_share(str(image), str(staging), done, k, 2) for k in (0, 1)]
    assert all(sum(h.values()) for h in halves)  # both shares had work


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    """An image and a staging copy of it (times kept), with a few differences already."""
    image, staging = tmp_path / "img1", tmp_path / ".img1.qrmfs-staging-t"
    _tree(image)
    for i in range(12):
        (image / f"srv/d{i}/sub").mkdir(parents=True)
        for j in range(4):
            (image / f"srv/d{i}/sub/f{j}").write_text(f"{i}.{j}\n")
    shutil.copytree(image, staging, symlinks=True, copy_function=shutil.copy2)
    shutil.rmtree(staging / ".qrmfs")
    (staging / "usr/bin/tool").write_text("v2, longer\n")
    (staging / "usr/bin/mode").chmod(0o700)
    shutil.rmtree(staging / "var/old")
    (staging / "opt/new").mkdir(parents=True)
    (staging / "opt/new/f").write_text("f\n")
    return image, staging


def test_a_scan_made_while_rsync_works_and_rsyncs_items_count_what_the_whole_walk_counts(tmp_path: Path) -> None:
    """The scan runs while rsync still changes the staging copy; whatever rsync changes after (or while) the
    scan looked, it itemizes: the count over those paths alone equals the whole walk's at the end."""
    image, staging = _pair(tmp_path)
    scanned = treediff.op_rebase_scan(str(image), str(tmp_path), str(staging)).paths
    assert scanned is not None and sorted(scanned) == [
        "/opt", "/usr/bin/mode", "/usr/bin/tool", "/var/old"]  # a new or deleted directory: itself only
    # what "rsync" does after the scan, and the items it prints for it
    items = []
    (staging / "srv/d3/sub/f1").write_text("rewritten by rsync\n")
    items.append("/srv/d3/sub/f1")
    shutil.rmtree(staging / "srv/d5")                                # a deleted directory: rsync lists each entry
    items += ["/srv/d5", "/srv/d5/sub", *[f"/srv/d5/sub/f{j}" for j in range(4)]]
    shutil.rmtree(staging / "srv/d7/sub")                            # a directory that became a file
    (staging / "srv/d7/sub").write_text("now a file\n")
    items += ["/srv/d7/sub", "/srv/d7/sub/f0", "/srv/d7/sub/f2"]
    (staging / "srv/d9/n").mkdir()                                   # a new directory, filled
    (staging / "srv/d9/n/x").write_text("x\n")
    items += ["/srv/d9/n", "/srv/d9/n/x"]
    (staging / "usr/bin/tool").write_text("v1\n")                    # back as the image has it
    shutil.copystat(image / "usr/bin/tool", staging / "usr/bin/tool")
    items.append("/usr/bin/tool")
    (staging / "etc/.tool.Xy12ab").write_text("rsync's temporary file, gone at the end\n")
    os.unlink(staging / "etc/.tool.Xy12ab")
    items.append("/.qrmfs/nodes")                                    # never counted
    whole = treediff.op_rebase(str(image), str(tmp_path), str(staging), ["/etc/fstab"]).counts
    assert whole == {"new": 5, "changed": 2, "metadata": 1, "deleted": 10}
    assert treediff.op_rebase(str(image), str(tmp_path), str(staging), ["/etc/fstab"],
                          only=[*scanned, *items]).counts == whole
    # without rsync's items, the changes made after the scan are missed: the items are needed
    assert treediff.op_rebase(str(image), str(tmp_path), str(staging), ["/etc/fstab"], only=scanned).counts != whole


def test_a_scan_that_would_name_too_many_paths_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image, staging = _pair(tmp_path)
    monkeypatch.setattr(treediff, "SCAN_LIMIT", 2)
    assert treediff.op_rebase_scan(str(image), str(tmp_path), str(staging)).paths is None
