"""Dispatch one agent operation: a validated request in, one answer line out (protocol.py's framing)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

from . import fsutil, gens, steps, supervise, tree
from . import protocol as P
from .protocol import AgentError, ErrorKind


def _prepare(req: P.Prepare) -> P.Prepared:
    fixed, left = steps.apply(tree._root_of(req.path, req.root), req.options)
    return P.Prepared(fixed, left)


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
}


def _hold_lock(req: P.Lock) -> int:
    fd, locked = tree.take_lock(req.path, req.export_root, req.holder)
    gens.recover(req.path)  # a publish a crash interrupted is finished before anything else happens
    print(P.ok_line(locked), flush=True)
    sys.stdin.read()  # returns at EOF: our qrmfs is done (or gone); the flock dies with this process
    tree.release_lock(fd, req.path)
    return 0


def run(op: str, args: Any) -> int:
    try:
        req = P.request(op, args)
        if isinstance(req, P.Lock):
            return _hold_lock(req)
        if isinstance(req, P.Run):
            return supervise.run(req)
        result = HANDLERS[type(req)](req)
    except AgentError as e:
        print(P.error_line(e.kind, str(e)), flush=True)
        return P.FAILED
    except (fsutil.Mounted, fsutil.InUse) as e:
        print(P.error_line(ErrorKind.REFUSED, str(e)), flush=True)
        return P.FAILED
    except OSError as e:
        print(P.error_line(ErrorKind.OS, f"{e.strerror}: {e.filename}"), flush=True)
        return P.FAILED
    print(P.ok_line(result), flush=True)
    return 0


if __name__ == "__main__":
    r = json.loads(sys.stdin.readline())
    sys.exit(run(r["op"], r["args"]))
