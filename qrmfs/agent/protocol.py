"""The contract between qrmfs and its storage agent: one request and one answer dataclass per operation, one
enum of error kinds, one framing for every operation (the lock included).

Standard library only: this module travels to the storage server with the rest of the agent, so both ends
import the same definitions. The wire is JSON lines:
- the client writes one line `{"loader": ..., "modules": [...], "op": OP, "args": {...}}`;
- the agent answers with one line, `{"ok": true, "result": {...}}` or
  `{"ok": false, "error": {"kind": KIND, "message": TEXT}}`, and exits with FAILED after an error.
- `lock` answers like every other operation, then holds the lock until its stdin closes.
- `serve` is a session: the agent is shipped and started once per qrmfs run, answers `serve` with one line,
  then reads one `{"op": OP, "args": {...}}` line per call and answers each with one line, as above, until
  its stdin closes. In a session `lock` answers and holds the lock until `unlock` (or the end of the
  session, which ends with qrmfs however qrmfs ends); `run` needs its own agent (it streams).

The agent validates the arguments of every request (names and types) before it acts, the way an ansible
module checks its argument_spec: a client of another version gets `bad_request`, never a half-done action.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from .manifest import Manifest, ManifestError

FAILED = 3  # the agent's exit code after an error answer
STOPPED = 125  # `run`: the agent did not start the command, or stopped it (the reason is on stderr)
# Where an update keeps the generation it prunes as the image's spare, the next update's start (gens.prune):
# "reflink" where the file system shares extents (the spare costs what changed since), "always" (on ext4 it holds
# a whole copy between updates), "never".
SPARE_DEFAULT = "reflink"
SPARE_POLICIES = (SPARE_DEFAULT, "always", "never")
# Who serves an image's own NFS export (agent/exports.py): "none" (exports are managed elsewhere: qrmfs never
# writes one), "kernel" (the kernel NFS server, /etc/exports), "ganesha" (nfs-ganesha, an EXPORT block and DBus).
EXPORT_KINDS = ("none", "kernel", "ganesha")
EXPORT_FILES = {"kernel": "/etc/exports", "ganesha": "/etc/ganesha/qrmfs-exports.conf"}  # the default per kind
EXPORT_ACTIONS = ("add", "refresh", "remove", "show")

# Seconds after a node's last heartbeat that its record stops holding the generation it runs (holds.py): how
# long a node that crashed or lost power keeps its generation. The config's `node_timeout`.
NODE_TIMEOUT_DEFAULT = 900


class ErrorKind(str, enum.Enum):  # noqa: UP042 - StrEnum needs python 3.11 on the storage server
    LOCKED = "locked"
    EXISTS = "exists"
    NOT_FOUND = "not_found"
    REFUSED = "refused"
    NOT_IMAGE = "not_image"
    OS = "os"
    BAD_REQUEST = "bad_request"


class AgentError(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Options:
    """What the preparation of an image depends on: recorded in its manifest, sent with prepare and check."""
    image: str
    shared: bool = False
    private_add: list[str] = field(default_factory=list)
    private_exclude: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    keep_services: bool = True
    keep_network: bool = False
    hostname: str | None = None
    fresh_identity: bool = False  # clone: the new image must not keep the old one's host keys
    node_init: str = ""  # the qrmfs-init script's text, shipped from the qrmfs package

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Options:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def per_node_network(self) -> bool:
        """No network identity of the source stays in the image (persistent NIC rules, host keys)."""
        return self.shared or not self.keep_network

    @property
    def drops_host_keys(self) -> bool:
        """The image carries no ssh host keys: each node (shared) or the first boot makes its own."""
        return self.per_node_network or self.fresh_identity

    @property
    def regenerates_host_keys(self) -> bool:
        """A copy of an image that keeps per-image host keys (clone) gets new ones of its own."""
        return self.fresh_identity and not self.per_node_network


# --- answers ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FindingRecord:
    """A preparation or validation finding as it crosses the wire and is kept in the manifest."""
    step: str
    path: str
    problem: str
    fixable: bool


@dataclass(frozen=True)
class Inspected:
    exists: bool
    is_image: bool
    parent_exists: bool
    previous: bool
    free_bytes: int
    manifest: Manifest | None
    manifest_error: str | None = None  # a manifest is there but cannot be read: why (then manifest is None)

    @property
    def not_image_because(self) -> str:
        """Why the target is no qrmfs image: its manifest is missing, or cannot be read."""
        return self.manifest_error or "no .qrmfs/manifest.json"


@dataclass(frozen=True)
class Locked:
    lock: str
    cleaned: list[str]  # what earlier runs that did not finish had left beside the image, now removed


@dataclass(frozen=True)
class Unlocked:
    lock: str


@dataclass(frozen=True)
class Serving:
    pid: int
    python: str


@dataclass(frozen=True)
class Staged:
    staging: str
    known_hosts: str | None = None


@dataclass(frozen=True)
class Discarded:
    removed: str


@dataclass(frozen=True)
class Written:
    path: str


@dataclass(frozen=True)
class Published:
    path: str
    replaced: bool
    previous: str | None


@dataclass(frozen=True)
class Removed:
    removed: str


@dataclass(frozen=True)
class StagedUpdate:
    """A staging directory for an update, the image's top-level entries to copy into it, and whether the
    file system shares extents (reflinks) so the copy can be cheap."""
    staging: str
    known_hosts: str | None
    entries: list[str]
    reflink: bool
    recycled: dict[str, Any] | None = None  # staging is the image's spare (a pruned generation): its manifest's
    #                                         generation id and time; nothing to copy (entries is empty)


@dataclass(frozen=True)
class NodeHold:
    """A node's record that it runs a generation (holds.py); times are the storage server's clock (epoch s)."""
    node: str
    generation: str        # the generation id the node booted
    since: float           # when it booted (its record was written)
    seen: float            # its last heartbeat


@dataclass(frozen=True)
class Held:
    """A tree kept (not deleted, not made the spare) because nodes run it."""
    path: str
    nodes: list[NodeHold]


@dataclass(frozen=True)
class Swapped:
    """A journaled publish (update or rollback) done: where the replaced image went, what was pruned."""
    path: str
    generation: str | None
    pruned: list[str]
    nodes_moved: bool
    prune_failed: list[str] = field(default_factory=list)  # generations that could not be deleted (yet)
    held: list[Held] = field(default_factory=list)  # generations beyond `keep` kept because nodes run them


@dataclass(frozen=True)
class Generation:
    path: str
    role: str              # "current" | "generation"
    seq: int | None        # generations: higher is newer; 0 is an old-style .NAME.qrmfs-previous
    manifest: Manifest | None
    cost: int | None       # bytes shared with no other tree (reflinks); None when not asked for
    nodes: list[NodeHold] = field(default_factory=list)  # the nodes that run it (holds.py)


@dataclass(frozen=True)
class GenerationList:
    generations: list[Generation]
    journal: bool          # a publish was interrupted and is finished under the next lock


@dataclass(frozen=True)
class ListedImage:
    path: str
    manifest: Manifest
    locked: str | None


@dataclass(frozen=True)
class Leftover:
    """Something beside an image that no finished operation left: an unfinished copy (staging), a pinned source
    key, a half-removed tree, a lock file without its image, or an earlier generation."""
    path: str
    image: str       # the image path it belongs to
    kind: str        # staging | known_hosts | removing | lock | previous
    bytes: int
    held_by: str | None  # the image's lock holder: then it is in use, not left over


@dataclass(frozen=True)
class Listed:
    images: list[ListedImage]
    leftovers: list[Leftover] = field(default_factory=list)


@dataclass(frozen=True)
class ManifestUpdated:
    manifest: Manifest


@dataclass(frozen=True)
class Counts:
    files: int
    bytes: int


@dataclass(frozen=True)
class Pinned:
    known_hosts: str


@dataclass(frozen=True)
class Unpinned:
    known_hosts: str


@dataclass(frozen=True)
class Prepared:
    fixed: list[FindingRecord]
    left: list[FindingRecord]
    counts: Counts | None = None  # entries and bytes of the prepared tree, from the preparation's one walk


@dataclass(frozen=True)
class Checked:
    findings: list[FindingRecord]


# --- requests --------------------------------------------------------------------------------------------

A = TypeVar("A")


SESSION = "session"  # the handler of the ops the agent's framing serves itself (main.py): lock, unlock, serve, run
REQUESTS: dict[str, type[Request[Any]]] = {}  # every operation by its name: each Request subclass adds itself


class Request(Generic[A]):
    """One agent operation, declared once, as a frozen dataclass of its arguments that names
    - `op`: the operation's name on the wire;
    - `answer`: the dataclass of its result (the client decodes the answer line into it);
    - `handler`: "module.function" in this package that does it, called with the request's fields as keyword
      arguments (main.py resolves it; an agent without it answers bad_request), or SESSION for the ops that
      main.py's framing serves itself.
    Defining the class registers it in REQUESTS. The client's typed method is storage.StorageSide's
    `name = op(P.Name)` (or a method of its own that sends it); tests/unit/agent/test_ops.py checks that every
    operation has all four."""
    op: ClassVar[str]
    answer: ClassVar[type]
    handler: ClassVar[str]
    after_lost_lock: ClassVar[bool] = False  # the client sends it after the session that held the lock died

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.op in REQUESTS:
            raise TypeError(f"{REQUESTS[cls.op].__name__} and {cls.__name__} both declare the operation {cls.op!r}")
        REQUESTS[cls.op] = cls

    def decode_answer(self, data: Any) -> A:
        return typing.cast(A, decode(self.answer, data))


@dataclass(frozen=True)
class Inspect(Request[Inspected]):
    """What is at the target now: exists, is an image, staging leftovers, free space."""
    op: ClassVar[str] = "inspect"
    answer: ClassVar[type] = Inspected
    handler: ClassVar[str] = "tree.op_inspect"
    path: str
    export_root: str


@dataclass(frozen=True)
class Lock(Request[Locked]):
    """Take the image's lock and hold it until the client's stdin closes."""
    op: ClassVar[str] = "lock"
    answer: ClassVar[type] = Locked
    handler: ClassVar[str] = SESSION
    path: str
    export_root: str
    holder: str


@dataclass(frozen=True)
class Unlock(Request[Unlocked]):
    """In a session: give up the image's lock that this session took."""
    op: ClassVar[str] = "unlock"
    answer: ClassVar[type] = Unlocked
    handler: ClassVar[str] = SESSION
    path: str
    export_root: str


@dataclass(frozen=True)
class Serve(Request[Serving]):
    """Start a session: answer, then answer one request line after another until stdin closes."""
    op: ClassVar[str] = "serve"
    answer: ClassVar[type] = Serving
    handler: ClassVar[str] = SESSION


@dataclass(frozen=True)
class Stage(Request[Staged]):
    """A fresh staging directory beside the image (leftovers of crashed runs removed first)."""
    op: ClassVar[str] = "stage"
    answer: ClassVar[type] = Staged
    handler: ClassVar[str] = "tree.op_stage"
    path: str
    export_root: str
    token: str
    known_hosts: str | None = None


@dataclass(frozen=True)
class Discard(Request[Discarded]):
    op: ClassVar[str] = "discard"
    answer: ClassVar[type] = Discarded
    handler: ClassVar[str] = "tree.op_discard"
    after_lost_lock: ClassVar[bool] = True  # a failed run removes its own unfinished copy: never the image
    path: str
    export_root: str
    staging: str


@dataclass(frozen=True)
class WriteManifest(Request[Written]):
    """Write the manifest into a staging copy of the image (the last thing before publish)."""
    op: ClassVar[str] = "write_manifest"
    answer: ClassVar[type] = Written
    handler: ClassVar[str] = "tree.op_write_manifest"
    path: str
    export_root: str
    staging: str
    manifest: Manifest


@dataclass(frozen=True)
class Publish(Request[Published]):
    op: ClassVar[str] = "publish"
    answer: ClassVar[type] = Published
    handler: ClassVar[str] = "tree.op_publish"
    path: str
    export_root: str
    staging: str
    force: bool
    node_timeout: int = NODE_TIMEOUT_DEFAULT


@dataclass(frozen=True)
class StageUpdate(Request[StagedUpdate]):
    op: ClassVar[str] = "stage_update"
    answer: ClassVar[type] = StagedUpdate
    handler: ClassVar[str] = "gens.op_stage_update"
    path: str
    export_root: str
    token: str
    known_hosts: str | None = None
    node_timeout: int = NODE_TIMEOUT_DEFAULT


@dataclass(frozen=True)
class StageCopy(Request[StagedUpdate]):
    """A fresh staging directory for a new image made from the image `origin` on the same server (clone):
    origin's top-level entries to copy (all but /.qrmfs) and whether staging can share its extents."""
    op: ClassVar[str] = "stage_copy"
    answer: ClassVar[type] = StagedUpdate
    handler: ClassVar[str] = "gens.op_stage_copy"
    path: str
    export_root: str
    token: str
    origin: str
    origin_root: str


@dataclass(frozen=True)
class PublishUpdate(Request[Swapped]):
    """The journaled publish of an update: node state moves in, the image becomes the newest generation; the
    generations beyond `keep` are pruned, the newest of them kept as the spare as `spare` says (SPARE_POLICIES)."""
    op: ClassVar[str] = "publish_update"
    answer: ClassVar[type] = Swapped
    handler: ClassVar[str] = "gens.op_publish_update"
    path: str
    export_root: str
    staging: str
    keep: int
    spare: str = SPARE_DEFAULT
    node_timeout: int = NODE_TIMEOUT_DEFAULT


@dataclass(frozen=True)
class Rollback(Request[Swapped]):
    op: ClassVar[str] = "rollback"
    answer: ClassVar[type] = Swapped
    handler: ClassVar[str] = "gens.op_rollback"
    path: str
    export_root: str
    keep: int


@dataclass(frozen=True)
class Exported:
    path: str
    kind: str
    state: str                # "exported" | "stale" (listed, not refreshed since this generation) | "absent"
    export_id: int | None     # ganesha's Export_Id


@dataclass(frozen=True)
class Export(Request[Exported]):
    """The image's own NFS export (agent/exports.py): add, refresh (after a generation exchange), remove (after
    the image is gone) or show; `table` is /etc/exports or the ganesha file ganesha.conf includes."""
    op: ClassVar[str] = "export"
    answer: ClassVar[type] = Exported
    handler: ClassVar[str] = "exports.op_export"
    path: str
    export_root: str
    action: str
    kind: str
    clients: str
    table: str


@dataclass(frozen=True)
class Generations(Request[GenerationList]):
    op: ClassVar[str] = "generations"
    answer: ClassVar[type] = GenerationList
    handler: ClassVar[str] = "gens.op_generations"
    path: str
    export_root: str
    costs: bool = False
    node_timeout: int = NODE_TIMEOUT_DEFAULT


@dataclass(frozen=True)
class Pruned:
    pruned: list[str]
    failed: list[str]
    held: list[Held]


@dataclass(frozen=True)
class Prune(Request[Pruned]):
    """gc: the generations beyond `keep` that no node runs any more are deleted (gens.prune), as an update
    would; call under the image's lock."""
    op: ClassVar[str] = "prune"
    answer: ClassVar[type] = Pruned
    handler: ClassVar[str] = "gens.op_prune"
    path: str
    export_root: str
    keep: int
    spare: str
    node_timeout: int = NODE_TIMEOUT_DEFAULT


@dataclass(frozen=True)
class Rebased:
    counts: dict[str, int]


@dataclass(frozen=True)
class Rebase(Request[Rebased]):
    """What changed against the image, when the staging copy started from the spare (treediff.op_rebase):
    the staging copy compared with the image; `prepared`: the paths the preparation changes on purpose;
    `only`: the paths where they can differ (a scan's and rsync's), else every path."""
    op: ClassVar[str] = "rebase"
    answer: ClassVar[type] = Rebased
    handler: ClassVar[str] = "treediff.op_rebase"
    path: str
    export_root: str
    staging: str
    prepared: list[str]
    only: list[str] | None = None


@dataclass(frozen=True)
class RebaseScanned:
    paths: list[str] | None


@dataclass(frozen=True)
class RebaseScan(Request[RebaseScanned]):
    """The paths where the staging copy and the image differ, found while rsync still works in the copy
    (treediff.op_rebase_scan); None: too many to name."""
    op: ClassVar[str] = "rebase_scan"
    answer: ClassVar[type] = RebaseScanned
    handler: ClassVar[str] = "treediff.op_rebase_scan"
    path: str
    export_root: str
    staging: str


@dataclass(frozen=True)
class Remove(Request[Removed]):
    """running_ok: remove the image although nodes run it (else refused, the nodes named)."""
    op: ClassVar[str] = "remove"
    answer: ClassVar[type] = Removed
    handler: ClassVar[str] = "tree.op_remove"
    path: str
    export_root: str
    force: bool
    running_ok: bool = False
    node_timeout: int = NODE_TIMEOUT_DEFAULT


@dataclass(frozen=True)
class List(Request[Listed]):
    """The images below the export root; with leftovers, also what lies beside them (each one's size: a walk
    of each generation and spare)."""
    op: ClassVar[str] = "list"
    answer: ClassVar[type] = Listed
    handler: ClassVar[str] = "tree.op_list"
    export_root: str
    depth: int = 3
    leftovers: bool = True


@dataclass(frozen=True)
class ManifestUpdate(Request[ManifestUpdated]):
    op: ClassVar[str] = "manifest_update"
    answer: ClassVar[type] = ManifestUpdated
    handler: ClassVar[str] = "tree.op_manifest_update"
    path: str
    export_root: str
    patch: dict[str, Any]


@dataclass(frozen=True)
class Stats(Request[Counts]):
    """Entries and allocated bytes of the image, or of its staging copy `root`."""
    op: ClassVar[str] = "stats"
    answer: ClassVar[type] = Counts
    handler: ClassVar[str] = "tree.op_stats"
    path: str
    export_root: str
    root: str | None = None


@dataclass(frozen=True)
class PinHost(Request[Pinned]):
    op: ClassVar[str] = "pin_host"
    answer: ClassVar[type] = Pinned
    handler: ClassVar[str] = "tree.op_pin_host"
    path: str
    export_root: str
    known_hosts: str


@dataclass(frozen=True)
class UnpinHost(Request[Unpinned]):
    op: ClassVar[str] = "unpin_host"
    answer: ClassVar[type] = Unpinned
    handler: ClassVar[str] = "tree.op_unpin_host"
    path: str
    export_root: str


@dataclass(frozen=True)
class Prepare(Request[Prepared]):
    """Apply the preparation steps to the image, or to its staging copy `root`. The image itself (no `root`:
    validate --fix) is refused while nodes run it (holds.py, with node_timeout): a node's root never changes
    under it."""
    op: ClassVar[str] = "prepare"
    answer: ClassVar[type] = Prepared
    handler: ClassVar[str] = "main.op_prepare"
    path: str
    export_root: str
    options: Options
    root: str | None = None
    node_timeout: int = NODE_TIMEOUT_DEFAULT


@dataclass(frozen=True)
class Check(Request[Checked]):
    op: ClassVar[str] = "check"
    answer: ClassVar[type] = Checked
    handler: ClassVar[str] = "main.op_check"
    path: str
    export_root: str
    options: Options
    root: str | None = None


@dataclass(frozen=True)
class Ran:
    code: int


@dataclass(frozen=True)
class Run(Request[Ran]):
    """Run a command on the storage server (its rsync) as the agent's child, with the agent's stdout and stderr:
    no answer line, the agent exits with the command's exit code. With pipe_to, argv's stdout feeds pipe_to's
    stdin (both in one process group, stopped together); the agent then prints one line `{"pipeline": [code of
    argv, code of pipe_to]}` on stdout and exits with the larger code. The agent stops the command when its own
    stdin ends (qrmfs is gone, or its connection) or, with a holder, as soon as the image's lock is no longer
    held by that holder; it then exits with STOPPED and says why on stderr."""
    op: ClassVar[str] = "run"
    answer: ClassVar[type] = Ran
    handler: ClassVar[str] = SESSION
    path: str
    export_root: str
    argv: list[str]
    holder: str | None = None
    pipe_to: list[str] | None = None  # a second command reading argv's stdout (a tar stream's extracting end)


# --- encoding --------------------------------------------------------------------------------------------

def encode(value: Any) -> Any:
    """A dataclass (nested too) as plain JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Manifest):
        return value.data
    if isinstance(value, (list, tuple)):  # the agent may run on an older python3
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


def _bad(what: str) -> AgentError:
    return AgentError(ErrorKind.BAD_REQUEST, what)


_SCALARS: dict[str, type] = {"str": str, "int": int, "bool": bool, "float": float}


def _decode_value(hint: str, value: Any, where: str) -> Any:
    """Check and decode one field by its annotation's text (annotations are never evaluated, so the agent
    runs on the storage server's python3 even where `X | None` is not valid at run time)."""
    hint = hint.strip()
    if hint.endswith("| None"):
        return None if value is None else _decode_value(hint[:-len("| None")], value, where)
    if hint == "Any":
        return value
    if hint.startswith("list["):
        if not isinstance(value, list):
            raise _bad(f"{where}: expected a list")
        return [_decode_value(hint[len("list["):-1], v, where) for v in value]
    if hint.startswith("dict["):
        if not isinstance(value, dict):
            raise _bad(f"{where}: expected an object")
        return value
    if hint in _SCALARS:
        want = _SCALARS[hint]
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise _bad(f"{where}: expected {hint}")
        return value
    return decode(globals()[hint], value)


def decode(cls: type[Any], data: Any) -> Any:
    """Plain JSON data as the dataclass cls: unknown, missing or mistyped fields raise bad_request."""
    if cls is Manifest:
        try:
            return Manifest.load(data)
        except ManifestError as e:
            raise _bad(str(e)) from None
    if not isinstance(data, dict):
        raise _bad(f"{cls.__name__}: expected an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _bad(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _decode_value(str(f.type), data[name], f"{cls.__name__}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _bad(f"{cls.__name__}: missing field {name}")
    return cls(**kwargs)


def request(op: str, args: Any) -> Request[Any]:
    """The request an operation name and its arguments make, validated."""
    if op not in REQUESTS:
        raise _bad(f"unknown operation {op!r}")
    return typing.cast(Request[Any], decode(REQUESTS[op], args))


def ok_line(result: Any) -> str:
    return json.dumps({"ok": True, "result": encode(result)})


def error_line(kind: ErrorKind, message: str) -> str:
    return json.dumps({"ok": False, "error": {"kind": kind.value, "message": message}})


@dataclass(frozen=True)
class Answer:
    """One answer line, parsed: the result data, or the error's kind and message."""
    ok: bool
    result: Any = None
    kind: ErrorKind | None = None
    message: str = ""

    @classmethod
    def parse(cls, line: str) -> Answer:
        d = json.loads(line)
        if d.get("ok"):
            return cls(True, d.get("result"))
        err = d.get("error") or {}
        try:
            kind = ErrorKind(err.get("kind"))
        except ValueError:
            kind = ErrorKind.OS
        return cls(False, kind=kind, message=str(err.get("message", "")))
