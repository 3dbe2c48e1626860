"""Work started now whose result is taken later: the one way qrmfs overlaps a step with what follows it (a
source's mount table read during the storage server's handshake, an agent request answered while rsync runs).

A `Pending` has a name (what it is, for a reader and for `repr`) and is joined with `.result()`: that waits for
the work, gives its value, or raises what the work raised, there and every time it is asked again. A Pending
that nobody joins is abandoned, not waited for: a run that fails before it asks does not wait (a thread is a
daemon, and a command it started dies with qrmfs, PR_SET_PDEATHSIG following the thread that forked it; an
agent's answer is read and dropped by its session's reader)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")
U = TypeVar("U")


class Pending(Generic[T]):
    def __init__(self, name: str, join: Callable[[], T]) -> None:
        """join: waits for the work and gives its result, or raises what it raised; asked again, the same."""
        self.name = name
        self._join = join

    @classmethod
    def start(cls, name: str, fn: Callable[[], T]) -> Pending[T]:
        """fn, started now in a thread of its own."""
        box: list[tuple[bool, Any]] = []

        def work() -> None:
            try:
                box.append((True, fn()))
            except BaseException as e:  # handed to whoever joins
                box.append((False, e))

        t = threading.Thread(target=work, name=f"qrmfs: {name}", daemon=True)
        t.start()

        def join() -> T:
            t.join()
            ok, value = box[0]
            if not ok:
                raise value
            return cast("T", value)

        return cls(name, join)

    @classmethod
    def done(cls, name: str, value: T) -> Pending[T]:
        """A result known already (nothing to wait for in this run)."""
        return cls(name, lambda: value)

    def then(self, name: str, fn: Callable[[T], U]) -> Pending[U]:
        """fn of this result, computed when the new one is joined (in the joining thread)."""
        return Pending(name, lambda: fn(self.result()))

    def result(self) -> T:
        """Wait for the work: its value, or what it raised (raised here, in the joining thread)."""
        return self._join()

    def __repr__(self) -> str:
        return f"Pending({self.name!r})"
