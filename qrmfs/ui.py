"""What the operator sees while a command runs: step lines and warnings on stderr, a progress bar for the
transfer when stderr is a terminal, nothing decorative otherwise. Results go to stdout (cli.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


class Ui:
    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.warnings: list[str] = []

    @cached_property
    def err(self) -> Console:
        """stderr's console, made at the first line shown: importing rich takes 15-20 ms, which a run spends
        while its first ssh handshake runs, not before it starts."""
        from rich.console import Console

        return Console(stderr=True, highlight=False, soft_wrap=True)

    @property
    def tty(self) -> bool:
        return sys.stderr.isatty()

    def step(self, msg: str) -> None:
        self.err.print(f"qrmfs: {msg}", markup=False)

    def debug(self, msg: str) -> None:
        if self.verbose:
            self.err.print(msg, markup=False, style="dim")

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        self.err.print(f"qrmfs: warning: {msg}", markup=False, style="yellow")

    @contextmanager
    def transfer(self, label: str) -> Iterator[Any]:
        """A progress callback (bytes, percent, rate) for a copy; a bar only on a terminal. A percent below 0:
        not known (a tar stream counts bytes only), the bar then shows activity."""
        if not self.tty:
            yield None
            return
        # imported here: only a copy on a terminal draws a bar (rich.progress is 15 ms of every run's start-up)
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        # rsync's progress2 gives percent of the whole transfer, bytes so far and its own rate.
        cols = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[pct]}"),
                TextColumn("{task.fields[done]}"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn())
        with Progress(*cols, console=self.err, transient=True) as prog:
            task = prog.add_task(label, total=100, done="", rate="", pct="")

            def update(done: int, pct: int, rate: str) -> None:
                if pct < 0:
                    prog.update(task, total=None, done=f"{done / 2**20:,.0f} MiB", rate=rate, pct="")
                else:
                    prog.update(task, completed=pct, done=f"{done / 2**20:,.0f} MiB", rate=rate, pct=f"{pct:>3d}%")

            yield update
