"""Dispatch one agent operation: a validated request in, one answer line out (protocol.py's framing)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import typing
from collections.abc import Callable
from typing import Any

from . import exports, fsutil, gens, steps, supervise, tree, treediff
from . import protocol as P
from .manifest import ManifestError
from .protocol import AgentError, ErrorKind

REFUSED_IN_PLACE = ("fixing it in place: a running node's root never changes under it. `qrmfs update` makes the "
                    "fixes in a new generation (nodes get it at their next boot); or run validate --fix again once "
                    "the nodes rebooted into another generation or stopped reporting for node_timeout")


def op_prepare(path: str, export_root: str, options: P.Options, root: str | None,
               node_timeout: int = P.NODE_TIMEOUT_DEFAULT) -> P.Prepared:
    tree.check_under(path, export_root)
    target = tree._root_of(path, root)
    if target == path:  # the image in place: never the tree a node runs (a fix makes a new generation: update)
        tree._refuse_running(path, node_timeout, [path], REFUSED_IN_PLACE)
    fixed, left, counts = steps.prepare(target, options)
    return P.Prepared(fixed, left, P.Counts(*counts))


def op_check(path: str, export_root: str, options: P.Options, root: str | None) -> P.Checked:
    tree.check_under(path, export_root)
    return P.Checked([f.record() for f in steps.check(tree._root_of(path, root), options)])


# Where a request's `handler` ("module.function") is looked up.
MODULES: dict[str, Any] = {"tree": tree, "gens": gens, "treediff": treediff, "steps": steps, "exports": exports,
                           "main": sys.modules[__name__]}
_HANDLERS: dict[type[Any], Callable[..., Any]] = {}


def _takes(fn: Any, fields: set[str]) -> bool:
    """fn takes these keyword arguments, and needs no other."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    positional = code.co_varnames[:code.co_argcount]
    required = set(positional[:len(positional) - len(fn.__defaults__ or ())])
    keyword = code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]
    required |= set(keyword) - set(fn.__kwdefaults__ or {})
    return required <= fields <= set(positional) | set(keyword)


def handler(cls: type[Any]) -> Callable[..., Any]:
    """The function a request's `handler` names, checked to take exactly the request's fields: an operation
    this agent cannot do is answered bad_request (the session goes on)."""
    if cls in _HANDLERS:
        return _HANDLERS[cls]
    mod, _, name = cls.handler.partition(".")
    fn = getattr(MODULES.get(mod), name, None) if name else None
    if fn is None or not _takes(fn, {f.name for f in dataclasses.fields(cls)}):
        raise AgentError(ErrorKind.BAD_REQUEST, f"this agent has no handler for {cls.op} ({cls.handler})")
    _HANDLERS[cls] = typing.cast(Callable[..., Any], fn)
    return _HANDLERS[cls]


def dispatch(req: Any) -> Any:
    """Do one request that is not the session's own (P.SESSION): its handler, called with its fields."""
    if type(req).handler == P.SESSION:
        raise AgentError(ErrorKind.BAD_REQUEST, f"{req.op} cannot run inside a session")
    return handler(type(req))(**{f.name: getattr(req, f.name) for f in dataclasses.fields(req)})


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
        return dispatch(req)

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
    except ManifestError as e:
        return P.error_line(ErrorKind.NOT_IMAGE, str(e))
    except (fsutil.Mounted, fsutil.InUse, fsutil.Planted) as e:
        return P.error_line(ErrorKind.REFUSED, str(e))
    except OSError as e:
        return P.error_line(ErrorKind.OS, f"{e.strerror}: {e.filename}")
    except Exception as e:  # a fault of the agent's own: answered, so the session (and the lock it holds) goes on
        return P.error_line(ErrorKind.OS, f"the agent failed: {type(e).__name__}: {e}")


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
    line = _answer(functools.partial(dispatch, req))
    print(line, flush=True)
    return 0 if line.startswith('{"ok": true') else P.FAILED


if __name__ == "__main__":
    r = json.loads(sys.stdin.readline())
    sys.exit(run(r["op"], r["args"]))
