#!/usr/bin/env python3
"""Mock openQRM server for the qrmfs lab (Python 3.11 standard library only).

The lab runs the real openQRM 5.3.60 server (lab/images/openqrm); this mock exists for what a real server
cannot be made to do on demand: hang, answer 500, close mid-answer. Everywhere else it answers and stores
as openQRM 5.3.60's own PHP does (image-action.php, resource-monitor.php, event.class.php, image.class.php,
deployment.class.php on MariaDB in strict mode); tests/e2e/test_openqrm_contract.py runs the same requests
against both and compares their effect on the tables:

* ``/openqrm/action/resource-monitor.php?resource_command=post_event&...`` (no auth)
* ``/openqrm/base/server/image/image-action.php?image_command=...`` (HTTP Basic auth: 401 only there;
  every authenticated request is answered 200; a user without the administrator role changes nothing
  but an "Un-Authorized access" priority-1 event)

plus an inspection / control interface for tests:

* ``GET    /_mock/health`` -> 200 ``ok``
* ``GET    /_mock/state``  -> JSON ``{"images", "events", "deployments", "storage", "requests"}``: the tables
  as rows of their openQRM columns, each value a string or null (as ``mariadb --batch`` prints them)
* ``POST   /_mock/state``  JSON ``{"images"?, "events"?, "deployments"?}``: replace those tables
* ``GET    /_mock/fault``  -> JSON of the current fault
* ``POST   /_mock/fault``  JSON ``{"mode": "500"|"hang"|"close"|"ok", "count": N?, "path": "substr"?}``
* ``DELETE /_mock/fault``  clears the fault and releases hung requests (they get 503)
* ``POST   /_mock/reset``  back to a new install's tables; clears requests and the fault

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
from urllib.parse import parse_qsl, urlsplit

DEFAULT_USERS = "openqrm:openqrm:administrator,viewer:viewer:readonly"
DEFAULT_STORAGE: list[dict[str, Any]] = [
    {
        "storage_id": 1,
        "storage_name": "storage",
        "storage_type": "2",
        "storage_resource_id": 0,
        "storage_comment": "qrmfs lab storage server",
        "storage_capabilities": "",
        "storage_state": "active",
    }
]
ADMIN_ROLE = "administrator"
REALM = "openQRM-Server Login"  # src/etc/httpd/openqrm-htaccess.conf
EVENT_PATH = "/openqrm/action/resource-monitor.php"
IMAGE_PATH = "/openqrm/base/server/image/image-action.php"
FAULT_MODES = ("500", "hang", "close", "ok")
DEFAULT_HANG_TIMEOUT = 600.0

# --- openQRM 5.3.60's tables (src/etc/db/mysql/openqrm-mysql-init.sql): column -> VARCHAR length, or 0 for a
# number. Values are kept as MariaDB prints them: a string, or None for NULL.
IMAGE_COLUMNS = {"image_id": 0, "image_name": 255, "image_version": 30, "image_type": 255,
                 "image_rootdevice": 255, "image_size": 0, "image_rootfstype": 255, "image_storageid": 0,
                 "image_deployment_parameter": 1000, "image_isshared": 0, "image_isactive": 0,
                 "image_comment": 255, "image_capabilities": 255}
EVENT_COLUMNS = {"event_id": 0, "event_name": 50, "event_time": 50, "event_priority": 0, "event_source": 50,
                 "event_description": 255, "event_comment": 100, "event_capabilities": 255, "event_status": 0,
                 "event_image_id": 0, "event_resource_id": 0}
DEPLOYMENT_COLUMNS = {"deployment_id": 0, "deployment_name": 50, "deployment_type": 50,
                      "deployment_description": 50, "deployment_storagetype": 50,
                      "deployment_storagedescription": 50, "deployment_mapping": 255}
Row = dict[str, "str | None"]


def _row(columns: dict[str, int], **values: Any) -> Row:
    return {c: (None if values.get(c) is None else str(values[c])) for c in columns}


def initial_tables() -> dict[str, list[Row]]:
    """The rows openqrm-mysql-init.sql inserts (images openqrm and idle, the ramdisk deployment type)."""
    return {
        "images": [_row(IMAGE_COLUMNS, image_id=0, image_name="openqrm", image_version="openqrm", image_type="ram",
                        image_rootdevice="ram", image_isshared=0),
                   _row(IMAGE_COLUMNS, image_id=1, image_name="idle", image_version="openqrm", image_type="ram",
                        image_rootdevice="ram", image_rootfstype="ext2", image_isshared=1)],
        "events": [],
        "deployments": [_row(DEPLOYMENT_COLUMNS, deployment_id=1, deployment_name="ramdisk", deployment_type="ram",
                             deployment_description="Ramdisk Deployment", deployment_storagetype="none",
                             deployment_storagedescription="none")],
    }


# --- what PHP and MariaDB do to a value ------------------------------------------------------------------
# src/web/base/include/requestfilter.inc.php: the filters htmlobject's request()->get() applies (PCRE -> re).
REQUEST_FILTER = [
    (r"(&#*\w+)[\x00-\x20]+;", r"\1;", 0),
    (r"(&#x*[0-9A-F]+);*", r"\1;", re.I),
    (r"(<[^>]+?[\x00-\x20\"'])(?:on|xmlns)[^>]*+>", r"\1>", re.I),
    (r"([a-z]*)[\x00-\x20]*=[\x00-\x20]*([`'\"]*)[\x00-\x20]*j[\x00-\x20]*a[\x00-\x20]*v[\x00-\x20]*a[\x00-\x20]*s"
     r"[\x00-\x20]*c[\x00-\x20]*r[\x00-\x20]*i[\x00-\x20]*p[\x00-\x20]*t[\x00-\x20]*:", r"\1=\2nojavascript...", re.I),
    (r"([a-z]*)[\x00-\x20]*=(['\"]*)[\x00-\x20]*v[\x00-\x20]*b[\x00-\x20]*s[\x00-\x20]*c[\x00-\x20]*r[\x00-\x20]*i"
     r"[\x00-\x20]*p[\x00-\x20]*t[\x00-\x20]*:", r"\1=\2novbscript...", re.I),
    (r"([a-z]*)[\x00-\x20]*=(['\"]*)[\x00-\x20]*-moz-binding[\x00-\x20]*:", r"\1=\2nomozbinding...", 0),
    (r"(<[^>]+?)style[\x00-\x20]*=[\x00-\x20]*[`'\"]*.*?expression[\x00-\x20]*\([^>]*+>", r"\1>", re.I),
    (r"(<[^>]+?)style[\x00-\x20]*=[\x00-\x20]*[`'\"]*.*?behaviour[\x00-\x20]*\([^>]*+>", r"\1>", re.I),
    (r"(<[^>]+?)style[\x00-\x20]*=[\x00-\x20]*[`'\"]*.*?s[\x00-\x20]*c[\x00-\x20]*r[\x00-\x20]*i[\x00-\x20]*p"
     r"[\x00-\x20]*t[\x00-\x20]*:*[^>]*+>", r"\1>", re.I),
    (r"</*\w+:\w[^>]*+>", "", re.I | re.ASCII),
    (r"</*(?:applet|b(?:ase|gsound|link)|embed|frame(?:set)?|i(?:frame|layer)|l(?:ayer|ink)|meta|object"
     r"|s(?:cript|tyle)|title|xml|a)[^>]*+>", "", re.I),
]
_FILTERS = [(re.compile(p, f | re.ASCII), r) for p, r, f in REQUEST_FILTER]  # PCRE without /u UCP: ASCII \w
PHP_NUMERIC = re.compile(r"[ \t\n\r\v\f]*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?[ \t\n\r\v\f]*")
SQL_INT = re.compile(r"\s*\d+\s*")
_SQL_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a", "%": "\\%", "_": "\\_"}


def request_get(q: dict[str, Any], key: str) -> str:
    """htmlobject request()->get(KEY) with openQRM's request filter ('' when the key is absent; an array is
    what PHP makes of it in a string: "Array")."""
    v = q.get(key, "")
    if isinstance(v, list):
        return "Array"
    if v == "":
        return ""
    for rx, repl in _FILTERS:
        v = rx.sub(repl, v)
    return v


def sql_literal(raw: str) -> str | None:
    """What MariaDB reads from '<raw>' pasted into a query: None when a quote ends the literal (the query is
    then a syntax error), else the string with its backslash escapes applied."""
    out, i = [], 0
    while i < len(raw):
        c = raw[i]
        if c == "'":
            return None
        if c == "\\":
            if i + 1 >= len(raw):
                return None  # the backslash escapes the closing quote
            out.append(_SQL_ESCAPES.get(raw[i + 1], raw[i + 1]))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def sql_equal(literal: str, stored: str | None) -> bool:
    """`column = 'literal'` under utf8_general_ci: case-insensitive, trailing spaces ignored."""
    return stored is not None and literal.rstrip(" ").casefold() == stored.rstrip(" ").casefold()


def php_numeric(v: str) -> bool:
    return PHP_NUMERIC.fullmatch(v) is not None


def php_int(v: str) -> int:
    """ADOdb's cast of a value for a numeric column: its leading integer, else 0."""
    m = re.match(r"\s*([+-]?\d+)", v)
    return int(m.group(1)) if m else 0


def php_substr_bytes(v: str, n: int) -> str | None:
    """PHP's substr($v, 0, n) on the UTF-8 bytes; None when the cut splits a character (MariaDB in strict
    mode then refuses the row as an incorrect string value)."""
    b = v.encode("utf-8")[:n]
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def stripslashes(v: str) -> str:
    return re.sub(r"\\(.?)", lambda m: "\0" if m.group(1) == "0" else m.group(1), v, flags=re.S)


def fits(columns: dict[str, int], row: dict[str, Any]) -> bool:
    """Whether MariaDB in strict mode takes the row: each string within its VARCHAR length and within utf8
    (the tables are utf8mb3: no character outside the Basic Multilingual Plane)."""
    for c, v in row.items():
        if isinstance(v, str) and columns.get(c):
            if len(v) > columns[c] or any(ord(ch) > 0xFFFF for ch in v):
                return False
    return True


def to_columns(columns: dict[str, int], fields: dict[str, Any]) -> dict[str, str | None]:
    """AutoExecute: only the table's columns; numbers cast (an empty or non-numeric value is 0)."""
    out: dict[str, str | None] = {}
    for c, v in fields.items():
        if c not in columns:
            continue
        if v is None:
            out[c] = None
        elif columns[c] == 0:
            out[c] = str(v if isinstance(v, int) else php_int(str(v)))
        else:
            out[c] = str(v)
    return out


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
    tables: dict[str, list[Row]] = field(default_factory=initial_tables)
    requests: list[dict[str, Any]] = field(default_factory=list)
    fault: Fault = field(default_factory=Fault)
    last_id: int = 0
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
        self.tables = initial_tables()
        self.requests.clear()
        self.clear_fault()

    @property
    def images(self) -> list[Row]:
        return self.tables["images"]

    @property
    def events(self) -> list[Row]:
        return self.tables["events"]

    @property
    def deployments(self) -> list[Row]:
        return self.tables["deployments"]

    def new_id(self) -> int:
        """(int)str_replace(".", "", str_pad(microtime(true), 15, "0")): the time in 1/10000 s (kept unique)."""
        self.last_id = max(int(f"{time.time():.4f}".replace(".", "")), self.last_id + 1)
        return self.last_id

    # --- event.class.php log() --------------------------------------------------------------
    def log(self, name: str, priority: str | int, source: str, description: str) -> bool:
        """Store an event as event->log() does; False when PHP then dies (syslog() with a priority outside
        0..10 is a TypeError: the request is answered 500, after the row was stored)."""
        now = str(int(time.time()))
        prio = str(priority)
        numeric = php_numeric(prio)
        if numeric and float(prio) == 10:
            src, nm = sql_literal(source), sql_literal(name)
            if src is not None and nm is not None:
                for ev in self.events:  # "... where event_priority=9 and event_source='' and event_name=''"
                    if (ev["event_priority"] == "9" and sql_equal(src, ev["event_source"])
                            and sql_equal(nm, ev["event_name"])):
                        ev["event_priority"] = "5"
            prio, numeric = "5", True
        lits = [sql_literal(v) for v in (description, source, name)]
        if numeric and all(x is not None for x in lits):
            desc_l, src_l, name_l = (str(x) for x in lits)
            same = [ev for ev in self.events if ev["event_priority"] == str(php_int(prio))
                    and sql_equal(desc_l, ev["event_description"]) and sql_equal(src_l, ev["event_source"])
                    and sql_equal(name_l, ev["event_name"])]
            if same:  # "log already exists, just update the date" (of the last row the DESC loop saw)
                min(same, key=lambda ev: int(str(ev["event_id"])))["event_time"] = now
            else:
                cut = php_substr_bytes(description, 255)
                row = {"event_id": self.new_id(), "event_name": name, "event_time": now, "event_priority": prio,
                       "event_source": source, "event_description": cut, "event_comment": "",
                       "event_capabilities": "", "event_status": 0, "event_image_id": 0, "event_resource_id": 0}
                if cut is not None and fits(EVENT_COLUMNS, row):  # strict mode: a row too long is refused
                    self.events.append(_row(EVENT_COLUMNS, **to_columns(EVENT_COLUMNS, row)))
        return numeric and float(prio) in range(11)

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
        return json.loads(json.dumps({**self.tables, "storage": self.storage, "requests": self.requests}))


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


def identifier(q: dict[str, Any], fields: dict[str, Any]) -> bool:
    """image-action.php's web-UI branch: with action=add|update, each value of the `identifier` array becomes
    image_storageid unless one is given. False where PHP dies: strlen() of an array-valued image_storageid."""
    if request_get(q, "action") in ("add", "update") and isinstance(q.get("identifier"), list):
        for storage_id in q["identifier"]:
            if isinstance(fields.get("image_storageid"), list):
                return False
            if not fields.get("image_storageid"):
                fields["image_storageid"] = storage_id
    return True


def json_object(body: bytes) -> dict[str, Any] | None:
    """A request body that is a JSON object, else None."""
    try:
        data = json.loads(body.decode("utf-8") or "null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def single_values(query: str) -> dict[str, Any]:
    """Query string -> dict as PHP's $_REQUEST has it: the last value wins for a repeated key; `KEY[]=v`
    collects a list under KEY."""
    out: dict[str, Any] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k.endswith("[]"):
            prev = out.get(k[:-2])
            out[k[:-2]] = [*(prev if isinstance(prev, list) else []), v]
        else:
            out[k] = v
    return out


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

    def log_message(self, format: str, *args: Any) -> None:
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
            query = single_values(parts.query)
            if self.command == "POST":  # $_REQUEST: the form body's values after the query's
                query.update(single_values(self._read_body().decode("utf-8", errors="replace")))
            self._openqrm(path, query)
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
        """Request handling as openQRM 5.3.60 does it; the caller holds the state lock."""
        if needs_auth and user is None:  # apache's Basic auth (.htaccess): the only answer that is not 200
            return Response(
                401, "<html><body><p>Unauthorized</p></body></html>\n",
                headers={"WWW-Authenticate": f'Basic realm="{REALM}"'},
            )
        if path == EVENT_PATH:
            return self._resource_monitor(query)
        if path == IMAGE_PATH:
            assert user is not None
            return self._image_action(query, user)
        return html_page(404, "Not Found")

    def _resource_monitor(self, q: dict[str, str]) -> Response:
        """resource-monitor.php: post_event logs when resource_id and event_name are given. Other commands
        (get_parameter, update_info, ...) are not modelled: answered 200, nothing stored."""
        state = self.server.state
        if request_get(q, "resource_command") == "post_event":
            if request_get(q, "resource_id") and request_get(q, "event_name"):
                ok = state.log(request_get(q, "event_name"), request_get(q, "event_priority"),
                               request_get(q, "event_source"), request_get(q, "event_description"))
                if not ok:
                    return Response(500, "")
        return Response(200, "")

    def _image_action(self, q: dict[str, str], user: User) -> Response:
        """image-action.php: 200 whatever happened; what happened is only in the tables."""
        state = self.server.state
        if ADMIN_ROLE not in user.role:
            state.log("authorization", 1, "image-action", f"Un-Authorized access to image-actions from {user.name}")
            return Response(200, "")
        command, name = request_get(q, "image_command"), request_get(q, "image_name")
        fields: dict[str, Any] = {k: v for k, v in q.items() if k.startswith("image_") and k != "image_command"}
        if not identifier(q, fields):
            return Response(500, "")  # strlen() of an array: a TypeError, before anything is logged
        state.log(command, 5, "image-action", f"Processing image {command} on Image {name}")
        if command == "new_image":
            self._new_image(fields, request_get(q, "image_type"))
        elif command == "update_image":
            self._update_image(fields, request_get(q, "image_id"))
        elif command in ("remove", "remove_by_name", "remove_deployment_type"):
            self._remove(command, q)
        elif command == "add_deployment_type":
            dep: dict[str, Any] = {k: v for k, v in q.items() if k.startswith("deployment_")}
            dep["deployment_id"] = state.new_id()
            if fits(DEPLOYMENT_COLUMNS, dep):
                state.deployments.append(_row(DEPLOYMENT_COLUMNS, **to_columns(DEPLOYMENT_COLUMNS, dep)))
            else:
                state.log("add", 2, "deployment.class.php", "Failed adding new deployment to database")
        else:
            state.log(command, 3, "image-action", f"No such image command ({command})")
        return Response(200, "\n")

    def _remove(self, command: str, q: dict[str, str]) -> None:
        """remove (by id), remove_by_name (`image_name='...'`: case-insensitive, a quote breaks the query),
        remove_deployment_type (by type); openqrm, idle and ram are kept. Nothing is said either way."""
        state = self.server.state
        if command == "remove":
            image_id = request_get(q, "image_id")
            if SQL_INT.fullmatch(image_id) and int(image_id) not in (0, 1):
                state.tables["images"] = [i for i in state.images if i["image_id"] != str(int(image_id))]
            return
        key, table, column, kept = (("image_name", "images", "image_name", ("openqrm", "idle"))
                                    if command == "remove_by_name" else
                                    ("deployment_name", "deployments", "deployment_type", ("ram",)))
        value = request_get(q, key)
        lit = sql_literal(value)
        if value not in kept and lit is not None:
            state.tables[table] = [r for r in state.tables[table] if not sql_equal(lit, r[column])]

    def _new_image(self, fields: dict[str, Any], image_type: str) -> None:
        """image->add(): a microtime id; image_type read as a deployment id and replaced by that deployment's
        type ('' when there is none); image_isactive 0; a row MariaDB refuses leaves a priority-2 event."""
        state = self.server.state
        fields["image_id"] = state.new_id()
        if image_type == "":
            state.log("get_instance", 2, "deployment.class.php",
                      "cd Could not create instance of deployment without data ( image-action.php 104 )")
        dep = next((d for d in state.deployments if SQL_INT.fullmatch(image_type)
                    and d["deployment_id"] == str(int(image_type))), None)
        fields["image_type"] = (dep or {}).get("deployment_type") or ""
        fields["image_deployment_parameter"] = stripslashes(fields.get("image_deployment_parameter") or "")
        fields["image_isactive"] = 0
        if fits(IMAGE_COLUMNS, fields):
            state.images.append(_row(IMAGE_COLUMNS, **to_columns(IMAGE_COLUMNS, fields)))
        else:
            state.log("add", 2, "image.class.php", "Failed adding new image to database")

    def _update_image(self, fields: dict[str, Any], image_id: str) -> None:
        """image->update(): image_isshared 0 unless given; every other given image_* column as sent (no
        deployment lookup); an unknown id changes nothing and says nothing."""
        state = self.server.state
        if not fields.get("image_isshared"):
            fields["image_isshared"] = "0"
        fields["image_deployment_parameter"] = stripslashes(fields.get("image_deployment_parameter") or "")
        fields.pop("image_id", None)
        if image_id == "" or (php_numeric(image_id) and float(image_id) < 0):
            state.log("update", 2, "image.class.php", f"Unable to update image {image_id}")
            return
        if not SQL_INT.fullmatch(image_id) or not fits(IMAGE_COLUMNS, fields):
            state.log("update", 2, "image.class.php", f"Failed updating image {image_id}")
            return
        for img in state.images:
            if img["image_id"] == str(int(image_id)):
                img.update(to_columns(IMAGE_COLUMNS, fields))

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
            if method == "POST":
                return self._load_state(self._read_body())
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

    def _load_state(self, body: bytes) -> Response:
        """Replace tables (e.g. with the real server's rows, so both start from the same database)."""
        state = self.server.state
        data = json_object(body)
        columns = {"images": IMAGE_COLUMNS, "events": EVENT_COLUMNS, "deployments": DEPLOYMENT_COLUMNS}
        if data is None or not set(data) <= set(columns) or not all(
                isinstance(rows, list) and all(isinstance(r, dict) and set(r) == set(columns[t]) for r in rows)
                for t, rows in data.items()):
            return json_response(400, {"error": "body must map images/events/deployments to lists of full rows"})
        with state.lock:
            for table, rows in data.items():
                state.tables[table] = [_row(columns[table], **r) for r in rows]
            ids = [int(str(r[f"{t[:-1]}_id"])) for t in ("images", "events", "deployments") for r in state.tables[t]]
            state.last_id = max([state.last_id, *ids])
            return json_response(200, {"loaded": sorted(data)})

    def _set_fault(self, body: bytes) -> Response:
        state = self.server.state
        data = json_object(body)
        if data is None:
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
    parser.add_argument("--host", default="0.0.0.0")
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
