"""drivers/vhost/vhost.c (worker half): vhost_poll on the kick eventfd, the work list and the
vhost kthread.

Covered: vhost_poll_init, vhost_poll_wakeup, vhost_poll_start, vhost_work_queue,
vhost_worker.  The kick eventfd's wake-up runs ``vhost_poll_wakeup`` synchronously in the
signaller (the vCPU's ``ioeventfd_write``); it only queues work, the worker task does it.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vkick.kernel.eventfd import EventfdCtx, eventfd_poll
from vkick.kernel.sched import (
    TASK_INTERRUPTIBLE,
    TASK_RUNNING,
    TaskStruct,
    schedule,
    set_current_state,
    wake_up_process,
)
from vkick.kernel.wait import EPOLLIN, WaitQueueEntry, WaitQueueHead, add_wait_queue
from vkick.runtime.tasks import Runtime


@dataclass(slots=True, eq=False)
class VhostWork:
    """drivers/vhost/vhost.h: struct vhost_work (``queued`` is VHOST_WORK_QUEUED)."""

    fn: Callable[[VhostWork], Any]
    queued: bool = False
    owner: Any = None


@dataclass(slots=True, eq=False)
class VhostDev:
    """drivers/vhost/vhost.h: struct vhost_dev (one worker, a work list)."""

    rt: Runtime
    name: str
    worker: TaskStruct | None = None
    work_list: deque[VhostWork] = field(default_factory=deque)


@dataclass(slots=True, eq=False)
class VhostPoll:
    """drivers/vhost/vhost.h: struct vhost_poll — a wait entry on the kick eventfd."""

    dev: VhostDev
    work: VhostWork
    wait: WaitQueueEntry
    mask: int = EPOLLIN
    wqh: WaitQueueHead | None = None


def vhost_poll_wakeup(wait: WaitQueueEntry, mode: int, sync: int, key: int) -> int:
    """drivers/vhost/vhost.c: vhost_poll_wakeup  [atomic: the eventfd's wqh.lock held]

    Queue the poll's work if the wake key matches; always 0: never an exclusive consumer.
    """
    poll: VhostPoll = wait.private
    if key & poll.mask:
        vhost_work_queue(poll.dev, poll.work)
    return 0


def vhost_poll_init(dev: VhostDev, fn: Callable[[VhostWork], Any], owner: Any) -> VhostPoll:
    """drivers/vhost/vhost.c: vhost_poll_init."""
    wait = WaitQueueEntry(vhost_poll_wakeup)
    poll = VhostPoll(dev, VhostWork(fn, owner=owner), wait)
    wait.private = poll
    return poll


def vhost_poll_start(poll: VhostPoll, ctx: EventfdCtx) -> None:
    """drivers/vhost/vhost.c: vhost_poll_start — add the entry (plain add_wait_queue, after
    any priority entries), then poll: an already signalled eventfd queues the work now."""

    def queue_proc(wqh: WaitQueueHead) -> None:
        poll.wqh = wqh
        add_wait_queue(wqh, poll.wait)

    mask = eventfd_poll(ctx, queue_proc)
    if mask & poll.mask:
        vhost_work_queue(poll.dev, poll.work)


def vhost_work_queue(dev: VhostDev, work: VhostWork) -> None:
    """drivers/vhost/vhost.c: vhost_work_queue — test-and-set QUEUED (requests coalesce),
    push, wake the worker."""
    if dev.worker is None or work.queued:
        return
    work.queued = True
    dev.work_list.append(work)
    wake_up_process(dev.worker)


async def vhost_worker(dev: VhostDev) -> None:
    """drivers/vhost/vhost.c: vhost_worker  [process: the vhost kthread]

    State first, then take the whole list (a push after the check wakes us: no lost kick);
    QUEUED is cleared before each function runs, so a kick during it queues it again.
    """
    task = dev.worker
    assert task is not None
    while True:
        set_current_state(task, TASK_INTERRUPTIBLE)
        if not dev.work_list:
            await schedule(task, f"vhost_worker({dev.name}): no work")
            continue
        task.state = TASK_RUNNING
        batch = list(dev.work_list)
        dev.work_list.clear()
        for work in batch:
            work.queued = False
            result = work.fn(work)
            if inspect.isawaitable(result):
                await result


def vhost_dev_start(dev: VhostDev) -> None:
    """Create and start the device's worker task (vhost_dev_set_owner)."""
    dev.worker = TaskStruct(dev.rt, f"vhost-{dev.name}")
    dev.rt.spawn(dev.worker.comm, vhost_worker, dev)
