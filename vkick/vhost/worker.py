"""drivers/vhost/vhost.c (worker half): vhost_poll on a file's wait queue, the work list and
the vhost kthread.

Covered: vhost_poll_init, vhost_poll_wakeup, vhost_poll_start, vhost_poll_stop,
vhost_poll_queue, vhost_work_queue, vhost_worker, and the worker's start in
vhost_dev_set_owner (:func:`vhost_dev_start`).  A poll's wake-up runs ``vhost_poll_wakeup``
synchronously in the waker (the vCPU's ``ioeventfd_write`` for a kick eventfd, the tap for
a socket); it only queues work, the worker task does it.  Files are polled through
:func:`vfs_poll`.
"""

from __future__ import annotations

import errno
import functools
import inspect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any, Final, Protocol

from vkick.kernel.eventfd import PollQueueProc
from vkick.kernel.sched import (
    TASK_INTERRUPTIBLE,
    TASK_RUNNING,
    TaskStruct,
    schedule,
    set_current_state,
    wake_up_process,
)
from vkick.kernel.wait import (
    EPOLLERR,
    EPOLLIN,
    WaitQueueEntry,
    WaitQueueHead,
    add_wait_queue,
    remove_wait_queue,
)
from vkick.runtime.tasks import Runtime

VHOST_NET_WEIGHT: Final = 0x80000  # bytes per handler round (drivers/vhost/net.c)
VHOST_NET_PKT_WEIGHT: Final = 256  # packets per handler round


class PollFile(Protocol):
    """A file with a ``poll`` file operation (``f_op->poll``): an eventfd (a kick), the tap
    socket."""

    def f_op_poll(self, queue_proc: PollQueueProc | None) -> int: ...


def vfs_poll(file: PollFile, queue_proc: PollQueueProc | None) -> int:
    """include/linux/poll.h: vfs_poll — call the file's poll: join its wait queue through
    ``queue_proc`` (poll_wait) and return the ready mask."""
    return file.f_op_poll(queue_proc)


@dataclass(slots=True, eq=False)
class VhostWork:
    """drivers/vhost/vhost.h: struct vhost_work (``queued`` is VHOST_WORK_QUEUED)."""

    fn: Callable[[VhostWork], Any]
    queued: bool = False
    owner: Any = None


@dataclass(slots=True, eq=False)
class VhostDev:
    """drivers/vhost/vhost.h: struct vhost_dev (one worker, a work list, the weights).

    ``toggles``: the owning VM's bug toggles that concern vhost (test-only ones included).
    """

    rt: Runtime
    name: str
    worker: TaskStruct | None = None
    work_list: deque[VhostWork] = field(default_factory=deque)
    weight: int = VHOST_NET_PKT_WEIGHT
    byte_weight: int = VHOST_NET_WEIGHT
    toggles: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"<vhost_dev {self.name} queued={len(self.work_list)} worker={self.worker}>"


@dataclass(slots=True, eq=False)
class VhostPoll:
    """drivers/vhost/vhost.h: struct vhost_poll — a wait entry on a polled file; ``table``
    is the poll table's queue function (vhost_poll_func bound to this poll, built once)."""

    dev: VhostDev
    work: VhostWork
    wait: WaitQueueEntry
    mask: int = EPOLLIN
    wqh: WaitQueueHead | None = None
    table: PollQueueProc = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.table = functools.partial(vhost_poll_func, self)  # init_poll_funcptr


def vhost_poll_wakeup(wait: WaitQueueEntry, mode: int, sync: int, key: int) -> int:
    """drivers/vhost/vhost.c: vhost_poll_wakeup  [atomic: the file's wqh.lock held]

    Queue the poll's work if the wake key matches; always 0: never an exclusive consumer.
    """
    poll: VhostPoll = wait.private
    if key & poll.mask:
        vhost_work_queue(poll.dev, poll.work)
    return 0


def vhost_poll_init(dev: VhostDev, fn: Callable[[VhostWork], Any], owner: Any,
                    mask: int = EPOLLIN) -> VhostPoll:
    """drivers/vhost/vhost.c: vhost_poll_init (``mask``: the wake keys that queue the
    work — EPOLLIN for every poll here: the kick polls and the RX socket poll; the TX
    socket poll, EPOLLOUT, is not modelled)."""
    wait = WaitQueueEntry(vhost_poll_wakeup)
    poll = VhostPoll(dev, VhostWork(fn, owner=owner), wait, mask)
    wait.private = poll
    return poll


def vhost_poll_func(poll: VhostPoll, wqh: WaitQueueHead) -> None:
    """drivers/vhost/vhost.c: vhost_poll_func — the poll table's queue function (what the
    file's poll_wait calls): remember the file's wait queue and join it."""
    poll.wqh = wqh
    add_wait_queue(wqh, poll.wait)


def vhost_poll_start(poll: VhostPoll, file: PollFile) -> int:
    """drivers/vhost/vhost.c: vhost_poll_start — add the entry (plain add_wait_queue, after
    any priority entries), then act on what the poll reports: a file already readable
    queues the work now.  0, or -EINVAL when the file reports an error."""
    if poll.wqh is not None:
        return 0
    mask = vfs_poll(file, poll.table)
    if mask:
        vhost_poll_wakeup(poll.wait, 0, 0, mask)
    if mask & EPOLLERR:
        vhost_poll_stop(poll)
        return -errno.EINVAL
    return 0


def vhost_poll_stop(poll: VhostPoll) -> None:
    """drivers/vhost/vhost.c: vhost_poll_stop — leave the file's wait queue."""
    if poll.wqh is not None:
        remove_wait_queue(poll.wqh, poll.wait)
        poll.wqh = None


def vhost_poll_queue(poll: VhostPoll) -> None:
    """drivers/vhost/vhost.c: vhost_poll_queue — queue the poll's work directly."""
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
    why = f"vhost_worker({dev.name}): no work"
    while True:
        set_current_state(task, TASK_INTERRUPTIBLE)
        work_list = dev.work_list
        if not work_list:
            await schedule(task, why)
            continue
        task.state = TASK_RUNNING
        if len(work_list) == 1:  # the common case: no list copy
            batch: tuple[VhostWork, ...] | list[VhostWork] = (work_list.popleft(),)
        else:
            batch = list(work_list)
            work_list.clear()
        for work in batch:
            work.queued = False
            result = work.fn(work)
            # The handlers return coroutines; anything else is asked the slow way.
            if type(result) is CoroutineType or (result is not None
                                                 and inspect.isawaitable(result)):
                await result


def vhost_dev_start(dev: VhostDev) -> None:
    """vkick: the worker's start in drivers/vhost/vhost.c: vhost_dev_set_owner
    (VHOST_SET_OWNER)  [process]

    Create and start the device's worker kthread (``vhost-<owner pid>``; here
    ``vhost-<device>``).  The rest of vhost_dev_set_owner (the -EBUSY owner check, the mm,
    cgroups, iovecs) has nothing to do here.
    """
    dev.worker = TaskStruct(dev.rt, f"vhost-{dev.name}")
    dev.rt.spawn(dev.worker.comm, vhost_worker, dev)
