"""The storage server as qrmfs sees it: agent operations on the image tree, run where the image lives.

The agent modules (qrmfs/agent, standard library only) travel on stdin to `python3 -c BOOTSTRAP` over
ssh, or run locally with this interpreter for a `local` storage server. Their answer is one JSON line.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any, TypeVar

from . import argv as A
from .agent import protocol as P
from .agent.protocol import ErrorKind
from .config import Storage
from .errors import ConnectError, ExistsError, LockedError, NotFoundError, QrmfsError, RefusedError, StorageError
from .runner import CommandFailed, Runner, tail

AGENT_MODULES = ("fsutil", "protocol", "steps", "tree", "gens", "supervise", "main")
# The -c program is tiny and fixed; the loader and the agent modules come on stdin (first JSON line).
BOOTSTRAP = 'import sys,json;r=json.loads(sys.stdin.readline());exec(r["loader"])'
LOADER = """
import sys, types
for n in ("qrmfs", "qrmfs.agent"):
    m = types.ModuleType(n); m.__path__ = []; sys.modules[n] = m
for n, src in r["modules"]:
    m = types.ModuleType(n); m.__package__ = "qrmfs.agent"; sys.modules[n] = m
    exec(compile(src, n, "exec"), m.__dict__)
sys.exit(sys.modules["qrmfs.agent.main"].run(r["op"], r["args"]))
"""
ERRORS: dict[ErrorKind, type[QrmfsError]] = {
    ErrorKind.LOCKED: LockedError, ErrorKind.EXISTS: ExistsError, ErrorKind.NOT_FOUND: NotFoundError,
    ErrorKind.REFUSED: RefusedError, ErrorKind.NOT_IMAGE: RefusedError, ErrorKind.OS: StorageError,
    ErrorKind.BAD_REQUEST: StorageError}
T = TypeVar("T")


def _agent_sources() -> list[tuple[str, str]]:
    pkg = resources.files("qrmfs.agent")
    return [(f"qrmfs.agent.{m}", (pkg / f"{m}.py").read_text()) for m in AGENT_MODULES]


def node_init_script() -> str:
    return (resources.files("qrmfs") / "data" / "qrmfs-init").read_text()


class StorageSide:
    def __init__(self, storage: Storage, runner: Runner, *, identity: str | None = None,
                 known_hosts: str | None = None) -> None:
        self.storage, self.runner = storage, runner
        self.identity, self.known_hosts = identity, known_hosts
        self._sources: list[tuple[str, str]] | None = None
        self._control: str | None = None
        self._master: subprocess.Popen[bytes] | None = None

    def _mux(self) -> str:
        """One ssh master connection per storage server for this run: every agent call after the first
        skips the ssh handshake. Calls made before the master is up simply connect on their own."""
        if self._control is None:
            d = tempfile.mkdtemp(prefix="qrmfs-ssh-")
            self._control = os.path.join(d, "m")
            self._master = self.runner.popen(
                A.ssh_master_argv(self.storage.ssh, self._control, identity=self.identity,
                                  known_hosts=self.known_hosts),
                stdin=subprocess.DEVNULL, output=subprocess.DEVNULL)
            atexit.register(self.close)
        return self._control

    def close(self) -> None:
        if self._master is not None:
            self._master.terminate()
            try:
                self._master.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._master.kill()
            self._master = None
        if self._control is not None:
            shutil.rmtree(os.path.dirname(self._control), ignore_errors=True)
            self._control = None

    @property
    def root(self) -> str:
        return self.storage.export_root

    @property
    def local(self) -> bool:
        return self.storage.ssh.is_local

    def argv(self, remote: Sequence[str], forward_agent: bool = False) -> tuple[str, ...]:
        """argv that runs `remote` on the storage server (as is, when the storage server is local)."""
        if self.local:
            return tuple(remote)
        # Agent forwarding must come from this process's own agent: never through the shared master.
        return A.ssh_argv(self.storage.ssh, remote, identity=self.identity, known_hosts=self.known_hosts,
                          forward_agent=forward_agent, control=None if forward_agent else self._mux())

    def _payload(self, req: P.Request[Any]) -> str:
        if self._sources is None:
            self._sources = _agent_sources()
        return json.dumps({"loader": LOADER, "modules": self._sources, "op": req.op, "args": P.encode(req)}) + "\n"

    def _agent_argv(self) -> tuple[str, ...]:
        return self.argv(A.agent_argv(sys.executable if self.local else "python3", BOOTSTRAP))

    def _call(self, req: P.Request[T]) -> T:
        try:
            r = self.runner.run(self._agent_argv(), input=self._payload(req), ok=(0, P.FAILED))
        except CommandFailed as e:
            raise self.connect_error(e) from None
        return req.decode_answer(self._answer(r.stdout, r.stderr, req))

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

    def inspect(self, path: str) -> P.Inspected:
        return self._call(P.Inspect(path, self.root))

    def stage(self, path: str, token: str, known_hosts: str | None = None) -> P.Staged:
        return self._call(P.Stage(path, self.root, token, known_hosts))

    def discard(self, path: str, staging: str) -> P.Discarded:
        return self._call(P.Discard(path, self.root, staging))

    def write_manifest(self, path: str, staging: str, manifest: dict[str, Any]) -> P.Written:
        return self._call(P.WriteManifest(path, self.root, staging, manifest))

    def publish(self, path: str, staging: str, force: bool) -> P.Published:
        return self._call(P.Publish(path, self.root, staging, force))

    def remove(self, path: str, force: bool) -> P.Removed:
        return self._call(P.Remove(path, self.root, force))

    def list(self) -> P.Listed:
        return self._call(P.List(self.root))

    def manifest_update(self, path: str, patch: dict[str, Any]) -> P.ManifestUpdated:
        return self._call(P.ManifestUpdate(path, self.root, patch))

    def stats(self, path: str, root: str | None = None) -> P.Counts:
        return self._call(P.Stats(path, self.root, root))

    def pin_host(self, path: str, known_hosts: str) -> P.Pinned:
        return self._call(P.PinHost(path, self.root, known_hosts))

    def unpin_host(self, path: str) -> P.Unpinned:
        return self._call(P.UnpinHost(path, self.root))

    def prepare(self, path: str, options: P.Options, root: str | None = None) -> P.Prepared:
        return self._call(P.Prepare(path, self.root, options, root))

    def check(self, path: str, options: P.Options, root: str | None = None) -> P.Checked:
        return self._call(P.Check(path, self.root, options, root))

    def stage_update(self, path: str, token: str, known_hosts: str | None = None) -> P.StagedUpdate:
        return self._call(P.StageUpdate(path, self.root, token, known_hosts))

    def stage_copy(self, path: str, token: str, origin: str, origin_root: str) -> P.StagedUpdate:
        return self._call(P.StageCopy(path, self.root, token, origin, origin_root))

    def publish_update(self, path: str, staging: str, keep: int) -> P.Swapped:
        return self._call(P.PublishUpdate(path, self.root, staging, keep))

    def rollback(self, path: str, keep: int) -> P.Swapped:
        return self._call(P.Rollback(path, self.root, keep))

    def generations(self, path: str, costs: bool = False) -> P.GenerationList:
        return self._call(P.Generations(path, self.root, costs))

    def supervised(self, path: str, argv: Sequence[str], holder: str | None,
                   forward_agent: bool = False, pipe_to: Sequence[str] | None = None) -> tuple[tuple[str, ...], bytes]:
        """argv and stdin that run `argv` on the storage server under the agent's `run`: it stops the command
        when our stdin to it closes (we ended, or died), and, with a holder, when the image's lock is lost.
        Keep stdin open for as long as the command should run (Runner.stream does). pipe_to: a second command
        reading argv's stdout (protocol Run)."""
        agent = self.argv(A.agent_argv(sys.executable if self.local else "python3", BOOTSTRAP),
                          forward_agent=forward_agent)
        run = P.Run(path, self.root, list(argv), holder, None if pipe_to is None else list(pipe_to))
        return agent, self._payload(run).encode()

    def connect_error(self, e: CommandFailed) -> QrmfsError:
        if e.code == 255 and not self.local:
            return ConnectError(f"cannot reach storage server {self.storage.name} "
                                f"({self.storage.ssh.dest} port {self.storage.ssh.port}) over ssh", tail(e.stderr))
        if "python3" in e.stderr and ("not found" in e.stderr or "No such file" in e.stderr):
            return StorageError(f"python3 is needed on storage server {self.storage.name}", tail(e.stderr))
        return StorageError(f"storage server {self.storage.name}: {e.message}", e.detail)

    @contextmanager
    def lock(self, path: str, holder: str) -> Iterator[P.Locked]:
        """Hold the image's lock for the block: a helper process on the storage side keeps a flock until
        its stdin closes, so a qrmfs that dies cannot leave a stale lock behind."""
        req = P.Lock(path, self.root, holder)
        p = self.runner.popen(self._agent_argv())
        assert p.stdin is not None and p.stdout is not None
        try:
            p.stdin.write(self._payload(req).encode())
            p.stdin.flush()
            first = p.stdout.readline().decode()
        except BrokenPipeError:
            first = ""
        if not first.startswith("{"):
            p.kill() if first else None
            p.wait()
            err = p.stderr.read().decode(errors="replace") if p.stderr else ""
            if first:
                raise StorageError(f"storage server {self.storage.name}: bad lock answer: {first[:200]}")
            raise self.connect_error(CommandFailed(self._agent_argv()[:1], p.returncode, err))
        try:
            locked = req.decode_answer(self._answer(first, req=req))
        except QrmfsError:
            p.wait()
            raise
        try:
            yield locked
        finally:
            try:
                p.stdin.close()
            except BrokenPipeError:
                pass
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
