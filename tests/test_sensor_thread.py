"""`wan-pipeline run` ticks the completion sensor in a thread of its own: polling goes on while the
main thread submits and collects (as the daemon ticks sensors beside running runs)."""

from __future__ import annotations

import threading

import pytest

from wan_pipeline.runner import SensorThread

WAIT_S = 30.0  # a bound on a hang, never a measured time


def test_ticks_go_on_while_the_main_thread_is_busy() -> None:
    cursors: list[str | None] = []
    third_tick = threading.Event()

    def tick(cursor: str | None) -> str:
        cursors.append(cursor)
        if len(cursors) == 3:
            third_tick.set()
        return f"after-{len(cursors)}"

    with SensorThread(tick, lambda max_wait_s: 0.0, max_wait_s=10.0) as sensor:
        # The main thread does nothing but wait (a collection run, say): the ticks happen anyway.
        assert third_tick.wait(WAIT_S)
        sensor.check()
    assert cursors[:3] == [None, "after-1", "after-2"]  # each tick gets the cursor of the one before


def test_a_tick_waits_until_the_next_poll_is_due_and_stopping_ends_the_wait() -> None:
    ticks: list[int] = []
    asked: list[float] = []

    def until_due(max_wait_s: float) -> float:
        asked.append(max_wait_s)
        return 3600.0  # nothing due for an hour

    sensor = SensorThread(lambda cursor: ticks.append(1), until_due, max_wait_s=7.0)
    with sensor:
        sensor.wait_for_tick(WAIT_S)
    assert ticks == [1] and asked == [7.0]  # one tick, then asleep until stopped, not an hour


def test_an_error_in_a_tick_is_raised_in_the_main_thread() -> None:
    def tick(cursor: str | None) -> str | None:
        raise RuntimeError("the ledger is unreachable")

    with pytest.raises(RuntimeError, match="the ledger is unreachable"):
        with SensorThread(tick, lambda max_wait_s: 0.0, max_wait_s=1.0) as sensor:
            sensor.wait_for_tick(WAIT_S)
            sensor.check()


def test_waking_the_thread_ticks_at_once_instead_of_at_the_next_due_time() -> None:
    ticked = [threading.Event(), threading.Event()]

    def tick(cursor: str | None) -> str:
        count = int(cursor or 0) + 1
        ticked[min(count, 2) - 1].set()
        return str(count)

    # Nothing is due for an hour after the first tick: only `wake` (a submission just ended) brings the second.
    with SensorThread(tick, lambda max_wait_s: 3600.0, max_wait_s=3600.0) as sensor:
        assert ticked[0].wait(WAIT_S) and not ticked[1].is_set()
        sensor.wake()
        assert ticked[1].wait(WAIT_S)
