"""Each operation's summary in the system log: `journalctl -t qrmfs` (or /var/log/syslog) shows who created,
cloned, repaired or removed which image, when, and how it ended. The manifest keeps the details.

Sent with the standard library's SysLogHandler to /dev/log as `qrmfs[PID]: ...`, so journald and rsyslog
record the identifier `qrmfs`. Where /dev/log does not exist (a container, a minimal host), nothing is sent
and nothing is said: the log is a convenience, never a reason for a command to fail.
"""

from __future__ import annotations

import getpass
import logging
import os
import shlex
from collections.abc import Sequence

from . import errors

DEV_LOG = "/dev/log"
IDENT = "qrmfs"
# Commands that change images or the openQRM server; read-only runs (list, check, validate without --fix,
# --dry-run, --help) are not recorded.
RECORDED = ("create", "clone", "remove", "validate", "flush")


def _value(v: object) -> str:
    s = str(v)
    return s if s and all(c.isalnum() or c in "._:/@-+,=" for c in s) else shlex.quote(s)


def record(command: str, target: str | None, outcome: str, *, address: str | None = None, **fields: object) -> bool:
    """Send one line `COMMAND target=... outcome=... user=... k=v ...`. Returns whether it was sent."""
    address = address or DEV_LOG
    if not os.path.exists(address):
        return False
    user = getpass.getuser()
    parts = [command, *([f"target={_value(target)}"] if target else []), f"outcome={_value(outcome)}",
             f"user={_value(user)}"]
    if os.environ.get("SUDO_USER"):
        parts.append(f"sudo_user={_value(os.environ['SUDO_USER'])}")
    parts += [f"{k}={_value(v)}" for k, v in fields.items() if v is not None]
    import logging.handlers  # here, at a run's end: 7 ms of every run's start-up otherwise

    class Handler(logging.handlers.SysLogHandler):
        def handleError(self, record: logging.LogRecord) -> None:  # logging's name
            pass  # a log that cannot be written must not disturb the command

    try:
        # /dev/log is a datagram socket under journald, a stream one under some syslogds: the handler tries both.
        handler = Handler(address=address, facility=logging.handlers.SysLogHandler.LOG_USER)
    except OSError:
        return False
    handler.ident = f"{IDENT}[{os.getpid()}]: "
    try:
        level = logging.INFO if outcome == "ok" else logging.ERROR
        handler.emit(logging.LogRecord("qrmfs", level, __file__, 0, " ".join(parts), None, None))
    finally:
        handler.close()
    return True


def _option(args: Sequence[str], *names: str) -> str | None:
    for i, a in enumerate(args):
        if a in names and i + 1 < len(args):
            return args[i + 1]
        for n in names:
            if n.startswith("--") and a.startswith(n + "="):
                return a[len(n) + 1:]
    return None


def _error_classes(base: type[errors.QrmfsError] = errors.QrmfsError) -> list[type[errors.QrmfsError]]:
    subs = base.__subclasses__()
    return subs + [c for s in subs for c in _error_classes(s)]


def kind_of(rc: int) -> str:
    """The exit code's name (the error kind of README "Exit codes")."""
    if rc == 0:
        return "ok"
    if rc == 130:
        return "interrupted"
    return next((e.kind for e in _error_classes() if e.exit_code == rc), "error")


def record_cli(args: Sequence[str], rc: int) -> bool:
    """cli.main's one call: the command line's command and target, and how it ended (by its exit code)."""
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in RECORDED or any(a in ("-h", "--help", "--dry-run") for a in args):
        return False
    if command == "validate" and not any(a in ("-f", "--fix") for a in args):
        return False
    return record(command, _option(args, "-t", "--target"), kind_of(rc), exit=rc,
                  source=_option(args, "--from", "-l", "--location"))
