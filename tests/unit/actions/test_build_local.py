"""The build path without docker: create, clone, validate --fix and remove through a `local` storage server (the
real agent in a subprocess, real rsync into a temp dir), openQRM through httpx's MockTransport. The copy, the
preparation and the publish fail in turn, for real, and nothing may look like an image afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import typer

from qrmfs import cli, jobs
from qrmfs.actions import clone as clone_act
from qrmfs.actions import create as create_act
from qrmfs.actions import remove as remove_act
from qrmfs.actions import validate as validate_act
from qrmfs.actions.common import Credentials, Env
from qrmfs.config import load
from qrmfs.errors import ExistsError, QrmfsError, TransferError, UsageError
from qrmfs.model import Location, Target
from qrmfs.results import RegState
from qrmfs.runner import Runner
from qrmfs.ui import Ui

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
URL = "http://openqrm.test/openqrm"
PASSWORD = "unit-Secret-0815"


class OpenQrm:
    """What the openQRM server received (httpx.MockTransport), answering 200 or a chosen status."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.status = 200

    def handle(self, request: httpx.Request) -> httpx.Response:
        q = {k: v[0] for k, v in parse_qs(urlsplit(str(request.url)).query, keep_blank_values=True).items()}
        self.requests.append(q)
        # as openQRM 5.3 answers: image-action.php's newline once it ran a command; post_event: nothing
        return httpx.Response(self.status, text="\n" if "image-action" in request.url.path else "")

    def commands(self) -> list[str]:
        return [q.get("image_command") or f"event {q.get('event_priority')}" for q in self.requests]


@pytest.fixture
def server() -> OpenQrm:
    return OpenQrm()


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    d = tmp_path / "exports"
    d.mkdir()
    return d


@pytest.fixture
def env(tmp_path: Path, exports: Path, server: OpenQrm) -> Env:
    cfg = tmp_path / "qrmfs.toml"
    cfg.write_text(f'spool_dir = "{tmp_path}/spool"\n\n[openqrm]\nurl = "{URL}"\nuser = "openqrm"\nretries = 0\n'
                   f'deployment_id = 2\n\n'
                   f'[storage.local]\naddress = "local"\nexport_root = "{exports}"\nstorage_id = 7\n')
    return Env(load(str(cfg)), Runner(), Ui(), transport=httpx.MockTransport(server.handle))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A small root filesystem: enough for every preparation step to find its files."""
    root = tmp_path / "src"
    for d in ("etc/ssh", "sbin", "var/log/apt", "proc", "sys", "dev", "run", "tmp"):
        (root / d).mkdir(parents=True)
    (root / "etc/hostname").write_text("golden\n")
    (root / "etc/fstab").write_text("UUID=0a1b / ext4 defaults 0 1\n")
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("secret key\n")
    (root / "var/log/apt/history.log").write_text("log\n")
    init = root / "sbin/init"
    init.write_text("#!/bin/sh\n")
    init.chmod(0o755)
    return root


def creds() -> Credentials:
    return Credentials(URL, "openqrm", PASSWORD)


def create(env: Env, exports: Path, source: Path, name: str = "img1", **kw: object) -> object:
    req = create_act.CreateRequest(name=name, target=Target("local", f"{exports}/{name}"),
                                   location=Location(None, str(source)), creds=creds(), **kw)  # type: ignore[arg-type]
    return create_act.create(req, env)


def names(exports: Path) -> list[str]:
    return sorted(os.listdir(exports))


def spool(tmp_path: Path) -> list[str]:
    """The jobs waiting in the spool (their lock files aside)."""
    d = tmp_path / "spool"
    return sorted(n for n in os.listdir(d) if n.endswith(".json")) if d.is_dir() else []


def test_create_copies_prepares_publishes_and_registers(env: Env, exports: Path, source: Path, server: OpenQrm,
                                                          tmp_path: Path) -> None:
    r = create(env, exports, source)
    img = exports / "img1"
    assert r.registration.state is RegState.SENT  # type: ignore[attr-defined]
    # what openQRM's answer showed, in plain words, in the output and the manifest: never "registered"
    reg = json.loads((img / ".qrmfs/manifest.json").read_text())["registration"]
    assert reg == {"state": "sent", "time": reg["time"], "via": "create", "seen": jobs.SEEN["new_image"]}
    assert r.text().endswith(f"; openQRM: sent ({reg['time']} by create; new_image ran for an administrator; "
                             "openQRM 5.3 shows no record, so the record itself is not verified; see docs/openqrm.md)")
    assert "registered" not in r.text()
    assert (img / "etc/hostname").read_text() == "golden\n"
    assert not (img / "etc/ssh/ssh_host_ed25519_key").exists()  # network removed: no host keys
    assert os.readlink(img / "etc/mtab") == "/proc/mounts"
    assert (img / ".qrmfs/manifest.json").is_file()
    assert names(exports) == [".img1.qrmfs-lock", "img1"]  # no staging left
    assert server.commands() == ["event 9", "new_image", "event 10"]
    new_image = server.requests[1]
    assert (new_image["image_rootdevice"], new_image["image_storageid"]) == (str(img), "7")
    assert spool(tmp_path) == []
    # validate agrees, and a second create without --force is refused before anything is touched
    assert validate_act.validate(validate_act.ValidateRequest(Target("local", str(img))), env).clean
    with pytest.raises(ExistsError):
        create(env, exports, source)


def _assert_nothing_published(exports: Path, server: OpenQrm, tmp_path: Path) -> None:
    assert [n for n in names(exports) if not n.endswith(".qrmfs-lock")] == []  # no image, no staging
    assert "new_image" not in server.commands()  # nothing registered
    assert server.commands()[-2:] == ["event 3", "event 10"]  # the failure is reported, and the job ends
    assert spool(tmp_path) == []  # ... and delivered, so nothing waits


def test_failed_copy_leaves_nothing(env: Env, exports: Path, source: Path, server: OpenQrm, tmp_path: Path) -> None:
    (source / "big").write_bytes(os.urandom(2 << 20))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "qrmfs-test", str(exports)], check=True)
    try:
        with pytest.raises(TransferError):
            create(env, exports, source)  # rsync fails: the export fills up
        _assert_nothing_published(exports, server, tmp_path)
    finally:
        subprocess.run(["umount", str(exports)], check=True)


def test_a_source_that_is_not_there_is_refused_before_anything(env: Env, exports: Path, source: Path,
                                                               server: OpenQrm) -> None:
    with pytest.raises(UsageError, match="is not a directory on this machine"):
        create(env, exports, source / "missing")
    assert names(exports) == [] and server.commands() == []  # nothing staged, locked or sent


def test_failed_preparation_leaves_nothing(env: Env, exports: Path, source: Path, server: OpenQrm,
                                           tmp_path: Path) -> None:
    # /etc/hostname is a non-empty directory in the source: the hostname step cannot replace it
    (source / "etc/hostname").unlink()
    (source / "etc/hostname/x").mkdir(parents=True)
    with pytest.raises(QrmfsError) as ei:
        create(env, exports, source, hostname="n1")
    assert "hostname" in ei.value.message and "/etc/hostname" in ei.value.message
    _assert_nothing_published(exports, server, tmp_path)


def _immutable(path: Path) -> Callable[[], None] | None:
    """chattr +i: even root cannot delete it (a real EPERM from the kernel); None where unsupported."""
    if shutil.which("chattr") is None:
        return None
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if r.returncode != 0:
        return None
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    todo: list[Callable[[], None]] = []
    yield todo
    for fn in todo:
        fn()


def test_an_undeletable_old_generation_never_fails_the_publish(env: Env, exports: Path, source: Path,
                                                                server: OpenQrm, tmp_path: Path,
                                                                cleanup: list[Callable[[], None]]) -> None:
    create(env, exports, source)
    server.requests.clear()
    # the oldest generation cannot be deleted (an immutable file in it): the new generation is published all
    # the same (create --force of an image makes a new generation), the old one is left and tried again later
    prev = exports / ".img1.qrmfs-previous"  # an image replaced by an old qrmfs (its manifest: qrmfs's own)
    (prev / "etc").mkdir(parents=True)
    (prev / ".qrmfs").mkdir()
    (prev / ".qrmfs/manifest.json").write_text('{"image": "img1"}\n')
    (prev / "etc/pinned").write_text("x")
    undo = _immutable(prev / "etc/pinned")
    if undo is None:
        pytest.skip("chattr +i is not supported here")
    moved = exports / ".img1.qrmfs-removing-gen-0/etc/pinned"
    cleanup.append(lambda: subprocess.run(["chattr", "-i", str(moved if moved.exists() else prev / "etc/pinned")],
                                          check=True))
    r = create(env, exports, source, force=True)
    assert r.replaced and r.previous == str(exports / ".img1.qrmfs-gen-1")  # type: ignore[attr-defined]
    assert any("could not be deleted" in w for w in env.ui.warnings)
    assert sorted(n for n in names(exports) if "staging" in n or "journal" in n) == []
    assert (exports / "img1/.qrmfs/manifest.json").is_file()
    assert (exports / ".img1.qrmfs-removing-gen-0/etc/pinned").is_file()  # left, out of the generations' way
    assert server.commands() == ["event 9", "event 10"]  # a new generation: the openQRM record stays


def test_create_force_keeps_the_old_tree_where_its_help_says(env: Env, exports: Path, source: Path,
                                                             server: OpenQrm) -> None:
    """`create --help` (and docs/cli.md, made from it) names where --force keeps what it replaces: a qrmfs
    image becomes a generation, any other directory .NAME.qrmfs-previous."""
    command = typer.main.get_command(cli.app).commands["create"]  # type: ignore[attr-defined]
    force_help = next(p.help for p in command.params if p.name == "force")
    create(env, exports, source)
    r = create(env, exports, source, force=True)
    assert r.previous == str(exports / ".img1.qrmfs-gen-1")  # type: ignore[attr-defined]
    assert ".NAME.qrmfs-gen-N" in force_help, force_help
    (exports / "other" / "data").mkdir(parents=True)
    r = create(env, exports, source, name="other", force=True)
    assert r.previous == str(exports / ".other.qrmfs-previous")  # type: ignore[attr-defined]
    assert (exports / ".other.qrmfs-previous" / "data").is_dir()
    assert "other directory is kept as .NAME.qrmfs-previous" in force_help, force_help


def test_create_force_replaces_the_record_whose_shown_options_change(env: Env, exports: Path, source: Path,
                                                                     server: OpenQrm) -> None:
    """--shared changes what the record shows: openQRM's record is replaced (remove_by_name, new_image: its
    update_image needs an image_id no answer shows), not kept with a warning. Fails on the old warning-only code."""
    create(env, exports, source)
    assert server.commands().count("new_image") == 1
    server.requests.clear()
    r = create(env, exports, source, force=True, shared=True)
    assert r.registration.state is RegState.SENT  # type: ignore[attr-defined]
    assert server.commands() == ["event 9", "remove_by_name", "new_image", "event 10"]
    assert server.requests[2]["image_isshared"] == "1"
    server.requests.clear()
    create(env, exports, source, force=True, shared=True)  # nothing the record shows changes: events only
    assert server.commands() == ["event 9", "event 10"]


def test_create_force_registers_an_image_that_had_no_record(env: Env, exports: Path, source: Path,
                                                            server: OpenQrm) -> None:
    create(env, exports, source, only_physical=True)
    assert server.commands() == []
    r = create(env, exports, source, force=True)
    assert r.registration.state is RegState.SENT  # type: ignore[attr-defined]
    assert server.commands() == ["event 9", "new_image", "event 10"]


def test_openqrm_down_keeps_the_registration_in_the_spool(env: Env, exports: Path, source: Path, server: OpenQrm,
                                                          tmp_path: Path) -> None:
    server.status = 503
    r = create(env, exports, source)
    assert r.registration.state is RegState.PENDING  # type: ignore[attr-defined]
    assert (exports / "img1/.qrmfs/manifest.json").is_file()
    (job,) = spool(tmp_path)
    assert PASSWORD not in (tmp_path / "spool" / job).read_text()
    from qrmfs.actions.listing import list_images

    (row,) = list_images(env, "local").images  # found by storage identity and path, however it was spelled
    assert (row.registration.state, row.registration.spool_job) == (RegState.PENDING, job[:-len(".json")])
    server.status = 200
    from qrmfs.actions.delivery import flush_spool

    for claim in env._claims.values():  # the create's process ends: it gives its job up
        claim.release()
    later = Env(env.cfg, Runner(), Ui(), transport=env.transport)  # a later `qrmfs flush`
    flush_spool(later, creds(), quick=False)
    assert spool(tmp_path) == [] and server.commands().count("new_image") == 1


def test_clone_and_remove(env: Env, exports: Path, source: Path, server: OpenQrm) -> None:
    create(env, exports, source, keep_network=True)
    server.requests.clear()
    req = clone_act.CloneRequest(name="img2", target=Target("local", f"{exports}/img2"),
                                 source=Target("local", f"{exports}/img1"), hostname="copy1", creds=creds())
    r = clone_act.clone(req, env)
    assert r.registration.state is RegState.SENT
    assert (exports / "img2/etc/hostname").read_text() == "copy1\n"
    assert (exports / "img1/etc/hostname").read_text() == "golden\n"  # the original is untouched
    assert server.commands() == ["event 9", "new_image", "event 10"]
    server.requests.clear()
    removed = remove_act.remove(remove_act.RemoveRequest(Target("local", f"{exports}/img2"), yes=True,
                                                         creds=creds()), env, confirm=lambda q: False)
    assert removed.registration.state is RegState.DEREGISTRATION_SENT  # type: ignore[union-attr]
    assert removed.text() == (f"removed local:{exports}/img2; openQRM: deregistration sent (remove_by_name ran for "
                              "an administrator; openQRM 5.3 shows no record, so the removal itself is not verified; "
                              "see docs/openqrm.md)")
    assert not (exports / "img2").exists()
    assert "remove_by_name" in server.commands()


def test_validate_fix_repairs_what_create_prepared(env: Env, exports: Path, source: Path) -> None:
    create(env, exports, source)
    img = exports / "img1"
    (img / "etc/mtab").unlink()
    (img / "var/log/new.log").write_text("x")
    target = Target("local", str(img))
    found = validate_act.validate(validate_act.ValidateRequest(target), env)
    assert {(f.step, f.path) for f in found.findings} == {("mtab", "/etc/mtab"), ("logs", "/var/log/new.log")}
    fixed = validate_act.validate(validate_act.ValidateRequest(target, fix=True), env)
    assert fixed.clean and len(fixed.fixed) == 2
    assert os.readlink(img / "etc/mtab") == "/proc/mounts"


def test_list_shows_leftovers_and_gc_removes_what_no_operation_holds(env: Env, exports: Path, source: Path) -> None:
    from qrmfs.actions.gc import gc
    from qrmfs.actions.listing import list_images

    create(env, exports, source, name="img1", only_physical=True)
    create(env, exports, source, name="img2", only_physical=True)
    (exports / ".img1.qrmfs-staging-dead/etc").mkdir(parents=True)
    from qrmfs.agent import tree

    pin1, pin2 = (tree.op_pin_host(str(exports / n), str(exports), "src ssh-ed25519 AAAA\n").known_hosts
                  for n in ("img1", "img2"))  # pins outside the export, left by runs that stopped
    (exports / ".img1.qrmfs-known_hosts").write_text("stale\n")  # an earlier version's pin, in the export
    (exports / ".ghost.qrmfs-lock").write_text("")
    side = env.side(env.cfg.storage["local"])
    with side.lock(str(exports / "img2"), "someone pid 9 (create img2)"):  # img2's operation is still running
        (exports / ".img2.qrmfs-staging-live").mkdir()
        pin2 = tree.op_pin_host(str(exports / "img2"), str(exports), "src ssh-ed25519 AAAA\n").known_hosts
        listed = list_images(env, None)
        assert sorted((x.kind, Path(x.path).name, Path(x.image).name, x.held_by is not None)
                      for x in listed.leftovers) == sorted([
            ("known_hosts", ".img1.qrmfs-known_hosts", "img1", False), ("lock", ".ghost.qrmfs-lock", "ghost", False),
            ("known_hosts", Path(pin1).name, "img1", False), ("known_hosts", Path(pin2).name, "img2", True),
            ("staging", ".img1.qrmfs-staging-dead", "img1", False),
            ("staging", ".img2.qrmfs-staging-live", "img2", True)])
        assert "left over" in listed.text() and "in use by someone pid 9" in listed.text()
        done = gc(env, "local")
    assert sorted(done.removed) == sorted([
        str(exports / ".ghost.qrmfs-lock"), str(exports / ".img1.qrmfs-known_hosts"), pin1,
        str(exports / ".img1.qrmfs-staging-dead")])
    assert sorted(done.in_use) == sorted([str(exports / ".img2.qrmfs-staging-live"), pin2])
    assert (exports / ".img2.qrmfs-staging-live").is_dir() and (exports / "img1/etc/hostname").is_file()
    assert os.path.exists(pin2) and not os.path.exists(pin1)


def _create_at(env: Env, path: Path, source: Path, **kw: object) -> object:
    req = create_act.CreateRequest(name=path.name, target=Target("local", str(path)),
                                   location=Location(None, str(source)), creds=creds(), **kw)  # type: ignore[arg-type]
    return create_act.create(req, env)


def test_a_name_registered_for_another_path_is_refused(env: Env, exports: Path, source: Path, server: OpenQrm,
                                                        tmp_path: Path) -> None:
    """openQRM image names are unique: a second image named img1 elsewhere is refused before anything is done,
    whether the first one is registered or its registration still waits in the spool."""
    _create_at(env, exports / "a/img1", source)
    _create_at(env, exports / "a/img1", source, force=True)  # the same image again: its own name
    server.requests.clear()
    with pytest.raises(ExistsError) as e:
        _create_at(env, exports / "b/img1", source)
    assert e.value.message.startswith("the openQRM image name img1 is already taken by local:")
    assert f"local:{exports}/a/img1 (registration sent)" in e.value.message and "\n" not in e.value.message
    assert not (exports / "b").exists() and server.requests == []  # nothing copied, locked or sent
    # clone under that name elsewhere: refused the same way
    with pytest.raises(ExistsError):
        clone_act.clone(clone_act.CloneRequest(name="img1", target=Target("local", f"{exports}/c/img1"),
                                               source=Target("local", f"{exports}/a/img1"), creds=creds()), env)
    assert not (exports / "c").exists() and server.requests == []
    # not registered (-o): no openQRM record, so no conflict
    _create_at(env, exports / "d/img1", source, only_physical=True)
    # a registration of img2 waiting in the spool holds the name too
    server.status = 503
    _create_at(env, exports / "a/img2", source)
    (job,) = spool(tmp_path)
    with pytest.raises(ExistsError) as e:
        _create_at(env, exports / "b/img2", source)
    assert f"spool job {job[:-len('.json')]} (for local:{exports}/a/img2)" in e.value.message
    assert not (exports / "b").exists()


def test_a_flush_records_the_delivery_in_the_manifest(env: Env, exports: Path, source: Path, server: OpenQrm,
                                                      tmp_path: Path) -> None:
    """openQRM down at create: the manifest names the spool job. A later flush delivers it and writes the
    delivery (when, how) into the manifest under the image's lock; list shows that, not a guess."""

    from qrmfs.actions.delivery import flush_spool
    from qrmfs.actions.listing import list_images

    server.status = 503
    create(env, exports, source)
    (job,) = spool(tmp_path)
    job_id = job[:-len(".json")]
    manifest = exports / "img1/.qrmfs/manifest.json"
    assert json.loads(manifest.read_text())["registration"] == {"state": "pending", "spool_job": job_id}
    for claim in env._claims.values():  # the create's process ends
        claim.release()
    server.status = 200
    later = Env(env.cfg, Runner(), Ui(), transport=env.transport)  # a later `qrmfs flush`
    assert flush_spool(later, creds(), quick=False)["delivered"] == [job_id]
    reg = json.loads(manifest.read_text())["registration"]
    assert (reg["state"], reg["spool_job"], reg["via"]) == ("sent", job_id, f"flush of spool job {job_id}")
    assert reg["time"].endswith("Z")
    assert names(exports) == [".img1.qrmfs-lock", "img1"]  # the lock was taken and given back
    (row,) = list_images(later, "local").images
    assert row.registration.state is RegState.SENT
    assert str(row.registration) == f"sent ({reg['time']} by flush of spool job {job_id}; {jobs.SEEN['new_image']})"


def test_a_publish_that_fails_keeps_or_drops_the_armed_registration_by_what_happened(
        env: Env, exports: Path, source: Path, server: OpenQrm, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The registration is armed before the publish. A publish that fails before anything happened drops it
    (the failure is reported). One whose answer is lost after the agent published keeps it armed: the next
    flush finds the image there and registers it once."""

    from qrmfs.actions.delivery import flush_spool
    from qrmfs.errors import StorageError
    from qrmfs.storage import StorageSide

    real = StorageSide.publish

    def refused(self: StorageSide, *a: object, **kw: object) -> object:
        raise StorageError("the storage server refused the publish")

    monkeypatch.setattr(StorageSide, "publish", refused)
    with pytest.raises(StorageError):
        create(env, exports, source)
    assert names(exports) == [] and spool(tmp_path) == []  # nothing published, nothing waits
    assert "new_image" not in server.commands() and server.commands()[-2:] == ["event 3", "event 10"]

    def answer_lost(self: StorageSide, *a: object, **kw: object) -> object:
        real(self, *a, **kw)  # type: ignore[arg-type]
        raise StorageError("the storage server gave no answer")

    monkeypatch.setattr(StorageSide, "publish", answer_lost)
    server.requests.clear()
    with pytest.raises(StorageError):
        create(env, exports, source)
    assert (exports / "img1/.qrmfs/manifest.json").is_file()  # it was published after all
    (job,) = spool(tmp_path)
    armed = json.loads((tmp_path / "spool" / job).read_text())
    assert armed["publish"] is not None and "new_image" not in server.commands()
    for claim in env._claims.values():  # that run ends
        claim.release()
    later = Env(env.cfg, Runner(), Ui(), transport=env.transport)
    assert flush_spool(later, creds(), quick=False)["delivered"] == [armed["id"]]
    assert server.commands().count("new_image") == 1 and spool(tmp_path) == []
    assert json.loads((exports / "img1/.qrmfs/manifest.json").read_text())["registration"]["state"] == "sent"


def test_validate_l_runs_a_silently_failed_dry_run_once_more(env: Env, exports: Path, source: Path,
                                                              tmp_path: Path) -> None:
    """A dry run that ends with 255 and nothing on stderr (what ssh does when the remote side is killed at once,
    bench/results/history.md, Investigations) is run once more, with a warning; a second such end fails and says why."""
    from plumbum import local

    create(env, exports, source, only_physical=True)
    (source / "etc/new.conf").write_text("new\n")
    bin_dir, marks = tmp_path / "bin", tmp_path / "marks"
    bin_dir.mkdir()
    marks.mkdir()
    rsync = shutil.which("rsync")
    (bin_dir / "rsync").write_text(f'#!/bin/sh\n# dies silently with 255 while a mark is left in {marks}\n'
                                   f'for m in {marks}/*; do [ -e "$m" ] && rm "$m" && exit 255; done\n'
                                   f'exec {rsync} "$@"\n')
    (bin_dir / "rsync").chmod(0o755)
    req = validate_act.ValidateRequest(Target("local", str(exports / "img1")), location=Location(None, str(source)))
    with local.env(PATH=f"{bin_dir}:{os.environ['PATH']}"):
        (marks / "1").touch()
        result = validate_act.validate(req, env)
        assert result.drift is not None and "/etc/new.conf" in [c["path"] for c in result.drift.changes]
        assert any("running the dry run once more" in w for w in env.ui.warnings)
        (marks / "1").touch()
        (marks / "2").touch()
        with pytest.raises(TransferError, match="exited with 255: the ssh session ended without an exit status"):
            validate_act.validate(req, env)


# --- the dry run shows the job the real run sends ---------------------------------------------------------

def _plan(plan: list[dict[str, object]]) -> list[dict[str, str]]:
    return [dict(r["params"]) for r in plan]  # type: ignore[call-overload]


def test_every_commands_dry_run_is_the_job_it_sends(env: Env, exports: Path, source: Path,
                                                   server: OpenQrm) -> None:
    """create, clone, update (with a changed --shared: the record replaced), rollback and remove: the openQRM
    requests of --dry-run are exactly those the real run sends, in order. Fails on the old code (clone's plan
    had no events, update's a line of text, rollback's and remove's none)."""
    from qrmfs.actions import update as update_act

    t = Target("local", f"{exports}/img1")
    creq = create_act.CreateRequest(name="img1", target=t, location=Location(None, str(source)), creds=creds())
    planned = _plan(create_act.dry_run(creq, env).registration)
    create_act.create(creq, env)
    assert server.requests == planned and [q.get("image_command") for q in planned] == [None, "new_image", None]

    server.requests.clear()
    c = clone_act.CloneRequest(name="img2", target=Target("local", f"{exports}/img2"), source=t, creds=creds())
    planned = _plan(clone_act.dry_run(c, env).registration)
    clone_act.clone(c, env)
    assert server.requests == planned and len(planned) == 3

    server.requests.clear()
    u = update_act.UpdateRequest(t, overrides={"shared": True}, creds=creds())
    planned = _plan(update_act.update(update_act.UpdateRequest(t, overrides={"shared": True}, creds=creds(),
                                                               dry_run=True), env).registration)  # type: ignore[union-attr]
    update_act.update(u, env)
    assert server.requests == planned
    assert [q.get("image_command") for q in planned] == [None, "remove_by_name", "new_image", None]

    server.requests.clear()
    rb = update_act.RollbackRequest(t, creds=creds())
    planned = _plan(update_act.rollback(update_act.RollbackRequest(t, creds=creds(), dry_run=True), env).plan)
    update_act.rollback(rb, env)
    assert server.requests == planned  # back to the unshared generation: its record again
    assert [q.get("image_command") for q in planned] == [None, "remove_by_name", "new_image", None]
    assert planned[2]["image_isshared"] == "0"

    server.requests.clear()  # an update that changes nothing the record shows: its events only, never a 2nd record
    planned = _plan(update_act.update(update_act.UpdateRequest(t, creds=creds(), dry_run=True),
                                      env).registration)  # type: ignore[union-attr]
    update_act.update(update_act.UpdateRequest(t, creds=creds()), env)
    assert server.requests == planned and [q.get("image_command") for q in planned] == [None, None]
    server.requests.clear()  # ... and so does a rollback to a generation with the same options
    planned = _plan(update_act.rollback(update_act.RollbackRequest(t, creds=creds(), dry_run=True), env).plan)
    update_act.rollback(update_act.RollbackRequest(t, creds=creds()), env)
    assert server.requests == planned and [q.get("image_command") for q in planned] == [None, None]

    server.requests.clear()
    r = remove_act.RemoveRequest(Target("local", f"{exports}/img2"), yes=True, creds=creds())
    planned = _plan(remove_act.remove(remove_act.RemoveRequest(r.target, creds=creds(), dry_run=True), env,
                                      lambda _: True).registration)  # type: ignore[union-attr]
    remove_act.remove(r, env, lambda _: True)
    assert server.requests == planned and [q.get("image_command") for q in planned] == [None, "remove_by_name", None]
