"""One run's agent session on a storage server: its life (started early, ready at its first answer, ended
when the run closes it or when it dies), the run's one ssh master connection that it opens, and the image
locks it holds. One session (`serve`) answers every call of the run, one JSON line each; a session that ends
holding a lock takes the lock with it, and from then on nothing is sent but what cleans up."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from .. import argv as A
from ..agent import protocol as P
from ..config import Storage
from ..errors import ConnectError, QrmfsError, StorageError, signals_deferred
from ..pending import Pending
from ..runner import CommandFailed, Runner, tail
from . import payload
from .answers import Answers


def connect_error(storage: Storage, e: CommandFailed) -> QrmfsError:
    """What a failed start of an agent on the storage server means: it cannot be reached, or lacks python3."""
    local = storage.ssh.is_local
    if e.code == 255 and not local:
        return ConnectError(f"cannot reach storage server {storage.name} "
                            f"({storage.ssh.dest} port {storage.ssh.port}) over ssh", tail(e.stderr))
    if "python3" in e.stderr and ("not found" in e.stderr or "No such file" in e.stderr):
        return StorageError(f"python3 is needed on storage server {storage.name}", tail(e.stderr))
    return StorageError(f"storage server {storage.name}: {e.message}", e.detail)


class Session:
    def __init__(self, storage: Storage, runner: Runner, *, identity: str | None, known_hosts: str | None,
                 agent_sock: str | None, on_start: Callable[[], None]) -> None:
        """on_start: called at each start (the side registers its close at exit)."""
        self.storage, self.runner = storage, runner
        self.identity, self.known_hosts, self.agent_sock = identity, known_hosts, agent_sock
        self.on_start = on_start
        self.control: str | None = None  # the master connection's socket (over ssh)
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = False
        self._err: list[bytes] = []
        self._threads: list[threading.Thread] = []  # the session's stderr reader, first writer, answer reader
        # the session's state; the answer reader thread fills answers under it and notifies the waiting callers
        self.io = threading.Condition()
        self.answers = Answers(self.io)  # the session's requests sent and not answered yet, in order
        self._serve: list[str] = []  # the session's first answer (it is up), filled by its answer reader
        self.locks: set[str] = set()  # the images whose lock the session holds
        self.lost: str | None = None  # the session that held a lock ended: why (nothing more is sent then)

    @property
    def local(self) -> bool:
        return self.storage.ssh.is_local

    def start(self) -> None:
        """Start the session now, without waiting for it (its first call waits for its answer)."""
        with self.io:
            if self.process is None:
                self._spawn()

    def _spawn(self) -> None:
        """Over ssh, the session's own ssh is the run's master connection: every later ssh to this server (a
        supervised rsync, a shell command) shares it, and none pays a handshake of its own. Its stdin gets the
        agent's modules once, from a thread (the pipe may fill before ssh has connected)."""
        remote = payload.agent_remote(self.local)
        if self.local:
            argv = remote
        else:
            self._drop_control()
            self.control = os.path.join(tempfile.mkdtemp(prefix="qrmfs-ssh-"), "m")
            argv = A.ssh_master_argv(self.storage.ssh, self.control, identity=self.identity,
                                     known_hosts=self.known_hosts, remote=remote,
                                     forward_agent=self.agent_sock is not None)
        runner = self.runner.with_env({"SSH_AUTH_SOCK": self.agent_sock}) if self.agent_sock else self.runner
        p = runner.popen(argv)  # from this thread: its PR_SET_PDEATHSIG follows the thread that forks
        assert p.stdin is not None and p.stdout is not None and p.stderr is not None
        err: list[bytes] = []
        first = payload.payload(P.Serve()).encode()
        answers = Answers(self.io)
        self._serve = answers.expect()
        self._threads = [threading.Thread(target=lambda f=p.stderr: err.append(f.read()), daemon=True),
                         threading.Thread(target=payload.write, args=(p, first), daemon=True),
                         threading.Thread(target=answers.read, args=(p,), daemon=True)]
        for t in self._threads:
            t.start()
        self.process, self._err, self.ready, self.answers = p, err, False, answers
        self.on_start()

    def live(self) -> subprocess.Popen[bytes]:
        """The session, started and ready (its first answer read). Call with self.io held."""
        if self.process is None:
            self._spawn()
        p = self.process
        assert p is not None
        if not self.ready:
            self._threads[1].join()
            self._wait(p, self._serve, P.Serve())
            self.ready = True
        return p

    def send(self, req: P.Request[Any]) -> Pending[str]:
        """Send a request now; joined, the answer's line. Answers come in the order of the requests; a call in
        between reads the earlier answers first and keeps them for their callers."""
        with self.io:
            if not req.after_lost_lock:
                self.refuse_unlocked(req.op)
            p = self.live()
            with signals_deferred():  # the request is sent and awaited as one step, or neither
                slot = self.answers.expect()
                if not slot:  # the session has not ended: the request goes to it
                    payload.write(p, payload.request_line(req).encode())

        def answer() -> str:
            with self.io:
                return self._wait(p, slot, req)
        return Pending(f"the answer to {req.op}", answer)

    def _wait(self, p: subprocess.Popen[bytes], slot: list[str], req: P.Request[Any]) -> str:
        """The answer line of a request sent on session p (call with self.io held), or the error of the
        session's end."""
        answer = self.answers.wait(slot)
        if answer.startswith("{"):
            return answer
        if self.process is p:  # the first of its waiting requests to see it ended says so
            self.ended(f"its agent session ended (while it waited for the answer to {req.op})")
        try:
            code = p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
        self._threads[0].join(timeout=5)
        stderr = b"".join(self._err).decode(errors="replace")
        failed = CommandFailed(("ssh",) if not self.local else ("python3",), code, stderr)
        if (code == 255 and not self.local) or "python3" in stderr:
            raise connect_error(self.storage, failed)
        if self.lost is not None:
            raise StorageError(self.lost, tail(stderr or answer))
        raise StorageError(f"the storage server {self.storage.name} gave no answer to {req.op} (the agent exited "
                           f"with {code})", tail(stderr or answer))

    def ended(self, why: str) -> None:
        """The session is gone (call with self.io held). A lock it held is gone with it: every later operation
        that needs it is refused (a new session would hold no lock), so the run fails there."""
        self.process = None
        if self.locks:
            self.lost = (f"the storage server {self.storage.name} no longer holds the lock on "
                         f"{', '.join(sorted(self.locks))}: {why}")
            self.locks.clear()

    def refuse_unlocked(self, op: str) -> None:
        """No operation runs on after the lock was lost (but for those that clean up what this run made)."""
        if self.lost is not None:
            raise StorageError(f"{self.lost}; {op} is not done without it")

    def mux(self) -> str | None:
        """The run's connection to share (the session's ssh, waited for if it is starting): None when there is
        no session (a command that needs no agent, as `check` runs them) or it could not connect; the caller's
        ssh then connects itself (and fails with ssh's own message)."""
        with self.io:
            if self.process is None:
                return None
            try:
                self.live()
            except QrmfsError:
                return None
        return self.control if self.control and os.path.exists(self.control) else None

    def _drop_control(self) -> None:
        if self.control is not None:
            shutil.rmtree(os.path.dirname(self.control), ignore_errors=True)
            self.control = None

    def close(self) -> None:
        """End the session: its stdin closes, the agent exits (giving up what it held), then its ssh."""
        p = self.process
        self.ended("the session was closed")
        if p is not None:
            if p.stdin is not None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for t in self._threads:
                t.join(timeout=5)
        self._drop_control()

