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
from typing import Any

from . import argv as A
from .config import Storage
from .errors import ConnectError, ExistsError, LockedError, NotFoundError, QrmfsError, RefusedError, StorageError
from .runner import CommandFailed, Result, Runner, tail

AGENT_MODULES = ("fsutil", "steps", "tree", "main")
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
ERRORS: dict[str, type[QrmfsError]] = {"locked": LockedError, "exists": ExistsError, "not_found": NotFoundError,
                                       "refused": RefusedError, "not_image": RefusedError}


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
    def local(self) -> bool:
        return self.storage.ssh.is_local

    def argv(self, remote: Sequence[str], forward_agent: bool = False) -> tuple[str, ...]:
        """argv that runs `remote` on the storage server (as is, when the storage server is local)."""
        if self.local:
            return tuple(remote)
        # Agent forwarding must come from this process's own agent: never through the shared master.
        return A.ssh_argv(self.storage.ssh, remote, identity=self.identity, known_hosts=self.known_hosts,
                          forward_agent=forward_agent, control=None if forward_agent else self._mux())

    def _payload(self, op: str, args: dict[str, Any]) -> str:
        if self._sources is None:
            self._sources = _agent_sources()
        return json.dumps({"loader": LOADER, "modules": self._sources, "op": op, "args": args}) + "\n"

    def _agent_argv(self) -> tuple[str, ...]:
        return self.argv(A.agent_argv(sys.executable if self.local else "python3", BOOTSTRAP))

    def call(self, op: str, **args: Any) -> Any:
        try:
            r = self.runner.run(self._agent_argv(), input=self._payload(op, args), ok=(0, 3))
        except CommandFailed as e:
            raise self.connect_error(e) from None
        return self._answer(r.stdout, r)

    def _answer(self, stdout: str, r: Result | None = None) -> Any:
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise StorageError(f"the storage server {self.storage.name} gave no answer",
                               tail(r.stderr) if r else "")
        ans = json.loads(lines[-1])
        if ans["ok"]:
            return ans["result"]
        err = ans["error"]
        raise ERRORS.get(err["kind"], StorageError)(err["message"])

    def connect_error(self, e: CommandFailed) -> QrmfsError:
        if e.code == 255 and not self.local:
            return ConnectError(f"cannot reach storage server {self.storage.name} "
                                f"({self.storage.ssh.dest} port {self.storage.ssh.port}) over ssh", tail(e.stderr))
        if "python3" in e.stderr and ("not found" in e.stderr or "No such file" in e.stderr):
            return StorageError(f"python3 is needed on storage server {self.storage.name}", tail(e.stderr))
        return StorageError(f"storage server {self.storage.name}: {e.message}", e.detail)

    @contextmanager
    def lock(self, path: str, holder: str) -> Iterator[str]:
        """Hold the image's lock for the block: a helper process on the storage side keeps a flock until
        its stdin closes, so a qrmfs that dies cannot leave a stale lock behind."""
        p = self.runner.popen(self._agent_argv())
        assert p.stdin is not None and p.stdout is not None
        try:
            p.stdin.write(self._payload("lock", {"path": path, "export_root": self.storage.export_root,
                                                 "holder": holder}).encode())
            p.stdin.flush()
            first = p.stdout.readline().decode()
        except BrokenPipeError:
            first = ""
        if not first:
            p.wait()
            err = p.stderr.read().decode(errors="replace") if p.stderr else ""
            raise self.connect_error(CommandFailed(self._agent_argv()[:1], p.returncode, err))
        try:
            ans = json.loads(first)
        except ValueError:
            p.kill()
            raise StorageError(f"storage server {self.storage.name}: bad lock answer: {first[:200]}") from None
        if not ans["ok"]:
            p.wait()
            err = ans["error"]
            if err["kind"] == "locked":
                raise LockedError(f"image {path} is locked by another qrmfs operation: {err['message']}")
            raise ERRORS.get(err["kind"], StorageError)(err["message"])
        try:
            yield ans["result"]["lock"]
        finally:
            try:
                p.stdin.close()
            except BrokenPipeError:
                pass
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
