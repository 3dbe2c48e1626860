"""qrmfs create: a root filesystem (source host, local directory or this system) becomes an image."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .. import openqrm
from ..agent import steps
from ..config import SshHost, Storage
from ..errors import ExistsError
from ..model import Location, Target
from . import copyplan, pipeline
from .common import Credentials, Env, flush_spool, require_registration


@dataclass(frozen=True)
class CreateRequest:
    name: str
    target: Target
    location: Location
    only_physical: bool = False
    excludes: tuple[str, ...] = ()
    private_add: tuple[str, ...] = ()
    private_exclude: tuple[str, ...] = ()
    arch: str | None = None
    os_name: str | None = None
    keep_services: bool = True
    keep_network: bool = False
    hostname: str | None = None
    shared: bool = False
    force: bool = False
    route: str = "ssh"
    comment: str | None = None
    creds: Credentials = field(default_factory=lambda: Credentials(None, None))

    def prepare_options(self) -> steps.Options:
        return steps.Options(image=self.name, shared=self.shared, private_add=list(self.private_add),
                             private_exclude=list(self.private_exclude), excludes=list(self.excludes),
                             keep_services=self.keep_services, keep_network=self.keep_network,
                             hostname=self.hostname)

    def options_record(self) -> dict[str, Any]:
        o = dataclasses.asdict(self.prepare_options())
        o.pop("node_init")
        o.pop("fresh_identity")
        o.update(arch=self.arch, os=self.os_name, only_physical=self.only_physical, route=self.route)
        return o

    def fields(self, storage_id: int | None) -> dict[str, str]:
        """new_image's image_* parameters for this image on a storage server with that openQRM id."""
        return openqrm.image_fields(name=self.name, rootdevice=self.target.path, storage_id=storage_id,
                                    shared=self.shared, comment=self.comment or f"qrmfs image from {self.location}",
                                    arch=self.arch, os_name=self.os_name)


def dry_run(req: CreateRequest, env: Env) -> dict[str, Any]:
    """The plan, computed without contacting any host."""
    storage = env.storage(req.target)
    staging = f"{req.target.parent}/.{req.name}.qrmfs-staging-<id>"
    cp = copyplan.plan(env.cfg, storage, copyplan.source_host(env.cfg, req.location), req.location.path, staging,
                       list(req.excludes), copyplan.Mounts(), route=req.route, progress=False,
                       storage_known_hosts=f"{req.target.parent}/.{req.name}.qrmfs-known_hosts")
    ev = f"create_image_{req.name}"
    regs = [] if req.only_physical else [
        openqrm.event(ev, 9, f"Started to create image {req.name} on {req.target}"),
        openqrm.new_image(req.fields(storage.storage_id)),
        openqrm.event(ev, 10, f"Finished to create image {req.name} on {req.target}")]
    return {
        "dry_run": True, "image": req.name, "target": str(req.target), "source": str(req.location),
        "route": req.route, "staging": staging, "copies": cp.describe(),
        "note": "separate filesystems mounted below the source root are detected at run time and copied too",
        "preparation": [{"step": s.name, "what": s.what} for s in steps.STEPS],
        "options": req.options_record(),
        "registration": [{"url": (req.creds.url or "?") + r.path, "params": r.params} for r in regs],
    }


def create(req: CreateRequest, env: Env) -> dict[str, Any]:
    storage = env.storage(req.target)
    if not req.only_physical:
        require_registration(req.creds)
        flush_spool(env, req.creds, quick=True)
    if req.route == "nfs":
        with copyplan.nfs_mount(env.runner, storage) as mnt:
            local = Storage(storage.name, SshHost("local"), mnt, storage.storage_id)
            return _create(req, env, local, mnt + req.target.path[len(storage.export_root):], storage)
    return _create(req, env, storage, req.target.path, storage)


def _create(req: CreateRequest, env: Env, storage: Storage, path: str, public: Storage) -> dict[str, Any]:
    side = env.side(storage)
    if side.call("inspect", path=path, export_root=storage.export_root)["exists"] and not req.force:
        raise ExistsError(f"{req.target} exists; use --force to replace it (the old image is kept until the new "
                          "one is published)")
    mounts = copyplan.discover_mounts(env.runner, env.cfg, req.location)
    for s in mounts.skipped:
        env.ui.warn(f"not copied: {s['path']} ({s['fstype']}, {s['why']})")
    src = copyplan.source_host(env.cfg, req.location)
    pull = src is not None and not storage.ssh.is_local

    def plan_copy(staging: str, storage_kh: str | None) -> copyplan.CopyPlan:
        return copyplan.plan(env.cfg, storage, src, req.location.path, staging, list(req.excludes), mounts,
                             route=req.route, progress=env.ui.tty, storage_known_hosts=storage_kh)

    spec = pipeline.BuildSpec(
        command="create", name=req.name, target=req.target, storage=storage, path=path, public_storage=public,
        force=req.force, options=req.prepare_options(), plan_copy=plan_copy,
        creds=None if req.only_physical else req.creds, fields=req.fields(public.storage_id),
        manifest={"source": str(req.location), "options": req.options_record(), "excludes": list(req.excludes)},
        known_hosts=copyplan.source_known_hosts(env.runner, env.cfg, src) if pull and src else None)
    return pipeline.build(env, spec)
