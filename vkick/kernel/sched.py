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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from vkick.runtime.sched import DONE
from vkick.runtime.tasks import Runtime

TASK_RUNNING: Final = 0x0000
TASK_INTERRUPTIBLE: Final = 0x0001
TASK_UNINTERRUPTIBLE: Final = 0x0002
TASK_NORMAL: Final = TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE


class TaskStruct:
    """include/linux/sched.h: struct task_struct (state and the sleep handle only)."""

    __slots__ = ("_fut", "_loop", "comm", "cpu", "cpus_allowed", "preempt_notifiers", "rt",
                 "state", "why")

    def __init__(self, rt: Runtime, comm: str, cpu: int = -1) -> None:
        self.rt = rt
        self.comm = comm  # task name; also the supervised asyncio task's name
        self.cpu = cpu  # the CPU it last ran on (smp_processor_id while running)
        self.cpus_allowed = cpu  # the one CPU it may run on (-1: not a modelled CPU)
        self.preempt_notifiers: list[PreemptNotifier] = []
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


# ---------------------------------------------------------------------------- preempt notifiers


@dataclass(slots=True, eq=False)
class PreemptOps:
    """include/linux/preempt.h: struct preempt_ops — called when the task is switched in on
    ``cpu`` (``sched_in``) and out (``sched_out``, with the next task, None here).

    Differs from the kernel: ``sched_in`` is awaited (vmx_vcpu_pi_load, reached from KVM's,
    has the ``W-PI-cas`` window of a cmpxchg loop in it).
    """

    sched_in: Callable[[PreemptNotifier, int], Awaitable[None]]
    sched_out: Callable[[PreemptNotifier, TaskStruct | None], None]


@dataclass(slots=True, eq=False)
class PreemptNotifier:
    """include/linux/preempt.h: struct preempt_notifier (``owner``: container_of)."""

    ops: PreemptOps
    owner: Any = None


def preempt_notifier_register(task: TaskStruct, notifier: PreemptNotifier) -> None:
    """kernel/sched/core.c: preempt_notifier_register  [process]

    On ``current`` (``task``); the newest notifier is first (hlist_add_head).
    """
    if notifier not in task.preempt_notifiers:
        task.preempt_notifiers.insert(0, notifier)


def preempt_notifier_unregister(task: TaskStruct, notifier: PreemptNotifier) -> None:
    """kernel/sched/core.c: preempt_notifier_unregister  [process]"""
    if notifier in task.preempt_notifiers:
        task.preempt_notifiers.remove(notifier)


async def fire_sched_in_preempt_notifiers(task: TaskStruct, cpu: int) -> None:
    """kernel/sched/core.c: fire_sched_in_preempt_notifiers  [finish_task_switch]

    Every registered notifier's ``sched_in`` (newest first), on the CPU the task now runs
    on (preemption disabled, IRQs enabled).
    """
    for notifier in list(task.preempt_notifiers):
        await notifier.ops.sched_in(notifier, cpu)


def fire_sched_out_preempt_notifiers(task: TaskStruct, nxt: TaskStruct | None) -> None:
    """kernel/sched/core.c: fire_sched_out_preempt_notifiers  [prepare_task_switch, IRQs off]

    Every registered notifier's ``sched_out`` (newest first), before the switch.
    """
    for notifier in list(task.preempt_notifiers):
        notifier.ops.sched_out(notifier, nxt)
