#!/usr/bin/env python3
"""Mock openQRM server for the qrmfs lab (Python 3.11 standard library only).

Serves the part of the openQRM HTTP interface that qrmfs speaks (see docs/openqrm-api.md):

* ``GET /openqrm/action/resource-monitor.php?resource_command=post_event&...`` (no auth)
* ``GET /openqrm/base/server/image/image-action.php?image_command=...`` (HTTP Basic auth,
  administrator role)

plus an inspection / control interface for tests:

* ``GET    /_mock/health`` -> 200 ``ok``
* ``GET    /_mock/state``  -> JSON ``{"events", "images", "storage", "requests"}``
* ``GET    /_mock/fault``  -> JSON of the current fault
* ``POST   /_mock/fault``  JSON ``{"mode": "500"|"hang"|"close"|"ok", "count": N?, "path": "substr"?}``
* ``DELETE /_mock/fault``  clears the fault and releases hung requests (they get 503)
* ``POST   /_mock/reset``  clears events, images, requests, fault; resets id counters

Configuration: ``MOCK_USERS`` (``user:password:role,...``), ``MOCK_STORAGE`` (JSON list of storage
records), ``MOCK_HANG_TIMEOUT`` (seconds a hung request is held at most, default 600).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import html
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

DEFAULT_USERS = "openqrm:openqrm:administrator,viewer:viewer:user"
DEFAULT_STORAGE: list[dict[str, Any]] = [
    {
        "storage_id": 1,
        "storage_name": "storage",
        "storage_type": "nfs-storage",
        "storage_resource_id": 0,
        "storage_comment": "qrmfs lab storage server",
        "storage_capabilities": "",
        "storage_state": "active",
    }
]
ADMIN_ROLE = "administrator"
REALM = "openQRM"
EVENT_PATH = "/openqrm/action/resource-monitor.php"
IMAGE_PATH = "/openqrm/base/server/image/image-action.php"
IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,50}")
FAULT_MODES = ("500", "hang", "close", "ok")
DEFAULT_HANG_TIMEOUT = 600.0


class ConfigError(Exception):
    """Invalid MOCK_* configuration."""


@dataclass(frozen=True)
class User:
    name: str
    password: str
    role: str


def parse_users(spec: str) -> dict[str, User]:
    """Parse ``user:password:role,...`` (the password may contain ':', the user may not)."""
    users: dict[str, User] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, rest = item.partition(":")
        password, sep2, role = rest.rpartition(":")
        if not sep or not sep2 or not name or not role:
            raise ConfigError(f"MOCK_USERS entry is not user:password:role: {item.split(':', 1)[0]!r}")
        users[name] = User(name, password, role)
    return users


def parse_storage(spec: str | None) -> list[dict[str, Any]]:
    if spec is None or not spec.strip():
        return [dict(s) for s in DEFAULT_STORAGE]
    try:
        data = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"MOCK_STORAGE is not valid JSON: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(s, dict) for s in data):
        raise ConfigError("MOCK_STORAGE must be a JSON list of objects")
    return data


@dataclass
class Fault:
    mode: str = "ok"
    count: int | None = None  # remaining affected requests; None = until changed
    path: str | None = None  # only requests whose path contains this

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "count": self.count, "path": self.path}


@dataclass
class State:
    """All mutable server state; every access goes through ``lock`` (``cond`` shares it)."""

    storage: list[dict[str, Any]]
    events: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    fault: Fault = field(default_factory=Fault)
    next_event_id: int = 1
    next_image_id: int = 1
    release_generation: int = 0  # bumped whenever hung requests must be released
    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)

    # --- callers hold self.lock -------------------------------------------------------------
    def clear_fault(self) -> None:
        self.fault = Fault()
        self.release_generation += 1
        self.cond.notify_all()

    def reset(self) -> None:
        self.events.clear()
        self.images.clear()
        self.requests.clear()
        self.next_event_id = 1
        self.next_image_id = 1
        self.clear_fault()

    def take_fault(self, path: str) -> str:
        """Return the fault mode that applies to this /openqrm/ request and consume one count."""
        f = self.fault
        if f.mode == "ok":
            return "ok"
        if f.path is not None and f.path not in path:
            return "ok"
        mode = f.mode
        if f.count is not None:
            f.count -= 1
            if f.count <= 0:
                self.fault = Fault()  # back to ok; hung requests keep waiting for an explicit clear
        return mode

    def snapshot(self) -> dict[str, Any]:
        return json.loads(
            json.dumps(
                {
                    "events": self.events,
                    "images": self.images,
                    "storage": self.storage,
                    "requests": self.requests,
                }
            )
        )


class Response:
    def __init__(
        self, status: int, body: str, content_type: str = "text/html; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body.encode("utf-8")
        self.content_type = content_type
        self.headers = headers or {}


def html_page(status: int, message: str) -> Response:
    text = html.escape(message)
    body = (
        "<!DOCTYPE html>\n<html><head><title>openQRM</title></head>"
        f"<body><p>{text}</p></body></html>\n"
    )
    return Response(status, body)


def json_response(status: int, data: Any) -> Response:
    return Response(status, json.dumps(data, indent=1) + "\n", "application/json")


def single_values(query: str) -> dict[str, str]:
    """Query string -> dict (the last value wins for a repeated key)."""
    return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}


class MockServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], users: dict[str, User], storage: list[dict[str, Any]],
        hang_timeout: float = DEFAULT_HANG_TIMEOUT,
    ) -> None:
        self.users = users
        self.state = State(storage=storage)
        self.hang_timeout = hang_timeout
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    server: MockServer
    server_version = "openQRM-mock/1.0"

    # one log line per request, written by _finish_log (default access log disabled)
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass

    def log_message(self, format: str, *args: Any) -> None:  # base class signature
        sys.stderr.write(f"{self.address_string()} [{self.log_date_time_string()}] {format % args}\n")
        sys.stderr.flush()

    def _log_outcome(self, outcome: int | str, user: str | None) -> None:
        self.log_message('"%s %s" %s user=%s', self.command, self.path, outcome, user or "-")

    # --- method entry points ----------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    # --- plumbing ---------------------------------------------------------------------------
    def _send(self, resp: Response) -> None:
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("Connection", "close")
        for k, v in resp.headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)
        self.close_connection = True

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        if path.startswith("/_mock/"):
            resp = self._control(path)
            self._send(resp)
            self._log_outcome(resp.status, None)
        elif path.startswith("/openqrm/"):
            self._openqrm(path, single_values(parts.query))
        else:
            resp = html_page(404, "Not Found")
            self._send(resp)
            self._log_outcome(resp.status, None)

    # --- authentication ---------------------------------------------------------------------
    def _authenticate(self) -> User | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        name, sep, password = decoded.partition(":")
        if not sep:
            return None
        user = self.server.users.get(name)
        if user is None:
            return None
        if not hmac.compare_digest(user.password.encode("utf-8"), password.encode("utf-8")):
            return None
        return user

    # --- /openqrm/ ----------------------------------------------------------------------------
    def _openqrm(self, path: str, query: dict[str, str]) -> None:
        state = self.server.state
        needs_auth = path.startswith("/openqrm/base/")
        user = self._authenticate() if needs_auth else None
        user_name = user.name if user else None
        record: dict[str, Any] = {
            "method": self.command,
            "path": path,
            "query": query,
            "status": None,
            "authorized_user": user_name,
        }
        resp: Response | None = None
        generation = 0
        with state.lock:
            mode = state.take_fault(path)
            if mode == "ok":
                resp = self._handle_openqrm(path, query, needs_auth, user)
                record["status"] = resp.status
            else:
                record["status"] = 500 if mode == "500" else mode
                generation = state.release_generation
            state.requests.append(record)

        if mode == "ok" and resp is not None:
            self._send(resp)
            self._log_outcome(resp.status, user_name)
        elif mode == "500":
            self._send(html_page(500, "Internal Server Error (mock fault)"))
            self._log_outcome("500 (fault)", user_name)
        elif mode == "close":
            self._log_outcome("close (fault)", user_name)
            self.close_connection = True  # no response at all; the socket is closed by finish()
        elif mode == "hang":
            started = time.monotonic()
            deadline = started + self.server.hang_timeout
            with state.cond:
                while state.release_generation == generation:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    state.cond.wait(remaining)
            self._send(html_page(503, "Service Unavailable (released mock hang)"))
            self._log_outcome(f"hang (fault) -> 503 after {time.monotonic() - started:.1f}s", user_name)

    def _handle_openqrm(
        self, path: str, query: dict[str, str], needs_auth: bool, user: User | None
    ) -> Response:
        """Real request handling; the caller holds the state lock."""
        if needs_auth:
            if user is None:
                return Response(
                    401, "<html><body><p>Authorization Required</p></body></html>\n",
                    headers={"WWW-Authenticate": f'Basic realm="{REALM}"'},
                )
            if user.role != ADMIN_ROLE:
                return html_page(403, "Forbidden: the administrator role is required")
        if self.command not in ("GET", "HEAD"):
            if path in (EVENT_PATH, IMAGE_PATH):
                return Response(405, "<html><body><p>Method Not Allowed</p></body></html>\n",
                                headers={"Allow": "GET"})
            return html_page(404, "Not Found")
        if path == EVENT_PATH:
            return self._post_event(query)
        if path == IMAGE_PATH:
            return self._image_action(query)
        return html_page(404, "Not Found")

    def _post_event(self, q: dict[str, str]) -> Response:
        state = self.server.state
        if q.get("resource_command") != "post_event":
            return html_page(400, "unknown or missing resource_command")
        name = q.get("event_name", "")
        if not name:
            return html_page(400, "missing event_name")
        try:
            priority = int(q.get("event_priority", ""))
        except ValueError:
            return html_page(400, "event_priority must be an integer")
        try:
            resource_id = int(q.get("resource_id", "0") or "0")
        except ValueError:
            return html_page(400, "resource_id must be an integer")
        source = q.get("event_source", "")
        if priority == 10:
            # openQRM: a "finished" event (10) turns the matching "started" event (9) into 5.
            for ev in state.events:
                if ev["event_priority"] == 9 and ev["event_name"] == name and ev["event_source"] == source:
                    ev["event_priority"] = 5
        event = {
            "event_id": state.next_event_id,
            "event_name": name,
            "event_priority": priority,
            "event_source": source,
            "event_description": q.get("event_description", ""),
            "resource_id": resource_id,
            "event_time": int(time.time()),
        }
        state.next_event_id += 1
        state.events.append(event)
        return html_page(200, f"event {event['event_id']} stored")

    def _image_action(self, q: dict[str, str]) -> Response:  # noqa: C901 - one dispatch over openQRM's image commands
        state = self.server.state
        command = q.get("image_command", "")
        fields = {
            k: v for k, v in q.items() if k.startswith("image_") and k not in ("image_command", "image_id")
        }

        if command == "new_image":
            name = q.get("image_name")
            if name is None or not IMAGE_NAME_RE.fullmatch(name):
                return html_page(400, "image_name must be 1-50 characters of A-Z a-z 0-9 _")
            new: dict[str, Any] = {"image_id": state.next_image_id, **fields}
            state.next_image_id += 1
            state.images.append(new)  # duplicates are stored as separate records on purpose
            return html_page(200, f"image {new['image_id']} added")

        if command in ("update_image", "remove"):
            raw_id = q.get("image_id")
            if raw_id is None or raw_id == "":
                return html_page(400, "missing image_id")
            wanted = raw_id.strip()
            image: dict[str, Any] | None = next(
                (i for i in state.images if str(i["image_id"]) == wanted), None
            )
            if image is None:
                return html_page(404, f"no image with image_id {raw_id}")
            if command == "remove":
                state.images.remove(image)
                return html_page(200, f"image {image['image_id']} removed")
            if "image_name" in fields and not IMAGE_NAME_RE.fullmatch(fields["image_name"]):
                return html_page(400, "image_name must be 1-50 characters of A-Z a-z 0-9 _")
            image.update(fields)
            return html_page(200, f"image {image['image_id']} updated")

        if command == "remove_by_name":
            name = q.get("image_name", "")
            if not name:
                return html_page(400, "missing image_name")
            matching = [i for i in state.images if i.get("image_name") == name]
            if not matching:
                return html_page(404, f"no image named {name}")
            state.images[:] = [i for i in state.images if i.get("image_name") != name]
            return html_page(200, f"{len(matching)} image(s) named {name} removed")

        return html_page(400, "unknown image_command")

    # --- /_mock/ control ----------------------------------------------------------------------
    def _control(self, path: str) -> Response:  # noqa: C901 - one dispatch over the mock's control paths
        state = self.server.state
        method = self.command
        if path == "/_mock/health":
            if method in ("GET", "HEAD"):
                return Response(200, "ok", "text/plain; charset=utf-8")
        elif path == "/_mock/state":
            if method in ("GET", "HEAD"):
                with state.lock:
                    return json_response(200, state.snapshot())
        elif path == "/_mock/reset":
            if method == "POST":
                self._read_body()
                with state.lock:
                    state.reset()
                return json_response(200, {"reset": True})
        elif path == "/_mock/fault":
            if method in ("GET", "HEAD"):
                with state.lock:
                    return json_response(200, state.fault.as_dict())
            if method == "DELETE":
                with state.lock:
                    state.clear_fault()
                    return json_response(200, state.fault.as_dict())
            if method == "POST":
                return self._set_fault(self._read_body())
        else:
            return json_response(404, {"error": "unknown mock endpoint"})
        return json_response(405, {"error": f"method {method} not allowed on {path}"})

    def _set_fault(self, body: bytes) -> Response:
        state = self.server.state
        try:
            data = json.loads(body.decode("utf-8") or "null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            return json_response(400, {"error": "body must be a JSON object"})
        if not isinstance(data, dict):
            return json_response(400, {"error": "body must be a JSON object"})
        mode = data.get("mode")
        if mode not in FAULT_MODES:
            return json_response(400, {"error": f"mode must be one of {list(FAULT_MODES)}"})
        count = data.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            return json_response(400, {"error": "count must be a positive integer or omitted"})
        fpath = data.get("path")
        if fpath is not None and not isinstance(fpath, str):
            return json_response(400, {"error": "path must be a string or omitted"})
        with state.lock:
            if mode == "ok":
                state.clear_fault()
            else:
                state.fault = Fault(mode=mode, count=count, path=fpath)
            return json_response(200, state.fault.as_dict())


def build_server(host: str, port: int, env: dict[str, str] | None = None) -> MockServer:
    env = dict(os.environ) if env is None else env
    users = parse_users(env.get("MOCK_USERS", DEFAULT_USERS))
    storage = parse_storage(env.get("MOCK_STORAGE"))
    try:
        hang_timeout = float(env.get("MOCK_HANG_TIMEOUT", DEFAULT_HANG_TIMEOUT))
    except ValueError as exc:
        raise ConfigError("MOCK_HANG_TIMEOUT must be a number") from exc
    return MockServer((host, port), users, storage, hang_timeout)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mock openQRM server for the qrmfs lab")
    parser.add_argument("--host", default="0.0.0.0")  # container service
    parser.add_argument("--port", type=int, default=80)
    args = parser.parse_args(argv)
    try:
        server = build_server(args.host, args.port)
    except ConfigError as exc:
        print(f"mock openQRM: {exc}", file=sys.stderr)
        return 2
    # As PID 1 in a container SIGTERM would otherwise be ignored.
    signal.signal(signal.SIGTERM, _terminate)
    print(
        f"mock openQRM listening on {args.host}:{server.server_port} users={sorted(server.users)} "
        f"storage={len(server.state.storage)}",
        file=sys.stderr, flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
