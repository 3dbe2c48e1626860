"""The agent's `run`: a storage-side command (the copy's rsync, or a tar stream's two ends) that cannot outlive
qrmfs or its lock.

The command runs as the agent's child in a session of its own, writing straight to the agent's stdout and
stderr (so rsync's progress and --stats reach qrmfs as they are). The agent watches two things while it runs:
- its stdin: qrmfs keeps it open for as long as it wants the command; end of file means qrmfs ended, was
  killed, or lost its connection;
- the image's lock, when a holder is given: the lock file must stay locked, by that holder.
When either goes, the whole process group of the command is stopped (SIGTERM, then SIGKILL) before the agent
exits, so nothing of ours keeps writing into a staging directory nobody owns any more.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading

from . import protocol as P
from . import tree

POLL = 0.5  # seconds between checks of the lock


def holds(lock: str, holder: str) -> bool:
    """The lock file is locked, and by `holder` (its first line names the holder)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False  # nobody holds it
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode(errors="replace").startswith(holder + " since ")
    finally:
        os.close(fd)


def _say(text: str) -> None:
    print(f"qrmfs agent: {text}", file=sys.stderr, flush=True)


def _stop(*children: subprocess.Popen[bytes]) -> None:
    """Stop the process group of each child (each leads its own): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for c in children:
            try:
                os.killpg(c.pid, sig)
            except ProcessLookupError:
                pass
        try:
            for c in children:
                c.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _ended(name: str, code: int) -> int:
    """The command's exit code as a shell gives it (128 + N for a death by signal N), and a line that says so:
    without it, a command killed at once (the OOM killer, a crash) ends its ssh session silently."""
    if code >= 0:
        return code
    sig = -code
    try:
        what = signal.Signals(sig).name
    except ValueError:
        what = str(sig)
    _say(f"{name} on {socket.gethostname()} was killed by signal {what}"
         + (" (the kernel's OOM killer sends this when memory runs out)" if sig == signal.SIGKILL else ""))
    return 128 + sig


def run(req: P.Run) -> int:
    tree.check_under(req.path, req.export_root)
    lock = tree.siblings(req.path).lock
    if req.holder is not None and not holds(lock, req.holder):
        _say(f"not starting {req.argv[0]}: the lock of {req.path} is not held by this operation")
        return P.STOPPED
    gone = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        gone.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    children = _start(req)
    while True:
        codes = _wait(children)
        if codes is not None:
            names = [req.argv[0], *(req.pipe_to[:1] if req.pipe_to else [])]
            ended = [_ended(n, c) for n, c in zip(names, codes, strict=True)]
            if req.pipe_to is None:
                return ended[0]
            print(json.dumps({"pipeline": codes}), flush=True)
            return max(ended)
        why = ("qrmfs is gone (its connection closed)" if gone.is_set() else
               f"the lock of {req.path} was lost" if req.holder is not None and not holds(lock, req.holder) else
               None)
        if why:
            _stop(*children)
            _say(f"stopped {req.argv[0]}: {why}")
            return P.STOPPED


def _start(req: P.Run) -> list[subprocess.Popen[bytes]]:
    """The command, in a session of its own; with pipe_to, the second command, in a session of its own too,
    reads its stdout."""
    if req.pipe_to is None:
        return [subprocess.Popen(req.argv, stdin=subprocess.DEVNULL, start_new_session=True)]
    first = subprocess.Popen(req.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    try:
        second = subprocess.Popen(req.pipe_to, stdin=first.stdout, stdout=sys.stderr.fileno(),
                                  start_new_session=True)
    except BaseException:
        _stop(first)
        raise
    finally:
        assert first.stdout is not None
        first.stdout.close()  # the second command holds the pipe's read end now
    return [first, second]


def _wait(children: list[subprocess.Popen[bytes]]) -> list[int] | None:
    """Every child's exit code once all have ended; None after up to POLL seconds while one still runs."""
    running = [c for c in children if c.poll() is None]
    if running:
        _until_one_ends(running, POLL)
        if any(c.poll() is None for c in running):
            return None
    return [c.returncode for c in children]


def _until_one_ends(running: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait until one of the running children ends, or `timeout`. A pidfd (Linux 5.3) wakes the agent as the
    child ends; Popen.wait(timeout) would poll, 50 ms apart at most: that much later, each supervised command
    would be seen to end, and qrmfs would go on."""
    fds: list[int] = []
    try:
        for c in running:
            fds.append(os.pidfd_open(c.pid))
    except (AttributeError, OSError):  # no pidfd here (an older kernel or Python): Popen's own polling
        for fd in fds:
            os.close(fd)
        try:
            running[0].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        return
    try:
        select.select(fds, [], [], timeout)
    finally:
        for fd in fds:
            os.close(fd)
