"""qrmfs/agent/tree.py (and main.py's dispatch): the image tree on an export root in tmp_path."""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from qrmfs import model
from qrmfs.agent import fsutil, tree
from qrmfs.agent import main as agent_main
from qrmfs.agent.manifest import SCHEMA, Manifest, ManifestError
from qrmfs.agent.protocol import encode
from qrmfs.agent.tree import AgentError


def image(path: Path, manifest: dict[str, Any] | None = None) -> Path:
    (path / "etc").mkdir(parents=True, exist_ok=True)
    (path / "etc/hostname").write_text("n\n")
    if manifest is not None:
        tree.write_manifest(str(path), Manifest.new(manifest))
    return path


def enc(fn: Any) -> Any:
    """A tree operation whose typed answer is compared as the JSON data it crosses the wire as."""
    return lambda *a, **kw: encode(fn(*a, **kw))


def refused(kind: str, fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(AgentError) as ei:
        fn(*args, **kw)
    assert ei.value.kind == kind, str(ei.value)
    return str(ei.value)


def test_siblings() -> None:
    assert encode(tree.siblings("/exports/lab/img1")) == {
        "lock": "/exports/lab/.img1.qrmfs-lock",
        "staging_prefix": "/exports/lab/.img1.qrmfs-staging-",
        "previous": "/exports/lab/.img1.qrmfs-previous",
        "old_pin": "/exports/lab/.img1.qrmfs-known_hosts",
        "removing": "/exports/lab/.img1.qrmfs-removing",
        "gen_prefix": "/exports/lab/.img1.qrmfs-gen-",
        "journal": "/exports/lab/.img1.qrmfs-journal",
        "spare": "/exports/lab/.img1.qrmfs-spare",
    }


# --- inspect ---------------------------------------------------------------------------------------

def test_inspect_absent(root: Path) -> None:
    info = enc(tree.op_inspect)(str(root / "img1"), str(root))
    st = os.statvfs(root)
    assert {k: v for k, v in info.items() if k != "free_bytes"} == {
        "exists": False, "is_image": False, "parent_exists": True, "previous": False, "manifest": None,
        "manifest_error": None}
    assert abs(info["free_bytes"] - st.f_bavail * st.f_frsize) < 64 * 2**20


def test_inspect_image_and_parent_missing(root: Path) -> None:
    image(root / "img1", {"image": "img1"})
    (root / ".img1.qrmfs-previous").mkdir()
    info = enc(tree.op_inspect)(str(root / "img1"), str(root))
    assert (info["exists"], info["is_image"], info["previous"]) == (True, True, True)
    assert info["manifest"] == {"image": "img1", "schema": SCHEMA}
    info = enc(tree.op_inspect)(str(root / "lab/img2"), str(root))
    assert (info["exists"], info["parent_exists"]) == (False, False)
    assert not (root / "lab").exists()  # inspect creates nothing


def test_inspect_directory_without_manifest_is_not_an_image(root: Path) -> None:
    image(root / "img1")
    info = enc(tree.op_inspect)(str(root / "img1"), str(root))
    assert (info["exists"], info["is_image"]) == (True, False)


def test_manifest_through_symlink_is_refused_never_read(root: Path, tmp_path: Path) -> None:
    (tmp_path / "fake.json").write_text('{"image": "evil"}')
    (root / "img1/.qrmfs").mkdir(parents=True)
    os.symlink(tmp_path / "fake.json", root / "img1/.qrmfs/manifest.json")
    with pytest.raises(fsutil.Planted, match=r"img1/\.qrmfs/manifest\.json is a symlink"):
        tree.read_manifest(str(root / "img1"))
    (root / "img2/.qrmfs").mkdir(parents=True)
    (root / "img2/.qrmfs/manifest.json").write_text("{broken")
    with pytest.raises(ManifestError, match=r"img2/\.qrmfs/manifest\.json is not JSON"):
        tree.read_manifest(str(root / "img2"))


@pytest.mark.parametrize("rel", ["../elsewhere/img", "img/../../x"])
def test_paths_outside_or_not_canonical_refused(root: Path, rel: str) -> None:
    msg = refused("refused", tree.op_inspect, os.path.join(str(root), rel), str(root))
    assert "is not below the export root" in msg


def test_export_root_itself_and_other_roots_refused(root: Path, tmp_path: Path) -> None:
    refused("refused", tree.op_inspect, str(root), str(root))
    refused("refused", tree.op_inspect, str(tmp_path / "exports2/img"), str(root))  # prefix but not below
    refused("not_found", tree.op_inspect, str(tmp_path / "nope/img"), str(tmp_path / "nope"))


def test_symlinked_parent_or_image_refused(root: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "lab")
    assert "is reached through a symlink" in refused("refused", tree.op_inspect, str(root / "lab/img"), str(root))
    image(tmp_path / "real", {"image": "real"})
    os.symlink(tmp_path / "real", root / "img1")
    assert "is a symlink" in refused("refused", tree.op_inspect, str(root / "img1"), str(root))


# --- stage / discard / publish ---------------------------------------------------------------------

def test_taking_the_lock_removes_leftovers_of_this_image_only(root: Path, pin_dir: Path) -> None:
    (root / ".img1.qrmfs-staging-old1/etc").mkdir(parents=True)
    (root / ".img1.qrmfs-known_hosts").write_text("stale\n")  # an earlier version's pin, in the export
    tree.op_pin_host(str(root / "img1"), str(root), "src ssh-ed25519 AAAA\n")
    tree.op_pin_host(str(root / "img10"), str(root), "src ssh-ed25519 AAAA\n")
    pin1, pin10 = tree.pin_file(str(root / "img1")), tree.pin_file(str(root / "img10"))
    (root / ".img10.qrmfs-staging-other").mkdir()
    fd, locked = tree.take_lock(str(root / "img1"), str(root), "me")
    try:
        assert locked.cleaned == [str(root / ".img1.qrmfs-staging-old1"), pin1]
        assert sorted(os.listdir(root)) == [".img1.qrmfs-lock", ".img10.qrmfs-staging-other"]
        assert [str(p) for p in pin_dir.iterdir()] == [pin10]
    finally:
        tree.release_lock(fd, str(root / "img1"))


def test_stage_creates_staging_and_pins_the_source_key_outside_the_export(root: Path, pin_dir: Path) -> None:
    (root / ".img10.qrmfs-staging-other").mkdir()
    out = enc(tree.op_stage)(str(root / "img1"), str(root), "abc123", known_hosts="src ssh-ed25519 AAAA\n")
    pin = tree.pin_file(str(root / "img1"))
    assert out == {"staging": str(root / ".img1.qrmfs-staging-abc123"), "known_hosts": pin}
    assert os.path.dirname(pin) == str(pin_dir) and not pin.startswith(str(root))
    assert sorted(os.listdir(root)) == [".img1.qrmfs-staging-abc123", ".img10.qrmfs-staging-other"]
    assert os.listdir(root / ".img1.qrmfs-staging-abc123") == []
    assert Path(pin).read_text() == f"# qrmfs: the source's host key, pinned for {root}/img1\nsrc ssh-ed25519 AAAA\n"
    assert stat.S_IMODE(os.lstat(pin).st_mode) == 0o600 and stat.S_IMODE(os.lstat(pin_dir).st_mode) == 0o700
    assert model.ssh_value(pin, "pin") == pin  # safe for ssh's word splitting, whatever the image's path
    # a stale pin shows in the listing as a leftover of its image, and goes with the image's next lock
    (left,) = [x for x in tree.op_list(str(root)).leftovers if x.kind == "known_hosts"]
    assert (left.path, left.image, left.kind, left.held_by) == (pin, str(root / "img1"), "known_hosts", None)
    tree.op_discard(str(root / "img1"), str(root), str(root / ".img1.qrmfs-staging-abc123"))
    assert list(pin_dir.iterdir()) == [] and [x.kind for x in tree.op_list(str(root)).leftovers] == ["staging"]


def test_a_pin_directory_inside_the_export_or_open_to_others_is_refused(root: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("QRMFS_PIN_DIR", str(root / "pins"))
    assert "lies inside the export" in refused("refused", tree.op_pin_host, str(root / "img1"), str(root), "k\n")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    monkeypatch.setenv("QRMFS_PIN_DIR", str(tmp_path / "link"))
    assert "not a plain directory" in refused("refused", tree.op_pin_host, str(root / "img1"), str(root), "k\n")
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    monkeypatch.setenv("QRMFS_PIN_DIR", str(open_dir))
    tree.op_pin_host(str(root / "img1"), str(root), "k\n")
    assert stat.S_IMODE(open_dir.stat().st_mode) == 0o700  # made private before the key goes in


def test_stage_makes_parent_and_no_known_hosts(root: Path) -> None:
    out = enc(tree.op_stage)(str(root / "lab/img1"), str(root), "t")
    assert out == {"staging": str(root / "lab/.img1.qrmfs-staging-t"), "known_hosts": None}
    assert os.listdir(root / "lab") == [".img1.qrmfs-staging-t"]


def test_publish_refuses_without_manifest(root: Path) -> None:
    st = enc(tree.op_stage)(str(root / "img1"), str(root), "t")["staging"]
    msg = refused("refused", tree.op_publish, str(root / "img1"), str(root), st, False)
    assert msg == f"{st} has no manifest: not publishing an unfinished image"
    assert os.path.isdir(st) and not (root / "img1").exists()


def test_publish_refuses_foreign_staging(root: Path) -> None:
    other = enc(tree.op_stage)(str(root / "img2"), str(root), "t")["staging"]
    tree.write_manifest(other, Manifest.new({"image": "img2"}))
    refused("refused", tree.op_publish, str(root / "img1"), str(root), other, False)
    refused("refused", tree.op_publish, str(root / "img1"), str(root), str(root / ".img1.qrmfs-staging-none"), False)
    assert os.path.isdir(other)


def test_publish_new(root: Path) -> None:
    st = enc(tree.op_stage)(str(root / "img1"), str(root), "t", known_hosts="kh\n")["staging"]
    image(Path(st), {"image": "img1", "n": 1})
    out = enc(tree.op_publish)(str(root / "img1"), str(root), st, False)
    assert out == {"path": str(root / "img1"), "replaced": False, "previous": None}
    assert os.listdir(root) == ["img1"]  # staging renamed, known_hosts removed
    assert tree.read_manifest(str(root / "img1")) == Manifest.new({"image": "img1", "n": 1})


def test_publish_existing_refused_without_force_then_force_keeps_previous(root: Path) -> None:
    image(root / "img1", {"image": "img1", "n": 1})
    (root / ".img1.qrmfs-previous").mkdir()
    (root / ".img1.qrmfs-previous/very-old").write_text("0")
    st = enc(tree.op_stage)(str(root / "img1"), str(root), "t")["staging"]
    image(Path(st), {"image": "img1", "n": 2})
    assert refused("exists", tree.op_publish, str(root / "img1"), str(root), st, False) == f"{root / 'img1'} exists"
    assert tree.read_manifest(str(root / "img1")) == Manifest.new({"image": "img1", "n": 1}) and os.path.isdir(st)
    out = enc(tree.op_publish)(str(root / "img1"), str(root), st, True)
    assert out == {"path": str(root / "img1"), "replaced": True, "previous": str(root / ".img1.qrmfs-previous")}
    assert tree.read_manifest(str(root / "img1")) == Manifest.new({"image": "img1", "n": 2})
    assert tree.read_manifest(str(root / ".img1.qrmfs-previous")) == Manifest.new({"image": "img1", "n": 1})
    assert sorted(os.listdir(root)) == [".img1.qrmfs-previous", "img1"]


def test_discard(root: Path) -> None:
    st = enc(tree.op_stage)(str(root / "img1"), str(root), "t", known_hosts="kh\n")["staging"]
    image(Path(st))
    image(root / "img1", {"image": "img1"})
    assert enc(tree.op_discard)(str(root / "img1"), str(root), st) == {"removed": st}
    assert os.listdir(root) == ["img1"]
    refused("refused", tree.op_discard, str(root / "img1"), str(root), str(root / "img1"))


def test_discard_refuses_dotdot_staging(root: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    (victim / "data").mkdir(parents=True)
    enc(tree.op_stage)(str(root / "img1"), str(root), "x")
    evil = str(root / ".img1.qrmfs-staging-x") + "/../../victim"
    with pytest.raises(AgentError):
        enc(tree.op_discard)(str(root / "img1"), str(root), evil)
    assert (victim / "data").is_dir()


# --- remove ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "", "exports/img1"])
def test_remove_refuses_root_empty_relative(root: Path, path: str) -> None:
    assert refused("refused", tree.op_remove, path, str(root), True) == f"refusing to remove {path!r}"


def test_remove_refuses_outside_export_root(root: Path, tmp_path: Path) -> None:
    image(tmp_path / "other/img1", {"image": "img1"})
    refused("refused", tree.op_remove, str(tmp_path / "other/img1"), str(root), True)
    refused("refused", tree.op_remove, str(root), str(root), True)
    assert (tmp_path / "other/img1/etc/hostname").exists() and root.is_dir()


def test_remove_refuses_symlinked_paths(root: Path, tmp_path: Path) -> None:
    image(tmp_path / "real/img1", {"image": "img1"})
    os.symlink(tmp_path / "real/img1", root / "img1")
    os.symlink(tmp_path / "real", root / "lab")
    refused("refused", tree.op_remove, str(root / "img1"), str(root), True)
    refused("refused", tree.op_remove, str(root / "lab/img1"), str(root), True)
    assert (tmp_path / "real/img1/etc/hostname").exists()
    assert os.path.islink(root / "img1")


def test_remove_not_found_not_dir_not_image(root: Path) -> None:
    refused("not_found", tree.op_remove, str(root / "img1"), str(root), True)
    (root / "afile").write_text("x")
    refused("refused", tree.op_remove, str(root / "afile"), str(root), True)
    image(root / "plain")
    msg = refused("not_image", tree.op_remove, str(root / "plain"), str(root), False)
    assert msg == f"{root / 'plain'} has no qrmfs manifest: not an image (use --force to remove anyway)"
    assert (root / "plain/etc/hostname").exists()
    assert enc(tree.op_remove)(str(root / "plain"), str(root), True) == {"removed": str(root / "plain")}
    assert sorted(os.listdir(root)) == ["afile"]


def test_remove_image_and_previous_only(root: Path) -> None:
    image(root / "img1", {"image": "img1"})
    image(root / ".img1.qrmfs-previous", {"image": "img1"})
    image(root / "img10", {"image": "img10"})
    (root / ".img10.qrmfs-previous").mkdir()
    assert enc(tree.op_remove)(str(root / "img1"), str(root), False) == {"removed": str(root / "img1")}
    assert sorted(os.listdir(root)) == [".img10.qrmfs-previous", "img10"]


def test_remove_refuses_image_with_mounts(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image(root / "img1", {"image": "img1"})
    monkeypatch.setattr(tree, "mounts_at_or_below", lambda p: [p + "/proc"])
    msg = refused("refused", tree.op_remove, str(root / "img1"), str(root), True)
    assert msg == f"{root / 'img1'} has mounts under it: {root / 'img1'}/proc"
    assert (root / "img1/etc/hostname").exists()


def test_mounts_at_or_below_reads_this_machines_mountinfo() -> None:
    from qrmfs.agent import fsutil

    assert "/proc" in fsutil.mounts_at_or_below("/proc")
    assert fsutil.mounts_at_or_below("/nonexistent-qrmfs-test") == []
    info = ("36 25 0:32 / /exports/img rw - ext4 /dev/sda1 rw\n"
            "37 36 0:33 / /exports/img/srv/a\\040b rw - tmpfs tmpfs rw\n"
            "38 25 0:34 / /exports/img2 rw - tmpfs tmpfs rw\n")
    assert fsutil.mounts_at_or_below("/exports/img", info) == ["/exports/img", "/exports/img/srv/a b"]


# --- list / manifest_update / stats ----------------------------------------------------------------

def test_list(root: Path) -> None:
    image(root / "img1", {"image": "img1"})
    image(root / "lab/deep/img2", {"image": "img2"})
    image(root / "a/b/c/too_deep", {"image": "x"})
    image(root / ".img1.qrmfs-previous", {"image": "old"})
    image(root / "plain")
    (root / "afile").write_text("x")
    got = enc(tree.op_list)(str(root))["images"]
    assert got == [
        {"path": str(root / "img1"), "manifest": {"image": "img1", "schema": SCHEMA}, "locked": None},
        {"path": str(root / "lab/deep/img2"), "manifest": {"image": "img2", "schema": SCHEMA}, "locked": None},
    ]
    assert [g["path"] for g in enc(tree.op_list)(str(root), depth=4)["images"]] == [
        str(root / "a/b/c/too_deep"), str(root / "img1"), str(root / "lab/deep/img2")]
    refused("not_found", tree.op_list, str(root / "missing"))


def test_list_shows_lock_holder(root: Path) -> None:
    image(root / "img1", {"image": "img1"})
    lock = root / ".img1.qrmfs-lock"
    lock.write_text("")
    assert enc(tree.op_list)(str(root))["images"][0]["locked"] is None
    fd = os.open(lock, os.O_RDWR)
    try:
        os.write(fd, b"op@host pid 42 (create img1) since 2024-01-01T00:00:00Z\n")
        # a flock held by another open file description (as by the agent's lock process)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = enc(tree.op_list)(str(root))["images"][0]["locked"]
        assert locked == "op@host pid 42 (create img1) since 2024-01-01T00:00:00Z"
    finally:
        os.close(fd)
    assert enc(tree.op_list)(str(root))["images"][0]["locked"] is None


def test_manifest_update(root: Path) -> None:
    image(root / "img1", {"image": "img1", "registration": {"state": "pending"}, "keep": 1})
    out = enc(tree.op_manifest_update)(str(root / "img1"), str(root), {"registration": {"state": "sent"}})
    out = out["manifest"]
    assert out == {"image": "img1", "registration": {"state": "sent"}, "keep": 1, "schema": SCHEMA}
    assert json.loads((root / "img1/.qrmfs/manifest.json").read_text()) == out
    assert (root / "img1/.qrmfs/manifest.json").read_text().endswith("}\n")
    assert os.listdir(root / "img1/.qrmfs") == ["manifest.json"]
    image(root / "plain")
    refused("not_image", tree.op_manifest_update, str(root / "plain"), str(root), {"a": 1})


def test_write_manifest_replaces_a_non_directory(root: Path) -> None:
    (root / "img1").mkdir()
    (root / "img1/.qrmfs").write_text("junk")
    tree.write_manifest(str(root / "img1"), Manifest.new({"b": 2, "a": 1}))
    assert (root / "img1/.qrmfs/manifest.json").read_text() == f'{{\n  "a": 1,\n  "b": 2,\n  "schema": {SCHEMA}\n}}\n'


def test_stats_counts_hard_links_once(tmp_path: Path) -> None:
    def make(base: Path, hardlink: bool) -> dict[str, int]:
        (base / "d").mkdir(parents=True)
        (base / "d/a").write_bytes(os.urandom(200_000))
        if hardlink:
            os.link(base / "d/a", base / "d/b")
        else:
            (base / "d/b").write_bytes((base / "d/a").read_bytes())
        os.symlink("/etc/passwd", base / "l")  # never followed
        return enc(tree.op_stats)(str(base), str(tmp_path))

    linked, copied = make(tmp_path / "x", True), make(tmp_path / "y", False)
    assert linked["files"] == copied["files"] == 4  # d, d/a, d/b, l
    blocks = os.lstat(tmp_path / "x/d/a").st_blocks * 512
    assert blocks > 0
    assert copied["bytes"] - linked["bytes"] == blocks


# --- agent main: one JSON line --------------------------------------------------------------------

def test_agent_main_ok_and_errors(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image(root / "img1", {"image": "img1"})
    assert agent_main.run("inspect", {"path": str(root / "img1"), "export_root": str(root)}) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["result"]["is_image"] is True
    assert agent_main.run("remove", {"path": "/", "export_root": str(root), "force": True}) == 3
    assert json.loads(capsys.readouterr().out) == {"ok": False, "error": {"kind": "refused",
                                                                          "message": "refusing to remove '/'"}}
    assert agent_main.run("stats", {"path": str(root / "missing"), "export_root": str(root)}) == 3
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["kind"] == "not_found" and str(root / "missing") in err["message"]
    # requests are validated before anything is done: unknown ops, unknown, missing and mistyped fields
    for op, args, why in (("nope", {}, "unknown operation 'nope'"),
                          ("stats", {"path": str(root / "img1"), "export_root": str(root), "bogus": 1},
                           "Stats: unknown field(s) bogus"),
                          ("inspect", {"path": str(root / "img1")}, "Inspect: missing field export_root"),
                          ("remove", {"path": str(root / "img1"), "export_root": str(root), "force": "yes"},
                           "Remove.force: expected bool")):
        assert agent_main.run(op, args) == 3
        err = json.loads(capsys.readouterr().out)["error"]
        assert err == {"kind": "bad_request", "message": why}
    assert (root / "img1/etc/hostname").exists()


# --- deletes never cross into another filesystem (issue 10, class 1) --------------------------------------

@pytest.fixture
def tmpfs_in(root: Path) -> Any:
    """Mount a real tmpfs at a directory below the export root (root only); unmounted afterwards."""
    import subprocess

    mounted: list[Path] = []

    def mount(at: Path) -> Path:
        at.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "qrmfs-test", str(at)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(at)
        (at / "precious").write_text("keep me\n")
        return at

    yield mount
    for at in reversed(mounted):
        subprocess.run(["umount", str(at)], check=False)


def test_no_delete_crosses_a_mount_point(root: Path, tmpfs_in: Any) -> None:
    image(root / "img1", {"image": "img1"})
    prev = image(root / ".img1.qrmfs-previous", {"image": "img1"})
    shared = tmpfs_in(prev / "srv/shared")
    # publish with force deletes the previous generation: refused, the mounted files survive
    st = enc(tree.op_stage)(str(root / "img1"), str(root), "t")["staging"]
    tree.write_manifest(st, Manifest.new({"image": "img1"}))
    with pytest.raises(fsutil.Mounted):
        tree.op_publish(str(root / "img1"), str(root), st, True)
    assert (shared / "precious").read_text() == "keep me\n"
    assert (root / "img1/.qrmfs/manifest.json").exists()  # the current image was not moved
    # a leftover staging copy with a mount in it is not deleted either when the lock is taken
    leftover = tmpfs_in(root / ".img1.qrmfs-staging-old/mnt")
    with pytest.raises(fsutil.Mounted):
        tree.take_lock(str(root / "img1"), str(root), "me")
    assert (leftover / "precious").exists()


def test_agent_reports_a_mounted_tree_as_refused(root: Path, tmpfs_in: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    image(root / "img1", {"image": "img1"})
    tmpfs_in(root / ".img1.qrmfs-staging-x/srv")
    assert agent_main.run("discard", {"path": str(root / "img1"), "export_root": str(root),
                                      "staging": str(root / ".img1.qrmfs-staging-x")}) == 3
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["kind"] == "refused" and "mounted there" in err["message"]


# --- images inside images (issue 10, class 3) ------------------------------------------------------------

@pytest.mark.parametrize("rel", ["base/etc/img", ".base.qrmfs-previous/img", ".base.qrmfs-staging-1/img",
                                 "base/.qrmfs/img", "x/.qrmfs"])
def test_no_image_inside_an_image_or_a_qrmfs_name(root: Path, rel: str) -> None:
    image(root / "base", {"image": "base"})
    (root / ".base.qrmfs-previous").mkdir()
    (root / ".base.qrmfs-staging-1").mkdir()
    refused("refused", tree.op_inspect, str(root / rel), str(root))
    refused("refused", tree.take_lock, str(root / rel), str(root), "me")


def test_no_image_made_where_images_lie_below(root: Path) -> None:
    image(root / "lab/deep/img1", {"image": "img1"})
    msg = refused("refused", tree.op_stage, str(root / "lab"), str(root), "t")
    assert str(root / "lab/deep/img1") in msg
    assert sorted(os.listdir(root)) == ["lab"]


# --- a tree in use is never deleted (issue 10, class 2) ---------------------------------------------------

def test_a_generation_in_use_is_not_deleted(root: Path) -> None:
    import subprocess

    image(root / "img1", {"image": "img1"})
    prev = image(root / ".img1.qrmfs-previous", {"image": "img1"})
    user = subprocess.Popen(["sleep", "60"], cwd=prev / "etc")  # like a process (or the NFS server) using it
    try:
        st = enc(tree.op_stage)(str(root / "img1"), str(root), "t")["staging"]
        tree.write_manifest(st, Manifest.new({"image": "img1"}))
        with pytest.raises(fsutil.InUse, match=rf"in use by pid {user.pid} \(sleep\)"):
            tree.op_publish(str(root / "img1"), str(root), st, True)
        assert (prev / "etc/hostname").exists() and (root / "img1/etc/hostname").exists()
        msg = refused("refused", tree.op_remove, str(root / "img1"), str(root), False)
        assert f"pid {user.pid} (sleep)" in msg and (root / "img1/etc/hostname").exists()
    finally:
        user.kill()
        user.wait()
    assert enc(tree.op_remove)(str(root / "img1"), str(root), False) == {"removed": str(root / "img1")}


def test_the_nfs_servers_cached_files_are_not_a_use(tmp_path: Path) -> None:
    """nfs-ganesha keeps files of an image open long after its nodes powered off: that cache is no use."""
    proc = tmp_path / "proc"
    for pid, comm in (("101", "ganesha.nfsd"), ("202", "bash")):
        (proc / pid / "fd").mkdir(parents=True)
        (proc / pid / "comm").write_text(comm + "\n")
        os.symlink("/", proc / pid / "cwd")
        os.symlink("/", proc / pid / "root")
    os.symlink("/exports/img1/usr/lib/systemd/systemd", proc / "101/fd/32")
    assert fsutil.holders("/exports/img1", str(proc)) == []
    os.symlink("/exports/img1/etc", proc / "202/fd/3")
    assert fsutil.holders("/exports/img1", str(proc)) == ["pid 202 (bash)"]


def test_a_list_without_leftovers_names_the_images_and_walks_no_generation(root: Path, pin_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What the openQRM name check asks for: every image's manifest, nothing beside them (sizing a generation
    or a spare walks all of it: with big images, seconds before a registered create could start)."""
    for name in ("img1", "img2"):
        (root / name / ".qrmfs").mkdir(parents=True)
        (root / name / ".qrmfs/manifest.json").write_text(json.dumps({"image": name}))
    for made in (".img1.qrmfs-gen-1", ".img1.qrmfs-spare"):  # qrmfs's own (a manifest it wrote)
        (root / made / "usr").mkdir(parents=True)
        (root / made / ".qrmfs").mkdir()
        (root / made / ".qrmfs/manifest.json").write_text(json.dumps({"image": "img1"}))
    full = tree.op_list(str(root))
    assert sorted(x.kind for x in full.leftovers) == ["generation", "spare"]

    def no_walk(*a: Any, **kw: Any) -> Any:
        raise AssertionError("a generation was walked")

    monkeypatch.setattr(tree, "tree_counts", no_walk)
    quick = tree.op_list(str(root), leftovers=False)
    assert [(x.path, x.manifest) for x in quick.images] == [(x.path, x.manifest) for x in full.images]
    assert sorted(os.path.basename(x.path) for x in quick.images) == ["img1", "img2"] and quick.leftovers == []
