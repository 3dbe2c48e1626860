import threading

import pytest

from qrmfs.pending import Pending


def test_started_work_runs_beside_the_caller_and_its_result_is_taken_at_the_join() -> None:
    go, ran = threading.Event(), []
    p = Pending.start("work", lambda: (go.wait(5), ran.append(1), 42)[2])
    assert ran == []  # it waits for us: the caller went on
    go.set()
    assert p.result() == 42 and p.result() == 42 and ran == [1]


def test_an_error_of_the_work_is_raised_at_every_join_not_before() -> None:
    def fail() -> int:
        raise ValueError("the source cannot be read")

    p = Pending.start("mounts", fail)
    for _ in range(2):
        with pytest.raises(ValueError, match="cannot be read"):
            p.result()


def test_then_computes_in_the_joining_thread_from_the_result_and_passes_its_error_on() -> None:
    threads: list[str] = []
    p = Pending.done("source", 2).then("plan", lambda x: (threads.append(threading.current_thread().name), x * 3)[1])
    assert threads == [] and p.result() == 6 and threads == [threading.current_thread().name]
    failed = Pending.start("mounts", lambda: 1 // 0).then("plan", lambda x: x)
    with pytest.raises(ZeroDivisionError):
        failed.result()
    assert repr(failed) == "Pending('plan')"
