"""What each command returns, typed, and the one renderer for it: plain text for people, or with --json one
envelope for programs (docs/json.md):

    {"schema": 1, "ok": true,  "command": "create", "result": {...}}
    {"schema": 1, "ok": false, "command": "create", "error": {"kind", "message", "exit_code", "detail"}}

A command whose work ran but whose answer is "no" (validate found problems, list could not reach a server,
flush left jobs pending) prints ok false with its error and its result both.
"""

from __future__ import annotations

import enum
import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from .agent.manifest import Manifest, RegistrationRecord
from .agent.protocol import FindingRecord, encode
from .errors import ConnectError, InvalidImageError, QrmfsError, RegistrationError

SCHEMA = 1


class RegState(enum.Enum):
    """An image's openQRM registration, as recorded in its manifest and reported. openQRM 5.3 shows no record
    (docs/openqrm.md), so no state says "registered": what was sent and how openQRM answered is all qrmfs knows."""
    SENT = "sent"                  # openQRM ran new_image for an administrator; the record itself is not seen
    PENDING = "pending"            # waiting in the spool (openQRM did not answer yet)
    NOT_REGISTERED = "not_registered"  # -o/--only-physical
    DEREGISTRATION_SENT = "deregistration_sent"  # remove: openQRM ran remove_by_name for an administrator
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: Any) -> RegState:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


# the states whose requests openQRM answered: shown with when, how and what its answers showed (jobs.SEEN)
ANSWERED = (RegState.SENT, RegState.DEREGISTRATION_SENT)


@dataclass(frozen=True)
class Registration:
    state: RegState
    spool_job: str | None = None
    error: str | None = None
    time: str | None = None          # when openQRM answered it (UTC, ISO 8601), as recorded at that moment
    via: str | None = None           # how: "create", "clone", "flush of spool job ID", ...
    seen: str | None = None          # what openQRM's answers showed of it, and what they cannot show (jobs.SEEN)

    def record(self) -> dict[str, Any]:
        """As kept in the manifest."""
        return {k: v for k, v in encode(self).items() if v is not None}

    @classmethod
    def of_manifest(cls, manifest: Manifest | None) -> Registration:
        reg = manifest.registration if manifest is not None else RegistrationRecord()
        return cls(RegState.parse(reg.state), reg.spool_job, reg.error, reg.time, reg.via, reg.seen)

    @property
    def has_record(self) -> bool:
        """openQRM has a record of the image, or is being sent one (the spool), or may have one: everything that
        acts on "is this image registered?" asks this."""
        return self.state in (RegState.SENT, RegState.PENDING, RegState.UNKNOWN)

    def __str__(self) -> str:
        text = self.state.value.replace("_", " ")
        if self.spool_job and self.state is RegState.PENDING:
            return f"{text} (spool job {self.spool_job})"
        known = "; ".join(x for x in (" by ".join(x for x in (self.time, self.via) if x), self.seen) if x)
        return f"{text} ({known})" if known and self.state in ANSWERED else text


def plan_lines(registration: list[dict[str, Any]]) -> list[str]:
    """A dry run's openQRM requests (jobs.planned), one line each."""
    if not registration:
        return ["  openQRM: nothing sent"]
    return ["  openQRM (in this order):", *(
        f"    GET {r['url']} " + (r["params"].get("image_command") or
                                  f"event {r['params'].get('event_name')} priority {r['params'].get('event_priority')}")
        for r in registration)]


class Result:
    """A command's typed outcome. text() is what a person reads; failure() says when the answer is "no"."""

    def text(self) -> str:
        raise NotImplementedError

    def failure(self) -> QrmfsError | None:
        return None


@dataclass(frozen=True)
class Built(Result):
    """create and clone: a new image (or generation) is published."""
    command: str
    image: str
    target: str
    source: str
    route: str
    files: int
    bytes: int
    replaced: bool
    previous: str | None
    preparation_fixed: int
    validation: str
    registration: Registration
    warnings: list[str] = field(default_factory=list)
    # what the copy changed (rsync's counts: created, deleted, transferred, bytes_transferred); for update, how
    # the new generation differs from the one it replaced
    changes: dict[str, int] = field(default_factory=dict)
    export: str | None = None  # the image's own NFS export, as the NFS server lists it (None: exports = "none")

    def text(self) -> str:
        verb = {"create": "created", "clone": "cloned", "update": "updated"}.get(self.command, self.command)
        return (f"{verb} {self.target} from {self.source}: {self.files} files, {self.bytes / 2**20:.1f} MiB; "
                f"openQRM: {self.registration}" + (f"; NFS export: {self.export}" if self.export else ""))


@dataclass(frozen=True)
class BuildPlan(Result):
    """create --dry-run and clone --dry-run: what would run, nothing changed."""
    command: str
    image: str
    target: str
    source: str
    route: str
    staging: str
    copies: list[dict[str, Any]]
    preparation: list[dict[str, str]]
    options: dict[str, Any]
    registration: list[dict[str, Any]]
    note: str = ""
    dry_run: bool = True

    def text(self) -> str:
        lines = [f"dry run: {self.command} {self.image} at {self.target} from {self.source} (route {self.route})",
                 f"  staging: {self.staging}"]
        for c in self.copies:
            lines.append(f"  copy {c['what']} on {c['runs_on']}:")
            pipe = " | " + shlex.join(c["pipe_to"]) if c.get("pipe_to") else ""
            lines.append("    " + shlex.join(c["argv"]) + pipe)
            if c.get("repair_if_unclean"):
                lines.append("    if the stream does not end cleanly: " + shlex.join(c["repair_if_unclean"]))
        if self.note:
            lines.append("  " + self.note)
        lines.append("  preparation:")
        lines += [f"    {s['step']}: {s['what']}" for s in self.preparation]
        lines += plan_lines(self.registration)
        lines.append("nothing was changed")
        return "\n".join(lines)


@dataclass(frozen=True)
class UpdatePlan(Result):
    """update --dry-run: what would change (rsync's itemized dry run, counted by kind); nothing changed."""
    image: str
    target: str
    source: str
    counts: dict[str, int]
    changes: list[dict[str, str]]
    truncated: bool
    options: dict[str, Any]
    keep_generations: int
    registration: list[dict[str, Any]]
    dry_run: bool = True

    def text(self) -> str:
        total = sum(self.counts.values())
        lines = [f"dry run: update {self.target} from {self.source}: {total} change(s)"
                 + (" (" + ", ".join(f"{k} {v}" for k, v in self.counts.items()) + ")" if total else "")]
        lines += [f"  {c['change']} {c['path']}" for c in self.changes]
        if self.truncated:
            lines.append(f"  ... ({total - len(self.changes)} more)")
        lines.append(f"  the current image would become the newest earlier generation (keep_generations = "
                     f"{self.keep_generations})")
        lines += plan_lines(self.registration)
        lines.append("nothing was changed")
        return "\n".join(lines)


@dataclass(frozen=True)
class RolledBack(Result):
    target: str
    to: str                 # the generation that became current (its directory before the swap)
    made: str               # when that generation was made
    kept_as: str | None     # where the replaced image went
    registration: Registration
    dry_run: bool = False
    export: str | None = None  # the image's own NFS export, told of the exchange (None: exports = "none")
    plan: list[dict[str, Any]] = field(default_factory=list)  # dry run: the openQRM requests it would send

    def text(self) -> str:
        if self.dry_run:
            return "\n".join([f"would roll {self.target} back to {self.to} (made {self.made})",
                              *plan_lines(self.plan), "nothing was changed"])
        return (f"rolled back {self.target} to the generation made {self.made}; the replaced image is kept as "
                f"{self.kept_as}; openQRM: {self.registration}" + (f"; NFS export: {self.export}" if self.export
                                                                    else ""))


@dataclass(frozen=True)
class NodeRow:
    """A node that runs a generation (its record, agent/holds.py): since it booted, last heard of (UTC)."""
    node: str
    since: str
    seen: str


@dataclass(frozen=True)
class GenerationRow:
    path: str
    role: str
    seq: int | None
    made: str
    made_by: str | None
    source: str | None
    changes: dict[str, int] | None
    base_copy: str | None
    files: int | None
    bytes: int | None
    cost: int | None
    id: str | None
    nodes: list[NodeRow] = field(default_factory=list)


@dataclass(frozen=True)
class Generations(Result):
    target: str
    generations: list[GenerationRow]
    interrupted: bool = False   # a publish was interrupted; the next operation on the image finishes it

    def text(self) -> str:
        lines = [f"{self.target}:" + (" (an interrupted publish is finished by the next operation)"
                                      if self.interrupted else "")]
        for g in self.generations:
            ch = g.changes or {}
            what = (f"+{ch.get('new', ch.get('created', 0))} ~{ch.get('changed', ch.get('transferred', 0))} "
                    f"m{ch.get('metadata', 0)} -{ch.get('deleted', 0)}" if g.changes is not None else "-")
            cost = f"{g.cost / 2**20:.1f} MiB" if g.cost is not None else "?"
            name = "current" if g.role == "current" else f"gen {g.seq}"
            lines.append(f"  {name:<8} {g.made:<21} {what:<18} cost {cost:<12} copy {g.base_copy or '?':<20} "
                         f"from {g.source or '?'}")
            lines += [f"           run by node {n.node} since {n.since} (last heard of {n.seen})" for n in g.nodes]
        return "\n".join(lines)


@dataclass(frozen=True)
class GenerationListing(Result):
    images: list[Generations]
    errors: list[StorageFailure] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(g.text() for g in self.images) if self.images else "no images"

    def failure(self) -> QrmfsError | None:
        if not self.errors:
            return None
        return ConnectError("; ".join(f"storage server {e.storage}: {e.error}" for e in self.errors))


@dataclass(frozen=True)
class Removed(Result):
    removed: str
    registration: Registration

    def text(self) -> str:
        return f"removed {self.removed}; openQRM: {self.registration}"


@dataclass(frozen=True)
class RemovePlan(Result):
    remove: str
    deregister: bool
    is_image: bool
    registration: list[dict[str, Any]] = field(default_factory=list)  # the openQRM requests it would send
    dry_run: bool = True

    def text(self) -> str:
        return "\n".join([f"would remove {self.remove}" + (" and deregister it from openQRM" if self.deregister
                                                           else ""), *plan_lines(self.registration)])


@dataclass(frozen=True)
class Drift:
    source: str
    count: int
    changes: list[dict[str, str]]
    truncated: bool


@dataclass(frozen=True)
class Validated(Result):
    image: str
    target: str
    findings: list[FindingRecord]
    fix: bool = False
    dry_run: bool = False
    fixed: list[FindingRecord] = field(default_factory=list)
    would_fix: list[FindingRecord] = field(default_factory=list)
    findings_before_fix: list[FindingRecord] = field(default_factory=list)
    drift: Drift | None = None

    @property
    def clean(self) -> bool:
        return not self.findings

    def text(self) -> str:
        lines = [f"fixed    {f.step:<15} {f.path}: {f.problem}" for f in self.fixed]
        lines += [f"would fix {f.step:<14} {f.path}: {f.problem}" for f in self.would_fix]
        repairing = self.fix and not self.dry_run
        for f in self.findings:
            lines.append(f"LEFT     {f.step:<15} {f.path}: {f.problem}" if repairing else
                         f"problem  {f.step:<15} {f.path}: {f.problem}" + ("" if f.fixable else
                                                                          " (not repaired by --fix)"))
        if self.drift is not None:
            lines.append(f"drift from {self.drift.source}: {self.drift.count} difference(s)")
            lines += [f"  {c['change']} {c['path']}" for c in self.drift.changes]
        lines.append(f"{self.target}: " + ("clean" if self.clean else f"{len(self.findings)} problem(s)"
                                           + ("" if self.fix else "; `qrmfs validate --fix` repairs the fixable ones")))
        return "\n".join(lines)

    def failure(self) -> QrmfsError | None:
        if self.clean:
            return None
        return InvalidImageError(f"{self.target}: {len(self.findings)} problem(s)")


@dataclass(frozen=True)
class ImageRow:
    storage: str
    name: str | None
    path: str
    target: str
    bytes: int | None
    files: int | None
    created: str | None
    source: str | None
    shared: bool
    arch: str | None
    os: str | None
    validation: str
    registration: Registration
    locked_by: str | None


@dataclass(frozen=True)
class StorageFailure:
    storage: str
    error: str


@dataclass(frozen=True)
class LeftoverRow:
    storage: str
    path: str
    image: str
    kind: str
    bytes: int
    held_by: str | None


@dataclass(frozen=True)
class Listing(Result):
    images: list[ImageRow]
    errors: list[StorageFailure]
    leftovers: list[LeftoverRow] = field(default_factory=list)

    def _leftover_text(self) -> list[str]:
        if not self.leftovers:
            return []
        lines = ["", "beside images (`qrmfs gc` removes what no operation holds; earlier generations and spares "
                     "stay):"]
        for x in self.leftovers:
            state = (f"in use by {x.held_by}" if x.held_by else
                     "the next update starts from it" if x.kind == "spare" else
                     "not made by qrmfs: left alone" if x.kind == "foreign" else
                     "kept" if x.kind in ("generation", "previous") else "left over")
            lines.append(f"  {x.storage}:{x.path}  {x.kind}, {x.bytes / 2**20:.1f} MiB, {state}")
        return lines

    def text(self) -> str:
        from io import StringIO

        from rich.console import Console
        from rich.table import Table

        t = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("STORAGE", "NAME", "SIZE", "FILES", "CREATED", "SOURCE", "TAGS", "VALID", "OPENQRM"):
            t.add_column(col, overflow="fold")
        for i in self.images:
            tags = " ".join(x for x in ("shared" if i.shared else "", i.arch or "", i.os or "") if x)
            size = f"{i.bytes / 2**30:.2f}G" if i.bytes is not None else "?"
            t.add_row(i.storage, (i.name or "?") + (f" (locked: {i.locked_by})" if i.locked_by else ""), size,
                      str(i.files), i.created or "?", i.source or "?", tags, i.validation, str(i.registration))
        out = StringIO()
        # as wide as its rows: a long source or registration is never folded onto a second line (grep finds it)
        Console(file=out, width=10_000, no_color=True, highlight=False).print(t)
        return "\n".join([out.getvalue().rstrip("\n") if self.images else "no images", *self._leftover_text()])

    def failure(self) -> QrmfsError | None:
        if not self.errors:
            return None
        return ConnectError("; ".join(f"storage server {e.storage}: {e.error}" for e in self.errors))


@dataclass(frozen=True)
class Collected(Result):
    """qrmfs gc: what unfinished operations had left beside images, removed under each image's lock."""
    removed: list[str]
    in_use: list[str]
    held: list[str] = field(default_factory=list)  # generations beyond keep_generations that nodes still run

    def text(self) -> str:
        lines = ([f"removed {p}" for p in self.removed] + [f"in use, kept: {p}" for p in self.in_use]
                 + [f"kept while nodes run it: {p}" for p in self.held])
        return "\n".join(lines + [f"gc: removed {len(self.removed)}, in use {len(self.in_use)}"
                                  + (f", run by nodes {len(self.held)}" if self.held else "")])


@dataclass(frozen=True)
class Flushed(Result):
    delivered: list[str]
    pending: list[str]
    spool: str = ""

    def text(self) -> str:
        # sent: openQRM answered every request of those jobs (what that shows: jobs.SEEN, in each image's manifest)
        return (f"sent {len(self.delivered)}, still pending {len(self.pending)}"
                + (f" ({', '.join(self.pending)}; see {self.spool})" if self.pending else ""))

    def failure(self) -> QrmfsError | None:
        if not self.pending:
            return None
        return RegistrationError(f"{len(self.pending)} registration(s) still pending in the spool {self.spool}")


def _data(result: Result) -> Any:
    data = encode(result)
    if isinstance(result, Validated):
        data["clean"] = result.clean
    return data


def envelope(command: str, result: Result | None = None, error: QrmfsError | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {"schema": SCHEMA, "ok": error is None, "command": command}
    if result is not None:
        env["result"] = _data(result)
    if error is not None:
        env["error"] = {"kind": error.kind, "message": error.message, "exit_code": error.exit_code,
                        "detail": error.detail}
    return env


def render_json(command: str, result: Result | None = None, error: QrmfsError | None = None) -> str:
    return json.dumps(envelope(command, result, error), indent=2, default=str)
