"""What every action needs: config, runner, UI, credentials, the openQRM client and spool, the lock holder."""

from __future__ import annotations

import atexit
import getpass
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import jobs, model, openqrm
from ..agent.holds import describe
from ..agent.manifest import generation_id
from ..agent.protocol import Held, Inspected, Locked
from ..config import Config, Storage, _shown
from ..errors import NotFoundError, QrmfsError, RegistrationError, UsageError
from ..model import Target
from ..results import Registration, RegState
from ..runner import Runner
from ..storage import StorageSide
from ..ui import Ui
from . import hosts

if TYPE_CHECKING:
    import httpx

PASSWORD_ENV = "QRMFS_PASSWORD"


@dataclass
class Credentials:
    """The openQRM URL and credentials of this run. source: where the password came from (never the password),
    so that a spooled job is bound to it."""
    url: str | None
    user: str | None
    password: str | None = field(default=None, repr=False)
    source: str | None = None
    warned: bool = field(default=False, repr=False, compare=False)

    @property
    def auth(self) -> str | None:
        """What a job is bound to: "USER via SOURCE" (None without a password)."""
        return f"{self.user} via {self.source}" if self.password else None

    @property
    def plain_http(self) -> bool:
        return bool(self.url and self.url.startswith("http://"))


def _read_password(path: str) -> str:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UsageError(f"cannot read password file {_shown(path)}: {e.strerror}") from None
    if not lines or not lines[0].strip():
        raise UsageError(f"password file {_shown(path)} is empty")
    return lines[0].strip()


def resolve_credentials(cfg: Config, user: str | None, password: str | None, password_file: str | None,
                        url: str | None) -> Credentials:
    """-p, then --password-file, then $QRMFS_PASSWORD, then the config's password_file.
    A bad --openqrm-url is bad input (exit 2). The config's password goes over plain http only to the host
    the config names for it: never to another host given by --openqrm-url."""
    if url is not None:
        model.openqrm_url(url, "--openqrm-url")
    pw, source = None, None
    if password:
        pw, source = password, "-p/--password"
    elif password_file:
        pw, source = _read_password(password_file), f"--password-file {os.path.abspath(password_file)}"
    elif os.environ.get(PASSWORD_ENV):
        pw, source = os.environ[PASSWORD_ENV], f"${PASSWORD_ENV}"
    elif cfg.openqrm.password_file:
        pw = _read_password(cfg.openqrm.password_file)
        source = f"config {cfg.path or '?'} [openqrm] password_file {cfg.openqrm.password_file}"
    creds = Credentials(url or cfg.openqrm.url, user or cfg.openqrm.user, pw, source)
    configured = urlsplit(cfg.openqrm.url or "").hostname
    if (pw and url and creds.plain_http and cfg.openqrm.password_file and source and source.startswith("config ")
            and urlsplit(url).hostname != configured):
        raise UsageError(f"refusing to send the password of the config's [openqrm] password_file in clear "
                         f"(http) to {urlsplit(url).hostname}, which the config does not name: use https, or give "
                         "the password for that server with --password-file")
    return creds


def require_registration(creds: Credentials) -> None:
    missing = [what for what, v in (("the openQRM URL (config [openqrm] url or --openqrm-url)", creds.url),
                                    ("-u/--username", creds.user),
                                    (f"-p/--password, --password-file or ${PASSWORD_ENV}", creds.password)) if not v]
    if missing:
        raise UsageError(f"registering with openQRM needs {', '.join(missing)} (or -o/--only-physical to "
                         "create without registering)")


def storage_identity(cfg: Config, target: str) -> dict[str, Any] | None:
    """Where an image really is: its storage server's address and ssh port, and its path, whatever name or
    address the operator wrote (`nas1:/exports/img` and `10.0.0.5:/exports/img` are the same image)."""
    try:
        t = Target.parse(target)
        s = cfg.storage_for(t.storage)
    except UsageError:
        return None
    return identity_of(s, t.path)


def identity_of(storage: Storage, path: str) -> dict[str, Any]:
    """The one spelling of an image's identity: its storage server's address and ssh port, and its path."""
    return {"address": storage.ssh.address, "port": storage.ssh.port, "path": path}


def holder(command: str, name: str) -> str:
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} ({command} {name})"


def kept_for_nodes(env: Env, held: list[Held]) -> None:
    """Say which generations beyond keep_generations a prune kept, and which nodes run them (a warning: it is
    space kept beyond the config, and --json carries it in the result's warnings)."""
    for h in held:
        env.ui.warn(f"kept {h.path} beyond keep_generations: {len(h.nodes)} node(s) run it: {describe(h.nodes)}; "
                    f"it is deleted by the first update or gc after they rebooted or stopped reporting for "
                    f"node_timeout = {env.cfg.node_timeout} s")


@dataclass
class Env:
    cfg: Config
    runner: Runner
    ui: Ui
    transport: httpx.BaseTransport | None = None  # the openQRM client's (tests give an httpx.MockTransport)
    _sides: dict[Storage, StorageSide] = field(default_factory=dict)
    _claims: dict[str, openqrm.Claim] = field(default_factory=dict)  # spool jobs this process delivers
    agent: hosts.PrivateAgent | None = None  # this run's own ssh-agent, once forward_agent() started it

    def forward_agent(self) -> None:
        """This run may copy from a source host through a storage server (which logs in to the source with
        qrmfs's key, forwarded from a private ssh-agent): start that agent now, empty, before any connection to
        a storage server starts, so each connection forwards it and the copy's `ssh -A` shares the connection.
        The key goes into the agent only while a copy runs (hosts.ssh_agent), as before. Only with the config's
        identity file: the operator's own agent is never forwarded for the whole run."""
        if self.agent is None and self.cfg.identity_file and not self._sides:
            self.agent = hosts.PrivateAgent(self.runner)
            atexit.register(self.agent.stop)  # after the connections close (atexit runs last-registered first)

    def storage(self, target: Target) -> Storage:
        s = self.cfg.storage_for(target.storage)
        root = s.export_root
        if not target.path.startswith(root + "/"):
            raise UsageError(f"target {target} is not below the export root {root} of storage server {s.name}")
        return s

    def side(self, storage: Storage) -> StorageSide:
        """One StorageSide per storage server and run, and one agent session (and so one ssh master connection)
        per ssh server: two exports of one machine share it."""
        if storage not in self._sides:
            share = next((s for s in self._sides.values() if s.storage.ssh == storage.ssh), None)
            self._sides[storage] = StorageSide(storage, self.runner, identity=self.cfg.identity_file,
                                               known_hosts=self.cfg.known_hosts,
                                               agent_sock=self.agent.sock if self.agent else None,
                                               share=share)
        return self._sides[storage]

    def existing(self, target: Target) -> tuple[Storage, StorageSide, Inspected]:
        """The storage server, its agent and what is at target; NotFoundError when nothing is there."""
        storage = self.storage(target)
        side = self.side(storage)
        info = side.inspect(target.path)
        if not info.exists:
            raise NotFoundError(f"{target} does not exist")
        return storage, side, info

    @contextmanager
    def locked(self, side: StorageSide, path: str, command: str, name: str) -> Iterator[Locked]:
        """The image's lock for the block; what unfinished earlier runs left beside the image is removed as the
        lock is taken, and the operator told."""
        with side.lock(path, holder(command, name)) as lock:
            for p in lock.cleaned:
                self.ui.warn(f"removed {p}, left by an earlier qrmfs run on this image that did not finish")
            yield lock

    def spool(self) -> openqrm.Spool:
        return openqrm.Spool(self.cfg.spool_dir)

    def client(self, creds: Credentials, quick: bool = False) -> openqrm.Client:
        o = self.cfg.openqrm
        assert creds.url
        return openqrm.Client(creds.url, creds.user, creds.password, timeout=min(o.timeout, 3) if quick else o.timeout,
                              retries=0 if quick else o.retries, backoff=o.backoff, ca_file=o.ca_file,
                              transport=self.transport, diagnose=not quick)


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
