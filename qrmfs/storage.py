"""The storage server as qrmfs sees it: agent operations on the image tree, run where the image lives.

The agent modules (qrmfs/agent, standard library only) travel on stdin to `python3 -c BOOTSTRAP` over
ssh, or run locally with this interpreter for a `local` storage server. They travel once per run: one agent
session (`serve`) answers every call of the run, one JSON line each, over the run's one ssh master
connection. Only a supervised command (`run`, which streams) gets an agent of its own.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Concatenate, Generic, NamedTuple, ParamSpec, TypeVar, cast, overload

from . import argv as A
from .agent import protocol as P
from .agent.protocol import ErrorKind
from .config import Storage
from .errors import (
    ConnectError,
    ExistsError,
    LockedError,
    NotFoundError,
    QrmfsError,
    RefusedError,
    StorageError,
    signals_deferred,
)
from .pending import Pending
from .runner import CommandFailed, Runner, stop, tail

AGENT_MODULES = ("fsutil", "manifest", "protocol", "steps", "tree", "holds", "gens", "supervise", "exports",
                 "main")
# The -c program is tiny and fixed; the loader (agent/loader.py) and the agent modules come on stdin (first JSON
# line, with the modules' digest: the loader keeps their compiled code in the storage server's cache by it).
BOOTSTRAP = 'import sys,json;r=json.loads(sys.stdin.readline());exec(r["loader"])'
ERRORS: dict[ErrorKind, type[QrmfsError]] = {
    ErrorKind.LOCKED: LockedError, ErrorKind.EXISTS: ExistsError, ErrorKind.NOT_FOUND: NotFoundError,
    ErrorKind.REFUSED: RefusedError, ErrorKind.NOT_IMAGE: RefusedError, ErrorKind.OS: StorageError,
    ErrorKind.BAD_REQUEST: StorageError}
T = TypeVar("T")
Ps = ParamSpec("Ps")


class Supervised(NamedTuple):
    """A command under the storage-side agent's supervision: the argv that starts its agent, the agent's stdin,
    and the agent itself when warm() started it (then argv is what it was started with). A command run as it is
    (here, or on a local storage server) is Supervised(argv), with no agent and nothing on its stdin."""
    argv: Sequence[str]
    input: bytes | None = None
    started: subprocess.Popen[bytes] | None = None


@functools.cache
def _agent_sources() -> list[tuple[str, str]]:
    pkg = resources.files("qrmfs.agent")
    return [(f"qrmfs.agent.{m}", (pkg / f"{m}.py").read_text()) for m in AGENT_MODULES]


@functools.cache
def _loader() -> str:
    return (resources.files("qrmfs.agent") / "loader.py").read_text() + "\nsys.exit(load(r))\n"


@functools.cache
def _sources_key() -> str:
    """The digest the storage-side loader names its cache file by (agent/loader.py)."""
    return hashlib.sha256(json.dumps(_agent_sources()).encode()).hexdigest()[:32]


def _request_line(req: P.Request[Any]) -> str:
    """One request as the agent reads it: a JSON line of its op and arguments."""
    return json.dumps({"op": req.op, "args": P.encode(req)}) + "\n"


def _write(p: subprocess.Popen[bytes], data: bytes) -> None:
    """Write to the agent's stdin; a closed pipe shows as the missing answer that follows."""
    assert p.stdin is not None
    try:
        p.stdin.write(data)
        p.stdin.flush()
    except (BrokenPipeError, ValueError):
        pass


@dataclass
class _Answers:
    """An agent session's requests waiting for their answers (each a slot the reader fills), oldest first."""
    waiting: deque[list[str]] = field(default_factory=deque)
    ended: bool = False


def node_init_script() -> str:
    return (resources.files("qrmfs") / "data" / "qrmfs-init").read_text()


class Op(Generic[Ps, T]):
    """StorageSide's typed method for an agent operation whose request begins (path, export_root, ...): called
    with the path and the request's other fields, the export root is the side's own."""

    def __init__(self, request: Callable[Concatenate[str, str, Ps], P.Request[T]]) -> None:
        self.request = request
        self.op = cast("type[P.Request[T]]", request).op  # its type as a Callable hides that it is a class
        self.__doc__ = request.__doc__

    @overload
    def __get__(self, side: None, owner: type) -> Op[Ps, T]: ...
    @overload
    def __get__(self, side: StorageSide, owner: type) -> Callable[Concatenate[str, Ps], T]: ...

    def __get__(self, side: StorageSide | None, owner: type) -> Any:
        return self if side is None else functools.partial(self, side)

    def __call__(self, side: StorageSide, path: str, /, *args: Ps.args, **kwargs: Ps.kwargs) -> T:
        return side._call(self.request(path, side.root, *args, **kwargs))


class StorageSide:
    def __init__(self, storage: Storage, runner: Runner, *, identity: str | None = None,
                 known_hosts: str | None = None, agent_sock: str | None = None,
                 share: StorageSide | None = None) -> None:
        """agent_sock: where this run's own ssh-agent listens. The master connection then forwards it, so a
        copy's `ssh -A` shares the connection too.
        share: the side of another storage server on the same ssh server (another export of one machine): this
        one uses its agent session and connection, not one of its own (every request names its export root)."""
        self._primary: StorageSide = share._primary if share is not None else self
        self.storage, self.runner = storage, runner
        self.identity, self.known_hosts, self.agent_sock = identity, known_hosts, agent_sock
        self._control: str | None = None
        self._session: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._session_err: list[bytes] = []
        self._threads: list[threading.Thread] = []  # the session's stderr reader, first writer, answer reader
        self._answers = _Answers()  # the session's requests sent and not answered yet, in order
        self._serve: list[str] = []  # the session's first answer (it is up), filled by its answer reader
        # the session's state; the answer reader thread fills answers under it and notifies the waiting callers
        self._io = threading.Condition()
        self._at_exit = False
        self._warm: dict[bool, tuple[subprocess.Popen[bytes], threading.Thread, tuple[str, ...]]] = {}
        self._locks: set[str] = set()  # the images whose lock the session holds
        self._lost: str | None = None  # the session that held a lock ended: why (nothing more is sent then)

    # --- this run's agent session (and, over ssh, its one connection) --------------------------------------

    def connect(self) -> None:
        """Start this run's agent session now, without waiting for it: its ssh handshake and start overlap
        whatever the caller does next (reading the source's mounts). The first call waits for its answer."""
        if self._primary is not self:
            return self._primary.connect()
        with self._io:
            if self._session is None:
                self._spawn()

    def _spawn(self) -> None:
        """Over ssh, the session's own ssh is the run's master connection: every later ssh to this server (a
        supervised rsync, a shell command) shares it, and none pays a handshake of its own. Its stdin gets the
        agent's modules once, from a thread (the pipe may fill before ssh has connected)."""
        remote = self._agent_remote()
        if self.local:
            argv = remote
        else:
            self._drop_control()
            self._control = os.path.join(tempfile.mkdtemp(prefix="qrmfs-ssh-"), "m")
            argv = A.ssh_master_argv(self.storage.ssh, self._control, identity=self.identity,
                                     known_hosts=self.known_hosts, remote=remote,
                                     forward_agent=self.agent_sock is not None)
        runner = self.runner.with_env({"SSH_AUTH_SOCK": self.agent_sock}) if self.agent_sock else self.runner
        p = runner.popen(argv)  # from this thread: its PR_SET_PDEATHSIG follows the thread that forks
        assert p.stdin is not None and p.stdout is not None and p.stderr is not None
        err: list[bytes] = []
        payload = self._payload(P.Serve()).encode()
        answers, self._serve = _Answers(), []
        answers.waiting.append(self._serve)
        self._threads = [threading.Thread(target=lambda f=p.stderr: err.append(f.read()), daemon=True),
                         threading.Thread(target=_write, args=(p, payload), daemon=True),
                         threading.Thread(target=self._read_answers, args=(p, answers), daemon=True)]
        for t in self._threads:
            t.start()
        self._session, self._session_err, self._ready, self._answers = p, err, False, answers
        if not self._at_exit:
            atexit.register(self.close)
            self._at_exit = True

    def _live(self) -> subprocess.Popen[bytes]:
        """The session, started and ready (its first answer read). Call with self._io held."""
        if self._session is None:
            self._spawn()
        p = self._session
        assert p is not None
        if not self._ready:
            self._threads[1].join()
            self._wait(p, self._serve, P.Serve())
            self._ready = True
        return p

    def _read_answers(self, p: subprocess.Popen[bytes], answers: _Answers) -> None:
        """The session's answer reader (a thread of its own: a signal raises Interrupted in the main thread
        only, so no signal can fall between reading an answer and handing it to its request): each answer line
        goes to the oldest request waiting, in order. At the session's end, every request still waiting gets
        an empty answer, and so does any sent after it."""
        assert p.stdout is not None
        while True:
            line = p.stdout.readline().decode(errors="replace")
            with self._io:
                if not line.startswith("{"):
                    answers.ended = True
                    for slot in answers.waiting:
                        slot.append(line)
                    answers.waiting.clear()
                    self._io.notify_all()
                    return
                if answers.waiting:  # an answer no request waits for cannot be: it is dropped
                    answers.waiting.popleft().append(line)
                self._io.notify_all()

    def _wait(self, p: subprocess.Popen[bytes], slot: list[str], req: P.Request[Any]) -> str:
        """The answer line of a request sent on session p, waited for (call with self._io held): a signal
        while waiting raises Interrupted here, and the reader still hands the answer to this slot, so the
        answers of later requests stay theirs."""
        while not slot:
            self._io.wait()
        answer = slot[0]
        if answer.startswith("{"):
            return answer
        if self._session is p:  # the first of its waiting requests to see it ended says so
            self._ended(f"its agent session ended (while it waited for the answer to {req.op})")
        try:
            code = p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
        self._threads[0].join(timeout=5)
        stderr = b"".join(self._session_err).decode(errors="replace")
        failed = CommandFailed(("ssh",) if not self.local else ("python3",), code, stderr)
        if (code == 255 and not self.local) or "python3" in stderr:
            raise self.connect_error(failed)
        if self._lost is not None:
            raise StorageError(self._lost, tail(stderr or answer))
        raise StorageError(f"the storage server {self.storage.name} gave no answer to {req.op} (the agent exited "
                           f"with {code})", tail(stderr or answer))

    def _ended(self, why: str) -> None:
        """The session is gone (call with self._io held). A lock it held is gone with it: the side refuses
        every later operation that needs it (a new session would hold no lock), so the run fails there."""
        self._session = None
        if self._locks:
            self._lost = (f"the storage server {self.storage.name} no longer holds the lock on "
                          f"{', '.join(sorted(self._locks))}: {why}")
            self._locks.clear()

    def _refuse_unlocked(self, op: str) -> None:
        """No operation runs on after the lock was lost (but for those that clean up what this run made)."""
        lost = self._primary._lost
        if lost is not None:
            raise StorageError(f"{lost}; {op} is not done without it")

    def _mux(self) -> str | None:
        """The run's connection to share (the session's ssh, waited for if it is starting): None when there is
        no session (a command that needs no agent, as `check` runs them) or it could not connect; the caller's
        ssh then connects itself (and fails with ssh's own message)."""
        if self._primary is not self:
            return self._primary._mux()
        with self._io:
            if self._session is None:
                return None
            try:
                self._live()
            except QrmfsError:
                return None
        return self._control if self._control and os.path.exists(self._control) else None

    def _drop_control(self) -> None:
        if self._control is not None:
            shutil.rmtree(os.path.dirname(self._control), ignore_errors=True)
            self._control = None

    def close(self) -> None:
        """End the session: its stdin closes, the agent exits (giving up what it held), then its ssh."""
        self._end_warm()
        if self._primary is not self:
            return self._primary.close()
        p = self._session
        self._ended("the session was closed")
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

    @property
    def root(self) -> str:
        return self.storage.export_root

    @property
    def local(self) -> bool:
        return self.storage.ssh.is_local

    def argv(self, remote: Sequence[str], forward_agent: bool = False) -> tuple[str, ...]:
        """argv that runs `remote` on the storage server (as is, when the storage server is local)."""
        self._refuse_unlocked(remote[0] if remote else "a command")
        if self.local:
            return tuple(remote)
        # Agent forwarding must come from this process's own agent: through the shared master only when that
        # forwards ours (agent_sock), else on a connection of its own.
        shared = not forward_agent or self.agent_sock is not None
        return A.ssh_argv(self.storage.ssh, remote, identity=self.identity, known_hosts=self.known_hosts,
                          forward_agent=forward_agent, control=self._mux() if shared else None)

    def _payload(self, req: P.Request[Any] | None) -> str:
        """The first line an agent reads: the loader and the modules, with the request; without one (a warm
        agent, see warm()), the request comes as the next line."""
        line: dict[str, Any] = {"loader": _loader(), "modules": _agent_sources(), "key": _sources_key()}
        if req is not None:
            line.update(op=req.op, args=P.encode(req))
        return json.dumps(line) + "\n"

    def _agent_remote(self) -> tuple[str, ...]:
        return A.agent_argv(sys.executable if self.local else "python3", BOOTSTRAP)

    def _agent_argv(self, forward_agent: bool = False) -> tuple[str, ...]:
        return self.argv(self._agent_remote(), forward_agent=forward_agent)

    def _call(self, req: P.Request[T]) -> T:
        return self._begin(req).result()

    def _begin(self, req: P.Request[T]) -> Pending[T]:
        """Send a request now, its answer read when it is joined: the agent works on it while we do something
        else. Answers come in the order of the requests; a call in between reads the
        earlier answers first and keeps them for their callers."""
        if self._primary is not self:
            return self._primary._begin(req)
        with self._io:
            if not req.after_lost_lock:
                self._refuse_unlocked(req.op)
            p = self._live()
            slot: list[str] = []
            with signals_deferred():  # the request is sent and awaited as one step, or neither
                answers = self._answers
                if answers.ended:
                    slot.append("")
                else:
                    answers.waiting.append(slot)
                    _write(p, _request_line(req).encode())

        def answer() -> T:
            with self._io:
                line = self._wait(p, slot, req)
            return req.decode_answer(self._answer(line, "", req))
        return Pending(f"the answer to {req.op}", answer)

    def _answer(self, stdout: str, stderr: str = "", req: P.Request[Any] | None = None) -> Any:
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise StorageError(f"the storage server {self.storage.name} gave no answer", tail(stderr))
        ans = P.Answer.parse(lines[-1])
        if ans.ok:
            return ans.result
        assert ans.kind is not None
        if ans.kind is ErrorKind.LOCKED:
            raise LockedError(f"image {getattr(req, 'path', '')} is locked by another qrmfs operation: {ans.message}")
        raise ERRORS[ans.kind](ans.message)

    # --- the operations, typed; the export root is this server's -------------------------------------------
    # Each is its request's client method (protocol.Request): Op(P.X) for a request of (path, export_root, ...),
    # a method of its own for the others (tests/unit/agent/test_ops.py checks that every operation has one).

    inspect = Op(P.Inspect)
    stage = Op(P.Stage)
    discard = Op(P.Discard)
    write_manifest = Op(P.WriteManifest)
    publish = Op(P.Publish)
    remove = Op(P.Remove)
    manifest_update = Op(P.ManifestUpdate)
    stats = Op(P.Stats)
    pin_host = Op(P.PinHost)
    unpin_host = Op(P.UnpinHost)
    prepare = Op(P.Prepare)
    check = Op(P.Check)
    stage_update = Op(P.StageUpdate)
    stage_copy = Op(P.StageCopy)
    publish_update = Op(P.PublishUpdate)
    rollback = Op(P.Rollback)
    generations = Op(P.Generations)
    prune = Op(P.Prune)

    def export(self, path: str, action: str) -> P.Exported:
        """The image's own NFS export, as this server's config says (Storage.exports, not "none")."""
        s = self.storage
        assert s.exports != "none" and s.export_clients is not None, "the caller checks Storage.exports"
        return self._call(P.Export(path, self.root, action, s.exports, s.export_clients, s.exports_table))

    def list(self, leftovers: bool = True) -> P.Listed:
        return self._call(P.List(self.root, leftovers=leftovers))

    def start_check(self, path: str, options: P.Options) -> Pending[P.Checked]:
        """check, started now, its findings read when joined."""
        return self._begin(P.Check(path, self.root, options))

    def rebase(self, path: str, staging: str, prepared: Iterable[str], only: Iterable[str] | None = None
               ) -> P.Rebased:
        return self._call(P.Rebase(path, self.root, staging, sorted(prepared), None if only is None else sorted(only)))

    def start_rebase_scan(self, path: str, staging: str) -> Pending[P.RebaseScanned]:
        """rebase_scan, started now (it runs while rsync does), its paths read when joined."""
        return self._begin(P.RebaseScan(path, self.root, staging))

    def supervised(self, path: str, argv: Sequence[str], holder: str | None,
                   forward_agent: bool = False, pipe_to: Sequence[str] | None = None) -> Supervised:
        """argv and stdin that run `argv` on the storage server under the agent's `run`: it stops the command
        when our stdin to it closes (we ended, or died), and, with a holder, when the image's lock is lost.
        Keep stdin open for as long as the command should run (Runner.stream does). pipe_to: a second command
        reading argv's stdout (protocol Run). With a warm agent of the same forward_agent (warm()), `started`
        is that agent, and stdin is the request line alone."""
        self._refuse_unlocked(P.Run.op)
        run = P.Run(path, self.root, list(argv), holder, None if pipe_to is None else list(pipe_to))
        warm = self._warm.pop(forward_agent, None)
        if warm is not None and warm[0].poll() is not None:  # it ended while it waited: start one now
            warm[1].join(timeout=5)
            warm = None
        if warm is not None:
            p, writer, started_as = warm
            writer.join()  # the modules' line is through: the request follows it
            return Supervised(started_as, _request_line(run).encode(), p)
        return Supervised(self._agent_argv(forward_agent), self._payload(run).encode())

    def warm(self, forward_agent: bool = False) -> None:
        """Start the agent of this run's next supervised command now: its ssh channel, python3 and the agent's
        modules are ready by the time the command is known (they cost about 0.08 s on the lab's storage server,
        on the run's critical path when started then). supervised() with the same forward_agent takes it; one
        not taken ends with the session (its stdin closes before it has read a request: it exits, having done
        nothing). Call it once the session is up (argv() waits for the connection it shares)."""
        if forward_agent in self._warm or (forward_agent and self.agent_sock is None and not self.local):
            return  # forwarding from the caller's own agent takes a connection of its own: not started early
        argv = self._agent_argv(forward_agent)
        runner = self.runner.with_env({"SSH_AUTH_SOCK": self.agent_sock}) if self.agent_sock else self.runner
        p = runner.popen(argv)  # from the caller's thread: PR_SET_PDEATHSIG follows the thread that forks
        writer = threading.Thread(target=_write, args=(p, self._payload(None).encode()), daemon=True)
        writer.start()
        self._warm[forward_agent] = (p, writer, argv)
        if not self._at_exit:
            atexit.register(self.close)
            self._at_exit = True

    def _end_warm(self) -> None:
        """Agents warm() started that no command took: their stdin closes, they exit."""
        for p, writer, _argv in self._warm.values():
            writer.join(timeout=5)
            stop(p, grace=5.0)
        self._warm.clear()

    def connect_error(self, e: CommandFailed) -> QrmfsError:
        if e.code == 255 and not self.local:
            return ConnectError(f"cannot reach storage server {self.storage.name} "
                                f"({self.storage.ssh.dest} port {self.storage.ssh.port}) over ssh", tail(e.stderr))
        if "python3" in e.stderr and ("not found" in e.stderr or "No such file" in e.stderr):
            return StorageError(f"python3 is needed on storage server {self.storage.name}", tail(e.stderr))
        return StorageError(f"storage server {self.storage.name}: {e.message}", e.detail)

    @contextmanager
    def lock(self, path: str, holder: str) -> Iterator[P.Locked]:
        """Hold the image's lock for the block: this run's agent session keeps a flock until `unlock`, or until
        the session ends (its stdin closes when qrmfs ends, however it ends), so a qrmfs that dies cannot leave
        a stale lock behind."""
        locked = self._call(P.Lock(path, self.root, holder))
        self._primary._locks.add(path)
        try:
            yield locked
        except BaseException:
            try:
                self._unlock(path)
            except QrmfsError:
                pass  # the block's own error is the one to see (a lost lock failed it, or went with it)
            raise
        self._unlock(path)  # raises when the session died: the block's end was not seen under the lock

    def _unlock(self, path: str) -> None:
        try:
            self._call(P.Unlock(path, self.root))
        finally:
            self._primary._locks.discard(path)
