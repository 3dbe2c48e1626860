"""qrmfs update, rollback and list --generations: an image's daily path.

update re-pulls an image from its source into a new generation (incremental: a reflink or plain copy of the
current image, then rsync --delete, then the preparation), published by the agent's journaled swap that moves
the nodes' state along. The source and options default to those in the image's manifest; what is given
overrides them and is recorded. rollback makes the newest earlier generation current again, the same way.

openQRM: the image's record stays as it is (same name, same root device). openQRM's update_image needs an
image_id that qrmfs cannot learn (openQRM answers with a status only), and an update changes none of the
record's fields unless options that openQRM shows are overridden; those are reported as not sent. So an
update or rollback sends only its events (priority 9 and 10), through the spool, never a new_image.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .. import openqrm
from ..agent.holds import stamp
from ..errors import NotFoundError, RefusedError, UsageError
from ..model import Location, Route, Target
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
from . import pipeline
from .common import Credentials, Env, deliver, flush_spool, holder, require_registration
from .create import CreateRequest
from .listing import list_images
from .validate import changes_from_source

# options of the manifest an update may override: (manifest key, UpdateRequest field)
OPTION_KEYS = ("excludes", "private_add", "private_exclude", "keep_services", "keep_network", "hostname",
               "shared", "arch", "os")


@dataclass(frozen=True)
class UpdateRequest:
    target: Target
    location: Location | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # option name -> value, only what was given
    only_physical: bool = False
    route: Route | None = None
    dry_run: bool = False
    creds: Credentials = field(default_factory=lambda: Credentials(None, None))


def _current(env: Env, target: Target) -> dict[str, Any]:
    _storage, _side, info = env.existing(target)
    if info.manifest is None:
        raise RefusedError(f"{target} is not a qrmfs image (no .qrmfs/manifest.json): nothing to update")
    return info.manifest


def _registered(manifest: dict[str, Any]) -> bool:
    return Registration.of_manifest(manifest).has_record


def create_request(req: UpdateRequest, manifest: dict[str, Any]) -> CreateRequest:
    """What a fresh create of this image with the recorded (or overridden) source and options would be."""
    o = {**manifest.get("options", {}), **req.overrides}
    if req.location is not None:
        loc = req.location
    else:
        try:
            loc = Location.parse(str(manifest.get("source", "")))
        except UsageError:
            raise UsageError(f"{req.target} records no source qrmfs can pull from ({manifest.get('source')!r}); "
                             "give -l/--location") from None
    route = req.route or Route(o.get("route") or manifest.get("route") or Route.SSH.value)
    return CreateRequest(
        name=req.target.name, target=req.target, location=loc, only_physical=req.only_physical,
        excludes=tuple(o.get("excludes") or ()), private_add=tuple(o.get("private_add") or ()),
        private_exclude=tuple(o.get("private_exclude") or ()), arch=o.get("arch"), os_name=o.get("os"),
        keep_services=bool(o.get("keep_services", True)), keep_network=bool(o.get("keep_network", False)),
        hostname=o.get("hostname"), shared=bool(o.get("shared")), force=True, route=route, creds=req.creds)


def _unsent_fields(req: UpdateRequest, manifest: dict[str, Any]) -> list[str]:
    """openQRM fields an override changes, which the record keeps (no image_id to send update_image with)."""
    return pipeline.record_fields_changed(manifest.get("options", {}), req.overrides)


def _events_only(req: UpdateRequest, manifest: dict[str, Any], env: Env) -> pipeline.Enrollment | None:
    if req.only_physical or not _registered(manifest):
        return None
    require_registration(req.creds)
    return pipeline.Enrollment(req.creds, {})


def update(req: UpdateRequest, env: Env) -> Built | UpdatePlan:
    env.forward_agent()  # before the first connection: the source (in the manifest) is likely a host to pull from
    manifest = _current(env, req.target)
    creq = create_request(req, manifest)
    if req.dry_run:
        return _dry_run(req, env, manifest, creq)
    enroll = _events_only(req, manifest, env)
    if enroll:
        flush_spool(env, req.creds, quick=True)
    with pipeline.placement(env, req.target, creq.route) as place:
        spec = pipeline.BuildSpec(
            command="update", place=place, source=creq.source(env), source_label=str(creq.location),
            options=creq.prepare_options(), force=True, enroll=enroll,
            manifest={"options": {**creq.options_record(), "only_physical": manifest.get("options", {}).get(
                "only_physical", False)}, "excludes": list(creq.excludes), "route": creq.route.value},
            discover_mounts=True, new_record=False, parent=manifest)
        return pipeline.build(env, spec)


def _dry_run(req: UpdateRequest, env: Env, manifest: dict[str, Any], creq: CreateRequest) -> UpdatePlan:
    """What the update would change: rsync's itemized dry run from the source into the current image, with the
    update's excludes; the paths the preparation changes on purpose are left out. Nothing is written."""
    changes = changes_from_source(env, env.storage(req.target), req.target, creq.location, creq.excludes, manifest)
    counts = Counter(change_kind(c["change"]) for c in changes)
    return UpdatePlan(image=req.target.name, target=str(req.target), source=str(creq.location),
                      counts=dict(sorted(counts.items())), changes=changes[:200], truncated=len(changes) > 200,
                      options=creq.options_record(), keep_generations=env.cfg.keep_generations,
                      registration=[] if not _registered(manifest) or req.only_physical else
                      [f"event update_image_{req.target.name} (9, 10)"],
                      unsent_fields=_unsent_fields(req, manifest))


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
    if req.dry_run:
        return RolledBack(str(req.target), to.path, _made(to.manifest), None, Registration(RegState.NOT_REGISTERED),
                          dry_run=True)
    enroll = _events_only(UpdateRequest(req.target, only_physical=req.only_physical, creds=req.creds), manifest, env)
    name = req.target.name
    job = None
    if enroll:
        assert req.creds.url
        flush_spool(env, req.creds, quick=True)
        job = openqrm.Job(req.creds.url, req.creds.user, name, str(req.target), [
            openqrm.event(f"rollback_image_{name}", 9, f"Started to roll back image {name} on {req.target}")])
        deliver(env, req.creds, job, quick=True)
    with side.lock(req.target.path, holder("rollback", name)):
        swapped = side.rollback(req.target.path, env.cfg.keep_generations)
    env.ui.step(f"rolled back {req.target} to the generation made {_made(to.manifest)}; the replaced one is kept "
                f"as {swapped.generation}")
    reg = Registration(RegState.NOT_REGISTERED) if not _registered(manifest) else Registration.of_manifest(manifest)
    if job is not None:
        job.requests.append(openqrm.event(f"rollback_image_{name}", 10,
                                          f"Finished to roll back image {name} on {req.target}"))
        why = deliver(env, req.creds, job)
        reg = Registration(RegState.REGISTERED) if why is None else Registration(RegState.PENDING, job.id)
        if why is not None:
            env.ui.warn(f"openQRM did not answer ({why}): the rollback's events wait in the spool")
    return RolledBack(str(req.target), to.path, _made(to.manifest), swapped.generation, reg)


def _made(m: dict[str, Any] | None) -> str:
    return str((m or {}).get("finished") or (m or {}).get("created") or "?")


def generations(env: Env, target: Target) -> Generations:
    side = env.side(env.storage(target))
    listed = side.generations(target.path, costs=True, node_timeout=env.cfg.node_timeout)
    if not listed.generations[0].manifest:
        raise RefusedError(f"{target} is not a qrmfs image (no .qrmfs/manifest.json)")
    rows = []
    for g in listed.generations:
        m = g.manifest or {}
        gen = m.get("generation") or {}
        rows.append(GenerationRow(
            path=g.path, role=g.role, seq=g.seq, made=_made(m), made_by=gen.get("made_by") or m.get("created_by"),
            source=m.get("source"), changes=gen.get("changes"), base_copy=(gen.get("base_copy") or {}).get("method"),
            files=(m.get("counts") or {}).get("files"), bytes=(m.get("counts") or {}).get("bytes"), cost=g.cost,
            id=gen.get("id"), nodes=[NodeRow(h.node, stamp(h.since), stamp(h.seen)) for h in g.nodes]))
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
