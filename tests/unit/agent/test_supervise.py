"""qrmfs/agent/supervise.py through a local storage side: a storage-side command never outlives qrmfs (its
stdin) or the image's lock. Real processes, real flocks, real signals."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from qrmfs.agent import protocol as P
from qrmfs.agent import supervise
from qrmfs.errors import QrmfsError, RefusedError
from qrmfs.runner import Runner
from qrmfs.storage import StorageSide

HOLDER = "tester@host pid 1 (create img1)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _start(side: StorageSide, root: Path, holder: str | None, pidfile: Path) -> subprocess.Popen[bytes]:
    """The agent running `sh -c 'echo $$ > pidfile; exec sleep 60'`, its stdin kept open by us."""
    argv, payload, _started = side.supervised(str(root / "img1"), ["sh", "-c", f'echo $$ > {pidfile}; exec sleep 60'],
                                              holder)
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None
    p.stdin.write(payload)
    p.stdin.flush()
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "the supervised command did not start"
        time.sleep(0.05)
    return p


def test_exit_code_and_output_pass_through(side: StorageSide, root: Path) -> None:
    argv, payload, _started = side.supervised(str(root / "img1"), ["sh", "-c", "echo out; echo err >&2; exit 23"], None)
    r = Runner().stream(argv, lambda _l: None, ok=range(256), input=payload)
    assert (r.code, r.stdout.strip(), r.stderr.strip()) == (23, "out", "err")


def test_a_warm_agent_runs_the_next_supervised_command(side: StorageSide, root: Path) -> None:
    """warm() starts the agent before the command is known; supervised() hands it over with the request alone
    on its stdin, and the command runs under it as under an agent started then. The next one starts cold."""
    side.warm()
    sup = side.supervised(str(root / "img1"), ["sh", "-c", "echo out; echo err >&2; exit 23"], None)
    assert sup.started is not None and sup.input is not None and b'"modules"' not in sup.input
    r = Runner().stream(sup.argv, lambda _l: None, ok=range(256), input=sup.input, started=sup.started)
    assert (r.code, r.stdout.strip(), r.stderr.strip()) == (23, "out", "err")
    cold = side.supervised(str(root / "img1"), ["true"], None)
    assert cold.started is None and cold.input is not None and b'"modules"' in cold.input


def test_a_warm_agent_of_other_forwarding_is_not_taken_and_ends_with_the_session(side: StorageSide,
                                                                                 root: Path) -> None:
    """A warm agent waits for the command it was started for (with or without the ssh agent forwarded); one
    no command took reads end of file when the session closes and exits having run nothing."""
    side.warm(forward_agent=False)
    p = side.warm_agents[False].process
    assert side.supervised(str(root / "img1"), ["true"], None, forward_agent=True).started is None
    assert p.poll() is None
    side.close()
    assert p.wait(timeout=10) == 0 and not side.warm_agents
    assert p.stdout is not None and p.stdout.read() == b""


def test_a_warm_agent_stops_its_command_when_qrmfs_is_gone(side: StorageSide, root: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    side.warm()
    sup = side.supervised(str(root / "img1"), ["sh", "-c", f'echo $$ > {pidfile}; exec sleep 60'], None)
    p = sup.started
    assert p is not None and p.stdin is not None and sup.input is not None
    p.stdin.write(sup.input)
    p.stdin.flush()
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert p.poll() is None and time.monotonic() < deadline, "the supervised command did not start"
        time.sleep(0.05)
    child = int(pidfile.read_text())
    p.stdin.close()  # what qrmfs's death does to the agent's stdin
    assert p.wait(timeout=20) == P.STOPPED
    assert not _alive(child)


def test_a_death_by_signal_is_reported_not_silent(side: StorageSide, root: Path) -> None:
    """A command killed at once (the OOM killer, a crash) ends with 128 + N and a line that names the signal,
    where its ssh session would otherwise end with 255 and nothing on stderr (bench/results/history.md,
    Investigations)."""
    argv, payload, _started = side.supervised(str(root / "img1"), ["sh", "-c", "kill -KILL $$"], None)
    r = Runner().stream(argv, lambda _l: None, ok=range(256), input=payload)
    assert r.code == 128 + 9
    assert "sh on " in r.stderr and "was killed by signal SIGKILL" in r.stderr


def test_command_stops_when_qrmfs_is_gone(side: StorageSide, root: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    p = _start(side, root, None, pidfile)
    child = int(pidfile.read_text())
    assert _alive(child)
    assert p.stdin is not None
    p.stdin.close()  # what the OS does when qrmfs dies, however it dies
    assert p.wait(timeout=20) == P.STOPPED
    assert not _alive(child)
    assert b"stopped sh: qrmfs is gone" in p.stderr.read()  # type: ignore[union-attr]


def test_command_stops_when_the_lock_is_lost(side: StorageSide, root: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with side.lock(str(root / "img1"), HOLDER):
        p = _start(side, root, HOLDER, pidfile)
        child = int(pidfile.read_text())
        assert p.poll() is None and _alive(child)
    # the lock's session ended while the command still ran: it must not go on without the lock
    assert p.wait(timeout=20) == P.STOPPED
    assert not _alive(child)
    assert b"was lost" in p.stderr.read()  # type: ignore[union-attr]


def test_command_is_not_started_without_the_lock(side: StorageSide, root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    argv, payload, _started = side.supervised(str(root / "img1"), ["touch", str(marker)], HOLDER)
    with side.lock(str(root / "img1"), "someone else pid 2 (create img1)"):
        r = Runner().stream(argv, lambda _l: None, ok=range(256), input=payload)
    assert r.code == P.STOPPED and "not held by this operation" in r.stderr
    assert not marker.exists()


# --- a tar stream's two ends: argv's stdout feeds pipe_to ---------------------------------------------------

def test_pipeline_feeds_the_second_command_and_reports_both_codes(side: StorageSide, root: Path,
                                                                  tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x" * 5000)
    dest = root / ".img1.qrmfs-staging-1"
    dest.mkdir()
    argv, payload, _started = side.supervised(str(root / "img1"), ["tar", "-cf", "-", "-C", str(src), "."], None,
                                    pipe_to=["tar", "-xf", "-", "--totals", "-C", str(dest)])
    r = Runner().stream(argv, lambda _l: None, ok=range(256), input=payload)
    assert r.code == 0 and r.stdout.strip() == '{"pipeline": [0, 0]}'
    assert (dest / "d" / "f").read_bytes() == b"x" * 5000
    assert "Total bytes read: 10240" in r.stderr  # header blocks + data, as the extracting end counted


def test_pipeline_codes_of_each_end_and_the_larger_as_exit(side: StorageSide, root: Path) -> None:
    argv, payload, _started = side.supervised(str(root / "img1"), ["sh", "-c", "echo data; exit 1"], None,
                                    pipe_to=["sh", "-c", "cat >/dev/null; exit 2"])
    r = Runner().stream(argv, lambda _l: None, ok=range(256), input=payload)
    assert (r.code, r.stdout.strip()) == (2, '{"pipeline": [1, 2]}')


def test_pipeline_both_ends_stop_when_the_lock_is_lost(side: StorageSide, root: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    argv, payload, _started = side.supervised(
        str(root / "img1"), ["sh", "-c", f"echo $$ > {first}; exec sleep 60"], HOLDER,
        pipe_to=["sh", "-c", f"echo $$ > {second}; exec sleep 60"])
    with side.lock(str(root / "img1"), HOLDER):
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdin is not None
        p.stdin.write(payload)
        p.stdin.flush()
        deadline = time.monotonic() + 10
        while not all(f.exists() and f.read_text().strip() for f in (first, second)):
            assert p.poll() is None and time.monotonic() < deadline, "the pipeline did not start"
            time.sleep(0.05)
        pids = [int(f.read_text()) for f in (first, second)]
        assert all(_alive(c) for c in pids)
    assert p.wait(timeout=20) == P.STOPPED
    assert not any(_alive(c) for c in pids)
    assert b"was lost" in p.stderr.read()  # type: ignore[union-attr]


# --- clone on the same server: staging beside the new image, entries of the original ------------------------

def test_stage_copy_lists_the_originals_entries_and_probes_reflinks(side: StorageSide, root: Path) -> None:
    orig = root / "orig"
    (orig / ".qrmfs").mkdir(parents=True)
    (orig / ".qrmfs" / "manifest.json").write_text("{}")
    for e in ("etc", "usr", "-odd"):
        (orig / e).mkdir()
    up = side.stage_copy(str(root / "new"), "tok1", str(orig), str(root))
    assert up.staging == str(root / ".new.qrmfs-staging-tok1") and Path(up.staging).is_dir()
    assert up.entries == ["-odd", "etc", "usr"] and up.known_hosts is None
    assert isinstance(up.reflink, bool) and os.listdir(up.staging) == []  # the probe's files are gone


def test_stage_copy_refuses_an_origin_that_is_no_image_or_outside_its_export(side: StorageSide, root: Path,
                                                                             tmp_path: Path) -> None:
    (root / "plain").mkdir()
    with pytest.raises(RefusedError, match="no qrmfs manifest"):
        side.stage_copy(str(root / "new"), "tok2", str(root / "plain"), str(root))
    with pytest.raises(QrmfsError):
        side.stage_copy(str(root / "new"), "tok3", str(tmp_path), str(root))


def test_a_warm_agent_that_ended_while_it_waited_is_not_handed_over(side: StorageSide, root: Path) -> None:
    """A warm agent whose connection failed while it waited: the command gets an agent started then."""
    side.warm()
    p = side.warm_agents[False].process
    assert p.stdin is not None
    p.stdin.close()  # it reads end of file where its request would be, and exits
    p.wait(timeout=10)
    sup = side.supervised(str(root / "img1"), ["sh", "-c", "echo fresh"], None)
    assert sup.started is None
    r = Runner().stream(sup.argv, lambda _l: None, ok=range(256), input=sup.input)
    assert (r.code, r.stdout.strip()) == (0, "fresh")


def test_a_command_gone_before_it_read_its_input_is_judged_by_its_exit_not_a_broken_pipe() -> None:
    """Its stdin broken (it ended at once, as an ssh that cannot connect does): the result says how it ended."""
    r = Runner().stream(["sh", "-c", "exec 0<&-; echo gone >&2; exit 255"], lambda _l: None, ok=range(256),
                        input=b"x" * (1 << 20))
    assert (r.code, r.stderr.strip()) == (255, "gone")


def test_the_agent_wakes_when_any_of_its_commands_ends_not_at_its_next_check() -> None:
    """A pipeline's second end that exits first wakes the agent (a pidfd per running child): it neither waits
    for the first end's timeout nor polls. _wait says None while one end still runs, both codes after."""
    first = subprocess.Popen(["sleep", "60"], start_new_session=True)
    second = subprocess.Popen(["true"], start_new_session=True)
    try:
        t0 = time.monotonic()
        supervise._until_one_ends([first, second], timeout=30)
        assert time.monotonic() - t0 < 10, "the agent slept through its second command's end"
        assert second.poll() == 0 and first.poll() is None
        assert supervise._wait([first, second]) is None
    finally:
        first.kill()
    first.wait(timeout=10)
    assert supervise._wait([first, second]) == [-9, 0]


def test_without_pidfds_the_agent_still_sees_its_command_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """An older kernel (pidfd_open fails): Popen's own wait, on the first running child."""
    def no_pidfd(_pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(supervise.os, "pidfd_open", no_pidfd)
    p = subprocess.Popen(["sh", "-c", "exit 7"])
    t0 = time.monotonic()
    supervise._until_one_ends([p], timeout=30)
    assert time.monotonic() - t0 < 10
    assert supervise._wait([p]) == [7]
