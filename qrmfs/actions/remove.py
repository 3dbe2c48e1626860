"""qrmfs remove: refuse anything that is not plainly an unmounted, unlocked image below the export root;
then remove it (rename out of sight first, then delete) and deregister it (remove_by_name)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .. import jobs, openqrm
from ..errors import AbortedError, RefusedError
from ..model import Target
from ..results import Registration, RegState, Removed, RemovePlan
from . import exports
from .common import Credentials, Env, deliver, flush_spool, require_registration, same_image


@dataclass(frozen=True)
class RemoveRequest:
    target: Target
    yes: bool = False
    force: bool = False
    running_ok: bool = False  # remove it although nodes run it (else refused, the nodes named)
    only_physical: bool = False
    dry_run: bool = False
    creds: Credentials = field(default_factory=lambda: Credentials(None, None))


def remove(req: RemoveRequest, env: Env, confirm: Callable[[str], bool]) -> Removed | RemovePlan:
    _storage, side, info = env.existing(req.target)
    manifest = info.manifest
    if manifest is None and not req.force:
        raise RefusedError(f"{req.target} is not a qrmfs image ({info.not_image_because}); "
                           "use --force to remove it anyway")
    registered = manifest is None or Registration.of_manifest(manifest).state is not RegState.NOT_REGISTERED
    deregister = registered and not req.only_physical
    if deregister:
        require_registration(req.creds)
    size = "" if manifest is None or manifest.bytes is None else \
        f" ({manifest.files} files, {manifest.bytes / 2**20:.0f} MiB)"
    what = f"{req.target}" + (" (NOT a qrmfs image)" if manifest is None else size)
    name, target = req.target.name, str(req.target)
    requests = jobs.requests("remove", name, target, None, replace=True) if deregister else []
    if req.dry_run:
        return RemovePlan(target, deregister, manifest is not None, jobs.planned(req.creds.url, requests))
    if not req.yes and not confirm(f"remove {what}" + (" and deregister it from openQRM" if deregister else "")):
        raise AbortedError("nothing removed")
    with env.locked(side, req.target.path, "remove", req.target.name):
        side.remove(req.target.path, req.force, req.running_ok, env.cfg.node_timeout)
        unexported = exports.apply(env, side, req.target, "remove")  # only now: the image is gone
    env.ui.step(f"removed {req.target}")
    # a registration still waiting in the spool for this image must never arrive after its removal
    # matched by storage identity and path, whatever spelling (name or address) either run used
    spool = env.spool()
    for job in spool.jobs():
        if not same_image(env.cfg, job, req.target):
            continue
        claim = spool.claim(job.id, wait=30.0)  # a flush delivering it right now finishes first
        if claim is None:
            env.ui.warn(f"the spooled registration {job.id} of the removed image is held by another qrmfs "
                        f"process; drop it with `rm {spool.dir}/{job.id}.json` once that process ended")
            continue
        spool.drop(job)
        claim.release(unlink=True)
        env.ui.step(f"dropped the spooled registration {job.id} of the removed image")
    deregistration: openqrm.Job | None = None
    if deregister:
        assert req.creds.url
        deregistration = jobs.job(req.creds.url, req.creds.user, "remove", name, target, requests)
    result = _deregister(req, env, deregistration)
    exports.failed(unexported)  # after the deregistration: the image is gone either way
    return result


def _deregister(req: RemoveRequest, env: Env, job: openqrm.Job | None) -> Removed:
    if job is None:
        return Removed(str(req.target), Registration(RegState.NOT_REGISTERED))
    flush_spool(env, req.creds, quick=True)
    why = deliver(env, req.creds, job)
    if why is None:
        return Removed(str(req.target), Registration(RegState.DEREGISTERED, seen=jobs.SEEN["remove_by_name"]))
    env.ui.warn(f"openQRM did not answer ({why}): the deregistration waits in the spool; it is delivered "
                "at the next qrmfs run, or now with `qrmfs flush`")
    return Removed(str(req.target), Registration(RegState.PENDING, job.id))
