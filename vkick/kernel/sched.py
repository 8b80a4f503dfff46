"""kernel/sched/core.c (the part every sleeper needs): task state, schedule(), wake_up_process().

The one sleeping primitive of vkick.  A kernel thread sleeps by setting its state to
TASK_INTERRUPTIBLE, re-checking its condition, and calling ``schedule()``; a waker publishes
the condition and calls ``wake_up_process()``, which sets the state back to TASK_RUNNING.
``schedule()`` sleeps only while the state is not RUNNING, so a wake-up that lands between
the check and the sleep (spec §16.3 W-BLK-sleep) is never lost.  kvm_vcpu_block, the
workqueue worker and the vhost worker all sleep through this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Final

from vkick.runtime.sched import DONE
from vkick.runtime.tasks import Runtime

TASK_RUNNING: Final = 0x0000
TASK_INTERRUPTIBLE: Final = 0x0001
TASK_UNINTERRUPTIBLE: Final = 0x0002
TASK_NORMAL: Final = TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE


class TaskStruct:
    """include/linux/sched.h: struct task_struct (state and the sleep handle only)."""

    __slots__ = ("_fut", "_loop", "comm", "cpu", "rt", "state", "why")

    def __init__(self, rt: Runtime, comm: str, cpu: int = -1) -> None:
        self.rt = rt
        self.comm = comm  # task name; also the supervised asyncio task's name
        self.cpu = cpu  # the CPU it last ran on (smp_processor_id while running)
        self.state = TASK_RUNNING
        self.why = ""  # what it sleeps on, for deadlock reports
        self._fut: asyncio.Future[None] | None = None
        self._loop = rt.loop
        rt.kthreads.append(self)

    @property
    def sleeping(self) -> bool:
        fut = self._fut
        return fut is not None and not fut.done()

    def __repr__(self) -> str:
        state = "RUNNING" if self.state == TASK_RUNNING else f"sleeping({self.state:#x})"
        return f"<task {self.comm} {state}>"


def set_current_state(task: TaskStruct, state: int) -> None:
    """include/linux/sched.h: set_current_state — a store plus full barrier (smp_mb)."""
    task.state = state


def schedule(task: TaskStruct, why: str = "schedule()") -> Awaitable[None]:
    """kernel/sched/core.c: schedule  [process]

    Sleep until ``wake_up_process`` unless the state is already TASK_RUNNING (a wake-up that
    came after the caller's condition check).  ``why`` names the wait for deadlock reports.
    Returns the awaitable to sleep on (callers write ``await schedule(task)``).
    NOTE: a plain ``def`` returning the future, not a coroutine: one coroutine frame less
    per sleep (bench/bench_runtime.py); the waker does the bookkeeping.
    """
    if task.state == TASK_RUNNING:
        return DONE
    fut: asyncio.Future[None] = task._loop.create_future()
    task._fut = fut
    task.why = why
    return fut


def wake_up_process(task: TaskStruct) -> bool:
    """kernel/sched/core.c: wake_up_process → try_to_wake_up(p, TASK_NORMAL, 0)

    Returns True iff the task was not running (it was sleeping, or about to sleep).
    """
    if task.state == TASK_RUNNING:
        return False
    task.state = TASK_RUNNING
    fut = task._fut
    if fut is not None:
        task._fut = None
        if not fut.done():
            fut.set_result(None)
    return True
