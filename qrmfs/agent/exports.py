"""An image's own NFS export on the storage server, the way openQRM's nfs-storage plugin gives every image one.

Standard library only (it travels with the agent). Two kinds of NFS server:
- `kernel`: the kernel NFS server. One line per image in /etc/exports (openQRM's own line:
  `/exports/NAME<TAB>CLIENTS(rw,insecure,no_root_squash,async,no_subtree_check)`), then `exportfs -r`, and
  `exportfs -v` must list the path (or no longer list it, after a remove).
- `ganesha`: nfs-ganesha. One EXPORT block per image in a file that ganesha.conf includes (`%include`), then its
  DBus ExportMgr (`dbus-send`): AddExport, RemoveExport; ShowExports must list the path (or no longer list it).

Either file is edited under an exclusive flock of a lock file beside it (`.NAME.qrmfs-lock`: the file itself is
replaced by rename, so a lock on it would not exclude a later writer), written to a temporary file in the same
directory and renamed into place: a reader sees the old file or the new one, never half of one. Lines and blocks
that are not this image's own are never touched.

After an update or a rollback the image's name holds another directory (gens: RENAME_EXCHANGE). ganesha resolved
the export's path to a directory handle when the export was added, and UpdateExport does not resolve it again
(measured in the lab, nfs-ganesha 4.3: a new NFSv3 mount still got the replaced generation); RemoveExport and
AddExport with the same Export_Id does, and a running client's handles stay valid after it (its handles name the
export id and the file, not the path: measured with a held libnfs mount). The kernel server is told with
`exportfs -r` and `exportfs -f` (its export caches are flushed, so the next mount resolves the path again).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

from . import protocol as P
from .manifest import generation_id
from .protocol import AgentError, ErrorKind
from .tree import op_manifest_update, read_manifest

# openQRM's nfs-storage plugin writes exactly these options (include/openqrm-plugin-nfs-storage-functions)
KERNEL_OPTIONS = "rw,insecure,no_root_squash,async,no_subtree_check"
GANESHA_ID_MIN = 100  # Export_Ids qrmfs gives start here (ganesha.conf's own usually use small ones)
GANESHA_ID_MAX = 65535  # an export id is a uint16
# An export path qrmfs writes: every component as a target path's (model.COMPONENT_RE), so it needs no quoting
# in /etc/exports nor in ganesha's config.
_PATH_RE = re.compile(r"(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,254})+")
# A client spec: an address, a network (a/b), a host name, a wildcard (*, ?), a netgroup (@g): nothing that
# ends the spec in either file (white space, parentheses, quotes, ';', '#', ',').
_CLIENT_RE = re.compile(r"[A-Za-z0-9_.:/*?@\[\]-]{1,255}")
_DBUS = ("dbus-send", "--system", "--print-reply", "--dest=org.ganesha.nfsd", "/org/ganesha/nfsd/ExportMgr")
_IFACE = "org.ganesha.nfsd.exportmgr."
_TIMEOUT = 60
# What lists the exports a server serves: how qrmfs sees an export done (and `qrmfs check` sees the server answer).
LISTERS = {"kernel": ("exportfs", "-v"), "ganesha": (*_DBUS, _IFACE + "ShowExports")}


def op_export(path: str, export_root: str, action: str, kind: str, clients: str, table: str) -> P.Exported:
    """add (create, clone, validate --fix), refresh (after an update or rollback), remove (after the image is
    gone), show (validate): each verified by what the NFS server itself lists afterwards."""
    _checked(path, export_root, kind, clients, table)
    if action not in P.EXPORT_ACTIONS:
        raise AgentError(ErrorKind.BAD_REQUEST, f"unknown export action {action!r}")
    if action == "remove" and os.path.lexists(path):
        raise AgentError(ErrorKind.REFUSED, f"{path} still exists: its export is removed only after the image")
    if action in ("add", "refresh") and not os.path.isdir(path):
        raise AgentError(ErrorKind.NOT_FOUND, f"{path} is not a directory: nothing to export")
    server = Kernel(table) if kind == "kernel" else Ganesha(table)
    if action == "add":
        server.add(path, clients)
    elif action == "refresh":
        server.refresh(path, clients)
    elif action == "remove":
        server.remove(path)
    listed = server.listed()
    exported = path in listed
    if action in ("add", "refresh") and not exported:
        raise AgentError(ErrorKind.OS, f"{server.name} does not list {path} after it was exported ({server.lister})")
    if action == "remove" and exported:
        raise AgentError(ErrorKind.OS, f"{server.name} still lists {path} after its export was removed "
                                       f"({server.lister})")
    if action in ("add", "refresh") and read_manifest(path) is not None:
        op_manifest_update(path, export_root, {"export": {
            "kind": kind, "generation": generation_id(read_manifest(path)), "export_id": listed.get(path),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}})
    return P.Exported(path, kind, _state(path, kind, exported), listed.get(path))


def _state(path: str, kind: str, exported: bool) -> str:
    """"exported"; "stale": listed, but not (seen) exported since the image's current generation was published,
    so the NFS server may still serve an earlier one to new mounts; "absent"."""
    if not exported:
        return "absent"
    m = read_manifest(path)
    if m is None:
        return "exported"
    return "exported" if m.exported_for == (kind, m.generation_id) else "stale"


def client_spec_ok(clients: str) -> bool:
    return _CLIENT_RE.fullmatch(clients) is not None


def _checked(path: str, export_root: str, kind: str, clients: str, table: str) -> None:
    if kind not in ("kernel", "ganesha"):
        raise AgentError(ErrorKind.BAD_REQUEST, f"unknown export kind {kind!r}")
    if not _PATH_RE.fullmatch(path) or not path.startswith(export_root.rstrip("/") + "/"):
        raise AgentError(ErrorKind.REFUSED, f"{path!r} is no image path below {export_root}: not exported")
    if not client_spec_ok(clients):
        raise AgentError(ErrorKind.BAD_REQUEST, f"export clients {clients!r}: an address, network, host name or "
                                                "wildcard without spaces, quotes, parentheses, ';', '#' or ','")
    if not table.startswith("/") or os.path.normpath(table) != table:
        raise AgentError(ErrorKind.BAD_REQUEST, f"exports file {table!r} must be a canonical absolute path")


# --- the file: edited atomically under a lock -------------------------------------------------------------

def lock_path(table: str) -> str:
    return os.path.join(os.path.dirname(table), f".{os.path.basename(table)}.qrmfs-lock")


@contextlib.contextmanager
def locked(table: str) -> Iterator[None]:
    """The exclusive flock every qrmfs edit of `table` holds (any image, any qrmfs run)."""
    fd = os.open(lock_path(table), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def rewrite(table: str, edit: Callable[[list[str]], list[str]]) -> bool:
    """Apply `edit` to the file's lines (a missing file has none) and replace the file with the result, by
    rename of a temporary file in the same directory, under the lock. False when nothing changed."""
    with locked(table):
        try:
            with open(table, encoding="utf-8") as f:
                old = f.read().splitlines()
            st: os.stat_result | None = os.stat(table)
        except FileNotFoundError:
            old, st = [], None
        new = edit(list(old))
        if new == old:
            return False
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(table)}.", dir=os.path.dirname(table))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in new))
                f.flush()
                os.fchmod(f.fileno(), st.st_mode & 0o7777 if st else 0o644)
                if st is not None:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                os.fsync(f.fileno())
            os.replace(tmp, table)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(os.path.dirname(table), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return True


def _run(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except FileNotFoundError:
        raise AgentError(ErrorKind.OS, f"{argv[0]} is not installed on the storage server") from None
    except subprocess.TimeoutExpired:
        raise AgentError(ErrorKind.OS, f"`{' '.join(argv)}` did not end within {_TIMEOUT} s") from None
    if r.returncode != 0:
        raise AgentError(ErrorKind.OS, f"`{' '.join(argv)}` exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return r.stdout


# --- the kernel NFS server ----------------------------------------------------------------------------------

def kernel_line(path: str, clients: str) -> str:
    return f"{path}\t{clients}({KERNEL_OPTIONS})"


def line_path(line: str) -> str | None:
    """The exported path of an /etc/exports line (None: blank, comment, continuation)."""
    s = line.strip()
    if not s or s.startswith("#") or line[:1].isspace():
        return None
    first = s.split()[0]
    return first[1:-1] if len(first) > 1 and first[0] == first[-1] == '"' else first


class Kernel:
    name = "the kernel NFS server"
    lister = "exportfs -v"

    def __init__(self, table: str) -> None:
        self.table = table

    def add(self, path: str, clients: str) -> None:
        """The image's line, appended when there is none. A line for the path that is there already is left as it
        is: openQRM's `auth` step rewrites the client of this very line at each boot."""
        rewrite(self.table, lambda lines: lines if any(line_path(ln) == path for ln in lines)
                else [*lines, kernel_line(path, clients)])
        _run(["exportfs", "-r"])

    def refresh(self, path: str, clients: str) -> None:
        self.add(path, clients)
        _run(["exportfs", "-f"])  # the export caches hold the path's old directory: the next mount looks again

    def remove(self, path: str) -> None:
        rewrite(self.table, lambda lines: [ln for ln in lines if line_path(ln) != path])
        _run(["exportfs", "-r"])

    def listed(self) -> dict[str, int | None]:
        """The paths `exportfs -v` shows: a path starts a line; its clients follow on it or on the next line."""
        out = _run(list(LISTERS["kernel"]))
        return {p: None for p in (line_path(ln) for ln in out.splitlines()) if p is not None}


# --- nfs-ganesha ---------------------------------------------------------------------------------------------

def _mark(path: str) -> str:
    return f"# qrmfs image {path}"


def ganesha_block(path: str, clients: str, export_id: int) -> list[str]:
    """The image's EXPORT block: openQRM's line as ganesha says it (read-write for the clients, no root squash),
    NFSv3 and v4; attributes never cached, as images are published by rename."""
    return [f"EXPORT {{  {_mark(path)}", f"    Export_Id = {export_id};", f'    Path = "{path}";',
            f'    Pseudo = "{path}";', "    Access_Type = None;", "    Squash = No_Root_Squash;",
            "    Protocols = 3, 4;", "    Transports = TCP;", "    SecType = sys;", "    Attr_Expiration_Time = 0;",
            f"    CLIENT {{ Clients = {clients}; Access_Type = RW; }}", "    FSAL { Name = VFS; }",
            f"}}  {_mark(path)}"]


def block_span(lines: list[str], path: str) -> tuple[int, int] | None:
    """Where the image's own block is: (first line, line after its end), from its marks."""
    mark = _mark(path)
    starts = [i for i, ln in enumerate(lines) if ln.startswith("EXPORT {") and ln.endswith(mark)]
    if not starts:
        return None
    for j in range(starts[0] + 1, len(lines)):
        if lines[j].startswith("}") and lines[j].endswith(mark):
            return starts[0], j + 1
    raise AgentError(ErrorKind.OS, f"the EXPORT block of {path} has no end: repair it by hand")


_ID_RE = re.compile(r"^\s*Export_Id\s*=\s*(\d+)\s*;")
_SHOWN_RE = re.compile(r'uint16 (\d+)\s+string "([^"]*)"')


class Ganesha:
    name = "nfs-ganesha"
    lister = "dbus-send ... ShowExports"

    def __init__(self, table: str) -> None:
        self.table = table

    def _block_id(self, path: str) -> int | None:
        try:
            with open(self.table, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return None
        span = block_span(lines, path)
        ids = [int(m.group(1)) for m in map(_ID_RE.match, lines[span[0]:span[1]] if span else []) if m]
        return ids[0] if ids else None

    def _write(self, path: str, clients: str) -> int:
        """The image's block in the file (kept when it is there), its Export_Id one that ganesha and the file do
        not use yet."""
        chosen: list[int] = []

        def edit(lines: list[str]) -> list[str]:
            span = block_span(lines, path)
            if span is not None:
                chosen.extend(int(m.group(1)) for m in map(_ID_RE.match, lines[span[0]:span[1]]) if m)
                return lines
            used = set(self.listed().values()) | {int(m.group(1)) for m in map(_ID_RE.match, lines) if m}
            free = next((i for i in range(GANESHA_ID_MIN, GANESHA_ID_MAX + 1) if i not in used), None)
            if free is None:
                raise AgentError(ErrorKind.OS, "nfs-ganesha has no free Export_Id left")
            chosen.append(free)
            return [*lines, *ganesha_block(path, clients, free)]
        rewrite(self.table, edit)
        if not chosen:
            raise AgentError(ErrorKind.OS, f"the EXPORT block of {path} in {self.table} has no Export_Id")
        return chosen[0]

    def _add(self, export_id: int) -> None:
        _run([*_DBUS, _IFACE + "AddExport", f"string:{self.table}", f"string:EXPORT(Export_Id={export_id})"])

    def _drop(self, export_id: int) -> None:
        _run([*_DBUS, _IFACE + "RemoveExport", f"uint16:{export_id}"])

    def add(self, path: str, clients: str) -> None:
        """The image's block, then the export: added again when ganesha serves it already, since what it serves
        is the directory the path named when it was added (an image removed by hand and made again under its
        name would otherwise be served from the removed tree)."""
        self.refresh(path, clients)

    def refresh(self, path: str, clients: str) -> None:
        """The export again, with the same Export_Id: ganesha resolves the path anew (the current generation) and
        running clients' handles, which carry that id, stay valid."""
        export_id = self._write(path, clients)
        shown = self.listed()
        if shown.get(path) == export_id:
            self._drop(export_id)
        elif export_id in shown.values():
            raise AgentError(ErrorKind.OS, f"nfs-ganesha serves Export_Id {export_id} for another path: "
                                           f"fix {self.table}")
        self._add(export_id)

    def remove(self, path: str) -> None:
        export_id = self.listed().get(path)
        if export_id is not None and export_id == self._block_id(path):  # a foreign export of the path stays
            self._drop(export_id)

        def edit(lines: list[str]) -> list[str]:
            span = block_span(lines, path)
            return lines if span is None else lines[:span[0]] + lines[span[1]:]
        rewrite(self.table, edit)

    def listed(self) -> dict[str, int | None]:
        """path -> Export_Id, as ganesha's ShowExports answers."""
        out = _run(list(LISTERS["ganesha"]))
        return {p: int(i) for i, p in _SHOWN_RE.findall(out)}
