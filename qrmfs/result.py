"""The one JSON shape of every command's --json output (schema 1, documented in README "JSON output").

Success, or a result that is itself a verdict (check, validate):
    {"schema": 1, "ok": true|false, "command": "check", "result": {...}}
An error raised before a result exists (cli.main renders it):
    {"schema": 1, "ok": false, "command": "create", "error": {"kind", "message", "exit_code", "detail"}}
"""

from __future__ import annotations

from typing import Any

SCHEMA = 1


def envelope(command: str, result: Any, ok: bool = True) -> dict[str, Any]:
    return {"schema": SCHEMA, "ok": ok, "command": command, "result": result}
