"""The lab's XFS export helper, without docker: a failed set-up says what to do and leaves nothing behind."""

from __future__ import annotations

import shutil

import pytest

from lab import exports
from lab.images import LabError


def test_sizes_parse():
    assert exports._bytes("64G") == 64 << 30
    assert exports._bytes("512m") == 512 << 20
    assert exports._bytes("4096") == 4096


@pytest.mark.skipif(shutil.which("mkfs.xfs") is None, reason="xfsprogs not installed (make setup)")
def test_a_failed_xfs_export_names_the_plain_export_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(exports, "XFS_SIZE", "1M")  # far below XFS's minimum: mkfs.xfs refuses
    with pytest.raises(LabError, match="--export plain"):
        exports.prepare(tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert exports.release(tmp_path) == []  # nothing to undo, and no error
