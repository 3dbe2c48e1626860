"""The openQRM server's HTTP interface (events, image records) and the spool of undelivered requests.

A registration is never lost: every request is written to the spool before it is sent and removed when
the server has answered 200. Never sent twice:
- a new_image is marked `maybe_delivered` in the spool *before* it is sent, and the mark stays on disk
  until the request is removed from the job; a new_image in that state is preceded by remove_by_name on
  retry, so the server ends with exactly one record even when qrmfs dies mid-request;
- a job is delivered only by the process that holds its claim (an fcntl lock on `<id>.lock` in the spool
  directory), so two qrmfs processes never send the same job.
Never sent elsewhere: a job is bound to its URL and to where its credentials came from (`auth`: user and
source, never the password); it is never sent to another URL or with credentials from elsewhere.
Never sent for an image that is not there: a build writes its registration into the spool before it
publishes (so a qrmfs killed at the publish or right after it loses nothing), marked `publish` with the
generation it publishes; a job so marked is sent only once the image at its target is that generation, and its
registration is dropped (the failure reported) when the run died before publishing.
Passwords are never written to the spool.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import NotAdministratorError, NotOpenQrmError, OpenQrmDownError, RegistrationError

if TYPE_CHECKING:
    import ssl

    import httpx  # imported when a client is made: most runs never talk to openQRM

EVENT_PATH = "/action/resource-monitor.php"
IMAGE_PATH = "/base/server/image/image-action.php"
EVENT_SOURCE = "qrmfs"
PROCESSED = "\n"  # image-action.php's answer when it ran a command: the one byte after its closing `?>`
REALM = "openQRM-Server Login"  # the Basic-auth realm of openQRM's openqrm-htaccess.conf
# the role probe (probe_credentials): past the role check, PHP's strlen() fails on the array before any write
ROLE_PROBE = {"action": "add", "identifier[]": "0", "image_storageid[]": "0"}


@dataclass
class Request:
    kind: str                # "event" | "image"
    params: dict[str, str]
    maybe_delivered: bool = False

    @property
    def path(self) -> str:
        return EVENT_PATH if self.kind == "event" else IMAGE_PATH

    def describe(self) -> str:
        p = self.params
        if self.kind == "event":
            return f"event {p['event_name']} (priority {p['event_priority']}): {p['event_description']}"
        return f"{p['image_command']} {p.get('image_name', p.get('image_id', ''))}"


def event(name: str, priority: int, description: str) -> Request:
    return Request("event", {"resource_command": "post_event", "resource_id": "0", "event_name": name,
                             "event_priority": str(priority), "event_source": EVENT_SOURCE,
                             "event_description": description})


def new_image(fields: dict[str, str]) -> Request:
    return Request("image", {"image_command": "new_image", **fields})


def remove_by_name(name: str) -> Request:
    return Request("image", {"image_command": "remove_by_name", "image_name": name})


@dataclass
class Job:
    """An ordered list of requests for one image operation, persisted in the spool until all are sent.
    auth: "USER via SOURCE", the credentials it may be sent with (None: only events, no credentials).
    storage: the image's storage identity {"address", "port", "path"}, whatever spelling the target had.
    publish: see below; the process that armed the job holds its claim until the publish is done."""
    url: str
    user: str | None
    image: str
    target: str
    requests: list[Request]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created: float = field(default_factory=time.time)
    auth: str | None = None
    storage: dict[str, Any] | None = None
    publish: dict[str, Any] | None = None  # {"generation": ID}: armed before a publish; sent only once the image
    #                                        at target is that generation (a run that died before it: never)
    command: str | None = None  # the qrmfs command whose job it is (jobs.py); None in jobs spooled before it

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Job:
        d = json.loads(text)
        d["requests"] = [Request(**r) for r in d["requests"]]
        return cls(**d)


class Transient(Exception):
    """The server did not take the request this time (down, 5xx, timeout): try again later."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status it answered, if it answered


class Claim:
    """The exclusive right to deliver (or drop) one spooled job: an flock on `<id>.lock` in the spool."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd: int | None = fd
        self.path = path

    def release(self, unlink: bool = False) -> None:
        """unlink: the job is gone; the lock file goes while still held (claim() retries on a stale inode)."""
        if self.fd is None:
            return
        if unlink:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


class Spool:
    def __init__(self, directory: str) -> None:
        self.dir = Path(os.path.expanduser(directory))

    def claim(self, job_id: str, wait: float = 0.0) -> Claim | None:
        """Lock the job against every other qrmfs process; None when another one holds it (after waiting up
        to `wait` seconds, polling). A lock file unlinked by its holder is never trusted: retry on a new one."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.dir / f"{job_id}.lock"
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.05)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return Claim(fd, path)
            os.close(fd)

    def load(self, job_id: str) -> Job | None:
        """The job as it is on disk now (None: delivered or dropped meanwhile)."""
        try:
            return Job.from_json((self.dir / f"{job_id}.json").read_text())
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            return None  # gone, or unreadable (jobs() skips such a file too)

    def save(self, job: Job) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.dir / f".{job.id}.tmp"
        tmp.write_text(job.to_json())
        os.replace(tmp, self.dir / f"{job.id}.json")

    def drop(self, job: Job) -> None:
        (self.dir / f"{job.id}.json").unlink(missing_ok=True)

    def jobs(self) -> list[Job]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                out.append(Job.from_json(p.read_text()))
            except (ValueError, TypeError, KeyError):
                continue
        return sorted(out, key=lambda j: j.created)


def prepare(url: str, ca_file: str | None) -> None:
    """Import httpx and make the TLS context a client of `url` uses, now: a run that will talk to openQRM does
    this during its storage server's ssh handshake, off its critical path (together 60-100 ms)."""
    import httpcore  # noqa: F401 - httpx's transport imports it when the first client is made

    _tls(_https(url), ca_file)  # imports httpx


def _https(url: str) -> bool:
    return url.strip().lower().startswith("https:")


@functools.cache
def _tls(https: bool, ca_file: str | None) -> ssl.SSLContext:
    """The TLS context of every client of a run, made once (loading CAs costs 20-40 ms a time). TLS is always
    verified: against httpx's CA bundle, or [openqrm] ca_file. A plain-http URL's client gets a context that
    trusts no CA at all: it never speaks TLS (it follows no redirects), and if it ever did, it would refuse."""
    import ssl

    import httpx

    if not https:
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and host names, trusts no CA
    return ssl.create_default_context(cafile=ca_file) if ca_file else httpx.create_ssl_context()


class Client:
    def __init__(self, url: str, user: str | None, password: str | None, *,  # noqa: PLR0913 - keyword-only settings
                 timeout: float = 10.0,
                 retries: int = 4, backoff: float = 0.5, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep, ca_file: str | None = None,
                 diagnose: bool = True) -> None:
        self.url = url.rstrip("/")
        self.user, self.password = user, password
        self.retries, self.backoff, self.sleep = retries, backoff, sleep
        self.diagnose = diagnose  # after a last 500: tell a down database (OpenQrmDownError) from a passing fault
        # imported here: ssl and httpx are a tenth of qrmfs's start-up, paid only by runs that talk to openQRM
        import httpx

        self.httpx = httpx
        self.http = httpx.Client(timeout=timeout, transport=transport, verify=_tls(_https(url), ca_file))

    def send_once(self, req: Request) -> None:
        """One attempt. Raises Transient (try later) or RegistrationError (will not work as is)."""
        auth = None
        if req.kind == "image":
            if not (self.user and self.password):
                raise RegistrationError("openQRM credentials are needed to register images (-u and -p, "
                                        "--password-file or QRMFS_PASSWORD)")
            auth = (self.user, self.password)
        try:
            r = self.http.get(self.url + req.path, params=req.params, auth=auth)
        except (self.httpx.ConnectError, self.httpx.ConnectTimeout) as e:
            raise Transient(f"cannot connect to {self.url}: {e}") from None
        except self.httpx.TransportError as e:
            req.maybe_delivered = True  # it may have arrived before the connection died
            raise Transient(f"no answer from {self.url}: {type(e).__name__} {e}") from None
        self._judge(req, r)

    def _judge(self, req: Request, r: httpx.Response) -> None:
        """What openQRM 5.3's answer shows (docs/openqrm.md): image-action.php runs a command only for an
        administrator and then answers its one byte after `?>` (a newline); it stops at the role check with an
        empty answer; resource-monitor.php's post_event answers nothing. Both answer 200 either way."""
        if r.status_code == 200:
            if r.text == (PROCESSED if req.kind == "image" else ""):
                return
            if req.kind == "image" and r.text == "":
                raise NotAdministratorError(
                    f"openQRM at {self.url} did not run {req.describe()}: user {self.user!r} is not an administrator "
                    "(openQRM answers 200 and logs an \"Un-Authorized access\" event); the job waits in the spool")
            expected = "a newline" if req.kind == "image" else "nothing"
            raise NotOpenQrmError(f"{self.url} does not answer as openQRM 5.3: {req.describe()} got a page of "
                                  f"{len(r.content)} bytes, where openQRM answers {expected} (is the URL openQRM's "
                                  "base, e.g. http://host/openqrm?)")
        if r.status_code >= 500 or r.status_code in (408, 429):
            raise Transient(f"{self.url} answered {r.status_code}", r.status_code)
        if r.status_code == 401:
            raise RegistrationError(f"openQRM at {self.url} refused the credentials of user {self.user!r} (401) for "
                                    f"{req.describe()}")
        raise NotOpenQrmError(f"{self.url} does not answer as openQRM 5.3: {r.status_code} to {req.describe()} (is "
                              "the URL openQRM's base, e.g. http://host/openqrm?)")

    def database_answers(self) -> bool:
        """Does openQRM's PHP reach its database? A post_event without an event name reads the database (the
        server's own address) and writes nothing; it fails with 500 when the database is down. Raises
        Transient when the server does not answer at all, NotOpenQrmError when the answer is not openQRM's."""
        try:
            r = self.http.get(self.url + EVENT_PATH, params={"resource_command": "post_event", "resource_id": "0"})
        except self.httpx.TransportError as e:
            raise Transient(f"cannot connect to {self.url}: {type(e).__name__} {e}") from None
        if r.status_code == 500:
            return False
        self._judge(Request("event", {"resource_command": "post_event", "event_name": "", "event_priority": "",
                                      "event_description": "(none: reads the database only)"}), r)
        return True

    def probe_credentials(self) -> None:
        """Is the user an openQRM administrator? Proven without changing anything on the server: image-action.php
        checks the role first, and past it fails with 500 on an array-valued image_storageid (a PHP TypeError in its
        `strlen`) before it logs or writes anything; a user without the role is stopped before, with an empty 200
        (openQRM itself then logs the refused access). Without credentials Apache answers 401 with openQRM's realm.
        Only meaningful while the database answers (database_answers(), just before): a down database is a 500 too.
        Raises RegistrationError (and its kinds) or Transient."""
        try:
            bare = self.http.get(self.url + IMAGE_PATH)
            if bare.status_code != 401 or REALM not in bare.headers.get("www-authenticate", ""):
                raise NotOpenQrmError(f"{self.url} does not answer as openQRM 5.3: {IMAGE_PATH} without credentials "
                                      f"answered {bare.status_code}, not 401 for the realm \"{REALM}\" (is the URL "
                                      "openQRM's base, e.g. http://host/openqrm?)")
            r = self.http.get(self.url + IMAGE_PATH, params=ROLE_PROBE, auth=(self.user or "", self.password or ""))
        except self.httpx.TransportError as e:
            raise Transient(f"cannot connect to {self.url}: {type(e).__name__} {e}") from None
        if r.status_code == 500:
            return
        self._judge(Request("image", {"image_command": "(none: the role probe)"}), r)
        raise NotOpenQrmError(f"{self.url} does not answer as openQRM 5.3 does to the role probe ({r.status_code})")

    def send(self, req: Request) -> None:
        """With retries and exponential backoff; the last Transient propagates. A new_image that may
        have arrived already is preceded by remove_by_name, so the server never holds it twice."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                if req.maybe_delivered and is_new_image(req):
                    self.send_once(remove_by_name(req.params["image_name"]))
                    req.maybe_delivered = False
                self.send_once(req)
                req.maybe_delivered = False
                return
            except Transient as e:
                if attempt == self.retries:
                    if e.status == 500 and self.diagnose and not self.database_answers():
                        raise OpenQrmDownError(
                            f"openQRM at {self.url} fails (500) even on a request that only reads its database: its "
                            f"database is down (or its PHP broken); {req.describe()} was not done") from None
                    raise
                self.sleep(delay)
                delay *= 2

    def deliver(self, job: Job, spool: Spool) -> None:
        """Send the job's requests in order, keeping the spool file current. Raises Transient or
        RegistrationError with the unsent rest still in the spool. The caller holds the job's claim."""
        if job.url.rstrip("/") != self.url:
            raise RegistrationError(f"spool job {job.id} belongs to {job.url}, not {self.url}: not sent")
        if job.publish is not None:
            raise RegistrationError(f"spool job {job.id} waits for the publish of {job.target}: not sent")
        spool.save(job)
        while job.requests:
            req = job.requests[0]
            if is_new_image(req):
                # Write-ahead: on disk it is in doubt from before it is sent until it leaves the job, so a
                # process that dies anywhere in between (mid-request, or after the answer) leaves the mark.
                doubt, req.maybe_delivered = req.maybe_delivered, True
                spool.save(job)
                req.maybe_delivered = doubt
            try:
                self.send(req)
            except (Transient, RegistrationError):
                spool.save(job)  # a definite outcome: records whether the last attempt ended in doubt
                raise
            job.requests.pop(0)
            if job.requests:
                spool.save(job)
        spool.drop(job)


def is_new_image(req: Request) -> bool:
    return req.kind == "image" and req.params.get("image_command") == "new_image"


def public(job: Job) -> dict[str, Any]:
    """A job as shown to the user (never a password: jobs do not hold one)."""
    return {"id": job.id, "image": job.image, "target": job.target, "url": job.url, "auth": job.auth,
            "storage": job.storage, "pending": [r.describe() for r in job.requests]}
