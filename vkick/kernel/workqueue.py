"""kernel/workqueue.c: work items, workqueues and their kworkers.

A work item is queued at most once at a time: ``queue_work`` test-and-sets the PENDING bit
of ``work->data`` and returns False when it was already set (the request is merged into the
pending run).  A kworker clears PENDING *before* calling the function, so a request arriving
during the run queues it again (spec §7, §16.5).  One work item never runs concurrently with
itself (non-reentrancy).

Model: each workqueue has one pool of ``nr_workers`` kworkers (emulated tasks spawned with
``rt.spawn``) and one FIFO worklist.  The kernel's per-CPU pools, concurrency management
(a second worker runs only when the first sleeps), ``max_active`` limits and rescuers are
not modelled: an idle kworker is woken whenever work is queued, and kworkers run
work functions concurrently with each other.  ``queue_work_on``'s ``cpu`` is recorded only.

Covered: ``INIT_WORK`` (``WorkStruct``), ``queue_work_on``, ``queue_work``,
``schedule_work``, ``__queue_work``, ``worker_thread``, ``process_one_work``, ``flush_work``,
``flush_workqueue``, ``cancel_work_sync``, ``work_pending``, ``alloc_workqueue``,
``destroy_workqueue``, ``system_wq``, and delayed works (``DelayedWork``,
``queue_delayed_work_on``, ``schedule_delayed_work``, ``delayed_work_timer_fn``,
``cancel_delayed_work_sync``; delays in ns, not jiffies).  Work functions may be plain or
``async def``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any, Final
from weakref import WeakKeyDictionary

from vkick.kernel.bitops import clear_bit, test_and_set_bit, test_bit
from vkick.kernel.sched import (
    TASK_INTERRUPTIBLE,
    TaskStruct,
    schedule,
    set_current_state,
    wake_up_process,
)
from vkick.runtime.tasks import Runtime

WORK_STRUCT_PENDING_BIT: Final = 0  # include/linux/workqueue.h
WORK_CPU_UNBOUND: Final = -1  # NR_CPUS in the kernel: "no CPU preference"

WorkFunc = Callable[["WorkStruct"], Awaitable[None] | None]
"""``work_func_t``: a plain function, or an ``async def`` one (awaited by the kworker)."""


class WorkStruct:
    """include/linux/workqueue.h: struct work_struct (INIT_WORK)

    ``data`` bit 0 is PENDING (set while queued and not yet started).  ``entry_list`` is the
    list the work sits on while queued (a worklist, or a kworker's ``scheduled`` list), None
    otherwise; ``current_worker`` is the kworker executing it (the pool's busy hash).
    ``rt`` lets ``schedule_work`` find this run's ``system_wq``.
    """

    __slots__ = ("current_worker", "data", "entry_list", "func", "name", "owner",
                 "pending_flushers", "rt", "wq")

    def __init__(self, rt: Runtime, func: WorkFunc, name: str = "") -> None:
        self.rt = rt
        self.owner: Any = None  # the containing struct (container_of in the kernel)
        self.func = func
        self.name = name or getattr(func, "__name__", "work")
        self.data = 0
        self.entry_list: collections.deque[WorkStruct] | None = None
        self.current_worker: Worker | None = None
        self.wq: Workqueue | None = None  # the workqueue it was last queued on
        # Flushers waiting for the end of the execution that is queued now (the kernel
        # links a barrier work right behind the work).
        self.pending_flushers: list[asyncio.Future[None]] = []

    def __repr__(self) -> str:
        state = []
        if self.data & 1:
            state.append("PENDING")
        if self.entry_list is not None:
            state.append("queued")
        if self.current_worker is not None:
            state.append(f"running on {self.current_worker.task.comm}")
        return f"<work_struct {self.name} {' '.join(state) or 'idle'}>"


class Worker:
    """kernel/workqueue_internal.h: struct worker (a kworker)

    ``scheduled`` holds works moved behind the one it is executing (non-reentrancy);
    ``current_flushers`` wait for the end of the current execution.
    """

    __slots__ = ("current_flushers", "current_work", "scheduled", "task", "wq")

    def __init__(self, wq: Workqueue, task: TaskStruct) -> None:
        self.wq = wq
        self.task = task
        self.current_work: WorkStruct | None = None
        self.scheduled: collections.deque[WorkStruct] = collections.deque()
        self.current_flushers: list[asyncio.Future[None]] = []

    def __repr__(self) -> str:
        doing = self.current_work.name if self.current_work is not None else "idle"
        return f"<worker {self.task.comm} {doing}>"


class Workqueue:
    """kernel/workqueue.c: struct workqueue_struct (with its single worker pool)

    ``clear_pending_after_run`` is the spec §16.5 bug toggle: PENDING is cleared after the
    work function returns instead of before it is called, so a ``queue_work`` during the
    run is merged into a run that already read its state and is lost.  Off = the kernel.
    """

    __slots__ = ("bus", "clear_pending_after_run", "draining", "flags", "idle", "max_active",
                 "name", "rt", "workers", "worklist")

    def __init__(self, rt: Runtime, name: str, flags: int = 0, max_active: int = 0, *,
                 nr_workers: int = 2, clear_pending_after_run: bool = False) -> None:
        if nr_workers < 1:
            raise ValueError(f"nr_workers: expected ≥ 1, got {nr_workers}")
        self.rt = rt
        self.bus = rt.bus
        self.name = name
        self.flags = flags
        self.max_active = max_active  # recorded only (see the module docstring)
        self.clear_pending_after_run = clear_pending_after_run
        self.draining = False  # __WQ_DRAINING: destroy_workqueue in progress
        self.worklist: collections.deque[WorkStruct] = collections.deque()
        self.idle: collections.deque[Worker] = collections.deque()
        self.workers: list[Worker] = []
        for i in range(nr_workers):
            comm = f"kworker/{name}:{i}"
            worker = Worker(self, TaskStruct(rt, comm))
            self.workers.append(worker)
            rt.spawn(comm, worker_thread, worker)

    def __repr__(self) -> str:
        return (f"<workqueue {self.name} queued={[w.name for w in self.worklist]} "
                f"workers={self.workers}>")


def alloc_workqueue(rt: Runtime, fmt: str, flags: int = 0, max_active: int = 0, *,
                    nr_workers: int = 2, clear_pending_after_run: bool = False) -> Workqueue:
    """kernel/workqueue.c: alloc_workqueue  [process]

    A named workqueue (e.g. ``"kvm-irqfd-cleanup"``) with its kworkers.  Spec §7.4.
    Differs from the kernel: one pool of ``nr_workers`` kworkers (module docstring).
    """
    return Workqueue(rt, fmt, flags, max_active, nr_workers=nr_workers,
                     clear_pending_after_run=clear_pending_after_run)


_system_wqs: WeakKeyDictionary[Runtime, Workqueue] = WeakKeyDictionary()


def system_wq(rt: Runtime) -> Workqueue:
    """kernel/workqueue.c: system_wq

    This run's system workqueue ("events"), created on first use.  Spec §7.4.
    """
    wq = _system_wqs.get(rt)
    if wq is None:
        wq = _system_wqs[rt] = Workqueue(rt, "events", max_active=256)
    return wq


def work_pending(work: WorkStruct) -> bool:
    """include/linux/workqueue.h: work_pending

    Whether PENDING is set.
    """
    return test_bit(WORK_STRUCT_PENDING_BIT, work.data)


def queue_work_on(cpu: int, wq: Workqueue, work: WorkStruct) -> bool:
    """kernel/workqueue.c: queue_work_on  [any context, IRQs off]

    Test-and-set PENDING; if it was already set the work is pending and will run once:
    return False (merged).  Otherwise queue it and return True.  Spec §7.1, §16.5.
    """
    pending, work.data = test_and_set_bit(WORK_STRUCT_PENDING_BIT, work.data)
    if pending:
        bus = wq.bus
        if bus.on:
            bus.emit("workqueue_queue_work", wq=wq.name, work=work.name, queued=False)
        return False
    __queue_work(cpu, wq, work)
    return True


def __queue_work(cpu: int, wq: Workqueue, work: WorkStruct) -> None:
    """kernel/workqueue.c: __queue_work  [atomic: IRQs off, PENDING owned]

    Append the work to the pool's worklist and wake an idle kworker.  Non-reentrancy is
    enforced when a kworker takes it (``process_one_work``).  Spec §7.1.
    Differs from the kernel: one pool per workqueue; ``cpu`` is ignored.
    """
    bus = wq.bus
    if wq.draining:
        # The kernel WARNs and drops the request, leaving PENDING set.
        if bus.on:
            bus.emit("vkick_warn", what=f"queue_work({work.name}) on draining workqueue {wq.name}")
        return
    work.wq = wq
    work.entry_list = wq.worklist
    wq.worklist.append(work)
    if bus.on:
        bus.emit("workqueue_queue_work", wq=wq.name, work=work.name, queued=True)
    if wq.idle:
        # wake_up_worker: the first idle worker (the idle list is LIFO, as in the kernel).
        wake_up_process(wq.idle.popleft().task)


def queue_work(wq: Workqueue, work: WorkStruct) -> bool:
    """include/linux/workqueue.h: queue_work  [any context]

    ``queue_work_on(WORK_CPU_UNBOUND, wq, work)``.  Spec §7.1.
    """
    return queue_work_on(WORK_CPU_UNBOUND, wq, work)


def schedule_work(work: WorkStruct) -> bool:
    """include/linux/workqueue.h: schedule_work  [any context]

    ``queue_work(system_wq, work)``: False if the work was already pending.  Spec §7.1.
    """
    return queue_work_on(WORK_CPU_UNBOUND, system_wq(work.rt), work)


async def worker_thread(worker: Worker) -> None:
    """kernel/workqueue.c: worker_thread  [process: kworker]

    Take works from the kworker's ``scheduled`` list, else from the pool's worklist, and
    run them; with nothing to do, go idle and sleep until ``__queue_work`` wakes it.
    Differs from the kernel: exits when its workqueue has been destroyed.
    """
    wq = worker.wq
    task = worker.task
    worklist = wq.worklist
    scheduled = worker.scheduled
    while True:
        if scheduled:
            work = scheduled.popleft()
        elif worklist:
            work = worklist.popleft()
        else:
            if wq.draining and not wq.workers:
                return
            # worker_enter_idle + schedule() under pool->lock: synchronous up to the sleep,
            # so a __queue_work cannot slip between the empty check and going idle.
            set_current_state(task, TASK_INTERRUPTIBLE)
            wq.idle.appendleft(worker)
            await schedule(task, f"worker_thread({wq.name}): idle")
            continue
        work.entry_list = None
        await process_one_work(worker, work)


async def process_one_work(worker: Worker, work: WorkStruct) -> None:
    """kernel/workqueue.c: process_one_work  [process: kworker]

    If another kworker of the pool is executing this work, move it behind that execution
    and return (non-reentrancy).  Otherwise clear PENDING, then call the function; a
    ``queue_work`` after the clear runs the work again afterwards.  Spec §7.2, §16.5.
    """
    wq = worker.wq
    collision = work.current_worker
    if collision is not None and collision is not worker and collision.wq is wq:
        collision.scheduled.append(work)
        work.entry_list = collision.scheduled
        return
    worker.current_work = work
    work.current_worker = worker
    # Flushers of the execution that was queued now wait for this one.
    if work.pending_flushers:
        worker.current_flushers, work.pending_flushers = work.pending_flushers, []
    rt = work.rt
    bus = wq.bus
    if not wq.clear_pending_after_run:
        # set_work_pool_and_clear_pending: smp_wmb, clear PENDING, smp_mb.
        work.data = clear_bit(WORK_STRUCT_PENDING_BIT, work.data)
        # PENDING cleared ↔ work function runs: a producer may publish new state and
        # queue_work() here; it sees PENDING clear and re-queues, so the work runs again
        # after this run.  Pairs with queue_work_on's test_and_set_bit.  Spec §7.2, §16.5.
        await rt.preempt("W-WQ-run")
    if bus.on:
        bus.emit("workqueue_execute_start", wq=wq.name, work=work.name)
    res = work.func(work)
    if res is not None:
        await res
    if bus.on:
        bus.emit("workqueue_execute_end", wq=wq.name, work=work.name)
    if wq.clear_pending_after_run:
        # Bug toggle §16.5: work function returned ↔ PENDING cleared.  A queue_work here
        # (or during the run) sees PENDING set and is merged into a run that has already
        # read its state: that request is lost.
        await rt.preempt("W-WQ-run")
        work.data = clear_bit(WORK_STRUCT_PENDING_BIT, work.data)
    worker.current_work = None
    work.current_worker = None
    flushers = worker.current_flushers
    if flushers:
        worker.current_flushers = []
        for fut in flushers:
            if not fut.done():
                fut.set_result(None)


async def flush_work(work: WorkStruct) -> bool:
    """kernel/workqueue.c: flush_work  [process; sleeps]

    Wait until the execution that is queued (or, if none is queued, running) when called
    has finished; True if it had to wait, False if the work was idle.  Spec §7.3.
    """
    if work.entry_list is not None:
        waiters = work.pending_flushers
    elif work.current_worker is not None:
        waiters = work.current_worker.current_flushers
    else:
        return False
    fut: asyncio.Future[None] = work.rt.loop.create_future()
    waiters.append(fut)
    await fut
    return True


async def flush_workqueue(wq: Workqueue) -> None:
    """kernel/workqueue.c: flush_workqueue  [process; sleeps]

    Wait until every work queued on ``wq`` (or running there) before the call has
    finished.  Spec §7.3.
    """
    loop = wq.rt.loop
    futs: list[asyncio.Future[None]] = []
    for worker in wq.workers:
        if worker.current_work is not None:
            fut: asyncio.Future[None] = loop.create_future()
            worker.current_flushers.append(fut)
            futs.append(fut)
        for work in worker.scheduled:
            fut = loop.create_future()
            work.pending_flushers.append(fut)
            futs.append(fut)
    for work in wq.worklist:
        fut = loop.create_future()
        work.pending_flushers.append(fut)
        futs.append(fut)
    for fut in futs:
        await fut


async def cancel_work_sync(work: WorkStruct) -> bool:
    """kernel/workqueue.c: cancel_work_sync  [process; sleeps]

    Take PENDING (dequeuing the work if it is queued), wait for a running execution to
    finish, then release PENDING.  Requests made meanwhile fail.  Returns whether the work
    was pending.
    """
    was_pending, work.data = test_and_set_bit(WORK_STRUCT_PENDING_BIT, work.data)
    lst = work.entry_list
    if lst is not None:
        lst.remove(work)
        work.entry_list = None
        # The kernel leaves the flush barrier on the list; it completes at once.
        for fut in work.pending_flushers:
            if not fut.done():
                fut.set_result(None)
        work.pending_flushers = []
    try:
        await flush_work(work)
    finally:
        work.data = clear_bit(WORK_STRUCT_PENDING_BIT, work.data)
    return was_pending


async def destroy_workqueue(wq: Workqueue) -> None:
    """kernel/workqueue.c: destroy_workqueue  [process; sleeps]

    Drain (flush until empty; only chained work may still be queued meanwhile), then stop
    the kworkers.
    Differs from the kernel: chained work is not told apart; every new request is dropped
    with a warning once draining starts, as the kernel does for outside requests.
    """
    wq.draining = True
    while wq.worklist or any(w.current_work is not None or w.scheduled for w in wq.workers):
        await flush_workqueue(wq)
    workers, wq.workers = wq.workers, []
    del workers  # the kworkers see an empty list and exit on their next wake
    while wq.idle:
        wake_up_process(wq.idle.popleft().task)



class DelayedWork:
    """include/linux/workqueue.h: struct delayed_work (INIT_DELAYED_WORK)

    A work item and the timer that queues it.  PENDING is taken when the timer is armed,
    so a second request while the timer runs or the work is queued is merged.
    """

    __slots__ = ("cpu", "timer", "work", "wq")

    def __init__(self, rt: Runtime, func: WorkFunc, name: str = "") -> None:
        self.work = WorkStruct(rt, func, name)
        self.timer: asyncio.TimerHandle | None = None
        self.wq: Workqueue | None = None
        self.cpu = WORK_CPU_UNBOUND

    def __repr__(self) -> str:
        return f"<delayed_work {self.work!r} timer={'armed' if self.timer else 'idle'}>"


def delayed_work_timer_fn(dwork: DelayedWork) -> None:
    """kernel/workqueue.c: delayed_work_timer_fn  [softirq: timer]

    The delay has passed: queue the work (PENDING is already owned).
    """
    dwork.timer = None
    wq = dwork.wq
    assert wq is not None
    __queue_work(dwork.cpu, wq, dwork.work)


def queue_delayed_work_on(cpu: int, wq: Workqueue, dwork: DelayedWork, delay_ns: int) -> bool:
    """kernel/workqueue.c: queue_delayed_work_on  [any context]

    Test-and-set PENDING (False: already pending, merged); a zero delay queues at once,
    otherwise the timer queues the work ``delay_ns`` from now.
    Differs from the kernel: the delay is in ns rather than jiffies.
    """
    work = dwork.work
    pending, work.data = test_and_set_bit(WORK_STRUCT_PENDING_BIT, work.data)
    if pending:
        return False
    dwork.wq = wq
    dwork.cpu = cpu
    if delay_ns <= 0:
        __queue_work(cpu, wq, work)
        return True
    rt = work.rt
    dwork.timer = rt.call_at_ns(rt.now_ns() + delay_ns, delayed_work_timer_fn, dwork)
    return True


def schedule_delayed_work(dwork: DelayedWork, delay_ns: int) -> bool:
    """include/linux/workqueue.h: schedule_delayed_work — on the system workqueue."""
    return queue_delayed_work_on(WORK_CPU_UNBOUND, system_wq(dwork.work.rt), dwork, delay_ns)


async def cancel_delayed_work_sync(dwork: DelayedWork) -> bool:
    """kernel/workqueue.c: cancel_delayed_work_sync  [process; sleeps]

    Stop an armed timer (releasing the PENDING it held), else cancel the work as
    ``cancel_work_sync`` does.  Returns whether it was pending.
    """
    timer = dwork.timer
    if timer is not None:
        timer.cancel()
        dwork.timer = None
        work = dwork.work
        work.data = clear_bit(WORK_STRUCT_PENDING_BIT, work.data)
        await flush_work(work)
        return True
    return await cancel_work_sync(dwork.work)
