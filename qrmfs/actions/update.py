"""qrmfs update, rollback and list --generations: an image's daily path.

update re-pulls an image from its source into a new generation (incremental: a reflink or plain copy of the
current image, then rsync --delete, then the preparation), published by the agent's journaled swap that moves
the nodes' state along. The source and options default to those in the image's manifest; what is given
overrides them and is recorded. rollback makes the newest earlier generation current again, the same way.

openQRM: the image's record stays as it is (same name, same root device), so an update or rollback of a
registered image sends its events (priority 9 and 10) through the spool; only when an option the record shows
changes (--shared, -a, --operation-system; or the generation rolled back to had others) is the record replaced:
remove_by_name, then new_image, as openQRM's update_image needs the record's image_id, which no answer shows.
The requests are built in jobs.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .. import jobs, openqrm
from ..agent.holds import stamp
from ..agent.manifest import Manifest
from ..errors import NotFoundError, RefusedError, UsageError
from ..model import Location, Route, Target
from ..options import IMAGE_OPTIONS, OPTION
from ..results import (
    Built,
    GenerationListing,
    GenerationRow,
    Generations,
    NodeRow,
    Registration,
    RegState,
    RolledBack,
    UpdatePlan,
)
from ..transfer import change_kind
from . import exports, pipeline
from .common import Credentials, Env, holder, require_registration
from .create import CreateRequest
from .delivery import deliver, flush_spool, iso_now
from .listing import list_images
from .validate import changes_from_source


@dataclass(frozen=True)
class UpdateRequest:
    target: Target
    location: Location | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # option name -> value, only what was given
    only_physical: bool = False
    route: Route | None = None
    dry_run: bool = False
    creds: Credentials = field(default_factory=lambda: Credentials(None, None))


def _current(env: Env, target: Target) -> Manifest:
    _storage, _side, info = env.existing(target)
    if info.manifest is None:
        raise RefusedError(f"{target} is not a qrmfs image ({info.not_image_because}): nothing to update")
    return info.manifest


def _registered(manifest: Manifest) -> bool:
    return Registration.of_manifest(manifest).has_record


def create_request(req: UpdateRequest, manifest: Manifest) -> CreateRequest:
    """What a fresh create of this image with the recorded (or overridden) source and options would be."""
    o = {**manifest.options, **req.overrides}
    if req.location is not None:
        loc = req.location
    else:
        try:
            loc = Location.parse(manifest.source or "")
        except UsageError:
            raise UsageError(f"{req.target} records no source qrmfs can pull from ({manifest.source!r}); "
                             "give -l/--location") from None
    # the route: given, else recorded in the options, else where a manifest before the options had it
    route = req.route or Route(o.get("route") or manifest.route or OPTION["route"].default)
    return CreateRequest(name=req.target.name, target=req.target, location=loc, only_physical=req.only_physical,
                         force=True, route=route, creds=req.creds,
                         **{opt.name: opt.recorded(o) for opt in IMAGE_OPTIONS if opt.name != "route"})


def _enrollment(creds: Credentials, only_physical: bool, manifest: Manifest, target: Target,
                made: Manifest, env: Env) -> pipeline.Enrollment | None:
    """A registered image's record as the image `made` (its options and source) has it; sent only if what the
    record shows differs from the current image's (_changes)."""
    if only_physical or not _registered(manifest):
        return None
    return pipeline.Enrollment(creds, jobs.image_fields(
        env.cfg.openqrm, env.storage(target), name=target.name, rootdevice=target.path,
        shared=bool(made.option("shared")), comment=f"qrmfs image from {made.source}", arch=made.option("arch"),
        os_name=made.option("os")))


def _changes(manifest: Manifest, made: Manifest) -> bool:
    return bool(jobs.record_fields_changed(manifest.options, made.options))


def _made(creq: CreateRequest) -> Manifest:
    """What the manifest of the image an update makes has of what its record follows."""
    return Manifest.new({"options": creq.options_record(), "source": str(creq.location)})


def update(req: UpdateRequest, env: Env) -> Built | UpdatePlan:
    env.forward_agent()  # before the first connection: the source (in the manifest) is likely a host to pull from
    manifest = _current(env, req.target)
    creq = create_request(req, manifest)
    if req.dry_run:
        return _dry_run(req, env, manifest, creq)
    enroll = _enrollment(req.creds, req.only_physical, manifest, req.target, _made(creq), env)
    if enroll:
        require_registration(req.creds)
        flush_spool(env, req.creds, quick=True)
    with pipeline.placement(env, req.target, creq.route) as place:
        spec = pipeline.BuildSpec(
            command="update", place=place, source=creq.source(env), source_label=str(creq.location),
            options=creq.prepare_options(), force=True, enroll=enroll,
            manifest={"options": {**creq.options_record(), "only_physical": manifest.option("only_physical", False)},
                      "excludes": list(creq.excludes), "route": creq.route.value},
            discover_mounts=True, new_record=False, parent=manifest)
        return pipeline.build(env, spec)


def _dry_run(req: UpdateRequest, env: Env, manifest: Manifest, creq: CreateRequest) -> UpdatePlan:
    """What the update would change: rsync's itemized dry run from the source into the current image, with the
    update's excludes; the paths the preparation changes on purpose are left out. Nothing is written."""
    enroll = _enrollment(req.creds, req.only_physical, manifest, req.target, _made(creq), env)
    changed = _changes(manifest, _made(creq))
    changes = changes_from_source(env, env.storage(req.target), req.target, creq.location, creq.excludes, manifest)
    counts = Counter(change_kind(c["change"]) for c in changes)
    return UpdatePlan(image=req.target.name, target=str(req.target), source=str(creq.location),
                      counts=dict(sorted(counts.items())), changes=changes[:200], truncated=len(changes) > 200,
                      options=creq.options_record(), keep_generations=env.cfg.keep_generations,
                      registration=[] if enroll is None else jobs.planned(req.creds.url, jobs.requests(
                          "update", req.target.name, str(req.target), enroll.fields if changed else None, changed)))


@dataclass(frozen=True)
class RollbackRequest:
    target: Target
    only_physical: bool = False
    dry_run: bool = False
    creds: Credentials = field(default_factory=lambda: Credentials(None, None))


def rollback(req: RollbackRequest, env: Env) -> RolledBack:
    manifest = _current(env, req.target)
    storage = env.storage(req.target)
    side = env.side(storage)
    gens = [g for g in side.generations(req.target.path, node_timeout=env.cfg.node_timeout).generations
            if g.role == "generation" and g.manifest]
    if not gens:
        raise NotFoundError(f"{req.target} has no earlier generation to roll back to")
    to = gens[0]
    name, target = req.target.name, str(req.target)
    # the record as the generation rolled back to has it: replaced if what it shows differs
    back = to.manifest
    assert back is not None
    enroll = _enrollment(req.creds, req.only_physical, manifest, req.target, back, env)
    changed = _changes(manifest, back)
    closing = [] if enroll is None else jobs.closing("rollback", name, target, enroll.fields if changed else None,
                                                     changed)
    if req.dry_run:
        plan = [] if enroll is None else [jobs.started("rollback", name, target), *closing]
        return RolledBack(target, to.path, _when(to.manifest), None, Registration.of_manifest(manifest),
                          dry_run=True, plan=jobs.planned(req.creds.url, plan))
    job = None
    if enroll:
        assert req.creds.url
        require_registration(req.creds)
        flush_spool(env, req.creds, quick=True)
        job = jobs.job(req.creds.url, req.creds.user, "rollback", name, target,
                       [jobs.started("rollback", name, target)])
        deliver(env, req.creds, job, quick=True)
    with side.lock(req.target.path, holder("rollback", name)):
        swapped = side.rollback(req.target.path, env.cfg.keep_generations)
        exported = exports.apply(env, side, req.target, "refresh")  # new mounts get the generation now current
    env.ui.step(f"rolled back {req.target} to the generation made {_when(to.manifest)}; the replaced one is kept "
                f"as {swapped.generation}")
    reg = Registration(RegState.NOT_REGISTERED) if not _registered(manifest) else Registration.of_manifest(manifest)
    if job is not None:
        job.requests += closing
        saw = jobs.seen(closing)
        why = deliver(env, req.creds, job)
        if why is not None:
            reg = Registration(RegState.PENDING, job.id)
        elif any(openqrm.is_new_image(r) for r in closing):
            reg = Registration(RegState.SENT, time=iso_now(), via="rollback", seen=saw)
        if why is not None:
            env.ui.warn(f"openQRM did not answer ({why}): the rollback's requests wait in the spool")
    exports.failed(exported)  # after the registration: the rollback is done either way
    return RolledBack(target, to.path, _when(to.manifest), swapped.generation, reg, export=exports.shown(exported))


def _when(m: Manifest | None) -> str:
    return (m.made if m is not None else None) or "?"


def generations(env: Env, target: Target) -> Generations:
    side = env.side(env.storage(target))
    listed = side.generations(target.path, costs=True, node_timeout=env.cfg.node_timeout)
    if not listed.generations[0].manifest:
        raise RefusedError(f"{target} is not a qrmfs image (no .qrmfs/manifest.json)")
    rows = []
    for g in listed.generations:
        m = g.manifest or Manifest.new({})
        rows.append(GenerationRow(
            path=g.path, role=g.role, seq=g.seq, made=_when(g.manifest), made_by=m.made_by, source=m.source,
            changes=m.changes, base_copy=m.base_copy_method, files=m.files, bytes=m.bytes, cost=g.cost,
            id=m.generation_id, nodes=[NodeRow(h.node, stamp(h.since), stamp(h.seen)) for h in g.nodes]))
    return Generations(str(target), rows, listed.journal)


def generations_listing(env: Env, storage_name: str | None, target: Target | None) -> GenerationListing:
    """list --generations: every image's generations (or one image's, with -t)."""
    if target is not None:
        return GenerationListing([generations(env, target)])
    listing = list_images(env, storage_name)
    out = []
    for row in listing.images:
        t = Target(row.storage, row.path)
        out.append(generations(env, t))
    return GenerationListing(out, listing.errors)
