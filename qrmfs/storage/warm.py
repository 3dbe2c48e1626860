"""Agents started before their command is known (a copy's supervised rsync): their ssh channel, python3 and the
agent's modules are ready by the time the command is, off the run's critical path."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Sequence
from typing import NamedTuple

from ..runner import Runner, stop
from . import payload


class WarmAgent(NamedTuple):
    process: subprocess.Popen[bytes]
    writer: threading.Thread  # writes the modules' line; the request follows once it is through
    argv: tuple[str, ...]     # what it was started with


class WarmAgents:
    """At most one waiting agent per kind (with or without agent forwarding)."""

    def __init__(self) -> None:
        self._agents: dict[bool, WarmAgent] = {}

    def __contains__(self, forward_agent: bool) -> bool:
        return forward_agent in self._agents

    def start(self, forward_agent: bool, argv: Sequence[str], runner: Runner) -> None:
        p = runner.popen(argv)  # from the caller's thread: PR_SET_PDEATHSIG follows the thread that forks
        writer = threading.Thread(target=payload.write, args=(p, payload.payload(None).encode()), daemon=True)
        writer.start()
        self._agents[forward_agent] = WarmAgent(p, writer, tuple(argv))

    def take(self, forward_agent: bool) -> WarmAgent | None:
        """The waiting agent of that kind, its modules' line through; None when there is none, or it ended
        while it waited."""
        warm = self._agents.pop(forward_agent, None)
        if warm is not None and warm.process.poll() is not None:  # it ended while it waited: start one now
            warm.writer.join(timeout=5)
            return None
        if warm is not None:
            warm.writer.join()  # the modules' line is through: the request follows it
        return warm

    def end(self) -> None:
        """Agents no command took: their stdin closes, they exit."""
        for warm in self._agents.values():
            warm.writer.join(timeout=5)
            stop(warm.process, grace=5.0)
        self._agents.clear()

    def __bool__(self) -> bool:
        return bool(self._agents)

    def __getitem__(self, forward_agent: bool) -> WarmAgent:
        return self._agents[forward_agent]
