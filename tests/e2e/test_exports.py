"""Both kinds of export path: /exports (XFS, reflinks, the lab's default) and /exports-plain (ext4)."""

from __future__ import annotations

import uuid

import pytest

from .helpers import qrmfs, tree_info

pytestmark = pytest.mark.e2e

FIXTURE = "/srv/fixture"


def test_create_and_clone_on_the_plain_export_are_faithful(lab, on_storage):
    """The lab's config names /exports-plain as the storage `plain`; an image made and cloned there keeps
    every fixture case, like one on /exports."""
    name = f"plain_{uuid.uuid4().hex[:8]}"
    path, clone = f"/exports-plain/{name}", f"/exports-plain/{name}_c"
    try:
        r = qrmfs("create", "-t", f"plain:{path}", "-l", "source:/", "-o", "--json", config=lab["config"])
        assert r.returncode == 0, r.stderr
        assert on_storage(f"stat -f -c %T {path}").stdout.decode().strip() == "ext2/ext3"
        src = tree_info(lab, "source", FIXTURE)
        src.pop("socket")
        assert tree_info(lab, "storage", path + FIXTURE) == src
        r = qrmfs("clone", "-s", f"{name}_c", "-t", f"plain:{clone}", "--from", f"plain:{path}", "-o", "--json",
                  config=lab["config"])
        assert r.returncode == 0, r.stderr
        assert tree_info(lab, "storage", clone + FIXTURE) == src
    finally:
        on_storage(f"rm -rf {path} {clone} /exports-plain/.{name}.qrmfs-* /exports-plain/.{name}_c.qrmfs-*",
                   check=False)
