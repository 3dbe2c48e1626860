"""What every action needs: config, runner, UI, credentials, the openQRM client and spool, the lock holder."""

from __future__ import annotations

import atexit
import getpass
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import model, openqrm
from ..agent.holds import describe
from ..agent.protocol import Held, Inspected, Locked
from ..config import Config, Storage, _shown
from ..errors import NotFoundError, UsageError
from ..model import Target
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

    def client(self, creds: Credentials, quick: bool = False, retry: bool = True) -> openqrm.Client:
        """The one way a client of openQRM is made, from [openqrm]: quick, one short attempt (a 500 is not looked
        into); retry=False, one attempt with the configured timeout (check's probes); else with retries."""
        o = self.cfg.openqrm
        assert creds.url
        return openqrm.Client(creds.url, creds.user, creds.password, timeout=min(o.timeout, 3) if quick else o.timeout,
                              retries=0 if quick or not retry else o.retries, backoff=o.backoff, ca_file=o.ca_file,
                              transport=self.transport, diagnose=not quick)
