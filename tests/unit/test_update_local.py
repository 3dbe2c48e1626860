"""update, rollback and generations against a `local` storage server: the real CLI, the real agent in a
subprocess, real rsync and cp, on temp directories (and on a loop-mounted XFS for reflinks)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from plumbum import local

from qrmfs import cli
from qrmfs.agent import gens, space, tree
from qrmfs.agent.manifest import Manifest
from qrmfs.agent.protocol import AgentError, ErrorKind

NODE_FILE = ".qrmfs/nodes/1/var/lib/app/state"


@pytest.fixture
def env(tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.delenv(gens.CRASH_ENV, raising=False)
    return _env(tmp_path, tmp_path / "exports", keep=1)


def _env(tmp_path: Path, root: Path, keep: int, config: str = "") -> dict[str, Path]:
    src = tmp_path / "src"
    for d in ("etc", "usr/bin", "var/lib/app", "var/log", "sbin"):
        (src / d).mkdir(parents=True, exist_ok=True)
    (src / "etc/motd").write_text("hello\n")
    (src / "etc/fstab").write_text("UUID=1234 / ext4 defaults 0 1\n")
    (src / "usr/bin/tool").write_text("version 1\n")
    (src / "usr/bin/same").write_bytes(os.urandom(70000))
    (src / "var/log/syslog").write_text("log\n")
    (src / "sbin/init").write_text("#!/bin/sh\n")
    (src / "sbin/init").chmod(0o755)
    root.mkdir(exist_ok=True)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'spool_dir = "{tmp_path}/spool"\nkeep_generations = {keep}\n{config}\n[storage.local]\n'
                   f'address = "local"\nexport_root = "{root}"\n')
    return {"tmp": tmp_path, "root": root, "src": src, "cfg": cfg, "img": root / "img1"}


def qrmfs(env: dict[str, Path], *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    code = cli.main([*args, "--json", "--config", str(env["cfg"])])
    out, _err = capsys.readouterr()
    return code, json.loads(out)


def create(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out = qrmfs(env, "create", "-t", f"local:{env['img']}", "-l", str(env["src"]), "-o", "--shared",
                      "--private-add", "/var/lib/app", capsys=capsys)
    assert code == 0, out
    node = env["img"] / NODE_FILE
    node.parent.mkdir(parents=True)
    node.write_text("node 1 state\n")


def update(env: dict[str, Path], capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, Any]:
    return qrmfs(env, "update", "-t", f"local:{env['img']}", *extra, capsys=capsys)


def manifest_of(path: str) -> Any:
    """The image's manifest as written (its data)."""
    m = tree.read_manifest(path)
    return None if m is None else m.data


def snapshot(top: Path, skip: tuple[str, ...] = (".qrmfs",)) -> dict[str, tuple[Any, ...]]:
    """Every entry's bytes and metadata, ctime and inode included: any write, chmod, chown, xattr or link
    change on an inode shows."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        rel_dir = os.path.relpath(dirpath, top)
        if rel_dir.split("/")[0] in skip:
            dirnames[:] = []
            continue
        for n in [*dirnames, *filenames]:
            p = os.path.join(dirpath, n)
            rel = os.path.normpath(os.path.join(rel_dir, n))
            if rel in skip:
                continue
            st = os.lstat(p)
            xattrs = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False))
                                  for k in os.listxattr(p, follow_symlinks=False)))
            data = hashlib.sha256(Path(p).read_bytes()).hexdigest() if os.path.isfile(p) and not os.path.islink(p) \
                else (os.readlink(p) if os.path.islink(p) else None)
            out[rel] = (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                        st.st_nlink, xattrs, data)
    return out


def test_node_state_kept_across_two_updates_and_a_rollback(env: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    create(env, capsys)
    img = env["img"]
    (env["src"] / "usr/bin/tool").write_text("version 2 (second)\n")
    code, out = update(env, capsys)
    assert code == 0, out
    assert out["result"]["command"] == "update" and out["result"]["replaced"] is True
    assert (img / "usr/bin/tool").read_text() == "version 2 (second)\n"
    assert (img / NODE_FILE).read_text() == "node 1 state\n"
    (img / NODE_FILE).write_text("node 1 state, later\n")  # a node writes between updates
    (env["src"] / "usr/bin/tool").write_text("version 3 (the third)\n")
    (env["src"] / "etc/motd").unlink()
    code, out = update(env, capsys)
    assert code == 0, out
    assert (img / "usr/bin/tool").read_text() == "version 3 (the third)\n" and not (img / "etc/motd").exists()
    assert (img / NODE_FILE).read_text() == "node 1 state, later\n"
    # keep_generations = 1: only the generation before this one is kept, and it has no node state of its own
    assert [g for _, g in gens.generations(str(img))] == [str(env["root"] / ".img1.qrmfs-gen-2")]
    assert not (env["root"] / ".img1.qrmfs-gen-2" / ".qrmfs/nodes").exists()
    code, out = qrmfs(env, "rollback", "-t", f"local:{img}", "-o", capsys=capsys)
    assert code == 0, out
    assert (img / "usr/bin/tool").read_text() == "version 2 (second)\n" and (img / "etc/motd").exists()
    assert (img / NODE_FILE).read_text() == "node 1 state, later\n"
    m = manifest_of(str(img))
    assert m is not None and m["generation"]["made_by"] == "update"
    # rollback again goes forward again: the generation it replaced is the newest one
    code, out = qrmfs(env, "rollback", "-t", f"local:{img}", "-o", capsys=capsys)
    assert code == 0 and (img / "usr/bin/tool").read_text() == "version 3 (the third)\n"
    assert (img / NODE_FILE).read_text() == "node 1 state, later\n"


def test_update_leaves_the_previous_generation_untouched(env: dict[str, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    create(env, capsys)
    img = env["img"]
    os.link(img / "usr/bin/same", img / "usr/bin/same-link")  # a hard link inside the image
    (env["src"] / "usr/bin/same-link").hardlink_to(env["src"] / "usr/bin/same")
    code, _ = update(env, capsys)
    assert code == 0
    before = snapshot(img)
    # changes of content, mode, owner, xattr and time at the source; prepared files are prepared again
    src = env["src"]
    (src / "usr/bin/tool").write_text("version 2, longer\n")
    (src / "usr/bin/same").chmod(0o700)
    os.chown(src / "etc/motd", 1234, 5678)
    os.setxattr(src / "usr/bin/same", "user.qrmfs-test", b"1")
    os.utime(src / "sbin/init", ns=(1, 1))
    (src / "var/log/syslog").write_text("more log\n")
    code, out = update(env, capsys)
    assert code == 0, out
    prev = Path(out["result"]["previous"])
    assert snapshot(prev) == before
    assert (img / "usr/bin/tool").read_text() == "version 2, longer\n"
    assert os.stat(img / "etc/motd").st_uid == 1234 and os.stat(img / "usr/bin/same").st_mode & 0o777 == 0o700
    assert os.getxattr(img / "usr/bin/same", "user.qrmfs-test") == b"1"
    assert os.stat(img / "usr/bin/same").st_ino != os.stat(prev / "usr/bin/same").st_ino  # never shared
    assert os.stat(img / "usr/bin/same").st_ino == os.stat(img / "usr/bin/same-link").st_ino
    assert not (img / "var/log/syslog").exists()  # prepared again
    m = manifest_of(str(img))
    assert m is not None
    assert m["generation"]["base_copy"]["method"] in ("copy", "reflink")
    assert m["generation"]["parent"] == manifest_of(str(prev))["generation"]["id"]  # type: ignore[index]


def test_crash_at_each_step_keeps_image_and_node_state(env: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    create(env, capsys)
    img = env["img"]
    for i, step in enumerate(("journal", "nodes", "swap", "retire", "prune")):
        (env["src"] / "usr/bin/tool").write_text(f"crash {step}\n")
        with local.env(**{gens.CRASH_ENV: step}):  # the runner's processes take plumbum's environment
            code, out = update(env, capsys)
        assert code != 0, (step, out)
        # the agent died mid-publish: the journal is left, the node state is in the image or in the new tree
        assert (env["root"] / ".img1.qrmfs-journal").exists(), step
        listed = qrmfs(env, "list", "--generations", "-t", f"local:{img}", capsys=capsys)[1]
        assert listed["result"]["images"][0]["interrupted"] is True
        # the next operation under the image's lock finishes the publish
        code, out = qrmfs(env, "validate", "--fix", "-t", f"local:{img}", capsys=capsys)
        assert not (env["root"] / ".img1.qrmfs-journal").exists(), step
        assert (img / "usr/bin/tool").read_text() == f"crash {step}\n", step
        assert (img / NODE_FILE).read_text() == "node 1 state\n", step
        assert manifest_of(str(img)) is not None
        assert len(gens.generations(str(img))) == 1, (step, os.listdir(env["root"]))
        assert not [e for e in os.listdir(env["root"]) if "staging" in e or "removing" in e], step
        assert i >= 0


def test_crash_during_copy_leaves_the_image_as_it_was(env: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    create(env, capsys)
    before = snapshot(env["img"], skip=())
    (env["src"] / "unreadable").mkdir()
    (env["src"] / "usr/bin/tool").write_text("version 2 (second)\n")
    with local.env(PATH=f"{env['tmp']}/nobin"):  # no cp, no rsync here: the copy step fails for real
        code, out = update(env, capsys)
    assert code != 0 and out["ok"] is False
    assert snapshot(env["img"], skip=()) == before
    assert not [e for e in os.listdir(env["root"]) if "staging" in e or "gen" in e]


def test_update_counts_what_changed_at_the_source_only(env: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """An unchanged source is a generation with no changes (what the preparation redoes is not counted); a file
    rewritten within the same second at the same size is still seen (times compared to the nanosecond)."""
    create(env, capsys)
    code, out = update(env, capsys)
    assert code == 0, out
    gen = json.loads((env["img"] / ".qrmfs/manifest.json").read_text())["generation"]
    assert {k: gen["changes"][k] for k in ("new", "changed", "metadata", "deleted")} == {
        "new": 0, "changed": 0, "metadata": 0, "deleted": 0}
    tool = env["src"] / "usr/bin/tool"
    st = tool.stat()
    tool.write_text("version 2\n")  # same size
    os.utime(tool, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # the same second
    (env["src"] / "etc/new").write_text("new\n")
    (env["src"] / "etc/motd").unlink()
    code, out = update(env, capsys)
    assert code == 0, out
    assert (env["img"] / "usr/bin/tool").read_text() == "version 2\n"
    gen = json.loads((env["img"] / ".qrmfs/manifest.json").read_text())["generation"]
    assert {k: gen["changes"][k] for k in ("new", "changed", "deleted")} == {"new": 1, "changed": 1, "deleted": 1}


def test_update_dry_run_counts_changes_and_touches_nothing(env: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    create(env, capsys)
    (env["src"] / "usr/bin/tool").write_text("version 2 (second)\n")
    (env["src"] / "etc/new").write_text("new\n")
    (env["src"] / "etc/motd").unlink()
    os.chmod(env["src"] / "usr/bin/same", 0o600)
    before = snapshot(env["root"], skip=())
    code, out = update(env, capsys, "--dry-run")
    assert code == 0, out
    assert out["result"]["counts"] == {"changed": 1, "deleted": 1, "metadata": 1, "new": 1}
    assert {c["path"] for c in out["result"]["changes"]} == {"/usr/bin/tool", "/etc/new", "/etc/motd",
                                                             "/usr/bin/same"}
    assert snapshot(env["root"], skip=()) == before


def test_update_overrides_options_and_records_them(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    create(env, capsys)
    code, out = update(env, capsys, "-e", "/usr/bin", "--hostname", "web1")
    assert code == 0, out
    m = manifest_of(str(env["img"]))
    assert m is not None and m["options"]["excludes"] == ["/usr/bin"] and m["options"]["hostname"] == "web1"
    assert m["options"]["shared"] is True and m["options"]["private_add"] == ["/var/lib/app"]  # kept
    assert os.listdir(env["img"] / "usr/bin") == []  # excluded now: deleted from the new generation
    assert (env["img"] / "etc/hostname").read_text().strip() == "web1"
    code, out = update(env, capsys)  # the overrides are recorded: the next update keeps them
    assert code == 0 and os.listdir(env["img"] / "usr/bin") == []


def test_refusals(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert update(env, capsys)[0] == 4  # no image
    (env["img"]).mkdir()
    assert update(env, capsys)[0] == 11  # not an image
    shutil.rmtree(env["img"])
    create(env, capsys)
    code, out = qrmfs(env, "rollback", "-t", f"local:{env['img']}", "-o", capsys=capsys)
    assert code == 4 and "no earlier generation" in out["error"]["message"]


def test_create_force_keeps_node_state_and_remove_removes_every_generation(
        tmp_path: Path, env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    env = _env(tmp_path, env["root"], keep=3)
    create(env, capsys)
    for i in range(4):
        (env["src"] / "usr/bin/tool").write_text(f"v{i}\n")
        code, out = qrmfs(env, "create", "--force", "-t", f"local:{env['img']}", "-l", str(env["src"]), "-o",
                          "--shared", "--private-add", "/var/lib/app", capsys=capsys)
        assert code == 0, out
        assert (env["img"] / NODE_FILE).read_text() == "node 1 state\n"
    assert [s for s, _ in gens.generations(str(env["img"]))] == [2, 3, 4]  # keep_generations = 3
    code, out = qrmfs(env, "list", "--generations", capsys=capsys)
    rows = out["result"]["images"][0]["generations"]
    assert [r["role"] for r in rows] == ["current", "generation", "generation", "generation"]
    assert all(r["cost"] > 0 and r["source"] == str(env["src"]) for r in rows)
    code, out = qrmfs(env, "remove", "-t", f"local:{env['img']}", "--yes", "-o", capsys=capsys)
    assert code == 0
    assert [e for e in os.listdir(env["root"]) if not e.endswith("qrmfs-lock")] == []


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A loop-mounted XFS (reflinks): skipped where this machine cannot mount one."""
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
        pytest.skip("needs root and mkfs.xfs")
    img, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(400 * 2**20)
    subprocess.run(["mkfs.xfs", "-q", str(img)], check=True)
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount XFS here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_reflink_generations_cost_only_what_changed(tmp_path: Path, xfs: Path, env: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    env = _env(tmp_path, xfs / "exports", keep=1)
    (env["src"] / "big").write_bytes(os.urandom(20 * 2**20))
    create(env, capsys)
    (env["src"] / "usr/bin/tool").write_text("version 2 (second)\n")
    code, out = update(env, capsys)
    assert code == 0, out
    m = manifest_of(str(env["img"]))
    assert m is not None and m["generation"]["base_copy"]["method"] == "reflink"
    code, out = qrmfs(env, "list", "--generations", capsys=capsys)
    current, previous = out["result"]["images"][0]["generations"]
    assert current["bytes"] > 20 * 2**20  # the tree holds the 20 MiB file ...
    assert current["cost"] < 2 * 2**20 and previous["cost"] < 2 * 2**20  # ... shared by both generations
    # a node writing into a shared file changes only its generation (reflinks are copy-on-write)
    with open(env["img"] / "big", "r+b") as f:
        f.write(b"node write")
    assert (Path(previous["path"]) / "big").read_bytes()[:10] != b"node write"


def _acl(path: Path) -> str:
    return subprocess.run(["getfacl", "-cp", str(path)], capture_output=True, text=True, check=True).stdout


def test_updates_on_xfs_keep_acls_and_change_nothing_when_nothing_changed(
        tmp_path: Path, xfs: Path, env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """XFS shows root each ACL a second time, as the xattr trusted.SGI_ACL_FILE (SGI_ACL_DEFAULT for a
    directory's default ACL). rsync -X used to delete that 'extra' xattr, deleting the ACL with it: every update
    of an image on XFS lost its ACLs or set them again, and never counted 0 changes."""
    env = _env(tmp_path, xfs / "exports", keep=1)
    if not shutil.which("setfacl"):
        pytest.skip("needs setfacl")
    (env["src"] / "srv/acl-dir").mkdir(parents=True)
    subprocess.run(["setfacl", "-m", "u:4242:rwx", str(env["src"] / "etc/motd")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:4242:r-x", str(env["src"] / "srv/acl-dir")], check=True)
    create(env, capsys)
    for _ in range(3):  # the third starts from the spare (the generation the second pruned)
        code, out = update(env, capsys)
        assert code == 0, out
        assert "user:4242:rwx" in _acl(env["img"] / "etc/motd")
        assert "default:user:4242:r-x" in _acl(env["img"] / "srv/acl-dir")
        gen = json.loads((env["img"] / ".qrmfs/manifest.json").read_text())["generation"]
        assert {k: gen["changes"][k] for k in ("new", "changed", "metadata", "deleted")} == {
            "new": 0, "changed": 0, "metadata": 0, "deleted": 0}
    assert gen["base_copy"]["method"] == "recycled"
    code, out = update(env, capsys, "--dry-run")
    assert code == 0 and out["result"]["counts"] == {}, out


def _image(d: Path, tag: str, gen_id: str | None = None) -> None:
    (d / "etc").mkdir(parents=True)
    (d / "etc/tag").write_text(tag)
    tree.write_manifest(str(d), Manifest.new({"image": "img1", **({"generation": {"id": gen_id}} if gen_id else {})}))


def test_a_publish_with_an_unknown_spare_policy_is_refused_before_anything_moves(tmp_path: Path) -> None:
    root = tmp_path / "exports"
    img, staging = root / "img1", root / ".img1.qrmfs-staging-x"
    _image(img, "old", "a")
    _image(staging, "new", "b")
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(AgentError) as ei:
        gens.op_publish_update(str(img), str(root), str(staging), 1, "sometimes")
    assert ei.value.kind is ErrorKind.BAD_REQUEST and "reflink, always, never" in str(ei.value)
    assert sorted(p.name for p in root.iterdir()) == before and (img / "etc/tag").read_text() == "old"


def test_recovery_keeps_moved_node_state_over_one_a_booting_node_seeded(tmp_path: Path) -> None:
    root = tmp_path / "exports"
    img, staging = root / "img1", root / ".img1.qrmfs-staging-x"
    _image(img, "old", "a")
    _image(staging, "new", "b")
    (img / NODE_FILE).parent.mkdir(parents=True)
    (img / NODE_FILE).write_text("real")
    # the publish died right after moving the node state; a node booted and seeded fresh state in the image
    j = {"incoming": str(staging), "outgoing": str(root / ".img1.qrmfs-gen-1"), "new_id": "b", "keep": 1}
    (root / ".img1.qrmfs-journal").write_text(json.dumps(j))
    gens._move_nodes(str(img), str(staging))
    (img / NODE_FILE).parent.mkdir(parents=True)
    (img / NODE_FILE).write_text("seeded meanwhile")
    swapped = gens.recover(str(img))
    assert swapped is not None and swapped.generation == str(root / ".img1.qrmfs-gen-1")
    assert (img / "etc/tag").read_text() == "new" and (img / NODE_FILE).read_text() == "real"
    assert (root / ".img1.qrmfs-gen-1" / NODE_FILE).read_text() == "seeded meanwhile"  # kept, never mixed in
    assert not (root / ".img1.qrmfs-journal").exists()


def test_rollback_to_an_old_style_previous_sets_its_stale_node_state_aside(tmp_path: Path) -> None:
    root = tmp_path / "exports"
    img, prev = root / "img1", root / ".img1.qrmfs-previous"
    _image(img, "current", "a")
    _image(prev, "previous")  # made by create --force before generations: no id, and node state of its time
    (prev / NODE_FILE).parent.mkdir(parents=True)
    (prev / NODE_FILE).write_text("stale")
    (img / NODE_FILE).parent.mkdir(parents=True)
    (img / NODE_FILE).write_text("current")
    assert gens.generations(str(img)) == [(0, str(prev))]
    swapped = gens.op_rollback(str(img), str(root), keep=1)
    assert (img / "etc/tag").read_text() == "previous" and (img / NODE_FILE).read_text() == "current"
    assert [p.name for p in (img / ".qrmfs").iterdir() if p.name.startswith("nodes.superseded-")]
    assert swapped.generation == str(root / ".img1.qrmfs-gen-1") and not prev.exists()
    assert (root / ".img1.qrmfs-gen-1/etc/tag").read_text() == "current"


@pytest.mark.parametrize(("code", "kind"), [
    ("*deleting", "deleted"), (">f+++++++++", "new"), ("cd+++++++++", "new"), (">f.st......", "changed"),
    (">f..t......", "changed"), (".f...p.....", "metadata"), (".d..t......", "metadata"), ("cL.st......", "changed"),
    (".f......x..", "metadata")])
def test_change_kind(code: str, kind: str) -> None:
    from qrmfs.transfer import change_kind

    assert change_kind(code) == kind


def test_generations_are_listed_beside_images_and_gc_keeps_them(env: dict[str, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    create(env, capsys)
    assert update(env, capsys)[0] == 0
    code, out = qrmfs(env, "list", capsys=capsys)
    assert code == 0
    assert [(x["path"], x["kind"]) for x in out["result"]["leftovers"]] == [
        (str(env["root"] / ".img1.qrmfs-gen-1"), "generation")]
    code, out = qrmfs(env, "gc", capsys=capsys)
    assert code == 0 and out["result"]["removed"] == []
    assert (env["root"] / ".img1.qrmfs-gen-1/.qrmfs/manifest.json").is_file()


def test_a_generation_in_use_is_not_pruned(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    create(env, capsys)
    assert update(env, capsys)[0] == 0
    gen1 = env["root"] / ".img1.qrmfs-gen-1"
    with open(gen1 / "usr/bin/tool") as held:  # as the NFS server holds the files of a node still running on it
        code = cli.main(["update", "-t", f"local:{env['img']}", "--config", str(env["cfg"])])
        err = capsys.readouterr().err
        assert code == 0 and "could not be deleted" in err and "in use by" in err, err
        assert [s for s, _ in gens.generations(str(env["img"]))] == [1, 2]
        assert held.read() == "version 1\n"
    assert update(env, capsys)[0] == 0  # no longer held: pruned down to keep_generations
    assert [s for s, _ in gens.generations(str(env["img"]))] == [3]


def test_keep_generations_option_overrides_the_config_and_result_carries_changes(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    create(env, capsys)
    gens_of = lambda: sorted(p.name for p in env["root"].iterdir() if ".qrmfs-gen-" in p.name)  # noqa: E731
    (env["src"] / "usr/bin/tool").write_text("version 2 (second)\n")
    code, out = update(env, capsys, "--keep-generations", "2")
    assert code == 0, out
    assert out["result"]["changes"]["changed"] >= 1
    code, out = update(env, capsys, "--keep-generations", "2")
    assert code == 0 and len(gens_of()) == 2  # the config says 1
    code, out = update(env, capsys, "--keep-generations", "0")
    assert code == 0 and gens_of() == []
    code, out = update(env, capsys, "--keep-generations", "-1")
    assert code == 2 and out["error"]["kind"] == "usage"


def _files(top: Path) -> dict[str, tuple[int, str]]:
    """Every regular file below top but /.qrmfs: its mode and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if os.path.relpath(os.path.join(dirpath, d), top) != ".qrmfs"]
        for n in filenames:
            p = Path(dirpath, n)
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(top))] = (p.lstat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def test_on_xfs_a_pruned_generation_is_the_next_updates_start_and_the_result_is_a_fresh_copy(
        tmp_path: Path, xfs: Path, env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """keep_generations 1: the second update prunes generation 1, which becomes the spare; the third starts
    from it (no copy of the image), and its result is what a fresh copy would be: the files changed and
    deleted at the source since the spare was made are right, its old manifest is gone, node state moved in.
    Its change counts are those since the current image, not since the spare. list shows the spare, gc keeps
    it, remove deletes it."""
    _spare_cycle(_env(tmp_path, xfs / "exports", keep=1), capsys)


def test_spare_always_keeps_one_without_reflinks_and_never_keeps_none_with_them(
        tmp_path: Path, xfs: Path, env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """`spare = "always"`: on a file system without reflinks (the temp directory's), the same cycle as on
    XFS: the third update starts from the pruned generation, and neither copies the image nor deletes a tree.
    `spare = "never"`: on XFS, the pruned generation is deleted and every update starts from a copy. The
    default keeps none without reflinks."""
    if space.can_reflink(str(tmp_path)):
        pytest.skip("the temp directory's file system shares extents: no plain file system to test on")
    _spare_cycle(_env(tmp_path / "always", _mkdir(tmp_path / "always" / "exports"), keep=1,
                      config='spare = "always"\n'), capsys)
    for where, config in ((tmp_path / "default" / "exports", ""), (xfs / "never", 'spare = "never"\n')):
        env = _env(_mkdir(where.parent), _mkdir(where), keep=1, config=config)
        create(env, capsys)
        for _ in range(3):
            code, out = update(env, capsys)
            assert code == 0, out
        m = manifest_of(str(env["img"]))
        assert m is not None and m["generation"]["base_copy"]["method"] in ("copy", "reflink"), where
        assert [p.name for p in where.iterdir() if "spare" in p.name] == [], where
        assert (env["img"] / NODE_FILE).read_text() == "node 1 state\n"


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _spare_cycle(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    create(env, capsys)
    spare = env["root"] / ".img1.qrmfs-spare"
    (env["src"] / "usr/bin/tool").write_text("version 2\n")
    (env["src"] / "etc/gone").write_text("deleted by the third update's source\n")
    assert update(env, capsys)[0] == 0
    assert not spare.exists()  # nothing beyond keep_generations yet
    (env["src"] / "usr/bin/tool").write_text("version 3, longer\n")
    code, out = update(env, capsys)
    assert code == 0, out
    assert spare.is_dir() and [s for s, _ in gens.generations(str(env["img"]))] == [2]
    gen2_before = snapshot(env["root"] / ".img1.qrmfs-gen-2")
    (env["src"] / "etc/gone").unlink()
    (env["src"] / "etc/new").write_text("new at the source\n")
    code, out = update(env, capsys)
    assert code == 0, out
    m = manifest_of(str(env["img"]))
    assert m is not None and m["generation"]["base_copy"]["method"] == "recycled"
    assert not spare.exists() or manifest_of(str(spare)) != m  # the pruned generation 2 is the spare now
    # since the current image: etc/gone deleted, etc/new new; usr/bin/tool changed one update before, not now
    changes = m["generation"]["changes"]
    assert {k: changes[k] for k in ("new", "changed", "deleted")} == {"new": 1, "changed": 0, "deleted": 1}
    prepared = {f["path"].lstrip("/") for f in m["preparation"]["fixed"]}
    got = {k: v for k, v in _files(env["img"]).items() if k not in prepared}
    want = {k: v for k, v in _files(env["src"]).items() if k not in prepared}
    assert got == want  # the same tree a fresh copy would be
    assert (env["img"] / NODE_FILE).read_text() == "node 1 state\n"
    assert snapshot(env["root"] / ".img1.qrmfs-gen-3") != {}  # the image it replaced, a generation
    assert gen2_before  # (generation 2 was the spare's source: pruned now, as keep_generations says)
    code, out = qrmfs(env, "list", capsys=capsys)
    assert (str(spare), "spare") in [(x["path"], x["kind"]) for x in out["result"]["leftovers"]]
    code, out = qrmfs(env, "gc", capsys=capsys)
    assert code == 0 and out["result"]["removed"] == [] and spare.is_dir()
    code, out = qrmfs(env, "remove", "-t", f"local:{env['img']}", "--yes", capsys=capsys)
    assert code == 0, out
    assert sorted(p.name for p in env["root"].iterdir()) == []


def test_an_updates_root_copy_starts_before_the_sources_mount_table_is_read(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The root's rsync does not depend on the source's mounts: it runs while they are still being read (a
    reader that waits for the copy to begin is answered); a separate filesystem found then is copied after."""
    from qrmfs.actions import hosts, pipeline
    from qrmfs.mounts import Mounts

    create(env, capsys)
    other = env["tmp"] / "src-boot"  # stands for a separate filesystem mounted at /boot of the source
    (other / "grub").mkdir(parents=True)
    (other / "grub/grub.cfg").write_text("menu\n")
    (env["src"] / "boot").mkdir()
    began = threading.Event()
    seen: list[bool] = []
    real_rsync = pipeline.run_rsync

    def rsync(runner: Any, argv: Any, *a: Any, **kw: Any) -> Any:
        began.set()
        if argv[-2] == f"{other}/":
            shutil.copytree(other, argv[-1], dirs_exist_ok=True)  # the filesystem "mounted" there
            return {}, None, 0
        return real_rsync(runner, argv, *a, **kw)

    def mounts(runner: Any, cfg: Any, h: Any, path: str) -> Mounts:
        seen.append(began.wait(30))
        return Mounts(include=[f"{path.rstrip('/')}/boot"])

    monkeypatch.setattr(pipeline, "run_rsync", rsync)
    monkeypatch.setattr(hosts, "discover_mounts", mounts)
    monkeypatch.setattr(pipeline.copyplan, "parts", lambda src, dest: [
        (src.path, dest, list(src.excludes), "root filesystem"),
        *[(str(other), dest + "/boot", [], "separate filesystem /boot") for _ in src.mounts.include]])
    code, out = update(env, capsys)
    assert code == 0, out
    assert seen == [True], "the mount table was read only after the root's copy began"
    assert (env["img"] / "boot/grub/grub.cfg").read_text() == "menu\n"
    m = json.loads((env["img"] / ".qrmfs/manifest.json").read_text())
    assert [r["what"] for r in m["rsync"]] == ["root filesystem", "separate filesystem /boot"]
    assert m["separate_filesystems"] == [f"{env['src']}/boot"]


def test_an_update_whose_source_cannot_be_reached_says_so_and_keeps_the_image(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The root's copy runs before the mount table is read; when both fail (the source is gone), the error is
    the mount table's (cannot reach the source), not rsync's exit code, and nothing of the image changes."""
    from qrmfs.actions import hosts, pipeline
    from qrmfs.errors import ConnectError
    from qrmfs.transfer import check_rsync

    create(env, capsys)
    before = snapshot(env["img"], skip=())

    def mounts(runner: Any, cfg: Any, h: Any, path: str) -> Any:
        raise ConnectError("cannot reach source host src.example over ssh (root@src.example port 22)")

    monkeypatch.setattr(hosts, "discover_mounts", mounts)
    rsyncs: list[int] = []

    def rsync(*a: Any, **kw: Any) -> Any:  # as the real one fails when ssh cannot connect
        rsyncs.append(255)
        return {}, check_rsync(255, "ssh: connect to host src.example port 22: Connection refused\n"), 255

    monkeypatch.setattr(pipeline, "run_rsync", rsync)
    code, out = update(env, capsys)
    assert rsyncs == [255]
    assert code == 7 and out["error"]["message"].startswith("cannot reach source host src.example"), out
    assert snapshot(env["img"], skip=()) == before
    assert not [p for p in env["root"].iterdir() if ".qrmfs-staging-" in p.name]


def test_an_image_found_inside_the_image_stops_an_update_from_the_spare_or_a_copy(
        tmp_path: Path, xfs: Path, env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """An image made inside another by hand would go with the outer one's generations when they are pruned:
    an update refuses. From a copy, the staging step checks; from the spare, the change count's walk does
    (beside rsync): either way the image, the one inside it and node state are as they were."""
    env = _env(tmp_path, xfs / "exports", keep=1)
    create(env, capsys)
    for _ in range(2):
        assert update(env, capsys)[0] == 0
    spare = env["root"] / ".img1.qrmfs-spare"
    assert spare.is_dir()
    inner = env["img"] / "srv/inner"
    (inner / ".qrmfs").mkdir(parents=True)
    (inner / ".qrmfs/manifest.json").write_text('{"image": "inner"}\n')
    before = snapshot(env["img"], skip=())
    for how in ("recycled", "copy"):
        code, out = update(env, capsys)
        assert code == 11 and f"{env['img']} holds images ({inner})" in out["error"]["message"], (how, out)
        assert snapshot(env["img"], skip=()) == before
        assert not [p for p in env["root"].iterdir() if ".qrmfs-staging-" in p.name]
        assert not spare.exists()  # the first refusal used the spare up: the second started from a copy


def test_a_forced_clone_onto_an_image_keeps_the_configs_number_of_generations(
        tmp_path: Path, isolated_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """clone --force onto an existing image makes a new generation of it, pruned as keep_generations says
    (it used to keep one whatever the config said)."""
    env = _env(tmp_path, tmp_path / "exports", keep=0)
    create(env, capsys)
    clone = ("clone", "-s", "img2", "-t", f"local:{env['root'] / 'img2'}", "--from", f"local:{env['img']}", "-o")
    for extra in ((), ("--force",), ("--force",)):
        code, out = qrmfs(env, *clone, *extra, capsys=capsys)
        assert code == 0, out
    assert [p.name for p in env["root"].iterdir() if p.name.startswith(".img2.qrmfs-gen-")] == []
    env["cfg"].write_text(env["cfg"].read_text().replace("keep_generations = 0", "keep_generations = 2"))
    for _ in range(3):
        code, out = qrmfs(env, *clone, "--force", capsys=capsys)
        assert code == 0, out
    assert len([p for p in env["root"].iterdir() if p.name.startswith(".img2.qrmfs-gen-")]) == 2


def test_an_update_from_the_spare_counts_a_change_of_xattrs_or_acls_alone(
        tmp_path: Path, env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """The changes of an update that started from the spare are counted by comparing the staging copy with the
    image: an xattr or ACL changed at the source, and nothing else about the file, is a metadata change there
    too, as rsync's items count it on a copy of the image (it used to count 0)."""
    if not shutil.which("setfacl"):
        pytest.skip("needs setfacl")
    env = _env(tmp_path / "x", _mkdir(tmp_path / "x" / "exports"), keep=1, config='spare = "always"\n')
    create(env, capsys)
    for _ in range(2):
        assert update(env, capsys)[0] == 0
    os.setxattr(env["src"] / "etc/motd", "user.note", b"changed")
    subprocess.run(["setfacl", "-m", "u:4242:r", str(env["src"] / "usr/bin/tool")], check=True)
    code, out = update(env, capsys)
    assert code == 0, out
    gen = manifest_of(str(env["img"]))["generation"]  # type: ignore[index]
    assert gen["base_copy"]["method"] == "recycled"
    assert {k: gen["changes"][k] for k in ("new", "changed", "metadata", "deleted")} == {
        "new": 0, "changed": 0, "metadata": 2, "deleted": 0}
    assert os.getxattr(env["img"] / "etc/motd", "user.note") == b"changed"
    code, out = update(env, capsys)  # and nothing changed since
    gen = manifest_of(str(env["img"]))["generation"]  # type: ignore[index]
    assert code == 0 and sum(gen["changes"][k] for k in ("new", "changed", "metadata", "deleted")) == 0, gen


def test_an_agent_session_that_dies_during_the_spares_scan_fails_the_update_and_nothing_runs_unlocked(
        tmp_path: Path, env: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The session holding the image's lock is killed (SIGKILL) as the update from the spare asks for its scan,
    whose failure alone the count tolerates: the lock died with it, so the update fails there, and neither the
    change count, the preparation nor the publish runs on a new session that holds no lock. The image is as
    it was; the unfinished copy is removed (only this run's own)."""
    from qrmfs.storage import StorageSide
    env = _env(tmp_path, tmp_path / "exports", keep=1, config='spare = "always"\n')
    create(env, capsys)
    for _ in range(2):
        assert update(env, capsys)[0] == 0
    assert (env["root"] / ".img1.qrmfs-spare").is_dir()
    before, manifest = snapshot(env["img"], skip=()), manifest_of(str(env["img"]))
    sent: list[str] = []
    real_begin, real_scan = StorageSide._begin, StorageSide.start_rebase_scan

    def begin(self: StorageSide, req: Any) -> Any:  # what is sent to an agent
        answer = real_begin(self, req)
        sent.append(req.op)
        return answer

    def dying_scan(self: StorageSide, path: str, staging: str) -> Any:
        session = self.session.process
        assert session is not None
        session.kill()  # the agent that holds the lock, for real; its flock goes with it
        session.wait()
        return real_scan(self, path, staging)

    monkeypatch.setattr(StorageSide, "_begin", begin)
    monkeypatch.setattr(StorageSide, "start_rebase_scan", dying_scan)
    (env["src"] / "usr/bin/tool").write_text("version 4\n")
    code, out = update(env, capsys)
    assert code == 9, out
    message = out["error"]["message"]
    assert "no longer holds the lock on" in message and "rebase is not done without it" in message, message
    assert sent[sent.index("rebase_scan") + 1:] == ["discard"]  # only the clean-up was sent after it
    assert snapshot(env["img"], skip=()) == before and manifest_of(str(env["img"])) == manifest
    assert not [p for p in env["root"].iterdir() if ".qrmfs-staging-" in p.name]


@pytest.mark.parametrize("text", ["[]", "{not json", '{"schema": 99}'])
def test_an_image_whose_manifest_cannot_be_read_is_refused_in_one_line_and_only_removed_with_force(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str], text: str) -> None:
    create(env, capsys)
    (env["img"] / ".qrmfs/manifest.json").write_text(text)
    before = snapshot(env["img"], skip=())
    for args in (("update", "-t", f"local:{env['img']}"), ("remove", "-t", f"local:{env['img']}", "--yes", "-o"),
                 ("rollback", "-t", f"local:{env['img']}")):
        code, out = qrmfs(env, *args, capsys=capsys)
        message = out["error"]["message"]
        assert code == 11 and f"{env['img']}/.qrmfs/manifest.json " in message and "\n" not in message, (args, out)
        assert snapshot(env["img"], skip=()) == before
    code, out = qrmfs(env, "remove", "-t", f"local:{env['img']}", "--yes", "-o", "--force", capsys=capsys)
    assert code == 0, out
    assert not env["img"].exists()


def _run_node(img: Path, node: str) -> None:
    """A node's record (agent/holds.py) that it runs the image's current generation, as qrmfs-init writes it."""
    from qrmfs.agent import holds

    d = img / holds.NODES / node
    d.mkdir(parents=True, exist_ok=True)
    (d / holds.RUNNING).write_text((img / ".qrmfs/generation").read_text())
    (d / holds.ALIVE).write_text("")


def test_a_generation_a_node_runs_is_kept_listed_and_freed_by_gc_after_the_node_rebooted(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    env["cfg"].write_text(env["cfg"].read_text().replace("keep_generations = 1", "keep_generations = 0"))
    create(env, capsys)
    _run_node(env["img"], "7")
    booted = (env["img"] / ".qrmfs/generation").read_text().strip()
    code, out = update(env, capsys)
    gen1 = env["root"] / ".img1.qrmfs-gen-1"
    assert code == 0 and (gen1 / ".qrmfs/generation").read_text().strip() == booted
    assert [w for w in out["result"]["warnings"] if "beyond keep_generations" in w and "node 7 (since " in w], out
    code, out = qrmfs(env, "list", "--generations", "-t", f"local:{env['img']}", capsys=capsys)
    rows = out["result"]["images"][0]["generations"]
    assert [(r["role"], [n["node"] for n in r["nodes"]]) for r in rows] == [("current", []), ("generation", ["7"])]
    code, out = qrmfs(env, "remove", "-t", f"local:{env['img']}", "--yes", "-o", capsys=capsys)
    assert code != 0 and "node 7 (since " in out["error"]["message"] and gen1.is_dir() and env["img"].is_dir()
    code, out = qrmfs(env, "gc", capsys=capsys)
    assert code == 0 and out["result"]["held"] == [str(gen1)] and gen1.is_dir()
    _run_node(env["img"], "7")  # node 7 rebooted into the current generation
    code, out = qrmfs(env, "gc", capsys=capsys)
    assert code == 0 and str(gen1) in out["result"]["removed"] and not gen1.exists(), out
    code, out = qrmfs(env, "remove", "-t", f"local:{env['img']}", "--yes", "-o", "--running-nodes-ok", capsys=capsys)
    assert code == 0 and not env["img"].exists(), out


def test_validate_fix_never_rewrites_the_image_a_node_runs(env: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """validate --fix refuses, the node named and how to proceed said, and changes nothing of the tree; a fix
    the tree does not need (the manifest's record) is still made; after the node rebooted into another
    generation, the same --fix repairs the image."""
    create(env, capsys)
    mtab = env["img"] / "etc/mtab"
    mtab.unlink()
    mtab.write_text("a file\n")  # the preparation made it a link to /proc/self/mounts: a fault --fix repairs
    _run_node(env["img"], "7")
    before = {p: p.lstat() for p in env["img"].rglob("*") if ".qrmfs" not in p.parts}
    code, out = qrmfs(env, "validate", "-t", f"local:{env['img']}", "--fix", capsys=capsys)
    msg = out["error"]["message"]
    assert code != 0 and "node 7 (since " in msg and "qrmfs update" in msg and "in place" in msg, out
    after = {p: p.lstat() for p in env["img"].rglob("*") if ".qrmfs" not in p.parts}
    assert before == after and mtab.read_text() == "a file\n"
    code, out = update(env, capsys)  # the fix through a new generation: the node keeps the one it runs
    gen1 = env["root"] / ".img1.qrmfs-gen-1"
    assert code == 0 and (gen1 / "etc/mtab").read_text() == "a file\n" and (env["img"] / "etc/mtab").is_symlink()
    (env["img"] / "etc/mtab").unlink()
    (env["img"] / "etc/mtab").write_text("a file\n")
    code, out = qrmfs(env, "validate", "-t", f"local:{env['img']}", "--fix", capsys=capsys)
    assert code == 0 and (env["img"] / "etc/mtab").is_symlink(), out  # no node runs the current image
