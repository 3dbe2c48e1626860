"""The spool's delivery: a job's requests sent to openQRM, its claim by this process, a publish or a removal it
waits for settled, the delivery recorded in the image's manifest; `flush` of the whole spool."""

from __future__ import annotations

import time

from .. import jobs, openqrm
from ..agent.manifest import generation_id
from ..config import Config
from ..errors import QrmfsError, RegistrationError
from ..model import Target
from ..results import Registration, RegState
from .common import Credentials, Env, storage_identity


def same_image(cfg: Config, job: openqrm.Job, target: Target) -> bool:
    """Is the spooled job about the image at target? By storage identity and path, not by spelling."""
    mine = storage_identity(cfg, str(target))
    return mine is not None and (job.storage or storage_identity(cfg, job.target)) == mine


def _warn_plain_http(env: Env, creds: Credentials) -> None:
    if creds.password and creds.plain_http and not creds.warned:
        creds.warned = True
        env.ui.warn(f"the openQRM URL {creds.url} is plain http: the password crosses the network in clear "
                    "(use https; [openqrm] ca_file names a private CA)")


def deliver(env: Env, creds: Credentials, job: openqrm.Job, quick: bool = False) -> str | None:
    """Send the job (it is in the spool until answered). None when delivered; else why it still waits.
    A refusal (bad credentials, ...) raises RegistrationError with the job still spooled.
    The job is bound to this run's URL and credentials' source, and carries its image's storage identity.
    This process claims it for as long as it lives (or until it is delivered): no other qrmfs sends it."""
    if job.url != creds.url:
        raise RegistrationError(f"job {job.id} is for {job.url}, not {creds.url}")
    job.auth = job.auth or creds.auth
    job.storage = job.storage or storage_identity(env.cfg, job.target)
    spool = env.spool()
    claim_job(env, job)
    _warn_plain_http(env, creds)
    try:
        env.client(creds, quick=quick).deliver(job, spool)
    except openqrm.Transient as e:
        env.ui.debug(f"openQRM not reachable now ({e}); kept in the spool")
        return str(e)
    env._claims.pop(job.id).release(unlink=True)
    return None


def claim_job(env: Env, job: openqrm.Job) -> None:
    """This process claims the job for as long as it lives (or until it is delivered): no other qrmfs sends it."""
    if job.id not in env._claims:
        claim = env.spool().claim(job.id, wait=10.0)
        if claim is None:
            raise RegistrationError(f"spool job {job.id} is being delivered by another qrmfs process")
        env._claims[job.id] = claim


def settle_publish(env: Env, job: openqrm.Job) -> bool | None:
    """A job armed before a publish by a run that is gone (its claim is ours now): was the generation it was
    armed for published? Decided under the image's lock (which finishes an interrupted publish first), from
    the image's own record: the generation is the image or one of its earlier generations, or a generation
    made from it since (an update, a rollback) still names the job in its manifest. True: published, send it.
    False: the image is not there (never published, or removed since): its registration is dropped and the
    failure reported instead. None: cannot tell now (storage unreachable, image locked): it waits."""
    assert job.publish is not None
    if "removal" in job.publish:
        return settle_removal(env, job)
    armed = job.publish.get("generation")
    try:
        target = Target.parse(job.target)
        side = env.side(env.storage(target))
        with env.locked(side, target.path, "flush", target.name):
            exists = side.inspect(target.path).manifest is not None
            trees = side.generations(target.path).generations if exists else []
    except QrmfsError as e:
        env.ui.warn(f"spooled registration {job.id} ({job.image}) waits: cannot tell whether {job.target} was "
                    f"published ({e.message})")
        return None
    published = any(generation_id(g.manifest) == armed or Registration.of_manifest(g.manifest).spool_job == job.id
                    for g in trees)
    if not published:
        why = (f"{job.target} was never published (the run that armed it stopped first)" if exists else
               f"{job.target} was never published, or was removed since")
        jobs.abandon(job, why)
        env.ui.warn(f"spooled registration {job.id}: {why}; not registering it, reporting the failure instead")
    job.publish = None
    env.spool().save(job)
    return published


def settle_removal(env: Env, job: openqrm.Job) -> bool | None:
    """A deregistration armed before a remove by a run that is gone: is the image gone? Decided under its lock
    (which finishes a remove that started). True: send it. False: the image is still there (the remove never
    began): dropped. None: cannot tell now."""
    try:
        target = Target.parse(job.target)
        side = env.side(env.storage(target))
        with env.locked(side, target.path, "flush", target.name):
            exists = side.inspect(target.path).exists
    except QrmfsError as e:
        env.ui.warn(f"spooled deregistration {job.id} ({job.image}) waits: cannot tell whether {job.target} was "
                    f"removed ({e.message})")
        return None
    if exists:
        env.ui.warn(f"spooled deregistration {job.id}: {job.target} is still there (its remove never began); "
                    "not deregistering it")
        job.requests = []
    job.publish = None
    env.spool().save(job)
    return not exists


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def record_delivery(env: Env, job: openqrm.Job, when: str) -> None:
    """openQRM accepted the job's new_image: write that into the image's manifest, under the image's lock, so
    `list` shows what is known. Only a manifest that still waits for this very job is changed (a newer image
    under the same path has its own registration); when that cannot be done, say so: `list` then shows
    "unknown"."""
    try:
        target = Target.parse(job.target)
        side = env.side(env.storage(target))
        with env.locked(side, target.path, "flush", target.name):
            manifest = side.inspect(target.path).manifest
            if manifest is None or Registration.of_manifest(manifest).spool_job != job.id:
                env.ui.debug(f"{job.target}'s manifest does not wait for spool job {job.id}: left as it is")
                return
            reg = Registration(RegState.SENT, job.id, time=when, via=f"flush of spool job {job.id}",
                               seen=jobs.SEEN["new_image"])
            side.manifest_update(target.path, {"registration": reg.record()})
        env.ui.step(f"recorded the registration in the manifest of {job.target}")
    except QrmfsError as e:
        env.ui.warn(f"sent spooled registration {job.id}, but could not record it in the manifest of "
                    f"{job.target} ({e.message}); `qrmfs list` shows its registration as unknown")


def _bound_elsewhere(job: openqrm.Job, creds: Credentials) -> str | None:
    """Why this run may not send the job: it goes only to its own URL, with credentials from its own source."""
    if job.url.rstrip("/") != (creds.url or "").rstrip("/"):
        return f"it is bound to {job.url} (this run uses {creds.url or 'no URL'}; flush with --openqrm-url to send it)"
    if any(r.kind == "image" for r in job.requests):
        if not creds.password:
            return "it needs openQRM credentials"
        if job.auth is not None and job.auth != creds.auth:
            return f"it is bound to the credentials of {job.auth}"
        if job.auth is None and job.user and job.user != creds.user:
            return f"it is bound to user {job.user}"
    return None


CLAIM_WAIT = 30.0  # seconds a flush waits for another process's delivery of a job before calling it pending


def flush_spool(env: Env, creds: Credentials, quick: bool) -> dict[str, list[str]]:
    """Deliver what earlier runs left in the spool (oldest first). Quick: one attempt each, short timeout.
    A job goes only to its own URL with credentials from its own source; one held by another qrmfs
    process (delivering it now, or the run that made it) is left to that process."""
    done: list[str] = []
    left: list[str] = []
    spool = env.spool()
    for listed in spool.jobs():
        if listed.id in env._claims:
            continue  # this run's own job: its own deliver() sends it
        why = _bound_elsewhere(listed, creds)
        if why:
            left.append(listed.id)
            (env.ui.debug if quick else env.ui.warn)(f"spooled registration {listed.id} ({listed.image}) not sent: "
                                                     f"{why}")
            continue
        # another flush delivering it now is waited for (it is then gone, not pending); a quick flush waits not
        claim = spool.claim(listed.id, wait=0.0 if quick else CLAIM_WAIT)
        if claim is None:
            left.append(listed.id)
            env.ui.debug(f"spooled registration {listed.id} ({listed.image}) is being delivered by another qrmfs")
            continue
        try:
            job = spool.load(listed.id)  # as it is now that it is ours: another process may have sent it
            if job is None:
                claim.release(unlink=True)
                continue
            if job.publish is not None and settle_publish(env, job) is None:
                left.append(job.id)
                continue
            if not job.requests:  # settled: nothing to send (a remove that never began)
                spool.drop(job)
                claim.release(unlink=True)
                continue
            _warn_plain_http(env, creds)
            c = env.client(Credentials(job.url, creds.user, creds.password), quick=quick)
            registers = any(openqrm.is_new_image(r) for r in job.requests)
            saw = jobs.seen(job.requests)
            try:
                c.deliver(job, spool)
                claim.release(unlink=True)
                done.append(job.id)
                env.ui.step(f"sent spooled registration {job.id} ({job.image}) to {job.url}: {saw}")
                if registers:
                    record_delivery(env, job, iso_now())
            except Exception as e:  # a failed delivery stays in the spool; never fails the command
                left.append(job.id)
                (env.ui.debug if quick else env.ui.warn)(f"spooled registration {job.id} ({job.image}) still "
                                                         f"pending: {getattr(e, 'message', e)}")
        finally:
            claim.release()
    return {"delivered": done, "pending": left}
