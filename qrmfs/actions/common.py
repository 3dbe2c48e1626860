"""What every action needs: config, runner, UI, credentials, the openQRM client and spool, the lock holder."""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .. import openqrm
from ..agent.protocol import Inspected, Locked
from ..config import Config, Storage
from ..errors import NotFoundError, UsageError
from ..model import Target
from ..runner import Runner
from ..storage import StorageSide
from ..ui import Ui

PASSWORD_ENV = "QRMFS_PASSWORD"


@dataclass
class Credentials:
    url: str | None
    user: str | None
    password: str | None = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        return bool(self.url and self.user and self.password)


def _read_password(path: str) -> str:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UsageError(f"cannot read password file {path}: {e.strerror}") from None
    if not lines or not lines[0].strip():
        raise UsageError(f"password file {path} is empty")
    return lines[0].strip()


def resolve_credentials(cfg: Config, user: str | None, password: str | None, password_file: str | None,
                        url: str | None) -> Credentials:
    """-p, then --password-file, then $QRMFS_PASSWORD, then the config's password_file."""
    pw = (password or (password_file and _read_password(password_file)) or os.environ.get(PASSWORD_ENV)
          or (cfg.openqrm.password_file and _read_password(cfg.openqrm.password_file)) or None)
    return Credentials(url or cfg.openqrm.url, user or cfg.openqrm.user, pw)


def require_registration(creds: Credentials) -> None:
    missing = [what for what, v in (("the openQRM URL (config [openqrm] url or --openqrm-url)", creds.url),
                                    ("-u/--username", creds.user),
                                    (f"-p/--password, --password-file or ${PASSWORD_ENV}", creds.password)) if not v]
    if missing:
        raise UsageError(f"registering with openQRM needs {', '.join(missing)} (or -o/--only-physical to "
                         "create without registering)")


def holder(command: str, name: str) -> str:
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} ({command} {name})"


@dataclass
class Env:
    cfg: Config
    runner: Runner
    ui: Ui
    transport: httpx.BaseTransport | None = None  # the openQRM client's (tests give an httpx.MockTransport)
    _sides: dict[Storage, StorageSide] = field(default_factory=dict)

    def storage(self, target: Target) -> Storage:
        s = self.cfg.storage_for(target.storage)
        root = s.export_root
        if not target.path.startswith(root + "/"):
            raise UsageError(f"target {target} is not below the export root {root} of storage server {s.name}")
        return s

    def side(self, storage: Storage) -> StorageSide:
        """One StorageSide (and so one ssh master connection) per storage server and run."""
        if storage not in self._sides:
            self._sides[storage] = StorageSide(storage, self.runner, identity=self.cfg.identity_file,
                                               known_hosts=self.cfg.known_hosts)
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
                              retries=0 if quick else o.retries, backoff=o.backoff, transport=self.transport)


def deliver(env: Env, creds: Credentials, job: openqrm.Job, quick: bool = False) -> str | None:
    """Send the job (it is in the spool until answered). None when delivered; else why it still waits.
    A refusal (bad credentials, ...) raises RegistrationError with the job still spooled."""
    try:
        env.client(creds, quick=quick).deliver(job, env.spool())
        return None
    except openqrm.Transient as e:
        env.ui.debug(f"openQRM not reachable now ({e}); kept in the spool")
        return str(e)


def flush_spool(env: Env, creds: Credentials, quick: bool) -> dict[str, list[str]]:
    """Deliver what earlier runs left in the spool (oldest first). Quick: one attempt each, short timeout."""
    done: list[str] = []
    left: list[str] = []
    for job in env.spool().jobs():
        if not creds.password and any(r.kind == "image" for r in job.requests):
            left.append(job.id)
            continue
        c = env.client(Credentials(job.url, job.user or creds.user, creds.password), quick=quick)
        try:
            c.deliver(job, env.spool())
            done.append(job.id)
            env.ui.step(f"delivered spooled registration {job.id} ({job.image}) to {job.url}")
        except Exception as e:  # noqa: BLE001 - a failed delivery stays in the spool; never fails the command
            left.append(job.id)
            (env.ui.debug if quick else env.ui.warn)(f"spooled registration {job.id} ({job.image}) still pending: "
                                                     f"{getattr(e, 'message', e)}")
    return {"delivered": done, "pending": left}
