"""Each image's own NFS export, served by the lab's real nfs-ganesha (`exports = "ganesha"` in the lab's config):
create adds it, update and rollback make new mounts get the current generation while a mount made before keeps
its own (a held NFSv3 mount, as a running node holds its root), a failed export is reported and repaired by
`validate --fix`, remove takes it away. The kernel NFS server's path: tests/unit/agent/test_exports.py."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from . import nfsclient
from .helpers import qrmfs, result_of, run_on

pytestmark = pytest.mark.e2e

INCLUDE = "/etc/ganesha/qrmfs-exports.conf"
SHOW = ("dbus-send --system --print-reply --dest=org.ganesha.nfsd /org/ganesha/nfsd/ExportMgr "
        "org.ganesha.nfsd.exportmgr.ShowExports")


def shown(lab: dict[str, Any]) -> dict[str, int]:
    """path -> Export_Id, as ganesha itself lists its exports."""
    out = run_on(lab, "storage", SHOW).stdout.decode()
    return {p: int(i) for i, p in re.findall(r'uint16 (\d+)\s+string "([^"]*)"', out)}


@pytest.fixture
def tree(lab: dict[str, Any]) -> Iterator[str]:
    """A small root-like tree on the source host whose /etc/marker the test changes between runs."""
    d = f"/srv/exp-{uuid.uuid4().hex[:6]}"
    run_on(lab, "source", f"mkdir -p {d}/etc {d}/sbin && echo one > {d}/etc/marker && printf '#!/bin/sh\\n' > "
                          f"{d}/sbin/init && chmod 755 {d}/sbin/init")
    yield d
    run_on(lab, "source", f"rm -rf {d}", check=False)


def test_an_images_export_follows_its_generations_and_running_mounts_keep_theirs(lab, tree):
    cfg, server = lab["config"], lab["hosts"]["storage"]["address"]
    name = f"exp_{uuid.uuid4().hex[:8]}"
    path = f"/exports/{name}"
    t = f"storage:{path}"
    include_before = run_on(lab, "storage", f"cat {INCLUDE}").stdout.decode()

    def marker() -> str:  # what a node that mounts now gets: `mount -t nfs -o vers=3 SERVER:PATH`
        return nfsclient.cat(server, path, "/etc/marker").decode().strip()

    def manifest() -> dict[str, Any]:
        return json.loads(run_on(lab, "storage", f"cat {path}/.qrmfs/manifest.json").stdout)

    r = qrmfs("create", "-t", t, "-l", f"source:{tree}", "-o", "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    try:
        export_id = shown(lab)[path]
        assert result_of(r)["export"] == f"{path} exported by nfs-ganesha (Export_Id {export_id})"
        assert manifest()["export"]["generation"] == manifest()["generation"]["id"]
        block = run_on(lab, "storage", f"cat {INCLUDE}").stdout.decode()[len(include_before):]
        assert f'Path = "{path}";' in block and "Squash = No_Root_Squash;" in block and "Clients = *;" in block
        assert marker() == "one"

        # a running node: its mount and an open file, from before the update
        with nfsclient.Mount(server, path) as running:
            held = running.open("/etc/marker")
            assert held.read() == b"one\n"

            run_on(lab, "source", f"echo two > {tree}/etc/marker")
            r = qrmfs("update", "-t", t, "--json", config=cfg)
            assert r.returncode == 0, r.stderr
            assert marker() == "two"  # ganesha was told: a new mount gets the new generation
            assert shown(lab)[path] == export_id  # the same export id, so that running clients' handles stay valid
            assert held.read() == b"one\n"  # the running mount keeps its generation: its open file...
            assert running.cat("/etc/marker") == b"one\n"  # ...and its root, for new lookups

            r = qrmfs("rollback", "-t", t, "--json", config=cfg)
            assert r.returncode == 0, r.stderr
            assert result_of(r)["export"].startswith(f"{path} exported by nfs-ganesha")
            assert marker() == "one"
            assert held.read() == b"one\n" and running.cat("/etc/marker") == b"one\n"
        r = qrmfs("validate", "-t", t, "--json", config=cfg)
        assert r.returncode == 0, r.stdout + r.stderr

        # a fault after the publish: the export's file cannot be written (a directory where it should be)
        saved = run_on(lab, "storage", f"cat {INCLUDE}").stdout
        run_on(lab, "storage", f"rm {INCLUDE} && mkdir {INCLUDE}")
        try:
            run_on(lab, "source", f"echo three > {tree}/etc/marker")
            r = qrmfs("update", "-t", t, "--json", config=cfg)
            assert r.returncode == 9, r.stdout + r.stderr
            err = json.loads(r.stdout)["error"]["message"]
            assert f"{t}: its NFS export could not be made" in err and f"`qrmfs validate --fix -t {t}`" in err, err
            assert "\n" not in err
            assert marker() == "one"  # published, but ganesha still serves the generation it resolved
            r = qrmfs("validate", "-t", t, "--json", config=cfg)
            assert r.returncode == 12, r.stdout + r.stderr
            findings = result_of(r, ok=False)["findings"]
            assert [(f["step"], f["fixable"]) for f in findings] == [("export", True)], findings
            assert "not since the current generation was published" in findings[0]["problem"]
        finally:
            run_on(lab, "storage", f"rmdir {INCLUDE} 2>/dev/null; test -f {INCLUDE} || cat > {INCLUDE}",
                   input=saved)
        r = qrmfs("validate", "--fix", "-t", t, "--json", config=cfg)
        assert r.returncode == 0, r.stdout + r.stderr
        assert marker() == "three"
        assert manifest()["export"]["generation"] == manifest()["generation"]["id"]
    finally:
        r = qrmfs("remove", "-t", t, "--yes", "-o", "--json", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert path not in shown(lab)
    assert run_on(lab, "storage", f"cat {INCLUDE}").stdout.decode() == include_before  # nothing else touched
    with pytest.raises(nfsclient.NfsError):
        marker()
