"""validate [--fix], clone, remove and list against the lab."""

from __future__ import annotations

import json
import posixpath
import uuid

import pytest

from lab import lab as _lab
from qrmfs import jobs

from .helpers import exports_listing, qrmfs, real_events, real_images, result_of, run_on, tree_info, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def base_image(lab, tmp_path_factory):
    """One image of the whole lab source (kept network: it has host keys), shared by this module's tests."""
    d = tmp_path_factory.mktemp("base")
    cfg = write_config(lab, d)
    path = f"/exports/lc_base_{uuid.uuid4().hex[:6]}"
    r = qrmfs("create", "-t", f"storage:{path}", "-l", "source:/", "-o", "--keep-network", config=cfg)
    assert r.returncode == 0, r.stderr
    yield path
    run_on(lab, "storage", f"rm -rf {path} /exports/.{posixpath.basename(path)}.qrmfs-*", check=False)


def _clone(cfg, base, path, *extra):
    r = qrmfs("clone", "-s", posixpath.basename(path), "-t", f"storage:{path}", "--from", f"storage:{base}",
              *extra, config=cfg)
    assert r.returncode == 0, r.stderr
    return r


def test_validate_finds_a_broken_image_and_fix_repairs_it(lab, cfg, base_image, image_path, on_storage):
    _clone(cfg, base_image, image_path, "-o")
    assert qrmfs("validate", "-t", f"storage:{image_path}", config=cfg).returncode == 0
    on_storage(f"cd {image_path} && rm etc/mtab && echo not-a-link > etc/mtab && echo x > var/log/left.log && "
               f"python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"{image_path}/root/planted.sock\")'")
    r = qrmfs("validate", "-t", f"storage:{image_path}", "--json", config=cfg)
    assert r.returncode == 12
    found = {(f["step"], f["path"], f["fixable"]) for f in result_of(r, ok=False)["findings"]}
    assert found == {("mtab", "/etc/mtab", True), ("logs", "/var/log/left.log", True),
                     ("sockets", "/root/planted.sock", True)}
    r = qrmfs("validate", "-t", f"storage:{image_path}", "--fix", "--dry-run", "--json", config=cfg)
    assert r.returncode == 12
    assert {(f["step"], f["path"]) for f in result_of(r, ok=False)["would_fix"]} == {(s, p) for s, p, _ in found}
    on_storage(f"test ! -L {image_path}/etc/mtab && test -e {image_path}/var/log/left.log")  # nothing changed
    r = qrmfs("validate", "-t", f"storage:{image_path}", "--fix", "--json", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    out = result_of(r)
    assert out["clean"] and len(out["fixed"]) == 3
    on_storage(f"test \"$(readlink {image_path}/etc/mtab)\" = /proc/mounts && test ! -e {image_path}/var/log/left.log"
               f" && test ! -e {image_path}/root/planted.sock")
    manifest = json.loads(on_storage(f"cat {image_path}/.qrmfs/manifest.json").stdout)
    assert manifest["validation"]["state"] == "clean"
    assert qrmfs("validate", "-t", f"storage:{image_path}", config=cfg).returncode == 0


def test_validate_reports_what_fix_cannot_repair(lab, cfg, base_image, image_path, on_storage):
    _clone(cfg, base_image, image_path, "-o")
    on_storage(f"cd {image_path} && rm -f sbin/init usr/lib/systemd/systemd && rm .qrmfs/manifest.json && "
               "echo 'UUID=1234-abcd / ext4 defaults 0 1' >> etc/fstab")
    r = qrmfs("validate", "-t", f"storage:{image_path}", "--fix", "--json", config=cfg)
    assert r.returncode == 12
    out = result_of(r, ok=False)
    assert {f["step"] for f in out["fixed"]} == {"fstab"}
    # node-init: /sbin/init (which led to qrmfs-init) is gone, so qrmfs-init would have no init to start
    assert {(f["step"], f["fixable"]) for f in out["findings"]} == {("init", False), ("manifest", False),
                                                                      ("node-init", False)}
    on_storage(f"grep -q '^#qrmfs (local disk on a diskless node): UUID=1234-abcd' {image_path}/etc/fstab")


def test_validate_reports_drift_from_the_source_and_changes_nothing(lab, cfg, image_path, on_source, on_storage):
    """Drift on a scratch tree of the source (the shared fixture area is never modified by tests)."""
    scratch = f"/srv/scratch-{uuid.uuid4().hex[:6]}"
    on_source(f"mkdir -p {scratch}/etc && echo one > {scratch}/etc/conf && echo keep > {scratch}/same")
    try:
        r = qrmfs("create", "-t", f"storage:{image_path}", "-l", f"source:{scratch}", "-o", config=cfg)
        assert r.returncode == 0, r.stderr
        on_source(f"echo new > {scratch}/added && echo two >> {scratch}/etc/conf && rm {scratch}/same")
        before = on_storage(f"find {image_path} -printf '%p %s %T@\\n' | sort | md5sum").stdout
        r = qrmfs("validate", "-t", f"storage:{image_path}", "-l", f"source:{scratch}", "--json", config=cfg)
        assert r.returncode == 12  # a scratch tree is no bootable root: the drift report comes with the findings
        out = result_of(r, ok=False)
        changes = {c["path"]: c["change"] for c in out["drift"]["changes"]}
        assert changes.keys() >= {"/added", "/etc/conf", "/same"}
        assert changes["/same"] == "*deleting"
        assert on_storage(f"find {image_path} -printf '%p %s %T@\\n' | sort | md5sum").stdout == before
        on_storage(f"test ! -e {image_path}/added && test -e {image_path}/same")
    finally:
        on_source(f"rm -rf {scratch}")


def test_clone_keeps_every_hard_case_and_gets_a_new_identity(lab, cfg, base_image, image_path, on_storage):
    r = _clone(cfg, base_image, image_path, "-u", "openqrm", "--hostname", "clone-node", "--json")
    out = result_of(r)
    assert out["registration"]["state"] == "sent"
    assert tree_info(lab, "storage", image_path + "/srv/fixture") == \
        tree_info(lab, "storage", base_image + "/srv/fixture")
    manifest = json.loads(on_storage(f"cat {image_path}/.qrmfs/manifest.json").stdout)
    # on the same server, one cp of the image's entries (never /.qrmfs); on the XFS export, reflinks
    assert manifest["rsync"] == []
    base_copy = manifest["generation"]["base_copy"]
    assert base_copy["method"] == "reflink" and base_copy["argv"][:3] == ["cp", "-a", "--reflink=always"]
    assert base_image + "/etc" in base_copy["argv"] and base_image + "/.qrmfs" not in base_copy["argv"]
    assert manifest["source"] == f"clone of storage:{base_image}"
    key = "etc/ssh/ssh_host_ed25519_key.pub"
    ident = on_storage(f"cat {image_path}/etc/hostname; wc -c < {image_path}/etc/machine-id; "
                       f"cat {image_path}/{key} {base_image}/{key}").stdout.decode().splitlines()
    assert ident[0] == "clone-node" and ident[1] == "0"
    assert ident[2].split()[1] != ident[3].split()[1], "the clone kept the original's ssh host key"
    (rec,) = real_images(lab, posixpath.basename(image_path))  # the real openQRM's record of the clone
    assert (rec["image_rootdevice"], rec["image_type"], rec["image_storageid"]) == (
        image_path, "nfs-deployment", str(lab["openqrm"]["storage_ids"]["storage"]))


def test_clone_refusals(lab, cfg, base_image, image_path, on_storage):
    on_storage(f"mkdir -p {image_path}")
    r = qrmfs("clone", "-s", "x_new", "-t", "storage:/exports/x_new", "--from", f"storage:{image_path}", "-o",
              config=cfg)
    assert r.returncode == 4 and "not a qrmfs image" in r.stderr
    r = qrmfs("clone", "-s", posixpath.basename(image_path), "-t", f"storage:{image_path}", "--from",
              f"storage:{base_image}", "-o", config=cfg)
    assert r.returncode == 5 and "--force" in r.stderr
    r = qrmfs("clone", "-s", "other", "-t", "storage:/exports/x_new", "--from", f"storage:{base_image}", "-o",
              config=cfg)
    assert r.returncode == 2


def test_remove_deregisters_and_never_leaves_the_image(lab, cfg, image_path, on_storage):
    name = posixpath.basename(image_path)
    assert qrmfs("create", "-t", f"storage:{image_path}", "-l", "source:/srv", "-u", "openqrm",
                 config=cfg).returncode == 0
    assert len(real_images(lab, name)) == 1
    r = qrmfs("remove", "-t", f"storage:{image_path}", "-u", "openqrm", config=cfg)
    assert r.returncode == 14 and "without --yes" in r.stderr  # no terminal: never removes silently
    on_storage(f"test -d {image_path}")
    r = qrmfs("remove", "-t", f"storage:{image_path}", "-u", "openqrm", "--yes", "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    assert result_of(r)["registration"]["state"] == "deregistration_sent"
    on_storage(f"test ! -e {image_path} && test -s /etc/hostname")  # the fixture's /etc link was not followed
    assert real_images(lab, name) == []
    assert real_events(lab, name)[-2:] == [(f"remove_image_{name}", 5)] * 2
    assert not any(posixpath.basename(image_path) in n and "lock" not in n for n in exports_listing(lab))


@pytest.mark.parametrize("target,code,words", [
    ("storage:/etc", 2, "not below the export root"),
    ("storage:/", 2, "invalid"),
    ("storage:", 2, "invalid"),
    ("storage:/exports", 2, "not below the export root"),
    ("storage:/exports/../etc/passwd", 2, "not canonical"),
])
def test_remove_refuses_paths_outside_the_export_root(lab, cfg, on_storage, target, code, words):
    before = on_storage("ls -A /etc | md5sum; ls -A /exports | md5sum").stdout
    r = qrmfs("remove", "-t", target, "--yes", "--force", "-o", config=cfg)
    assert r.returncode == code, r.stderr
    assert words in r.stderr
    assert on_storage("ls -A /etc | md5sum; ls -A /exports | md5sum").stdout == before


def test_remove_refuses_a_symlink_out_of_the_export_root(lab, cfg, image_path, on_storage):
    on_storage(f"ln -s /etc {image_path}")
    r = qrmfs("remove", "-t", f"storage:{image_path}", "--yes", "--force", "-o", config=cfg)
    assert r.returncode == 11 and "symlink" in r.stderr
    on_storage("test -s /etc/passwd && test -L " + image_path)
    on_storage(f"rm {image_path}")


def test_remove_refuses_a_directory_that_is_not_an_image_unless_forced(lab, cfg, image_path, on_storage):
    on_storage(f"mkdir -p {image_path}/data && echo keep > {image_path}/data/f")
    r = qrmfs("remove", "-t", f"storage:{image_path}", "--yes", "-o", config=cfg)
    assert r.returncode == 11 and "not a qrmfs image" in r.stderr
    on_storage(f"test -f {image_path}/data/f")
    r = qrmfs("remove", "-t", f"storage:{image_path}", "--yes", "--force", "-o", config=cfg)
    assert r.returncode == 0, r.stderr
    on_storage(f"test ! -e {image_path}")


def test_remove_refuses_an_image_in_use(lab, cfg, image_path, on_storage):
    assert qrmfs("create", "-t", f"storage:{image_path}", "-l", "source:/srv", "-o", config=cfg).returncode == 0
    on_storage(f"mkdir -p {image_path}/mnt/x && mount -t tmpfs lab-busy {image_path}/mnt/x")
    try:
        r = qrmfs("remove", "-t", f"storage:{image_path}", "--yes", "-o", config=cfg)
        assert r.returncode == 11 and "mounts under it" in r.stderr
        on_storage(f"test -d {image_path}/fixture")
    finally:
        on_storage(f"umount {image_path}/mnt/x")
    from qrmfs.config import load
    from qrmfs.runner import Runner
    from qrmfs.storage import StorageSide

    c = load(cfg)
    side = StorageSide(c.storage["storage"], Runner(), identity=c.identity_file, known_hosts=c.known_hosts)
    with side.lock(image_path, "somebody else (test)"):
        r = qrmfs("remove", "-t", f"storage:{image_path}", "--yes", "-o", config=cfg)
        assert r.returncode == 6 and "somebody else (test)" in r.stderr
    on_storage(f"test -d {image_path}/fixture")


def test_list_agrees_with_openqrm(lab, cfg, image_path):
    other = image_path + "_o"
    try:
        assert qrmfs("create", "-t", f"storage:{image_path}", "-l", "source:/srv", "-u", "openqrm", "--shared",
                     "-a", "x86_64", config=cfg).returncode == 0
        assert qrmfs("create", "-t", f"storage:{other}", "-l", "source:/srv", "-o", config=cfg).returncode == 0
        r = qrmfs("list", "storage", "--json", config=cfg)
        assert r.returncode == 0, r.stderr
        rows = {i["name"]: i for i in result_of(r)["images"]}
        mine = rows[posixpath.basename(image_path)]
        assert mine["registration"]["state"] == "sent" and mine["shared"] and mine["arch"] == "x86_64"
        assert mine["source"] == "source:/srv" and mine["files"] > 20 and mine["validation"] == "problems"
        assert rows[posixpath.basename(other)]["registration"]["state"] == "not_registered"
        registered = {n for n, i in rows.items() if i["registration"]["state"] == "sent"}
        in_openqrm = {n for n in (posixpath.basename(image_path), posixpath.basename(other)) if real_images(lab, n)}
        assert registered & {posixpath.basename(image_path), posixpath.basename(other)} == in_openqrm
        text = qrmfs("list", config=cfg).stdout
        (row,) = [ln for ln in text.splitlines() if f" {posixpath.basename(image_path)} " in ln]
        assert f" sent ({mine['registration']['time']} by create; {jobs.SEEN['new_image']})" in row
        assert "registered" not in row
    finally:
        run_on(lab, "storage", f"rm -rf {other} /exports/.{posixpath.basename(other)}.qrmfs-*", check=False)


def test_lab_status_names_the_running_lab(lab):
    info = _lab.status()
    assert info and info["hosts"]["storage"]["address"] == lab["hosts"]["storage"]["address"]


def test_a_reflink_clone_is_independent_and_a_clone_to_the_plain_export_is_a_copy(lab, cfg, base_image,
                                                                                   image_path, on_storage):
    """The XFS clone shares extents with its original, yet a write to either never shows in the other; a
    clone to the ext4 export (another file system: no reflinks) is a plain cp, just as faithful."""
    _clone(cfg, base_image, image_path, "-o")
    f = "srv/fixture/xattr-file"
    before = on_storage(f"sha256sum < {base_image}/{f}; sha256sum < {base_image}/usr/bin/env").stdout
    on_storage(f"echo changed-in-the-clone > {image_path}/{f}; dd if=/dev/urandom of={image_path}/usr/bin/env "
               "bs=4k count=1 conv=notrunc status=none")
    assert on_storage(f"sha256sum < {base_image}/{f}; sha256sum < {base_image}/usr/bin/env").stdout == before
    assert on_storage(f"cmp -s {base_image}/usr/bin/env {image_path}/usr/bin/env || echo differ").stdout == b"differ\n"
    plain = "/exports-plain/" + posixpath.basename(image_path) + "_p"
    try:
        r = qrmfs("clone", "-s", posixpath.basename(plain), "-t", f"plain:{plain}", "--from",
                  f"storage:{base_image}", "-o", config=cfg)
        assert r.returncode == 0, r.stderr
        m = json.loads(on_storage(f"cat {plain}/.qrmfs/manifest.json").stdout)
        assert m["generation"]["base_copy"]["method"] == "copy" and m["rsync"] == []
        assert tree_info(lab, "storage", plain + "/srv/fixture") == tree_info(lab, "storage",
                                                                               base_image + "/srv/fixture")
    finally:
        qrmfs("remove", "-t", f"plain:{plain}", "--yes", "-o", config=cfg)
