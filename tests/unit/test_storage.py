"""qrmfs/storage (StorageSide, its Session) with a `local` storage server and the real Runner: the agent runs in a
subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qrmfs import argv as A
from qrmfs import storage as S
from qrmfs.agent import protocol as P
from qrmfs.agent import tree
from qrmfs.agent.manifest import Manifest
from qrmfs.config import SshHost, Storage
from qrmfs.errors import ConnectError, ExistsError, LockedError, NotFoundError, RefusedError, StorageError
from qrmfs.runner import CommandFailed, Runner
from qrmfs.storage import StorageSide

REPO = Path(__file__).resolve().parents[2]


def test_inspect_runs_agent_in_subprocess(side: StorageSide, root: Path) -> None:
    info = side.inspect(str(root / "img1"))
    assert (info.exists, info.is_image, info.parent_exists, info.previous, info.manifest) == (
        False, False, True, False, None)
    assert isinstance(info.free_bytes, int) and info.free_bytes > 0


def test_full_cycle(side: StorageSide, root: Path) -> None:
    path = str(root / "img1")
    st = side.stage(path, "tok").staging
    assert st == str(root / ".img1.qrmfs-staging-tok")
    Path(st, "etc").mkdir()
    assert side.write_manifest(path, st, Manifest.new({"image": "img1"})) == P.Written(st)
    assert side.publish(path, st, force=False, node_timeout=900) == P.Published(path, False, None)
    assert side.list() == P.Listed([P.ListedImage(path, Manifest.new({"image": "img1"}), None)])
    assert side.stats(path).files == 3  # etc, .qrmfs, manifest.json
    assert side.remove(path, force=False, running_ok=False, node_timeout=900) == P.Removed(path)
    assert os.listdir(root) == []


def test_errors_map_to_exit_codes(side: StorageSide, root: Path) -> None:
    with pytest.raises(RefusedError) as ei:
        side.remove("/", force=True, running_ok=False, node_timeout=900)
    assert (ei.value.message, ei.value.exit_code) == ("refusing to remove '/'", 11)
    with pytest.raises(NotFoundError):
        side.remove(str(root / "nope"), force=True, running_ok=False, node_timeout=900)
    (root / "plain").mkdir()
    with pytest.raises(RefusedError, match="has no qrmfs manifest"):
        side.remove(str(root / "plain"), force=False, running_ok=False, node_timeout=900)
    (root / "img1/.qrmfs").mkdir(parents=True)
    tree.write_manifest(str(root / "img1"), Manifest.new({}))
    st = side.stage(str(root / "img1"), "t").staging
    tree.write_manifest(st, Manifest.new({}))
    with pytest.raises(ExistsError):
        side.publish(str(root / "img1"), st, force=False, node_timeout=900)
    with pytest.raises(NotFoundError) as ei2:
        side.stats(str(root / "missing"))
    assert str(root / "missing") in ei2.value.message
    with pytest.raises(RefusedError, match="nor a staging directory"):
        side.stats(str(root / "img1"), root="/etc")  # the agent works only on the image and its staging copies


def test_bad_request_is_storage_error(side: StorageSide, root: Path) -> None:
    """A client of another version: the agent refuses the request before it acts (one framing, one error)."""
    payload = json.dumps({"loader": S.payload.loader(), "modules": S.payload.agent_sources(), "op": "inspect",
                          "args": {"path": str(root / "x")}}) + "\n"
    r = Runner().run(side._agent_argv(), input=payload, ok=(0, 3))
    assert r.code == 3
    with pytest.raises(StorageError, match="Inspect: missing field export_root"):
        side._answer(r.stdout)


def test_argv_local_and_remote(root: Path) -> None:
    local = StorageSide(Storage("local", SshHost("local"), str(root)), Runner())
    assert local.argv(["ls", "/x y"]) == ("ls", "/x y")
    assert local._agent_argv() == (sys.executable, "-c", S.payload.BOOTSTRAP)
    remote = StorageSide(Storage("nas", SshHost("nas", "admin", 2222), "/exports"), Runner(), identity="/k/id",
                         known_hosts="/k/kh")
    argv = remote._agent_argv()
    assert argv[0] == "ssh" and argv[-2:] == ("nas", "python3 -c " + "'" + S.payload.BOOTSTRAP + "'")
    assert argv[argv.index("-i") + 1] == "/k/id" and "-A" not in argv
    assert "-A" in remote.argv(["true"], forward_agent=True)


def test_connect_error_mapping(root: Path) -> None:
    remote = StorageSide(Storage("nas", SshHost("nas", "admin", 2222), "/exports"), Runner())
    e = remote.connect_error(CommandFailed(("ssh",), 255, "ssh: connect to host nas port 2222: Connection refused"))
    assert type(e) is ConnectError
    assert e.message == "cannot reach storage server nas (admin@nas port 2222) over ssh"
    assert e.detail == "ssh: connect to host nas port 2222: Connection refused"
    e = remote.connect_error(CommandFailed(("ssh",), 127, "bash: line 1: python3: command not found"))
    assert (type(e), e.message) == (StorageError, "python3 is needed on storage server nas")
    local = StorageSide(Storage("local", SshHost("local"), str(root)), Runner())
    assert type(local.connect_error(CommandFailed(("x",), 255, ""))) is StorageError


def test_answer_without_json_is_storage_error(side: StorageSide) -> None:
    with pytest.raises(StorageError, match="the storage server local gave no answer"):
        side._answer("Traceback (most recent call last):\n")


def test_node_init_script_is_shipped() -> None:
    text = S.node_init_script()
    assert text.startswith("#!")
    assert "node.conf" in text


# --- the lock ----------------------------------------------------------------------------------------

def test_lock_second_holder_refused_then_free(side: StorageSide, root: Path) -> None:
    path = str(root / "img1")
    with side.lock(path, "alice@ws1 pid 1 (create img1)") as locked:
        lock = locked.lock
        assert (lock, locked.cleaned) == (str(root / ".img1.qrmfs-lock"), [])
        assert Path(lock).read_text().startswith("alice@ws1 pid 1 (create img1) since ")
        t0 = time.monotonic()
        with pytest.raises(LockedError) as ei:
            with side.lock(path, "bob@ws2 pid 2 (create img1)"):
                pytest.fail("second lock was granted")
        assert time.monotonic() - t0 < 10  # fails fast, does not wait
        assert ei.value.exit_code == 6
        assert ei.value.message.startswith(f"image {path} is locked by another qrmfs operation: "
                                           "alice@ws1 pid 1 (create img1) since ")
        # another image is not affected
        with side.lock(str(root / "img2"), "carol"):
            pass
    with side.lock(path, "bob@ws2 pid 2 (create img1)"):
        assert Path(root / ".img1.qrmfs-lock").read_text().startswith("bob@ws2 pid 2 (create img1) since ")
    # no image of that name exists: its lock file does not outlive the lock
    assert os.listdir(root) == []
    (root / "img1").mkdir()
    with side.lock(path, "dave"):
        pass
    assert Path(root / ".img1.qrmfs-lock").read_text() == ""  # an image's own lock file stays, empty


def test_lock_outside_export_root_refused(side: StorageSide, tmp_path: Path) -> None:
    with pytest.raises(RefusedError, match="is not below the export root"):
        with side.lock(str(tmp_path / "elsewhere/img1"), "me"):
            pass
    assert not (tmp_path / "elsewhere").exists()


def test_lock_of_killed_holder_is_free_again(side: StorageSide, root: Path) -> None:
    path = str(root / "img1")
    code = textwrap.dedent(f"""
        import signal
        from qrmfs.config import SshHost, Storage
        from qrmfs.runner import Runner
        from qrmfs.storage import StorageSide
        side = StorageSide(Storage("local", SshHost("local"), {str(root)!r}), Runner())
        with side.lock({path!r}, "doomed pid holder"):
            print("held", flush=True)
            signal.pause()  # hold the lock until this process is killed
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(LockedError, match="doomed pid holder"):
            with side.lock(path, "me"):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    # the helper on the storage side sees its stdin close and exits: the flock dies with it
    deadline = time.monotonic() + 15
    while True:
        try:
            with side.lock(path, "me"):
                break
        except LockedError:
            assert time.monotonic() < deadline, "lock still held after its holder was killed"
            time.sleep(0.1)


# --- the session: the agent shipped and started once per run ---------------------------------------------

def test_one_agent_process_answers_every_call(side: StorageSide, root: Path) -> None:
    side.inspect(str(root / "img1"))
    assert side.session.process is not None
    pid = side.session.process.pid
    path = str(root / "img1")
    with side.lock(path, "me") as locked:
        side.stage(path, "t1")
        assert Path(locked.lock).read_text().startswith("me since ")
    side.list()
    assert side.session.process.pid == pid  # one agent for all of it
    # the lock was given up at the end of the block, with the session still running
    with side.lock(path, "you"):
        pass


def test_a_session_that_ends_holding_no_lock_fails_its_call_and_the_next_call_starts_another(
        side: StorageSide, root: Path) -> None:
    path = str(root / "img1")
    assert side.inspect(path).exists is False
    assert side.session.process is not None
    side.session.process.kill()
    side.session.process.wait()
    with pytest.raises(StorageError, match="gave no answer to inspect"):
        side.inspect(path)
    assert side.inspect(path).exists is False  # a new session


def test_session_refuses_run_and_serve(side: StorageSide, root: Path) -> None:
    with pytest.raises(StorageError, match="cannot run inside a session"):
        side._call(P.Serve())
    with pytest.raises(NotFoundError, match="holds no lock"):
        side._call(P.Unlock(str(root / "img1"), str(root)))


def test_remote_session_is_the_master_connection() -> None:
    remote = StorageSide(Storage("nas", SshHost("nas", "admin", 2222), "/exports"), Runner())
    argv = A.ssh_master_argv(remote.storage.ssh, "/tmp/c/m", remote=A.agent_argv("python3", S.payload.BOOTSTRAP))
    assert "ControlMaster=yes" in argv and "-N" not in argv
    assert argv[-2:] == ("nas", "python3 -c " + "'" + S.payload.BOOTSTRAP + "'")


def test_a_request_begun_early_is_answered_in_order(side: StorageSide, root: Path) -> None:
    """start_check: the agent checks while we do something else; a call in between gets its own answer."""
    img = root / "img1"
    (img / "etc").mkdir(parents=True)
    later = side.start_check(str(img), P.Options("img1"))
    assert side.inspect(str(img)).exists is True  # answered after the check's answer, which is kept
    findings = later.result().findings
    assert "init" in {f.step for f in findings}


def test_a_forwarding_master_carries_the_copys_dash_a_only_with_our_own_agent() -> None:
    """With the run's own agent (agent_sock), the master forwards it and a copy's `ssh -A` shares the master;
    without it, `-A` never goes through the shared connection (it opens its own)."""
    nas = Storage("nas", SshHost("nas", "admin", 2222), "/exports")
    master = A.ssh_master_argv(nas.ssh, "/tmp/c/m", remote=("true",), forward_agent=True)
    assert "-A" in master and "ControlMaster=yes" in master
    assert "-A" not in A.ssh_master_argv(nas.ssh, "/tmp/c/m", remote=("true",))
    for sock, shared in (("/tmp/qrmfs-agent-x/agent.sock", True), (None, False)):
        side = StorageSide(nas, Runner(), agent_sock=sock)
        side.session.process = object()  # type: ignore[assignment]  # a session that is up: no ssh in a unit test
        side.session.ready, side.session.control = True, __file__  # an existing path stands in for the control socket
        argv = side.argv(["rsync"], forward_agent=True)
        assert "-A" in argv
        assert (f"ControlPath={__file__}" in argv) is shared
        assert f"ControlPath={__file__}" in side.argv(["true"])  # without -A: always the shared connection


def test_two_exports_of_one_server_share_its_agent_session(tmp_path: Path) -> None:
    """Env.side: another storage server on the same ssh server uses the first one's session (one handshake);
    each request still names its own export root, and a lock taken through either is held by that session."""
    from qrmfs.actions.common import Env
    from qrmfs.config import Config
    from qrmfs.ui import Ui

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    sa, sb = Storage("a", SshHost("local"), str(a)), Storage("b", SshHost("local"), str(b))
    env = Env(Config(storage={"a": sa, "b": sb}), Runner(), Ui())
    side_a, side_b = env.side(sa), env.side(sb)
    try:
        assert side_a is not side_b and env.side(sb) is side_b
        (b / "img").mkdir()
        assert side_b.inspect(str(b / "img")).exists and not side_a.inspect(str(a / "img")).exists
        assert side_b.session is side_a.session and side_a.session.process is not None  # one agent process for both
        with side_b.lock(str(b / "img"), "me"):
            with pytest.raises(RefusedError):  # each request is checked against its own export root
                side_a.inspect(str(b / "img"))
        side_b.close()
        assert side_a.session.process is None  # closing either ends the one session
    finally:
        side_a.close()


def test_a_side_whose_locked_session_died_refuses_every_later_operation(side: StorageSide, root: Path) -> None:
    """The session holding the lock is killed: no later operation starts a session without it (the lock's end
    raises too, the block having done no more), but the run's own unfinished copy can still be removed; and
    another run can take the lock at once (it died with the session)."""
    path = str(root / "img1")
    staging = side.stage(path, "tok").staging
    with pytest.raises(StorageError, match="no longer holds the lock on .*img1.*: its agent session ended"):
        with side.lock(path, "test"):
            session = side.session.process
            assert session is not None
            session.kill()
            session.wait()
    for attempt in (lambda: side.inspect(path), lambda: side.supervised(path, ["true"], "test"),
                    lambda: side.argv(["true"])):
        with pytest.raises(StorageError, match="is not done without it"):
            attempt()
    assert side.session.process is None  # nothing started a session that holds no lock
    assert side.discard(path, staging) == P.Discarded(staging)
    other = StorageSide(side.storage, Runner())
    try:
        with other.lock(path, "another run"):
            pass
    finally:
        other.close()


def test_an_error_in_the_locked_block_is_the_one_raised_when_the_session_died_too(side: StorageSide,
                                                                                   root: Path) -> None:
    with pytest.raises(ValueError, match="the block's own"):
        with side.lock(str(root / "img1"), "test"):
            assert side.session.process is not None
            side.session.process.kill()
            raise ValueError("the block's own")


def test_a_signal_while_a_request_waits_for_its_answer_is_raised_with_the_session_lock_held():
    """SIGTERM while the main thread waits for an answer: Interrupted comes out within SIGNAL_LATENCY, the
    session's lock is held when it does (the caller's `with io:` lets go of it cleanly: a signal raised inside
    Condition.wait just after it released the lock made that exit fail with "cannot release un-acquired lock"),
    and the answer that comes later still goes to its own slot."""
    import threading

    from qrmfs.errors import Interrupted, interrupt
    from qrmfs.storage.answers import SIGNAL_LATENCY, Answers

    io = threading.Condition()
    answers = Answers(io)
    before = signal.signal(signal.SIGTERM, lambda n, _f: interrupt(n))
    try:
        for i in range(20):  # the signal at 20 different instants of the wait
            with io:
                slot = answers.expect()
            kill = threading.Timer(0.01 + 0.003 * i, os.kill, (os.getpid(), signal.SIGTERM))
            kill.start()
            t0 = time.monotonic()
            with pytest.raises(Interrupted), io:
                answers.wait(slot)
            assert time.monotonic() - t0 < 0.01 + 0.003 * i + SIGNAL_LATENCY + 1.0
            kill.join()
            with io:  # the reader's hand-over of the late answer
                answers.waiting.popleft().append('{"late": 1}')
            assert slot == ['{"late": 1}']
    finally:
        signal.signal(signal.SIGTERM, before)


def test_signals_deferred_in_another_thread_holds_back_none_of_the_main_threads_signals():
    import threading

    from qrmfs.errors import Interrupted, interrupt, signals_deferred

    inside, leave = threading.Event(), threading.Event()

    def worker() -> None:
        with signals_deferred():
            inside.set()
            leave.wait(10)

    before = signal.signal(signal.SIGTERM, lambda n, _f: interrupt(n))
    t = threading.Thread(target=worker)
    t.start()
    try:
        inside.wait(10)
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next bytecode; this sleep is only a bound
    finally:
        leave.set()
        t.join()
        signal.signal(signal.SIGTERM, before)
