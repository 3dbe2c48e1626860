"""Issue 26 on the lab: a node of one image takes another image's node state (reproduction 1), and a directory
named like a generation crashes the agent (reproduction 5). The writes a node would make are made on the
storage server as root (nodes write to their NFS root as root: no_root_squash); one pair of images serves
both."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .helpers import qrmfs, run_on

pytestmark = pytest.mark.e2e


@pytest.fixture
def two_images(lab: dict[str, Any], cfg: str) -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    vic, att = f"/exports/vic_{tag}", f"/exports/att_{tag}"
    try:
        for path in (vic, att):
            r = qrmfs("create", "-t", f"storage:{path}", "-l", "source:/", "-o", config=cfg)
            assert r.returncode == 0, r.stderr
        yield vic, att
    finally:
        for path in (vic, att):
            name = path.rsplit("/", 1)[1]
            run_on(lab, "storage", f"rm -rf {path} /exports/.{name}.qrmfs-*", check=False)


def test_a_node_cannot_take_another_images_node_state_nor_crash_qrmfs_with_a_name(
        lab: dict[str, Any], cfg: str, two_images: tuple[str, str]) -> None:
    vic, att = two_images
    att_name = att.rsplit("/", 1)[1]
    key = f"{vic}/.qrmfs/nodes/nodeV/etc/ssh/ssh_host_ed25519_key"
    run_on(lab, "storage", f"mkdir -p {vic}/.qrmfs/nodes/nodeV/etc/ssh && echo KEY > {key}")
    # standing in for a write by a node of att:
    run_on(lab, "storage", f"cd {att} && mv .qrmfs .qrmfs.orig && ln -s {vic}/.qrmfs .qrmfs")
    r = qrmfs("update", "-t", f"storage:{att}", "-o", config=cfg)
    assert r.returncode == 11, r.stderr  # it was 0, and vic's node state was gone into att
    assert f"{att}/.qrmfs is a symlink" in r.stderr and "Traceback" not in r.stderr
    assert run_on(lab, "storage", f"cat {key}").stdout == b"KEY\n"  # vic's node state where it was
    assert run_on(lab, "storage", f"readlink {att}/.qrmfs").stdout.decode().strip() == f"{vic}/.qrmfs"
    assert run_on(lab, "storage", f"ls -A /exports | grep -c '^.{att_name}.qrmfs-journal$' || true"
                  ).stdout.strip() == b"0"
    # reproduction 5: a directory named like a generation, in att's namespace (att itself mended)
    run_on(lab, "storage", f"cd {att} && rm .qrmfs && mv .qrmfs.orig .qrmfs && "
                           f"mkdir '/exports/.{att_name}.qrmfs-gen-²'")
    for args in (("update", "-t", f"storage:{att}", "-o"), ("rollback", "-t", f"storage:{att}", "-o"),
                 ("list", "--generations", "-t", f"storage:{att}")):
        r = qrmfs(*args, config=cfg)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)  # int('²') crashed all three
    r = qrmfs("list", config=cfg)
    assert f"/exports/.{att_name}.qrmfs-gen-²  foreign" in r.stdout, r.stdout
    assert run_on(lab, "storage", f"test -d '/exports/.{att_name}.qrmfs-gen-²'", check=False).returncode == 0
