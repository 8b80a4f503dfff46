"""fs/eventfd.c: the eventfd counter, its wait queue, and the kernel's signal/read/poll.

An eventfd is a 64-bit counter guarded by the lock of its wait queue (``ctx.wqh``).  The
kernel-side "write", ``eventfd_signal``, adds to the counter and runs the wait-queue
callbacks (``irqfd_wakeup``, ``vhost_poll_wakeup``) synchronously in the signaller (spec §5).

Covered: ``do_eventfd`` (as ``eventfd_ctx_create``), ``eventfd_signal`` (with the v5.13
per-CPU recursion guard), ``eventfd_signal_count``, ``eventfd_ctx_do_read`` (with the v5.13
semaphore underflow), ``eventfd_read`` / ``eventfd_write`` (a synchronous NOWAIT form and an
async blocking form for a task), ``eventfd_poll`` (and an async form with the ``W-EFD-poll``
window), ``eventfd_ctx_remove_wait_queue``, ``eventfd_release``, ``eventfd_ctx_fileget`` /
``eventfd_ctx_fdget`` / ``eventfd_ctx_put``.  Each context has its file
(``ctx.file``, vkick/kernel/file.py): the VMM's fd holds one reference, kernel users that
look the fd up take more, and the last ``fput`` runs ``eventfd_release`` (EPOLLHUP).
Left out: fd numbers, ``show_fdinfo``, signals (-ERESTARTSYS).

A semaphore read at count 0 (the v5.13 underflow, bug #14) emits
``vkick_eventfd_underflow``: the oracle's "the count never wraps below 0".
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable
from typing import Final
from weakref import WeakKeyDictionary

from vkick.kernel.file import File, fdget, fdput
from vkick.kernel.sched import TASK_INTERRUPTIBLE, TASK_NORMAL, TASK_RUNNING, TaskStruct
from vkick.kernel.sched import schedule as _schedule
from vkick.kernel.sched import set_current_state as _set_current_state
from vkick.kernel.wait import (
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    WaitQueueEntry,
    WaitQueueHead,
    __add_wait_queue,
    __remove_wait_queue,
    __wake_up_common,
    default_wake_function,
    wake_up_locked_poll,
    wake_up_poll,
)
from vkick.runtime.tasks import Runtime

# include/linux/eventfd.h, include/uapi/asm-generic/fcntl.h (x86 values)
EFD_SEMAPHORE: Final = 1 << 0
EFD_NONBLOCK: Final = 0o4000  # O_NONBLOCK
EFD_CLOEXEC: Final = 0o2000000  # O_CLOEXEC
EFD_SHARED_FCNTL_FLAGS: Final = EFD_CLOEXEC | EFD_NONBLOCK
EFD_FLAGS_SET: Final = EFD_SHARED_FCNTL_FLAGS | EFD_SEMAPHORE

ULLONG_MAX: Final = (1 << 64) - 1
UINT_MAX: Final = (1 << 32) - 1

PollQueueProc = Callable[[WaitQueueHead], None]
"""A ``poll_table``'s queueing procedure, called with the wait queue to join (``poll_wait``);
irqfd's adds a priority entry, vhost's a plain one."""

# The v5.13 per-CPU ``eventfd_wake_count``.  eventfd_signal never awaits, so "this CPU is
# inside eventfd_signal" is the same as "this synchronous call chain is": one counter.
_eventfd_wake_count = 0

_ids: WeakKeyDictionary[Runtime, itertools.count[int]] = WeakKeyDictionary()


class EventfdCtx:
    """fs/eventfd.c: struct eventfd_ctx

    ``count`` is the counter (0 ≤ count ≤ ULLONG_MAX), written only "under ``wqh.lock``"
    (synchronously).  ``flags`` are the creation flags (``EFD_SEMAPHORE``, and
    ``EFD_NONBLOCK`` standing for the file's ``O_NONBLOCK``).  ``name`` labels events.
    ``file`` is the eventfd's ``struct file`` (``anon_inode_getfile``), its
    ``private_data`` this context, its release ``eventfd_release``.
    ``fix_semaphore_underflow`` applies the v6.6 fix 758b49204781 (bug #14); off = v5.13.
    It is a property of the host kernel's fs/eventfd.c; the builders set it from the
    ``fix-efd-semaphore-underflow`` toggle of the VM they create the eventfd for.
    """

    __slots__ = ("bus", "count", "file", "fix_semaphore_underflow", "flags", "irqs", "kref",
                 "name", "released", "rt", "wqh")

    def __init__(self, rt: Runtime, name: str, count: int = 0, flags: int = 0, *,
                 fix_semaphore_underflow: bool = False) -> None:
        self.rt = rt
        self.bus = rt.bus
        self.name = name
        self.kref = 1  # the file's reference
        self.wqh = WaitQueueHead(name)
        self.count = count
        self.flags = flags
        self.released = False  # eventfd_release ran (the file is closed)
        self.file = File(name, self, eventfd_release)  # the VMM's fd holds the reference
        self.fix_semaphore_underflow = fix_semaphore_underflow
        # vkick bookkeeping: correlation ids of the signals counted but not yet consumed by
        # a reader (irqfd_wakeup, irqfd assignment take them over).
        self.irqs: list[int] = []

    def f_op_poll(self, queue_proc: PollQueueProc | None) -> int:
        """The file's poll operation (``eventfd_fops.poll``): :func:`eventfd_poll`."""
        return eventfd_poll(self, queue_proc)

    def __repr__(self) -> str:
        return (f"<eventfd_ctx {self.name} count={self.count} flags={self.flags:#o} "
                f"kref={self.kref} waiters={len(list(self.wqh))}>")


def eventfd_ctx_create(rt: Runtime, initval: int = 0, flags: int = 0, name: str = "", *,
                       fix_semaphore_underflow: bool = False) -> EventfdCtx | int:
    """fs/eventfd.c: do_eventfd  [process]

    The ``eventfd2(initval, flags)`` syscall without the file: flags outside
    ``EFD_FLAGS_SET`` give -EINVAL, otherwise a context with ``count = initval``.  Spec §5.1.
    Differs from the kernel: returns the context instead of a file descriptor.
    """
    if not 0 <= initval <= UINT_MAX:
        raise ValueError(f"initval: expected an unsigned 32-bit value, got {initval}")
    if flags & ~EFD_FLAGS_SET:
        return -errno.EINVAL
    if not name:
        counter = _ids.get(rt)
        if counter is None:
            counter = _ids[rt] = itertools.count()
        name = f"efd{next(counter)}"
    return EventfdCtx(rt, name, initval, flags, fix_semaphore_underflow=fix_semaphore_underflow)


def eventfd_ctx_fileget(ctx: EventfdCtx) -> EventfdCtx:
    """fs/eventfd.c: eventfd_ctx_fileget

    Take a context reference (irqfd and vhost hold one).  Spec §5.8.
    """
    ctx.kref += 1
    return ctx


def eventfd_ctx_fdget(ctx: EventfdCtx) -> EventfdCtx | int:
    """fs/eventfd.c: eventfd_ctx_fdget  [process]

    Look the fd up (``fdget``), take a context reference, drop the file again: the
    context, or -EBADF if the fd is closed.  Spec §5.8.
    Differs from the kernel: the context stands for its fd.
    """
    f = fdget(ctx.file)
    if f is None:
        return -errno.EBADF
    eventfd_ctx_fileget(ctx)
    fdput(f)
    return ctx


def eventfd_ctx_put(ctx: EventfdCtx) -> None:
    """fs/eventfd.c: eventfd_ctx_put

    Drop a context reference; the context is freed when the last one goes.  Spec §5.8.
    """
    if ctx.kref <= 0:
        raise RuntimeError(f"{ctx!r}: eventfd_ctx_put without a reference (double put)")
    ctx.kref -= 1


def eventfd_signal_count() -> int:
    """fs/eventfd.c: eventfd_signal_count

    Non-zero while this CPU is inside ``eventfd_signal`` (its callbacks must not signal).
    """
    return _eventfd_wake_count


def eventfd_signal(ctx: EventfdCtx, n: int) -> int:
    """fs/eventfd.c: eventfd_signal  [atomic: takes wqh.lock, IRQs off]

    Add ``n`` to the counter, saturating at ULLONG_MAX, and run the wait-queue callbacks
    with EPOLLIN right here (even when ``n`` was capped to 0).  Returns the amount added.  A
    nested call from inside one of those callbacks is dropped and returns 0 (the v5.13
    per-CPU recursion guard).  Spec §5.2, §16.10.
    Differs from the kernel: the WARN_ON_ONCE becomes a ``vkick_warn`` event on every drop.
    """
    global _eventfd_wake_count
    if _eventfd_wake_count:
        bus = ctx.bus
        if bus.on:
            bus.emit("vkick_warn", what=f"eventfd_signal({ctx.name}) nested in a wake-up: dropped")
        return 0
    if n < 0:
        raise ValueError(f"eventfd_signal: n is a u64, got {n}")
    _eventfd_wake_count = 1
    try:
        count = ctx.count
        if ULLONG_MAX - count < n:  # noqa: PLR1730  (the kernel's cap, kept as written)
            n = ULLONG_MAX - count
        count += n
        ctx.count = count
        irq = ctx.rt.cur_irq
        if irq:
            ctx.irqs.append(irq)
        bus = ctx.bus
        if bus.on:
            bus.emit("eventfd_signal", efd=ctx.name, n=n, count=count, irq=ctx.rt.cur_irq)
        # NOTE: waitqueue_active + wake_up_locked_poll inlined for speed (bench/bench_eventfd.py).
        wqh = ctx.wqh
        head = wqh.head
        if head.next is not head:
            __wake_up_common(wqh, TASK_NORMAL, 1, 0, EPOLLIN, None)
    finally:
        _eventfd_wake_count = 0
    return n


def eventfd_ctx_do_read(ctx: EventfdCtx) -> int:
    """fs/eventfd.c: eventfd_ctx_do_read  [atomic: wqh.lock held]

    Take 1 (semaphore) or the whole count from the counter and return it; no check, no
    wake-up.  Spec §5.3.  A semaphore read at count 0 wraps the counter to ULLONG_MAX: the
    v5.13 behaviour (bug #14; irqfd_shutdown's eventfd_ctx_remove_wait_queue does it after
    the irqfd drained the count), unless ``ctx.fix_semaphore_underflow`` (758b49204781,
    v6.6: read 1 only if the count is non-zero).
    Differs from the kernel: returns ``cnt`` instead of storing it through a pointer; the
    underflow emits ``vkick_eventfd_underflow`` (the eventfd model's assertion, checked by
    the oracle).
    """
    if ctx.flags & EFD_SEMAPHORE:
        if ctx.count == 0:
            if ctx.fix_semaphore_underflow:
                return 0
            bus = ctx.bus
            if bus.on:
                bus.emit("vkick_eventfd_underflow", efd=ctx.name, cnt=1,
                         count=ULLONG_MAX)
        cnt = 1
    else:
        cnt = ctx.count
    ctx.count = (ctx.count - cnt) & ULLONG_MAX
    return cnt


def eventfd_ctx_remove_wait_queue(ctx: EventfdCtx, wait: WaitQueueEntry) -> int:
    """fs/eventfd.c: eventfd_ctx_remove_wait_queue  [atomic: takes wqh.lock, IRQs off]

    Atomically w.r.t. signals: drain the counter and unlink ``wait``; if something was read
    and others still wait, wake them with EPOLLOUT.  0 if the count was non-zero, else
    -EAGAIN.  Spec §5.7.
    Differs from the kernel: the drained ``cnt`` is not returned (no caller uses it).
    """
    cnt = eventfd_ctx_do_read(ctx)
    __remove_wait_queue(ctx.wqh, wait)
    if cnt != 0:
        head = ctx.wqh.head
        if head.next is not head:
            wake_up_locked_poll(ctx.wqh, EPOLLOUT)
    return 0 if cnt != 0 else -errno.EAGAIN


def eventfd_read(ctx: EventfdCtx, size: int = 8) -> int:
    """fs/eventfd.c: eventfd_read  [process; the non-blocking path]

    ``read(2)`` that cannot sleep (O_NONBLOCK or IOCB_NOWAIT): -EINVAL for a buffer under 8
    bytes, -EAGAIN when the count is 0, otherwise ``eventfd_ctx_do_read`` and an EPOLLOUT
    wake of the queue.  Spec §5.4.
    Differs from the kernel: returns the value read (always > 0) instead of 8.
    """
    if size < 8:
        return -errno.EINVAL
    if ctx.count == 0:
        return -errno.EAGAIN
    return _read_locked(ctx)


def _read_locked(ctx: EventfdCtx) -> int:
    ucnt = eventfd_ctx_do_read(ctx)
    head = ctx.wqh.head
    if head.next is not head:
        wake_up_locked_poll(ctx.wqh, EPOLLOUT)
    return ucnt


async def eventfd_read_blocking(ctx: EventfdCtx, task: TaskStruct, size: int = 8) -> int:
    """fs/eventfd.c: eventfd_read  [process; may sleep]

    ``read(2)`` by ``task``: as ``eventfd_read``, but with the file blocking
    (no ``EFD_NONBLOCK``) a zero count puts the task on the queue until a write or signal.
    The state is set before each test of the count, so a signal between the test and the
    sleep is not lost (spec §5.4, §16.3).
    Differs from the kernel: returns the value read instead of 8; no signals.
    """
    if size < 8:
        return -errno.EINVAL
    if ctx.count == 0:
        if ctx.flags & EFD_NONBLOCK:
            return -errno.EAGAIN
        await _wait_locked(ctx, task, lambda: ctx.count != 0, "eventfd_read")
    return _read_locked(ctx)


async def _wait_locked(ctx: EventfdCtx, task: TaskStruct, ready: Callable[[], bool],
                       why: str) -> None:
    """The wait loop shared by read(2) and write(2): an on-stack, non-exclusive entry."""
    wait = WaitQueueEntry(default_wake_function, task)
    __add_wait_queue(ctx.wqh, wait)
    try:
        while True:
            _set_current_state(task, TASK_INTERRUPTIBLE)
            if ready():
                break
            await _schedule(task, f"{why}({ctx.name})")
    finally:
        __remove_wait_queue(ctx.wqh, wait)
        _set_current_state(task, TASK_RUNNING)


def eventfd_write(ctx: EventfdCtx, ucnt: int, size: int = 8) -> int:
    """fs/eventfd.c: eventfd_write  [process; the non-blocking path]

    ``write(2)`` that cannot sleep: -EINVAL for a buffer under 8 bytes or
    ``ucnt == ULLONG_MAX``; -EAGAIN unless ``ULLONG_MAX - count > ucnt``; otherwise add and
    wake the queue with EPOLLIN (callbacks run here).  Returns 8.  Spec §5.5.
    """
    if not 0 <= ucnt <= ULLONG_MAX:
        raise ValueError(f"eventfd_write: ucnt is a u64, got {ucnt}")
    if size < 8 or ucnt == ULLONG_MAX:
        return -errno.EINVAL
    if not ULLONG_MAX - ctx.count > ucnt:
        return -errno.EAGAIN
    return _write_locked(ctx, ucnt)


def _write_locked(ctx: EventfdCtx, ucnt: int) -> int:
    ctx.count += ucnt
    head = ctx.wqh.head
    if head.next is not head:
        wake_up_locked_poll(ctx.wqh, EPOLLIN)
    return 8


async def eventfd_write_blocking(ctx: EventfdCtx, task: TaskStruct, ucnt: int,
                                 size: int = 8) -> int:
    """fs/eventfd.c: eventfd_write  [process; may sleep]

    ``write(2)`` by ``task``: as ``eventfd_write``, but on a blocking file a write that
    would reach ULLONG_MAX sleeps until a read makes room.  Spec §5.5.
    Differs from the kernel: no signals.
    """
    if not 0 <= ucnt <= ULLONG_MAX:
        raise ValueError(f"eventfd_write: ucnt is a u64, got {ucnt}")
    if size < 8 or ucnt == ULLONG_MAX:
        return -errno.EINVAL
    if not ULLONG_MAX - ctx.count > ucnt:
        if ctx.flags & EFD_NONBLOCK:
            return -errno.EAGAIN
        await _wait_locked(ctx, task, lambda: ULLONG_MAX - ctx.count > ucnt, "eventfd_write")
    return _write_locked(ctx, ucnt)


def _poll_mask(count: int) -> int:
    events = 0
    if count > 0:
        events |= EPOLLIN
    if count == ULLONG_MAX:
        events |= EPOLLERR
    if count < ULLONG_MAX - 1:
        events |= EPOLLOUT
    return events


def eventfd_poll(ctx: EventfdCtx, queue_proc: PollQueueProc | None) -> int:
    """fs/eventfd.c: eventfd_poll  [process]

    ``poll_wait`` first (``queue_proc`` adds the caller's entry under ``wqh.lock``), then
    read the count: a concurrent signal is seen either by this read or by the new entry's
    callback, never by neither.  Returns EPOLLIN if count > 0, EPOLLERR at ULLONG_MAX,
    EPOLLOUT below ULLONG_MAX - 1.  Spec §5.6, §16.6.
    """
    if queue_proc is not None:
        queue_proc(ctx.wqh)
    return _poll_mask(ctx.count)


async def eventfd_poll_async(ctx: EventfdCtx, queue_proc: PollQueueProc | None, *,
                             count_first: bool = False) -> int:
    """fs/eventfd.c: eventfd_poll  [process; with the W-EFD-poll window]

    ``eventfd_poll`` with a preemption point between adding the entry and reading the
    count.  ``count_first`` is the §16.6 bug toggle: read the count *before* the entry is
    added, so a signal landing in the window is seen by neither (lost at irqfd assign).
    """
    if count_first:
        count = ctx.count
        # Bug toggle §16.6: count read ↔ entry added; a signal here finds no entry and
        # the count read above is already stale.
        await ctx.rt.preempt("W-EFD-poll")
        if queue_proc is not None:
            queue_proc(ctx.wqh)
        return _poll_mask(count)
    if queue_proc is not None:
        queue_proc(ctx.wqh)
    # Entry added ↔ count read (a lock-free READ_ONCE after the add).  A signal here sees
    # the entry and runs its callback; this read may then also see the new count (a
    # harmless double report).  Pairs with eventfd_signal's count store + waitqueue_active
    # under wqh.lock.  Spec §5.6, §16.6.
    await ctx.rt.preempt("W-EFD-poll")
    return _poll_mask(ctx.count)


def eventfd_release(ctx: EventfdCtx) -> None:
    """fs/eventfd.c: eventfd_release  [process]

    The last file reference is gone (``fput``, vkick/kernel/file.py): wake every entry with
    EPOLLHUP (irqfd queues its shutdown), then drop the file's context reference.  Spec
    §5.8.
    """
    if ctx.released:
        raise RuntimeError(f"{ctx!r}: eventfd_release called twice (the file closes once)")
    ctx.released = True
    bus = ctx.bus
    if bus.on:
        bus.emit("eventfd_release", efd=ctx.name)
    wake_up_poll(ctx.wqh, EPOLLHUP)
    eventfd_ctx_put(ctx)
