"""Dispatch one agent operation: JSON arguments in, one JSON line out (`{"ok": ..., "result"|"error"}`)."""

from __future__ import annotations

import json
import sys
from typing import Any

from . import steps, tree
from .tree import AgentError


def _prepare(root: str, options: dict[str, Any]) -> dict[str, Any]:
    fixed, left = steps.apply(root, steps.Options.from_dict(options))
    return {"fixed": fixed, "left": left}


def _check(root: str, options: dict[str, Any], only: list[str] | None = None) -> dict[str, Any]:
    return {"findings": [f.as_dict() for f in steps.check(root, steps.Options.from_dict(options), only)]}


def _write_manifest(root: str, manifest: dict[str, Any]) -> dict[str, Any]:
    tree.write_manifest(root, manifest)
    return {"written": root}


OPS: dict[str, Any] = {
    "inspect": tree.op_inspect,
    "stage": tree.op_stage,
    "discard": tree.op_discard,
    "publish": tree.op_publish,
    "remove": tree.op_remove,
    "list": tree.op_list,
    "manifest_update": tree.op_manifest_update,
    "write_manifest": _write_manifest,
    "stats": tree.op_stats,
    "pin_host": tree.op_pin_host,
    "unpin_host": tree.op_unpin_host,
    "prepare": _prepare,
    "check": _check,
    "steps": lambda: [{"name": s.name, "what": s.what} for s in steps.STEPS],
}


def run(op: str, args: dict[str, Any]) -> int:
    if op == "lock":
        try:
            return tree.op_lock(**args)
        except AgentError as e:
            print(json.dumps({"ok": False, "error": {"kind": e.kind, "message": str(e)}}), flush=True)
            return 3
    try:
        result = OPS[op](**args)
    except AgentError as e:
        print(json.dumps({"ok": False, "error": {"kind": e.kind, "message": str(e)}}))
        return 3
    except OSError as e:
        print(json.dumps({"ok": False, "error": {"kind": "os", "message": f"{e.strerror}: {e.filename}"}}))
        return 3
    print(json.dumps({"ok": True, "result": result}))
    return 0


if __name__ == "__main__":
    req = json.loads(sys.stdin.readline())
    sys.exit(run(req["op"], req["args"]))
