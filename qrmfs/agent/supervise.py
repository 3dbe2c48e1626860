"""The agent's `run`: a storage-side command (the copy's rsync) that cannot outlive qrmfs or its lock.

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
import os
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


def _stop(child: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
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
    tree._check_under(req.path, req.export_root)
    lock = tree.siblings(req.path).lock
    if req.holder is not None and not holds(lock, req.holder):
        _say(f"not starting {req.argv[0]}: the lock of {req.path} is not held by this operation")
        return P.STOPPED
    gone = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        gone.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    child = subprocess.Popen(req.argv, stdin=subprocess.DEVNULL, start_new_session=True)
    while True:
        try:
            return _ended(req.argv[0], child.wait(timeout=POLL))
        except subprocess.TimeoutExpired:
            pass
        why = ("qrmfs is gone (its connection closed)" if gone.is_set() else
               f"the lock of {req.path} was lost" if req.holder is not None and not holds(lock, req.holder) else
               None)
        if why:
            _stop(child)
            _say(f"stopped {req.argv[0]}: {why}")
            return P.STOPPED
