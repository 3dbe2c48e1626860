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
from .common import Credentials, Env, require_registration, storage_identity
from .delivery import CLAIM_WAIT, claim_job, deliver, flush_spool, same_image


@dataclass(frozen=True)
class RemoveRequest:
    target: Target
    yes: bool = False
    force: bool = False
    running_ok: bool = False  # remove it although nodes run it (else refused, the nodes named)
    only_physical: bool = False
    dry_run: bool = False
    creds: Credentials = field(default_factory=lambda: Credentials(None, None))


def _arm_deregistration(env: Env, req: RemoveRequest, requests: list[openqrm.Request]) -> openqrm.Job:
    """Write-ahead, before anything is deleted: the deregistration goes into the spool, bound to the image's
    removal and claimed by this process. Killed during the remove or after it, the next flush sends it once the
    image is gone (a remove that started is finished by the image's next lock), or drops it when the image is
    still there: the openQRM record goes exactly when the image does."""
    assert req.creds.url
    job = jobs.job(req.creds.url, req.creds.user, "remove", req.target.name, str(req.target), requests)
    job.auth = req.creds.auth
    job.storage = storage_identity(env.cfg, job.target)
    job.publish = {"removal": str(req.target)}
    claim_job(env, job)
    env.spool().save(job)
    return job


def _drop_registrations(env: Env, target: Target) -> None:
    """A registration still waiting in the spool for this image must never arrive after its removal: matched by
    storage identity and path, whatever spelling (name or address) either run used."""
    spool = env.spool()
    for waiting in spool.jobs():
        if not same_image(env.cfg, waiting, target) or waiting.id in env._claims:
            continue
        claim = spool.claim(waiting.id, wait=CLAIM_WAIT)  # a flush delivering it right now finishes first
        if claim is None:
            env.ui.warn(f"the spooled registration {waiting.id} of the removed image is held by another qrmfs "
                        f"process; drop it with `rm {spool.dir}/{waiting.id}.json` once that process ended")
            continue
        spool.drop(waiting)
        claim.release(unlink=True)
        env.ui.step(f"dropped the spooled registration {waiting.id} of the removed image")


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
    job = _arm_deregistration(env, req, requests) if deregister else None
    with env.locked(side, req.target.path, "remove", req.target.name):
        try:
            side.remove(req.target.path, req.force, req.running_ok, env.cfg.node_timeout)
        except RefusedError:
            if job is not None:  # refused whole, before anything was deleted: the record stays, nothing to send
                env.spool().drop(job)
                env._claims.pop(job.id).release(unlink=True)
            raise
        unexported = exports.apply(env, side, req.target, "remove")  # only now: the image is gone
    env.ui.step(f"removed {req.target}")
    _drop_registrations(env, req.target)
    result = _deregister(req, env, job)
    exports.failed(unexported)  # after the deregistration: the image is gone either way
    return result


def _deregister(req: RemoveRequest, env: Env, job: openqrm.Job | None) -> Removed:
    if job is None:
        return Removed(str(req.target), Registration(RegState.NOT_REGISTERED))
    job.publish = None  # the image is gone: from now on the deregistration may be sent
    env.spool().save(job)
    flush_spool(env, req.creds, quick=True)
    why = deliver(env, req.creds, job)
    if why is None:
        return Removed(str(req.target), Registration(RegState.DEREGISTRATION_SENT,
                                                     seen=jobs.SEEN["remove_by_name"]))
    env.ui.warn(f"openQRM did not answer ({why}): the deregistration waits in the spool; it is delivered "
                "at the next qrmfs run, or now with `qrmfs flush`")
    return Removed(str(req.target), Registration(RegState.PENDING, job.id))
