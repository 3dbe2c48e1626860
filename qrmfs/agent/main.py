"""Dispatch one agent operation: a validated request in, one answer line out (protocol.py's framing)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from . import fsutil, gens, steps, supervise, tree
from . import protocol as P
from .protocol import AgentError, ErrorKind


def _prepare(req: P.Prepare) -> P.Prepared:
    fixed, left, counts = steps.prepare(tree._root_of(req.path, req.root), req.options)
    return P.Prepared(fixed, left, P.Counts(*counts))


def _check(req: P.Check) -> P.Checked:
    return P.Checked([f.record() for f in steps.check(tree._root_of(req.path, req.root), req.options)])


def _fields(fn: Callable[..., Any]) -> Callable[[Any], Any]:
    """A tree operation called with the request's fields as its arguments."""
    return lambda req: fn(**{f.name: getattr(req, f.name) for f in dataclasses.fields(req)})


def _under(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An operation on the image or its staging copy: the image's path is checked against the export root."""
    def run(req: Any) -> Any:
        tree._check_under(req.path, req.export_root)
        return fn(req)
    return run


HANDLERS: dict[type[Any], Callable[[Any], Any]] = {
    P.Inspect: _fields(tree.op_inspect),
    P.Stage: _fields(tree.op_stage),
    P.Discard: _fields(tree.op_discard),
    P.WriteManifest: _fields(tree.op_write_manifest),
    P.Publish: _fields(tree.op_publish),
    P.Remove: _fields(tree.op_remove),
    P.List: _fields(tree.op_list),
    P.ManifestUpdate: _fields(tree.op_manifest_update),
    P.Stats: _fields(tree.op_stats),
    P.PinHost: _fields(tree.op_pin_host),
    P.UnpinHost: _fields(tree.op_unpin_host),
    P.Prepare: _under(_prepare),
    P.Check: _under(_check),
    P.StageUpdate: _fields(gens.op_stage_update),
    P.StageCopy: _fields(gens.op_stage_copy),
    P.PublishUpdate: _fields(gens.op_publish_update),
    P.Rollback: _fields(gens.op_rollback),
    P.Generations: _fields(gens.op_generations),
    P.Rebase: _fields(gens.op_rebase),
    P.RebaseScan: _fields(gens.op_rebase_scan),
}


def _take_lock(req: P.Lock) -> tuple[int, P.Locked]:
    fd, locked = tree.take_lock(req.path, req.export_root, req.holder)
    try:
        gens.recover(req.path)  # a publish a crash interrupted is finished before anything else happens
    except BaseException:
        tree.release_lock(fd, req.path)
        raise
    return fd, locked


def _hold_lock(req: P.Lock) -> int:
    held: list[int] = []

    def take() -> P.Locked:
        fd, locked = _take_lock(req)
        held.append(fd)
        return locked
    line = _answer(take)
    print(line, flush=True)
    if not held:
        return P.FAILED
    sys.stdin.read()  # returns at EOF: our qrmfs is done (or gone); the flock dies with this process
    tree.release_lock(held[0], req.path)
    return 0


class Session:
    """`serve`: one agent per qrmfs run answers one request line after another. The locks it takes are held
    (their fds open) until `unlock` or the end of the session: its stdin closes when qrmfs ends, however it
    ends, and the flocks die with this process, as with a one-shot `lock`."""

    def __init__(self) -> None:
        self.locks: dict[str, int] = {}

    def handle(self, req: Any) -> Any:
        if isinstance(req, P.Lock):
            fd, locked = _take_lock(req)
            self.locks[req.path] = fd
            return locked
        if isinstance(req, P.Unlock):
            if req.path not in self.locks:
                raise AgentError(ErrorKind.NOT_FOUND, f"this session holds no lock on {req.path}")
            tree.release_lock(self.locks.pop(req.path), req.path)
            return P.Unlocked(tree.siblings(req.path).lock)
        if isinstance(req, (P.Run, P.Serve)):
            raise AgentError(ErrorKind.BAD_REQUEST, f"{req.op} cannot run inside a session")
        return HANDLERS[type(req)](req)

    def handle_line(self, line: str) -> Any:
        return self.handle(_request(line))

    def serve(self) -> int:
        print(P.ok_line(P.Serving(os.getpid(), sys.version.split()[0])), flush=True)
        for line in sys.stdin:
            print(_answer(functools.partial(self.handle_line, line)), flush=True)
        for path, fd in list(self.locks.items()):
            tree.release_lock(fd, path)
        return 0


def _request(line: str) -> Any:
    """One request line of a session, validated."""
    try:
        r = json.loads(line)
    except ValueError:
        r = None
    if not isinstance(r, dict):
        raise AgentError(ErrorKind.BAD_REQUEST, "a request line must be a JSON object")
    return P.request(str(r.get("op")), r.get("args"))


def _answer(fn: Callable[[], Any]) -> str:
    """One answer line: the result, or the error as its kind."""
    try:
        return P.ok_line(fn())
    except AgentError as e:
        return P.error_line(e.kind, str(e))
    except (fsutil.Mounted, fsutil.InUse, fsutil.Planted) as e:
        return P.error_line(ErrorKind.REFUSED, str(e))
    except OSError as e:
        return P.error_line(ErrorKind.OS, f"{e.strerror}: {e.filename}")


def run(op: str, args: Any) -> int:
    try:
        req = P.request(op, args)
    except AgentError as e:
        print(P.error_line(e.kind, str(e)), flush=True)
        return P.FAILED
    if isinstance(req, P.Lock):
        return _hold_lock(req)
    if isinstance(req, P.Run):
        return supervise.run(req)
    if isinstance(req, P.Serve):
        return Session().serve()
    line = _answer(lambda: HANDLERS[type(req)](req))
    print(line, flush=True)
    return 0 if line.startswith('{"ok": true') else P.FAILED


if __name__ == "__main__":
    r = json.loads(sys.stdin.readline())
    sys.exit(run(r["op"], r["args"]))
