"""kernel/locking/mutex.c: the sleeping lock (``struct mutex``), without optimistic spinning.

The owner word of the kernel packs the owning task and three flag bits; here they are two
fields.  ``mutex_lock`` takes the lock with one compare-and-swap when it is free and nobody
waits; otherwise the caller joins the FIFO ``wait_list`` and sleeps through ``schedule()``
until ``mutex_unlock`` wakes the first waiter.  A woken first waiter that finds the lock
stolen sets MUTEX_FLAG_HANDOFF, and the next unlock hands the lock straight to it (owner set
to the waiter with MUTEX_FLAG_PICKUP), so a waiter cannot starve.  Callers pass ``current``
(the calling thread's TaskStruct) explicitly, as everywhere in vkick.kernel.

Differs from the kernel: no optimistic spinning on a running owner (``mutex_optimistic_spin``,
the osq): a contended locker goes straight to the wait list; no lockdep, no ww_mutex.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Final

from vkick.kernel.sched import (
    TASK_RUNNING,
    TASK_UNINTERRUPTIBLE,
    TaskStruct,
    schedule,
    set_current_state,
    wake_up_process,
)
from vkick.runtime.sched import DONE

MUTEX_FLAG_WAITERS: Final = 0x01  # non-empty waiter list: unlock must issue a wakeup
MUTEX_FLAG_HANDOFF: Final = 0x02  # unlock must hand the lock to the top waiter
MUTEX_FLAG_PICKUP: Final = 0x04  # handoff done, waiting for the top waiter to pick it up
MUTEX_FLAGS: Final = 0x07


@dataclass(slots=True, eq=False)
class MutexWaiter:
    """kernel/locking/mutex.h: struct mutex_waiter."""

    task: TaskStruct


@dataclass(slots=True, eq=False)
class Mutex:
    """include/linux/mutex.h: struct mutex (the owner word split into ``owner`` and
    ``flags``; ``wait_list`` in FIFO order, guarded by ``wait_lock`` in the kernel)."""

    name: str = "mutex"
    owner: TaskStruct | None = None
    flags: int = 0  # MUTEX_FLAG_*
    wait_list: list[MutexWaiter] = field(default_factory=list)


def mutex_is_locked(lock: Mutex) -> bool:
    """kernel/locking/mutex.c: mutex_is_locked."""
    return lock.owner is not None


def __mutex_trylock_or_owner(lock: Mutex, current: TaskStruct) -> TaskStruct | None:
    """kernel/locking/mutex.c: __mutex_trylock_or_owner  [atomic: cmpxchg]

    Take a free lock (clearing a stale HANDOFF, keeping WAITERS), or pick up a lock that
    was handed off to ``current``.  Returns None on success, else the owner.
    """
    owner = lock.owner
    flags = lock.flags
    if owner is not None:
        if owner is not current or not flags & MUTEX_FLAG_PICKUP:
            return owner
        flags &= ~MUTEX_FLAG_PICKUP
    lock.owner = current
    lock.flags = flags & ~MUTEX_FLAG_HANDOFF
    return None


def __mutex_trylock(lock: Mutex, current: TaskStruct) -> bool:
    """kernel/locking/mutex.c: __mutex_trylock — works on any unlocked state."""
    return __mutex_trylock_or_owner(lock, current) is None


def mutex_trylock(lock: Mutex, current: TaskStruct) -> bool:
    """kernel/locking/mutex.c: mutex_trylock — True if the lock was taken (never sleeps)."""
    return __mutex_trylock(lock, current)


def __mutex_add_waiter(lock: Mutex, waiter: MutexWaiter) -> None:
    """kernel/locking/mutex.c: __mutex_add_waiter — append (FIFO); the first sets WAITERS."""
    lock.wait_list.append(waiter)
    if lock.wait_list[0] is waiter:
        lock.flags |= MUTEX_FLAG_WAITERS


def __mutex_remove_waiter(lock: Mutex, waiter: MutexWaiter) -> None:
    """kernel/locking/mutex.c: __mutex_remove_waiter — the last one out clears the flags."""
    lock.wait_list.remove(waiter)
    if not lock.wait_list:
        lock.flags &= ~MUTEX_FLAGS


def mutex_lock(lock: Mutex, current: TaskStruct) -> Awaitable[None]:
    """kernel/locking/mutex.c: mutex_lock  [process]

    Fast path: one cmpxchg of the owner word from "free, no flags" to ``current``; else the
    sleeping slow path.  Returns the awaitable to wait on (``await mutex_lock(lock, task)``).
    NOTE: a plain ``def``: the uncontended lock costs no coroutine frame (as schedule()).
    """
    if lock.owner is None and not lock.flags:  # __mutex_trylock_fast
        lock.owner = current
        return DONE
    return __mutex_lock_slowpath(lock, current)


async def __mutex_lock_slowpath(lock: Mutex, current: TaskStruct) -> None:
    """kernel/locking/mutex.c: __mutex_lock_slowpath → __mutex_lock_common(TASK_UNINTERRUPTIBLE)

    Try once more, then queue at the tail, and loop: trylock (picks up a handoff), sleep,
    and once first in line ask for a handoff, re-arm the state, trylock again.  The state is
    set before each trylock, so an unlock between the trylock and schedule() makes the task
    RUNNING and schedule() returns at once (no lost wake-up).
    """
    if __mutex_trylock(lock, current):
        return
    # spin_lock(&lock->wait_lock)
    if __mutex_trylock(lock, current):
        return
    waiter = MutexWaiter(current)
    __mutex_add_waiter(lock, waiter)
    set_current_state(current, TASK_UNINTERRUPTIBLE)
    first = False
    while True:
        if __mutex_trylock(lock, current):
            break
        # spin_unlock(&lock->wait_lock); schedule_preempt_disabled()
        await schedule(current, f"mutex_lock({lock.name})")
        if not first:
            first = lock.wait_list[0] is waiter
            if first:
                lock.flags |= MUTEX_FLAG_HANDOFF
        set_current_state(current, TASK_UNINTERRUPTIBLE)
        if __mutex_trylock(lock, current):
            break
        # spin_lock(&lock->wait_lock)
    current.state = TASK_RUNNING
    __mutex_remove_waiter(lock, waiter)


def __mutex_handoff(lock: Mutex, task: TaskStruct | None) -> None:
    """kernel/locking/mutex.c: __mutex_handoff — give the lock to ``task`` (PICKUP set,
    HANDOFF cleared, WAITERS kept); with None, a plain release."""
    lock.owner = task
    lock.flags = (lock.flags & MUTEX_FLAG_WAITERS) | (MUTEX_FLAG_PICKUP if task else 0)


def mutex_unlock(lock: Mutex, current: TaskStruct) -> None:
    """kernel/locking/mutex.c: mutex_unlock  [process; never sleeps]

    Fast path: cmpxchg the owner word from ``current`` (no flags) to free; with flags set,
    the slow path releases (or hands off) and wakes the first waiter.
    """
    if lock.owner is current and not lock.flags:  # __mutex_unlock_fast
        lock.owner = None
        return
    __mutex_unlock_slowpath(lock, current)


def __mutex_unlock_slowpath(lock: Mutex, current: TaskStruct) -> None:
    """kernel/locking/mutex.c: __mutex_unlock_slowpath

    Release first so that other contenders can go on at once, unless HANDOFF asks for the
    lock to pass to the top waiter; then wake the top waiter (wake_q, after wait_lock).
    """
    if lock.owner is not current:
        raise RuntimeError(f"mutex_unlock({lock.name}) by {current.comm}, owner "
                           f"{lock.owner.comm if lock.owner else None}")
    flags = lock.flags
    if not flags & MUTEX_FLAG_HANDOFF:
        lock.owner = None
        if not flags & MUTEX_FLAG_WAITERS:
            return
    # spin_lock(&lock->wait_lock)
    nxt = lock.wait_list[0].task if lock.wait_list else None
    if flags & MUTEX_FLAG_HANDOFF:
        __mutex_handoff(lock, nxt)
    # spin_unlock(&lock->wait_lock); wake_up_q(&wake_q)
    if nxt is not None:
        wake_up_process(nxt)
