"""One error family; each kind has its own exit code. The CLI catches QrmfsError in one place."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class QrmfsError(Exception):
    exit_code = 1
    kind = "error"

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail  # e.g. the failing tool's stderr tail, shown under the one-line message


class UsageError(QrmfsError):
    """Bad input: a name, path, host or option combination. Nothing was touched."""
    exit_code, kind = 2, "usage"


class ConfigError(QrmfsError):
    """The config file is missing, unreadable or lacks what the command needs."""
    exit_code, kind = 3, "config"


class NotFoundError(QrmfsError):
    """The image, storage server or source does not exist."""
    exit_code, kind = 4, "not_found"


class ExistsError(QrmfsError):
    """The image exists and --force was not given."""
    exit_code, kind = 5, "exists"


class LockedError(QrmfsError):
    """Another qrmfs operation holds the image's lock."""
    exit_code, kind = 6, "locked"


class ConnectError(QrmfsError):
    """A host could not be reached or refused us (ssh)."""
    exit_code, kind = 7, "connect"


class TransferError(QrmfsError):
    """rsync (or the copy) failed; no image was published."""
    exit_code, kind = 8, "transfer"


class StorageError(QrmfsError):
    """An operation on the storage server's tree failed."""
    exit_code, kind = 9, "storage"


class RouteError(QrmfsError):
    """The requested route cannot work here (e.g. no kernel NFS client for --route nfs)."""
    exit_code, kind = 10, "route"


class RefusedError(QrmfsError):
    """A dangerous operation was refused (remove outside the export root, of a mounted image, ...)."""
    exit_code, kind = 11, "refused"


class InvalidImageError(QrmfsError):
    """validate found problems (or --fix could not repair them all)."""
    exit_code, kind = 12, "invalid"


class RegistrationError(QrmfsError):
    """The openQRM server refused a request (e.g. bad credentials) — not a transient failure."""
    exit_code, kind = 13, "registration"


class NotAdministratorError(RegistrationError):
    """openQRM took the credentials but did not run the request: the user is not an administrator (openQRM answers
    200 all the same; its empty answer shows it stopped at the role check)."""
    exit_code, kind = 16, "not_administrator"


class OpenQrmDownError(RegistrationError):
    """openQRM's PHP fails even on a request that only reads its database: the database is down (or the server
    broken). Nothing was done; the job waits in the spool."""
    exit_code, kind = 17, "openqrm_down"


class NotOpenQrmError(RegistrationError):
    """The URL does not answer as openQRM 5.3 does: not its base URL, or not openQRM."""
    exit_code, kind = 18, "not_openqrm"


class AbortedError(QrmfsError):
    """The operator declined a confirmation."""
    exit_code, kind = 14, "aborted"


class Interrupted(QrmfsError):
    """SIGINT or SIGTERM: qrmfs stopped what it ran, cleaned up, and exits with 128 + the signal's number."""
    kind = "interrupted"

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


class CheckFailedError(QrmfsError):
    """qrmfs check: at least one check failed (each is reported on its own line)."""
    exit_code, kind = 15, "check_failed"


# Signals that arrived inside a signals_deferred() block (the main thread's only: Python runs handlers there).
_deferring: list[int] = []   # depth of the blocks being run
_deferred: list[int] = []    # the signals that came meanwhile


def interrupt(signum: int) -> None:
    """What qrmfs's SIGINT/SIGTERM handler does: raise Interrupted, or, inside a signals_deferred() block,
    note the signal and raise it when the block ends."""
    if _deferring:
        _deferred.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """A short step that must happen whole (a request sent together with its place in the queue of answers):
    Interrupted is raised after it, not inside. Nothing in it may wait long: the signal waits with it.
    In any other thread than the main one it defers nothing: signals never interrupt those threads, and a
    block there must not hold back the main thread's signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring.append(1)
    try:
        yield
    finally:
        _deferring.pop()
    if not _deferring and _deferred:
        signum = _deferred[0]
        _deferred.clear()
        raise Interrupted(signum)
