import threading

import pytest

from qrmfs.pending import Pending


def test_started_work_runs_beside_the_caller_and_hands_over_its_result_or_its_error() -> None:
    started, release = threading.Event(), threading.Event()

    def slow() -> int:
        started.set()
        assert release.wait(10)
        return 42

    result = Pending.start("slow", slow)
    assert started.wait(10)  # it runs before anyone asks for the result
    release.set()
    assert result.result() == 42 and result.result() == 42  # asked twice: the same answer

    def fails() -> int:
        raise ValueError("unreachable source")

    failing = Pending.start("fails", fails)
    for _ in range(2):  # raised at the join, every time it is asked
        with pytest.raises(ValueError, match="unreachable source"):
            failing.result()


def test_then_computes_in_the_joining_thread_from_the_result_and_passes_its_error_on() -> None:
    threads: list[str] = []
    p = Pending.done("source", 2).then("plan", lambda x: (threads.append(threading.current_thread().name), x * 3)[1])
    assert threads == [] and p.result() == 6 and threads == [threading.current_thread().name]
    failed = Pending.start("mounts", lambda: 1 // 0).then("plan", lambda x: x)
    with pytest.raises(ZeroDivisionError):
        failed.result()
    assert repr(failed) == "Pending('plan')"
