"""qrmfs create: a root filesystem (source host, local directory or this system) becomes an image."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .. import jobs
from ..agent import steps
from ..agent.protocol import Options
from ..agent.tree import PIN_DIR, pin_file
from ..config import OpenQrm, Storage
from ..model import Location, Route, Target
from ..options import OPTION
from ..results import BuildPlan, Built
from . import copyplan, hosts, pipeline
from .common import Credentials, Env, require_registration
from .delivery import flush_spool


@dataclass(frozen=True)
class CreateRequest:
    name: str
    target: Target
    location: Location
    only_physical: bool = False
    # the image options: their defaults are options.IMAGE_OPTIONS'
    excludes: tuple[str, ...] = OPTION["excludes"].default
    private_add: tuple[str, ...] = OPTION["private_add"].default
    private_exclude: tuple[str, ...] = OPTION["private_exclude"].default
    arch: str | None = OPTION["arch"].default
    os_name: str | None = OPTION["os_name"].default
    keep_services: bool = OPTION["keep_services"].default
    keep_network: bool = OPTION["keep_network"].default
    hostname: str | None = OPTION["hostname"].default
    shared: bool = OPTION["shared"].default
    force: bool = False
    route: Route = Route(OPTION["route"].default)
    comment: str | None = None
    creds: Credentials = field(default_factory=lambda: Credentials(None, None))

    def prepare_options(self) -> Options:
        return Options(image=self.name, shared=self.shared, private_add=list(self.private_add),
                       private_exclude=list(self.private_exclude), excludes=list(self.excludes),
                       keep_services=self.keep_services, keep_network=self.keep_network, hostname=self.hostname)

    def options_record(self) -> dict[str, Any]:
        o = dataclasses.asdict(self.prepare_options())
        o.pop("node_init")
        o.pop("fresh_identity")
        o.update(arch=self.arch, os=self.os_name, only_physical=self.only_physical, route=self.route.value)
        return o

    def fields(self, oq: OpenQrm, storage: Storage) -> dict[str, str]:
        """new_image's image_* parameters for this image on that storage server."""
        return jobs.image_fields(oq, storage, name=self.name, rootdevice=self.target.path, shared=self.shared,
                                 comment=self.comment or f"qrmfs image from {self.location}", arch=self.arch,
                                 os_name=self.os_name)

    def source(self, env: Env) -> copyplan.Source:
        return copyplan.Source(hosts.source_host(env.cfg, self.location), self.location.path, self.excludes)


def dry_run(req: CreateRequest, env: Env) -> BuildPlan:
    """The plan, computed without contacting any host."""
    storage = env.storage(req.target)
    into = copyplan.Into(storage, pipeline.staging_name(req.target), storage.ssh.is_local or req.route is Route.NFS,
                         pin_file(req.target.path, PIN_DIR))
    cp = copyplan.plan(env.cfg, req.source(env), into, stream=True)
    regs = [] if req.only_physical else jobs.requests("create", req.name, str(req.target),
                                                      req.fields(env.cfg.openqrm, storage))
    return BuildPlan(
        command="create", image=req.name, target=str(req.target), source=str(req.location), route=req.route.value,
        staging=into.path, copies=cp.describe(),
        note="separate filesystems mounted below the source root are detected at run time and copied too",
        preparation=[{"step": s.name, "what": s.what} for s in steps.STEPS], options=req.options_record(),
        registration=jobs.planned(req.creds.url, regs))


def create(req: CreateRequest, env: Env) -> Built:
    if not req.only_physical:
        require_registration(req.creds)
        req.fields(env.cfg.openqrm, env.storage(req.target))  # a record openQRM could not use: refused first
    if req.location.host is not None and req.route is Route.SSH:
        env.forward_agent()  # the storage server pulls from the source host (a local one is never reached)
    with pipeline.placement(env, req.target, req.route) as place:
        if not req.only_physical:
            flush_spool(env, req.creds, quick=True)
        spec = pipeline.BuildSpec(
            command="create", place=place, source=req.source(env), source_label=str(req.location),
            options=req.prepare_options(), force=req.force,
            enroll=None if req.only_physical else pipeline.Enrollment(
                req.creds, req.fields(env.cfg.openqrm, place.storage)),
            manifest={"options": req.options_record(), "excludes": list(req.excludes), "route": req.route.value},
            discover_mounts=True)
        return pipeline.build(env, spec)
