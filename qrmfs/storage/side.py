"""The storage server as qrmfs sees it: agent operations on the image tree, run where the image lives.

The agent modules (qrmfs/agent, standard library only) travel on stdin to `python3 -c BOOTSTRAP` over
ssh, or run locally with this interpreter for a `local` storage server (payload.py). They travel once per
run: one agent session (session.py) answers every call of the run, one JSON line each, over the run's one
ssh master connection, its answers read in order by a thread (answers.py). Only a supervised command (`run`,
which streams) gets an agent of its own, which may be started before the command is known (warm.py). This
module is the typed layer over them: a method for each operation.
"""

from __future__ import annotations

import atexit
import functools
import subprocess
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Concatenate, Generic, NamedTuple, ParamSpec, TypeVar, cast, overload

from .. import argv as A
from ..agent import protocol as P
from ..agent.protocol import ErrorKind
from ..config import Storage
from ..errors import ExistsError, LockedError, NotFoundError, QrmfsError, RefusedError, StorageError
from ..pending import Pending
from ..runner import CommandFailed, Runner, tail
from . import payload
from .session import Session, connect_error
from .warm import WarmAgents

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
    """A storage server's agent operations, typed, run by this run's agent session (session.Session) on the
    server's export root; and the commands run there (argv, supervised)."""

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
        self._at_exit = False
        self.session: Session = self._primary.session if share is not None else Session(
            storage, runner, identity=identity, known_hosts=known_hosts, agent_sock=agent_sock,
            on_start=self._close_at_exit)
        self.warm_agents = WarmAgents()

    def _close_at_exit(self) -> None:
        if not self._at_exit:
            atexit.register(self.close)
            self._at_exit = True

    def connect(self) -> None:
        """Start this run's agent session now, without waiting for it: its ssh handshake and start overlap
        whatever the caller does next (reading the source's mounts). The first call waits for its answer."""
        self.session.start()

    def close(self) -> None:
        """End the session (and agents started for commands that never came)."""
        self.warm_agents.end()
        if self._primary is not self:
            return self._primary.close()
        self.session.close()

    @property
    def root(self) -> str:
        return self.storage.export_root

    @property
    def local(self) -> bool:
        return self.storage.ssh.is_local

    def argv(self, remote: Sequence[str], forward_agent: bool = False) -> tuple[str, ...]:
        """argv that runs `remote` on the storage server (as is, when the storage server is local)."""
        self.session.refuse_unlocked(remote[0] if remote else "a command")
        if self.local:
            return tuple(remote)
        # Agent forwarding must come from this process's own agent: through the shared master only when that
        # forwards ours (agent_sock), else on a connection of its own.
        shared = not forward_agent or self.agent_sock is not None
        return A.ssh_argv(self.storage.ssh, remote, identity=self.identity, known_hosts=self.known_hosts,
                          forward_agent=forward_agent, control=self.session.mux() if shared else None)

    def _agent_argv(self, forward_agent: bool = False) -> tuple[str, ...]:
        return self.argv(payload.agent_remote(self.local), forward_agent=forward_agent)

    def _call(self, req: P.Request[T]) -> T:
        return self._begin(req).result()

    def _begin(self, req: P.Request[T]) -> Pending[T]:
        """Send a request now, its answer read and decoded when it is joined: the agent works on it while we do
        something else (session.Session.send)."""
        return self.session.send(req).then(req.op, lambda line: req.decode_answer(self._answer(line, "", req)))

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
        self.session.refuse_unlocked(P.Run.op)
        run = P.Run(path, self.root, list(argv), holder, None if pipe_to is None else list(pipe_to))
        warm = self.warm_agents.take(forward_agent)
        if warm is not None:
            return Supervised(warm.argv, payload.request_line(run).encode(), warm.process)
        return Supervised(self._agent_argv(forward_agent), payload.payload(run).encode())

    def warm(self, forward_agent: bool = False) -> None:
        """Start the agent of this run's next supervised command now: its ssh channel, python3 and the agent's
        modules are ready by the time the command is known (they cost about 0.08 s on the lab's storage server,
        on the run's critical path when started then). supervised() with the same forward_agent takes it; one
        not taken ends with the session (its stdin closes before it has read a request: it exits, having done
        nothing). Call it once the session is up (argv() waits for the connection it shares)."""
        if forward_agent in self.warm_agents or (forward_agent and self.agent_sock is None and not self.local):
            return  # forwarding from the caller's own agent takes a connection of its own: not started early
        runner = self.runner.with_env({"SSH_AUTH_SOCK": self.agent_sock}) if self.agent_sock else self.runner
        self.warm_agents.start(forward_agent, self._agent_argv(forward_agent), runner)
        self._close_at_exit()

    def connect_error(self, e: CommandFailed) -> QrmfsError:
        return connect_error(self.storage, e)

    @contextmanager
    def lock(self, path: str, holder: str) -> Iterator[P.Locked]:
        """Hold the image's lock for the block: this run's agent session keeps a flock until `unlock`, or until
        the session ends (its stdin closes when qrmfs ends, however it ends), so a qrmfs that dies cannot leave
        a stale lock behind."""
        locked = self._call(P.Lock(path, self.root, holder))
        self.session.locks.add(path)
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
            self.session.locks.discard(path)
