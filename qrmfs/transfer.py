"""Copying a root filesystem with rsync or a tar stream: how to read their output (progress, --stats, items)
and how to judge their exit codes. What to copy (the separate filesystems) is in mounts.py, argv building in
argv.py, processes in runner.py.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .argv import TAR_PROGRESS
from .errors import TransferError
from .runner import Runner, tail

if TYPE_CHECKING:
    import subprocess

RSYNC_VANISHED = 24
RSYNC_MEANING = {1: "syntax or usage error", 2: "protocol incompatibility", 3: "errors selecting files",
                 5: "error starting client-server protocol", 10: "error in socket I/O", 11: "error in file I/O",
                 12: "error in rsync protocol data stream (often: rsync missing or failing on the other side)",
                 14: "error in IPC code", 20: "interrupted", 23: "partial transfer due to error",
                 30: "timeout in data send/receive", 35: "timeout waiting for daemon connection",
                 125: "stopped by qrmfs's storage-side supervisor", 127: "rsync not found on the other side",
                 255: "ssh failed (connection or authentication)"}


PROGRESS = re.compile(r"^\s*([\d,]+)\s+(\d+)%\s+(\S+/s)\s+(\S+)")


def parse_progress(line: str) -> tuple[int, int, str] | None:
    """rsync --info=progress2: (bytes so far, percent, rate) or None."""
    m = PROGRESS.match(line)
    if not m:
        return None
    return int(m.group(1).replace(",", "")), int(m.group(2)), m.group(3)


def parse_stats(text: str) -> dict[str, int]:
    """The numbers of rsync --stats we keep in the manifest."""
    keys = {"Number of files": "files", "Number of regular files transferred": "regular_transferred",
            "Total file size": "bytes", "Total transferred file size": "bytes_transferred",
            "Number of created files": "created", "Number of deleted files": "deleted"}
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep and k.strip() in keys:
            m = re.match(r"\s*([\d,]+)", v)
            if m:
                out[keys[k.strip()]] = int(m.group(1).replace(",", ""))
    return out


# rsync --itemize-changes: "YXcstpoguax path" (or "*deleting path")
ITEM = re.compile(r"^(\*deleting|[<>ch.*][fdLDS][^ ]{7,9})\s+(.*)$")
ITEM_KIND = re.compile(r"^(?P<op>[<>ch.*])(?P<type>[fdLDS])(?P<flags>.*)$")


def parse_item(line: str) -> tuple[str, str] | None:
    """One itemized line as (code, absolute path in the tree), or None: not an item, the root itself, or a
    directory whose only difference is its time (noise the preparation leaves when it writes inside)."""
    m = ITEM.match(line)
    if not m or m.group(2) == "./" or re.fullmatch(r"\.d\.\.t\.*", m.group(1)):
        return None
    return m.group(1), "/" + m.group(2).rstrip("/")


def change_kind(code: str) -> str:
    """One rsync itemize code as a kind: new, changed (content), metadata, deleted."""
    if code.startswith("*deleting"):
        return "deleted"
    m = ITEM_KIND.match(code)
    if not m:
        return "other"
    if "+++" in m.group("flags"):
        return "new"
    if m.group("op") in "<>" or (m.group("op") == "c" and m.group("type") != "d"):
        return "changed"
    return "metadata"


def judge(code: int) -> tuple[bool, str | None]:
    """(ok, warning) for an rsync exit code. 24 (files vanished on a live system) is only a warning."""
    if code == 0:
        return True, None
    if code == RSYNC_VANISHED:
        return True, "some files vanished during the copy (normal on a live system)"
    return False, None


def refused_feature(stderr: str) -> str | None:
    """What the receiving filesystem refused, said plainly (the exit code alone says only "file I/O")."""
    low = stderr.lower()
    if "operation not supported" in low and ("xattr" in low or "acl" in low):
        return "the target filesystem refused extended attributes or ACLs"
    if "no space left on device" in low:
        return "the target filesystem is full (No space left on device)"
    if "disk quota exceeded" in low:
        return "the target's disk quota is exceeded"
    return None


def _meaning(code: int, stderr: str) -> str:
    if code == 255 and not stderr.strip():
        return ("the ssh session ended without an exit status and without a message: the remote side was killed "
                "by a signal (the OOM killer, a crash) or the connection was cut")
    if 128 < code < 255 and code not in RSYNC_MEANING:
        try:
            return f"killed by signal {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return RSYNC_MEANING.get(code, "failed")


def check_rsync(code: int, stderr: str, what: str = "") -> str | None:
    """The one judgement of an rsync run: its warning, or TransferError saying why it failed (the exit code's
    meaning and the tail of rsync's and ssh's stderr; without any stderr, that there was none)."""
    ok, warning = judge(code)
    if ok:
        return warning
    why = refused_feature(stderr) or _meaning(code, stderr)
    detail = tail(stderr, 15) or "(rsync and ssh printed nothing on stderr)"
    raise TransferError(f"{what}rsync exited with {code}: {why}", detail)


def run_rsync(runner: Runner, argv: Sequence[str], on_progress: Callable[[int, int, str], None] | None,
              input: bytes | None = None, changes: Callable[[str, str], None] | None = None,
              started: subprocess.Popen[bytes] | None = None) -> tuple[dict[str, int], str | None, int]:
    """Run one rsync (already wrapped for where it runs; input: what its supervisor reads on stdin;
    changes: called with (kind, path) for each itemized change, when rsync itemizes; started: its supervisor,
    started early, see StorageSide.supervised).
    Returns (stats, warning, exit code)."""
    def on_line(line: str) -> None:
        p = parse_progress(line)
        if p and on_progress:
            on_progress(*p)
            return
        item = parse_item(line) if changes else None
        if item and changes:
            changes(change_kind(item[0]), item[1])

    r = runner.stream(argv, on_line, ok=range(256), input=input, started=started)  # every exit code is judged here
    warning = check_rsync(r.code, r.stderr)
    return parse_stats(r.stdout), warning, r.code


TAR_TOTALS = re.compile(r"^Total bytes read: (\d+)", re.M)
STOPPED = 125  # the storage-side supervisor stopped the command (agent protocol STOPPED)


@dataclass(frozen=True)
class Streamed:
    """What a tar stream did: the exit codes of its two ends (None: the supervisor reported none), the bytes
    that crossed (as the extracting tar counted them), the supervisor's own exit code, stderr."""
    codes: tuple[int, int] | None
    bytes: int | None
    code: int
    stderr: str

    @property
    def clean(self) -> bool:
        return self.codes == (0, 0)

    def why(self) -> str:
        """Why a stream was not clean, in one line."""
        if self.codes is None:
            last = tail(self.stderr, 1)
            return f"the stream did not run (exit {self.code})" + (f": {last}" if last else "")
        send, receive = self.codes
        parts = [f"sending tar exited with {send}" + (" (a file changed or vanished while it read it)"
                                                     if send == 1 else
                                                     " (ssh failed)" if send == 255 else
                                                     " (tar not found on the source)" if send == 127 else "")
                 ] if send else []
        parts += [f"extracting tar exited with {receive}"] if receive else []
        last = self.cause()
        return "; ".join(parts) + (f": {last}" if last else "")

    def cause(self) -> str:
        """The stream's own last error line: tar's closing summary ("Exiting with failure status due to previous
        errors") names no cause, the line before it does."""
        lines = [ln for ln in self.stderr.splitlines() if ln.strip() and not TAR_SUMMARY.search(ln)]
        return lines[-1].strip() if lines else tail(self.stderr, 1)


TAR_SUMMARY = re.compile(r"Exiting with failure status due to previous errors|Error is not recoverable")


def parse_streamed(stdout: str, stderr: str, code: int) -> Streamed:
    """The supervisor's `{"pipeline": [send, receive]}` line and tar's --totals."""
    codes = None
    for line in stdout.splitlines():
        if line.startswith('{"pipeline"'):
            c = json.loads(line)["pipeline"]
            codes = (int(c[0]), int(c[1]))
    m = TAR_TOTALS.search(stderr)
    return Streamed(codes, int(m.group(1)) if m else None, code, stderr)


TAR_PROGRESS_LINE = re.compile(r"^tar: " + re.escape(TAR_PROGRESS) + r" r: (\d+) \([^,]*, ([^)]*)\)")


def parse_tar_progress(line: str) -> tuple[int, str] | None:
    """A progress line of the extracting tar (argv.tar_extract_argv(progress=True)): (bytes read, rate)."""
    m = TAR_PROGRESS_LINE.match(line)
    return (int(m.group(1)), m.group(2)) if m else None


def run_stream(runner: Runner, argv: Sequence[str], input: bytes | None,
               on_progress: Callable[[int, int, str], None] | None = None,
               started: subprocess.Popen[bytes] | None = None) -> Streamed:
    """Run one tar stream under its storage-side supervisor (argv, input and started from
    StorageSide.supervised).
    Stopped by the supervisor (we went, or lost the lock): TransferError, as for rsync. on_progress: called
    with (bytes so far, -1: no percentage, rate) for each of the extracting tar's progress lines."""
    def progress(line: str) -> bool:
        p = parse_tar_progress(line)
        if p is None:
            return False
        if on_progress:
            on_progress(p[0], -1, p[1])
        return True

    r = runner.stream(argv, lambda _line: None, ok=range(256), input=input, on_err_line=progress, started=started)
    s = parse_streamed(r.stdout, r.stderr, r.code)
    if s.codes is None:
        # the supervisor reported no ends: it was stopped (we went, or lost the lock), or our connection to the
        # storage server was cut (255) or the storage server went away. A repair over that connection cannot
        # run (the lock went with it): the copy fails here, saying why, as an rsync would.
        raise TransferError(f"the tar stream exited with {r.code}: {RSYNC_MEANING.get(r.code, 'failed')}",
                            tail(r.stderr, 15) or "(nothing on stderr)")
    return s
