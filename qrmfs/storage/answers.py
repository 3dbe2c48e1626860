"""An agent session's pipelined answers: requests are sent without waiting, and a reader thread hands each
answer line to the oldest request still waiting for one (the agent answers in order)."""

from __future__ import annotations

import subprocess
import threading
from collections import deque

from ..errors import signals_deferred

# How long a signal may wait while a request waits for its answer: Condition.wait cannot take an exception at
# every instant (one raised just after it let go of the lock leaves the lock released under the caller's `with`,
# and its exit then fails with "cannot release un-acquired lock"), so the signal is noted during a short wait and
# raised between two of them, with the lock held.
SIGNAL_LATENCY = 0.2


class Answers:
    """The requests of one session waiting for their answers (each a slot the reader fills), oldest first.
    `io` guards them; the session that owns them holds it too for its own state."""

    def __init__(self, io: threading.Condition) -> None:
        self.io = io
        self.waiting: deque[list[str]] = deque()
        self.ended = False

    def expect(self) -> list[str]:
        """The slot of a request about to be sent (call with io held): already answered with "" when the
        session has ended (the request is then not sent)."""
        slot: list[str] = []
        if self.ended:
            slot.append("")
        else:
            self.waiting.append(slot)
        return slot

    def read(self, p: subprocess.Popen[bytes]) -> None:
        """The reader (a thread of its own: a signal raises Interrupted in the main thread only, so no signal
        can fall between reading an answer and handing it to its request): each answer line goes to the oldest
        request waiting, in order. At the session's end, every request still waiting gets an empty answer, and
        so does any sent after it."""
        assert p.stdout is not None
        while True:
            line = p.stdout.readline().decode(errors="replace")
            with self.io:
                if not line.startswith("{"):
                    self.ended = True
                    for slot in self.waiting:
                        slot.append(line)
                    self.waiting.clear()
                    self.io.notify_all()
                    return
                if self.waiting:  # an answer no request waits for cannot be: it is dropped
                    self.waiting.popleft().append(line)
                self.io.notify_all()

    def wait(self, slot: list[str]) -> str:
        """The slot's answer line, waited for (call with io held): a signal while waiting raises Interrupted
        here, and the reader still hands the answer to this slot, so the answers of later requests stay
        theirs. A line that is no JSON object means the session ended."""
        while not slot:
            with signals_deferred():
                self.io.wait(SIGNAL_LATENCY)
        return slot[0]
