"""The lab's real openQRM 5.3.60 server, seen from the machine running the lab: its database read with
`mariadb --batch` inside the container, the storage servers registered in it, its MariaDB stopped and
started (for "database is down" tests). Every function takes the server's docker container."""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .images import LabError

DB = "openqrm"
NFS_DEPLOYMENT = "nfs-deployment"
STORAGE_COMMENT = "qrmfs lab storage server"
_UNESCAPE = {"n": "\n", "t": "\t", "\\": "\\", "0": "\0"}


def _unescape(value: str) -> str | None:
    """One field of `mariadb --batch` output: NULL is None, \\n \\t \\\\ \\0 are what they stand for."""
    if value == "NULL":
        return None
    if "\\" not in value:
        return value
    out, i = [], 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            out.append(_UNESCAPE.get(value[i + 1], value[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_batch(text: str) -> list[dict[str, str | None]]:
    """`mariadb --batch` output (a header line, then tab-separated rows) as one dict per row."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        return []
    cols = lines[0].split("\t")
    return [dict(zip(cols, (_unescape(v) for v in ln.split("\t")), strict=True)) for ln in lines[1:]]


# The last result set of every query the lab sends: docker's exec sometimes returns a command's output empty
# although it ran (exit 0) on a loaded machine (it lost a row just written, and `lab up` cached no storage
# ids). Output that does not end with this was cut, and a read is asked again.
_END = "qrmfs_lab_end_of_output\n1\n"
_READS = ("select", "show")
SQL_ATTEMPTS = 5


def sql(container: Any, query: str) -> list[dict[str, str | None]]:
    """Run SQL in the server's database; the rows (values as MariaDB prints them: str, or None for NULL).
    A read whose output came back cut is run again; a write's output holds no rows, so its exit code says all."""
    argv = ["mariadb", "--batch", "--default-character-set=utf8mb4", DB, "-e",
            f"{query.rstrip().rstrip(';')}; SELECT 1 AS {_END.split()[0]}"]
    for _ in range(SQL_ATTEMPTS):
        code, (stdout, stderr) = container.exec_run(argv, demux=True)
        if code != 0:
            raise LabError(f"openQRM database: {query!r} failed (exit {code}): "
                           f"{(stderr or b'').decode(errors='replace').strip()}")
        text = (stdout or b"").decode()
        if text.endswith(_END):
            return parse_batch(text[:-len(_END)])
        if not query.lstrip().lower().startswith(_READS):
            return []
    raise LabError(f"openQRM database: the output of {query!r} came back cut {SQL_ATTEMPTS} times")


def quote(value: str | int) -> str:
    """A SQL literal for the lab's own values (names, addresses); never for anything a test did not write."""
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def new_id() -> int:
    """An id as openQRM allocates them: (int)str_replace(".", "", str_pad(microtime(true), 15, "0"))
    (PHP prints the float with 14 significant digits: 10 before the point, 4 after)."""
    return int(f"{time.time():.4f}".replace(".", ""))


def deployment_id(container: Any) -> int:
    rows = sql(container, f"SELECT deployment_id FROM deployment_info WHERE deployment_type={quote(NFS_DEPLOYMENT)}")
    if len(rows) != 1 or rows[0]["deployment_id"] is None:
        raise LabError(f"the lab's openQRM has {len(rows)} {NFS_DEPLOYMENT} deployment types, not one")
    return int(rows[0]["deployment_id"])


def storage_ids(container: Any) -> dict[str, int]:
    """storage name -> storage_id of the storage records the lab registered."""
    rows = sql(container, "SELECT storage_id, storage_name FROM storage_info "
                          f"WHERE storage_comment={quote(STORAGE_COMMENT)}")
    return {str(r["storage_name"]): int(str(r["storage_id"])) for r in rows}


def register_storage(container: Any, name: str, ip: str, mac: str) -> int:
    """A storage server as an openQRM administrator adds one: its resource record (the IP a node mounts
    from) and a storage record of the nfs-deployment type (storage.add.class.php: a microtime id,
    name, type = the deployment id, resource id, comment). Idempotent: an existing record is kept."""
    have = storage_ids(container)
    if name in have:
        return have[name]
    dep = deployment_id(container)
    server_ip = sql(container, "SELECT resource_ip FROM resource_info WHERE resource_id=0")[0]["resource_ip"] or ""
    rid = new_id()
    sql(container, "INSERT INTO resource_info (resource_id, resource_localboot, resource_kernel, resource_image, "
                   "resource_openqrmserver, resource_ip, resource_mac, resource_hostname, resource_vtype, "
                   "resource_vhostid, resource_state, resource_lastgood) VALUES "
                   f"({rid}, 1, 'local', 'local', {quote(server_ip)}, {quote(ip)}, {quote(mac)}, "
                   f"{quote('lab-' + name)}, 1, {rid}, 'active', {quote(str(int(time.time())))})")
    sid = new_id()
    while sid == rid:
        sid = new_id()
    sql(container, "INSERT INTO storage_info (storage_id, storage_name, storage_type, storage_comment, "
                   "storage_resource_id, storage_capabilities) VALUES "
                   f"({sid}, {quote(name)}, {dep}, {quote(STORAGE_COMMENT)}, {rid}, '')")
    return sid


# apache's combined log format: host ident user [time] "request" status size "referer" "agent"
_ACCESS = re.compile(r'^\S+ \S+ (?P<user>\S+) \[[^]]*\] "(?P<method>\S+) (?P<target>\S+) [^"]*" (?P<status>\d{3}) ')


def requests(container: Any) -> list[dict[str, Any]]:
    """The HTTP requests apache logged (its access log), oldest first: method, path, query (the last value
    of each key), status, user (the Basic-auth user, or None). The server's own add_deployment_type at start
    is the first."""
    code, out = container.exec_run(["cat", "/var/log/apache2/access.log"])
    if code != 0:
        raise LabError(f"openQRM access log: {out.decode(errors='replace').strip()}")
    rows = []
    for line in out.decode(errors="replace").splitlines():
        m = _ACCESS.match(line)
        if not m:
            continue
        parts = urlsplit(m["target"])
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        rows.append({"method": m["method"], "path": parts.path, "query": query, "status": int(m["status"]),
                     "user": None if m["user"] == "-" else m["user"]})
    return rows


def database(container: Any, action: str) -> None:
    """Stop or start the server's MariaDB (returns once it no longer answers / answers again)."""
    if action not in ("start", "stop"):
        raise LabError(f"openQRM database: unknown action {action!r} (start or stop)")
    code, out = container.exec_run(["lab-openqrm-db", action])
    if code != 0:
        raise LabError(f"openQRM database {action} failed: {out.decode(errors='replace').strip()}")
