"""Delayed works (kernel/workqueue.c queue_delayed_work_on and friends): PENDING is taken
when the timer is armed, the work runs once after the delay, cancel stops the timer."""

from __future__ import annotations

from vkick.kernel.workqueue import (
    DelayedWork,
    WorkStruct,
    cancel_delayed_work_sync,
    schedule_delayed_work,
    work_pending,
)
from vkick.runtime.tasks import Runtime


def test_queue_delayed_work_on_runs_once_after_the_delay_and_merges(rt: Runtime) -> None:
    """Two requests while armed give one run, no earlier than the delay."""
    ran: list[int] = []

    def fn(work: WorkStruct) -> None:
        ran.append(rt.now_ns())

    dwork = DelayedWork(rt, fn, "d")

    async def go() -> None:
        assert schedule_delayed_work(dwork, 5_000)
        assert not schedule_delayed_work(dwork, 1)  # already pending: merged
        assert work_pending(dwork.work)
        await rt.wait_quiescent()

    rt.call(go)
    assert len(ran) == 1 and ran[0] >= 5_000
    assert not work_pending(dwork.work)


def test_queue_delayed_work_on_zero_delay_queues_at_once(rt: Runtime) -> None:
    """Delay 0 queues the work immediately (no timer)."""
    ran: list[int] = []
    dwork = DelayedWork(rt, lambda w: ran.append(rt.now_ns()), "d0")

    async def go() -> None:
        schedule_delayed_work(dwork, 0)
        assert dwork.timer is None
        await rt.wait_quiescent()

    rt.call(go)
    assert ran == [0]


def test_cancel_delayed_work_sync_stops_an_armed_timer(rt: Runtime) -> None:
    """Cancelled before it fires: the work never runs and PENDING is released."""
    ran: list[int] = []
    dwork = DelayedWork(rt, lambda w: ran.append(1), "dc")

    async def go() -> bool:
        schedule_delayed_work(dwork, 5_000)
        was = await cancel_delayed_work_sync(dwork)
        await rt.wait_quiescent()
        return was

    assert rt.call(go) is True
    assert ran == [] and not work_pending(dwork.work)
