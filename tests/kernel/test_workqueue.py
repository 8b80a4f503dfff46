"""kernel/workqueue.c model (vkick/kernel/workqueue.py): PENDING, non-reentrancy, flush (§7)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vkick.kernel.workqueue import (
    WorkStruct,
    alloc_workqueue,
    cancel_work_sync,
    destroy_workqueue,
    flush_work,
    flush_workqueue,
    queue_work,
    schedule_work,
    system_wq,
    work_pending,
)
from vkick.runtime import PreemptPolicy, Runtime, SitePolicy
from vkick.testing import capture_events


@settings(deadline=None, max_examples=30)
@given(st.integers(1, 20), st.integers(1, 4))
def test_queue_work_while_pending_merges_into_one_run(n: int, workers: int) -> None:
    """N queue_work calls while PENDING is set give one run; all but the first return False
    (§7.1, §16.5)."""
    rt = Runtime()
    runs: list[int] = []

    async def main() -> list[bool]:
        wq = alloc_workqueue(rt, "t", nr_workers=workers)
        work = WorkStruct(rt, lambda w: runs.append(rt.now_ns()))
        results = [queue_work(wq, work) for _ in range(n)]
        assert work_pending(work)
        await rt.wait_quiescent()
        assert not work_pending(work)
        return results

    assert rt.run(main) == [True] + [False] * (n - 1)
    assert len(runs) == 1


def _requeue_during_run(clear_pending_after_run: bool, requeues: int) -> tuple[int, list[bool]]:
    rt = Runtime()
    runs: list[int] = []
    results: list[bool] = []

    async def fn(work: WorkStruct) -> None:
        runs.append(rt.now_ns())
        if len(runs) == 1:
            await rt.sleep_ns(10)
            # New state published during the run: the producer queues the work again.
            results.extend(queue_work(work.wq, work) for _ in range(requeues))  # type: ignore[arg-type]
            await rt.sleep_ns(10)

    async def main() -> None:
        wq = alloc_workqueue(rt, "t", clear_pending_after_run=clear_pending_after_run)
        work = WorkStruct(rt, fn)
        queue_work(wq, work)
        await rt.wait_quiescent()

    rt.run(main)
    return len(runs), results


@pytest.mark.parametrize("requeues", [1, 3])
def test_process_one_work_queue_during_run_runs_exactly_once_more(requeues: int) -> None:
    """PENDING is cleared before the function runs: queue_work during the run re-queues
    (first call True, the rest merged), giving exactly one more run (§7.2)."""
    count, results = _requeue_during_run(False, requeues)
    assert count == 2
    assert results == [True] + [False] * (requeues - 1)


def test_process_one_work_clear_pending_after_run_toggle_loses_a_run() -> None:
    """Bug toggle §16.5: with PENDING cleared after the function, the queue_work during the
    run is merged into the finished run and never runs."""
    count, results = _requeue_during_run(True, 1)
    assert results == [False]
    assert count == 1


def test_process_one_work_is_not_reentrant() -> None:
    """A work re-queued while running is not run concurrently by another idle kworker; it
    runs after the current execution, on the same worker (§7.1 step 3, §7.2 step 1)."""
    rt = Runtime()
    active = [0]
    max_active = [0]
    runs = [0]

    async def fn(work: WorkStruct) -> None:
        active[0] += 1
        max_active[0] = max(max_active[0], active[0])
        runs[0] += 1
        if runs[0] == 1:
            queue_work(wq, work)
        await rt.sleep_ns(50)
        active[0] -= 1

    wq = alloc_workqueue(rt, "t", nr_workers=3)

    async def main() -> None:
        queue_work(wq, WorkStruct(rt, fn))
        await rt.wait_quiescent()

    with capture_events(rt.bus, "workqueue_execute_start", "workqueue_execute_end") as ev:
        rt.run(main)
    assert runs[0] == 2
    assert max_active[0] == 1
    assert [e["ev"].rsplit("_", 1)[1] for e in ev] == ["start", "end", "start", "end"]
    assert [e["t"] for e in ev] == [0, 50, 50, 100]


def test_workers_run_different_works_concurrently() -> None:
    """Two different works on a 2-worker queue overlap in time (they are not serialised)."""
    rt = Runtime()
    spans: list[tuple[int, int]] = []

    async def fn(work: WorkStruct) -> None:
        start = rt.now_ns()
        await rt.sleep_ns(100)
        spans.append((start, rt.now_ns()))

    async def main() -> None:
        wq = alloc_workqueue(rt, "t", nr_workers=2)
        queue_work(wq, WorkStruct(rt, fn, "a"))
        queue_work(wq, WorkStruct(rt, fn, "b"))
        await rt.wait_quiescent()

    rt.run(main)
    assert spans == [(0, 100), (0, 100)]


def test_flush_work_waits_for_queued_and_running_executions() -> None:
    """flush_work returns True after the queued execution ends, after a running one ends
    when not queued, and False at once for an idle work (§7.3)."""
    rt = Runtime()
    ends: list[int] = []

    async def fn(work: WorkStruct) -> None:
        await rt.sleep_ns(100)
        ends.append(rt.now_ns())

    async def main() -> list[Any]:
        wq = alloc_workqueue(rt, "t")
        work = WorkStruct(rt, fn)
        out: list[Any] = []
        queue_work(wq, work)  # queued, not yet running
        out.append((await flush_work(work), rt.now_ns(), list(ends)))
        queue_work(wq, work)
        await rt.sleep_ns(30)  # now running
        out.append((await flush_work(work), rt.now_ns(), list(ends)))
        out.append((await flush_work(work), rt.now_ns()))
        return out

    assert rt.run(main) == [(True, 100, [100]), (True, 200, [100, 200]), (False, 200)]


def test_flush_work_running_and_requeued_waits_for_the_rerun() -> None:
    """Running and queued again: flush waits for the queued (second) execution (§7.3)."""
    rt = Runtime()
    ends: list[int] = []

    async def fn(work: WorkStruct) -> None:
        await rt.sleep_ns(100)
        ends.append(rt.now_ns())

    async def main() -> int:
        wq = alloc_workqueue(rt, "t")
        work = WorkStruct(rt, fn)
        queue_work(wq, work)
        await rt.sleep_ns(10)
        queue_work(wq, work)
        await flush_work(work)
        return rt.now_ns()

    assert rt.run(main) == 200
    assert ends == [100, 200]


def test_flush_workqueue_waits_for_everything_queued_before() -> None:
    """flush_workqueue returns once every work queued or running at the call has ended."""
    rt = Runtime()
    ends: dict[str, int] = {}

    def make(delay: int) -> Any:
        async def fn(work: WorkStruct) -> None:
            await rt.sleep_ns(delay)
            ends[work.name] = rt.now_ns()
        return fn

    async def main() -> int:
        wq = alloc_workqueue(rt, "t", nr_workers=1)
        for name, delay in (("a", 10), ("b", 20), ("c", 30)):
            queue_work(wq, WorkStruct(rt, make(delay), name))
        await rt.sleep_ns(5)
        await flush_workqueue(wq)
        return rt.now_ns()

    assert rt.run(main) == 60
    assert ends == {"a": 10, "b": 30, "c": 60}


def test_cancel_work_sync_dequeues_pending_work() -> None:
    """A queued work is taken off the list (never runs); True because it was pending."""
    rt = Runtime()
    runs: list[int] = []

    async def main() -> bool:
        wq = alloc_workqueue(rt, "t")
        work = WorkStruct(rt, lambda w: runs.append(1))
        queue_work(wq, work)
        was = await cancel_work_sync(work)
        await rt.wait_quiescent()
        assert not work_pending(work)
        assert queue_work(wq, work)
        await rt.wait_quiescent()
        return was

    assert rt.run(main) is True
    assert runs == [1]


def test_cancel_work_sync_waits_for_running_execution() -> None:
    """Running, not queued: cancel waits for the end of the run and returns False."""
    rt = Runtime()

    async def fn(work: WorkStruct) -> None:
        await rt.sleep_ns(100)

    async def main() -> tuple[bool, int]:
        wq = alloc_workqueue(rt, "t")
        work = WorkStruct(rt, fn)
        queue_work(wq, work)
        await rt.sleep_ns(1)
        return await cancel_work_sync(work), rt.now_ns()

    assert rt.run(main) == (False, 100)


def test_schedule_work_uses_this_runs_system_wq() -> None:
    """schedule_work queues on the run's system workqueue ("events"), one per Runtime."""
    rt = Runtime()
    seen: list[str] = []

    async def main() -> None:
        work = WorkStruct(rt, lambda w: seen.append(w.wq.name if w.wq else "?"))
        assert schedule_work(work)
        assert system_wq(rt) is system_wq(rt)
        await rt.wait_quiescent()

    rt.run(main)
    assert seen == ["events"]


def test_destroy_workqueue_drains_and_stops_workers() -> None:
    """destroy_workqueue runs what was queued, then later requests are dropped (warned)."""
    rt = Runtime()
    runs: list[str] = []

    async def main() -> None:
        wq = alloc_workqueue(rt, "t")
        work = WorkStruct(rt, lambda w: runs.append("ran"))
        queue_work(wq, work)
        await destroy_workqueue(wq)
        with capture_events(rt.bus, "vkick_warn") as warns:
            queue_work(wq, WorkStruct(rt, lambda w: runs.append("late")))
        assert len(warns) == 1
        await rt.wait_quiescent()

    rt.run(main)
    assert runs == ["ran"]


@pytest.mark.parametrize("seed", range(8))
def test_queue_work_no_request_lost_under_random_preemption(seed: int) -> None:
    """With W-WQ-run preemption, every producer step is followed by a run that sees it: the
    last run observes the final value (no lost request, §16.5)."""
    rt = Runtime(seed=seed, policy=PreemptPolicy.random(
        p=0.3, max_turns=3, max_delay_ns=20,
        sites={"W-WQ-run": SitePolicy(p=0.8, max_turns=3, max_delay_ns=30)}))
    state = {"produced": 0, "seen": -1}

    def fn(work: WorkStruct) -> None:
        state["seen"] = state["produced"]

    async def main() -> None:
        wq = alloc_workqueue(rt, "t", nr_workers=2)
        work = WorkStruct(rt, fn)
        for _ in range(20):
            state["produced"] += 1
            queue_work(wq, work)
            await rt.preempt("W-PI-send")
        await flush_work(work)

    rt.run(main)
    assert state["seen"] == 20


def test_queue_work_emits_events() -> None:
    """queue (queued True/False), execute_start and execute_end are emitted in order."""
    rt = Runtime()

    async def main() -> None:
        wq = alloc_workqueue(rt, "wq0")
        work = WorkStruct(rt, lambda w: None, "inject")
        queue_work(wq, work)
        queue_work(wq, work)
        await rt.wait_quiescent()

    with capture_events(rt.bus) as ev:
        rt.run(main)
    assert [(e["ev"], e.get("queued")) for e in ev] == [
        ("workqueue_queue_work", True), ("workqueue_queue_work", False),
        ("workqueue_execute_start", None), ("workqueue_execute_end", None)]
    assert all(e["wq"] == "wq0" and e["work"] == "inject" for e in ev)
