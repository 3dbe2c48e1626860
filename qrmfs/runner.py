"""The ONLY module that starts processes (through plumbum), locally; ssh wrapping is argv.ssh_argv's job.

A failing command raises CommandFailed carrying argv, exit code and the tail of its stderr, so the user
sees why. Callers that must interpret exit codes themselves (rsync's 24) pass `ok=`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from plumbum import local
from plumbum.commands.processes import CommandNotFound, ProcessTimedOut

from .errors import Interrupted, QrmfsError, signals_deferred


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class CommandFailed(QrmfsError):
    def __init__(self, argv: Sequence[str], code: int, stderr: str) -> None:
        super().__init__(f"{argv[0]} exited with {code}", tail(stderr))
        self.argv, self.code, self.stderr = tuple(argv), code, stderr


class ToolMissing(QrmfsError):
    exit_code, kind = 7, "connect"


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    code: int
    stdout: str
    stderr: str


class Runner:
    def __init__(self, verbose: bool = False, env: dict[str, str] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.verbose = verbose
        self.env = env or {}
        self._log = log or (lambda m: print(m, file=sys.stderr))

    def with_env(self, env: dict[str, str]) -> Runner:
        return Runner(self.verbose, {**self.env, **env}, self._log)

    def _cmd(self, argv: Sequence[str]) -> Any:
        try:
            cmd: Any = local[argv[0]][tuple(argv[1:])]
        except CommandNotFound:
            raise ToolMissing(f"{argv[0]} is not installed on this machine") from None
        if self.env:
            cmd = cmd.with_env(**self.env)
        if self.verbose:
            import shlex
            self._log(f"+ {shlex.join(argv)}")
        return cmd

    def popen(self, argv: Sequence[str], stdin: int | IO[Any] | None = subprocess.PIPE,
              output: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
        """The child, started. A SIGINT/SIGTERM during the fork is noted and raised once it returned (raised inside
        the fork's own hooks it was ignored and lost: the run went on): the child just started is then killed."""
        cmd = self._cmd(argv)
        p: subprocess.Popen[bytes] | None = None
        try:
            with signals_deferred():
                p = cmd.popen(stdin=stdin, stdout=output, stderr=output, **CHILD)
        except Interrupted:
            if p is not None:
                p.kill()
                p.wait()
            raise
        return p

    def run(self, argv: Sequence[str], *, input: str | bytes | None = None, ok: Sequence[int] = (0,),
            timeout: float | None = None) -> Result:
        """Run to completion (plumbum's run, its timeout); raise CommandFailed unless the exit code is in `ok`.
        Without input, the command's stdin is at end of file at once."""
        cmd = self._cmd(argv) << (input if input is not None else "")
        try:
            code, out, err = cmd.run(retcode=None, timeout=timeout, **CHILD)
        except ProcessTimedOut:
            raise CommandFailed(argv, -9, f"(timed out after {timeout}s)") from None
        if code not in ok:
            raise CommandFailed(argv, code, err)
        return Result(tuple(argv), code, out, err)

    def stream(self, argv: Sequence[str], on_line: Callable[[str], None], *, ok: Sequence[int] = (0,),
               input: bytes | None = None, on_err_line: Callable[[str], bool] | None = None,
               started: subprocess.Popen[bytes] | None = None) -> Result:
        """Run, calling on_line for each stdout line, split on \\r too: rsync's progress rewrites one line with
        \\r, which plumbum's iter_lines (it reads up to \\n) would deliver only at the end of the copy.

        With input, it is written to the command's stdin, which then stays open until the command ends: a
        storage-side supervisor (agent `run`) takes its end of file as "qrmfs is gone" and stops the command.
        If we are interrupted (Ctrl-C, SIGTERM), stdin is closed first and the command given time to end, so
        whatever it ran on a remote host has stopped before the caller cleans up after it.
        on_err_line: called with each stderr line as it comes; a line it returns True for is its own (a
        progress line), left out of the stderr the result keeps.
        started: argv, started earlier by popen() (stdin and output pipes), that still waits for its input."""
        p = started or self.popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL)
        assert p.stderr is not None and p.stdout is not None
        err_chunks: list[bytes] = []
        t = threading.Thread(target=_read_err, args=(p.stderr, err_chunks, on_err_line), daemon=True)
        t.start()
        try:
            if input is not None:
                assert p.stdin is not None
                try:
                    p.stdin.write(input)
                    p.stdin.flush()
                except BrokenPipeError:
                    pass  # it has ended already (a connection that failed): its exit code and stderr say why
            out = self._read_lines(p, on_line)
            p.wait()
        except BaseException:
            stop(p)
            raise
        finally:
            if p.stdin is not None and not p.stdin.closed:
                try:
                    p.stdin.close()
                except BrokenPipeError:
                    pass  # what it was to read is lost with it; its exit code says so
        t.join()
        r = Result(tuple(argv), p.returncode, "\n".join(out), b"".join(err_chunks).decode(errors="replace"))
        if r.code not in ok:
            raise CommandFailed(argv, r.code, r.stderr)
        return r

    @staticmethod
    def _read_lines(p: subprocess.Popen[bytes], on_line: Callable[[str], None]) -> list[str]:
        assert p.stdout is not None
        out_lines: list[str] = []
        buf = b""
        while True:
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
            for ln in lines:
                s = ln.decode(errors="replace")
                out_lines.append(s)
                on_line(s)
        if buf:
            out_lines.append(buf.decode(errors="replace"))
            on_line(out_lines[-1])
        return out_lines


T = TypeVar("T")


def _read_err(f: IO[bytes], into: list[bytes], on_line: Callable[[str], bool] | None) -> None:
    if on_line is None:
        into.append(f.read())
        return
    for line in iter(f.readline, b""):
        if not on_line(line.decode(errors="replace").rstrip("\n")):
            into.append(line)


def stop(p: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """End a child we are abandoning: close its stdin (a remote supervisor then stops what it runs, and ssh
    exits once that has ended), wait a little, then terminate, then kill."""
    if p.stdin is not None and not p.stdin.closed:
        try:
            p.stdin.close()
        except OSError:
            pass
    for sig, wait in ((None, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if sig is not None:
            p.send_signal(sig)
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _die_with_qrmfs() -> None:
    """In the child before exec: its own session (a Ctrl-C at the terminal reaches qrmfs alone, which stops
    the children in order), and SIGKILL when qrmfs dies, however it dies (Linux's PR_SET_PDEATHSIG)."""
    os.setsid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


PR_SET_PDEATHSIG = 1
CHILD: dict[str, Any] = {"preexec_fn": _die_with_qrmfs}
