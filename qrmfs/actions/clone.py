"""qrmfs clone: a new image from an existing one. On the same storage server the copy runs there (no image
data through this machine); across servers the target server pulls from the source server."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .. import openqrm
from ..agent import steps
from ..errors import ExistsError, NotFoundError, UsageError
from ..model import Target
from ..storage import StorageSide
from . import copyplan, pipeline
from .common import Credentials, Env, flush_spool, require_registration

CLONE_EXCLUDES = ["/.qrmfs"]  # the old manifest and the old image's per-node state


@dataclass(frozen=True)
class CloneRequest:
    name: str
    target: Target
    source: Target
    only_physical: bool = False
    force: bool = False
    hostname: str | None = None
    creds: Credentials = field(default_factory=lambda: Credentials(None, None))


def _inputs(req: CloneRequest, env: Env) -> tuple[Any, Any, StorageSide, dict[str, Any]]:
    if req.target.path == req.source.path and req.target.storage == req.source.storage:
        raise UsageError("clone target and --from are the same image")
    tstore = env.storage(req.target)
    sstore, sside, info = env.existing(req.source)
    if not info["is_image"]:
        raise NotFoundError(f"{req.source} is not a qrmfs image (no .qrmfs/manifest.json)")
    return tstore, sstore, sside, info["manifest"]


def _options(req: CloneRequest, src_manifest: dict[str, Any]) -> steps.Options:
    o = steps.Options.from_dict(src_manifest.get("options", {}))
    return dataclasses.replace(o, image=req.name, hostname=req.hostname, fresh_identity=True)


def _fields(req: CloneRequest, opts: steps.Options, src: dict[str, Any], storage_id: int | None) -> dict[str, str]:
    so = src.get("options", {})
    return openqrm.image_fields(name=req.name, rootdevice=req.target.path, storage_id=storage_id, shared=opts.shared,
                                comment=f"qrmfs clone of {req.source}", arch=so.get("arch"), os_name=so.get("os"))


def dry_run(req: CloneRequest, env: Env) -> dict[str, Any]:
    tstore, sstore, _sside, src = _inputs(req, env)
    staging = f"{req.target.parent}/.{req.name}.qrmfs-staging-<id>"
    cp = copyplan.plan(env.cfg, tstore, sstore.ssh, req.source.path, staging, CLONE_EXCLUDES, copyplan.Mounts(),
                       route="ssh", progress=False, live_root=False,
                       storage_known_hosts=f"{req.target.parent}/.{req.name}.qrmfs-known_hosts")
    opts = _options(req, src)
    return {"dry_run": True, "image": req.name, "target": str(req.target), "source": str(req.source),
            "copies": cp.describe(), "preparation": [{"step": s.name, "what": s.what} for s in steps.STEPS],
            "options": dataclasses.asdict(opts) | {"node_init": None},
            "registration": [] if req.only_physical else [
                {"params": openqrm.new_image(_fields(req, opts, src, tstore.storage_id)).params}]}


def clone(req: CloneRequest, env: Env) -> dict[str, Any]:
    tstore, sstore, sside, src = _inputs(req, env)
    if not req.only_physical:
        require_registration(req.creds)
        flush_spool(env, req.creds, quick=True)
    tside = env.side(tstore)
    if tside.call("inspect", path=req.target.path, export_root=tstore.export_root)["exists"] and not req.force:
        raise ExistsError(f"{req.target} exists; use --force to replace it")
    opts = _options(req, src)
    same = (sstore.ssh.address, sstore.ssh.port) == (tstore.ssh.address, tstore.ssh.port)
    kh = None if same or tstore.ssh.is_local else copyplan.source_known_hosts(env.runner, env.cfg, sstore.ssh)

    def plan_copy(staging: str, storage_kh: str | None) -> copyplan.CopyPlan:
        return copyplan.plan(env.cfg, tstore, sstore.ssh, req.source.path, staging, CLONE_EXCLUDES,
                             copyplan.Mounts(), route="ssh", progress=env.ui.tty, storage_known_hosts=storage_kh,
                             live_root=False)

    def new_host_keys(side: StorageSide, staging: str) -> None:
        """A clone that keeps per-image host keys gets its own, never the original's."""
        if opts.shared or not opts.keep_network:
            return  # keys were removed on purpose: each node makes its own at boot (qrmfs-init)
        script = 'test ! -d "$1/etc/ssh" || ssh-keygen -q -A -f "$1"'
        env.runner.run(side.argv(("sh", "-c", script, "sh", staging)), timeout=120)

    spec = pipeline.BuildSpec(
        command="clone", name=req.name, target=req.target, storage=tstore, path=req.target.path,
        public_storage=tstore, force=req.force, options=opts, plan_copy=plan_copy,
        creds=None if req.only_physical else req.creds, fields=_fields(req, opts, src, tstore.storage_id),
        manifest={"source": f"clone of {req.source}", "cloned_from": {"target": str(req.source),
                  "source": src.get("source"), "created": src.get("created")},
                  "options": {**src.get("options", {}), "image": req.name, "hostname": req.hostname},
                  "excludes": src.get("excludes", [])},
        known_hosts=kh, also_lock=[(sside, req.source.path)], after_prepare=new_host_keys)
    return pipeline.build(env, spec)
