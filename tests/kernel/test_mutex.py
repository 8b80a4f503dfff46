"""kernel/locking/mutex.c: fast paths, FIFO sleepers, handoff, no lost wake-up."""

from __future__ import annotations

import pytest

from vkick.kernel.mutex import (
    MUTEX_FLAG_HANDOFF,
    MUTEX_FLAG_PICKUP,
    MUTEX_FLAG_WAITERS,
    Mutex,
    mutex_is_locked,
    mutex_lock,
    mutex_trylock,
    mutex_unlock,
)
from vkick.kernel.sched import TASK_RUNNING, TaskStruct
from vkick.runtime.sched import DONE, PreemptPolicy
from vkick.runtime.tasks import Runtime


def test_mutex_lock_fast_path_takes_a_free_lock_without_sleeping(rt: Runtime) -> None:
    """An uncontended mutex_lock is one cmpxchg: it returns the completed awaitable."""
    lock = Mutex("m")
    a = TaskStruct(rt, "a")
    assert mutex_lock(lock, a) is DONE
    assert lock.owner is a and lock.flags == 0 and mutex_is_locked(lock)
    mutex_unlock(lock, a)
    assert lock.owner is None and not mutex_is_locked(lock)


def test_mutex_trylock_fails_on_a_held_lock_and_never_sleeps(rt: Runtime) -> None:
    """mutex_trylock on a lock held by another task (or by itself) returns False."""
    lock = Mutex("m")
    a, b = TaskStruct(rt, "a"), TaskStruct(rt, "b")
    assert mutex_trylock(lock, a)
    assert not mutex_trylock(lock, b)
    assert not mutex_trylock(lock, a)
    mutex_unlock(lock, a)
    assert mutex_trylock(lock, b)


def test_mutex_lock_sleepers_get_the_lock_in_fifo_order(rt: Runtime) -> None:
    """Contended lockers queue at the tail, sleep, and are granted the lock first-come
    first-served; the WAITERS flag is set while anyone waits and cleared after."""
    lock = Mutex("m")
    owner = TaskStruct(rt, "owner")
    tasks = [TaskStruct(rt, f"t{i}") for i in range(3)]
    order: list[str] = []

    async def locker(t: TaskStruct) -> None:
        await mutex_lock(lock, t)
        order.append(t.comm)
        await rt.sleep_ns(10)
        mutex_unlock(lock, t)

    async def main() -> None:
        await mutex_lock(lock, owner)
        for t in tasks:
            rt.spawn(t.comm, locker, t)
        await rt.sleep_ns(5)
        assert [w.task.comm for w in lock.wait_list] == ["t0", "t1", "t2"]
        assert lock.flags & MUTEX_FLAG_WAITERS
        assert all(t.sleeping for t in tasks)
        mutex_unlock(lock, owner)
        await rt.wait_quiescent()

    rt.call(main)
    assert order == ["t0", "t1", "t2"]
    assert lock.owner is None and lock.flags == 0 and not lock.wait_list
    assert all(t.state == TASK_RUNNING for t in tasks)


def test___mutex_unlock_slowpath_hands_off_to_a_first_waiter_that_was_robbed(
        rt: Runtime) -> None:
    """A woken first waiter that finds the lock stolen sets HANDOFF; the thief's unlock then
    passes the lock straight to it (owner = waiter, PICKUP) instead of releasing it."""
    lock = Mutex("m")
    owner, waiter, thief = (TaskStruct(rt, n) for n in ("owner", "waiter", "thief"))
    got: list[str] = []

    async def wait_for_it() -> None:
        await mutex_lock(lock, waiter)
        got.append("waiter")
        mutex_unlock(lock, waiter)

    async def main() -> None:
        await mutex_lock(lock, owner)
        rt.spawn("waiter", wait_for_it)
        await rt.sleep_ns(1)
        mutex_unlock(lock, owner)  # wakes the waiter, releases the lock
        assert mutex_trylock(lock, thief)  # steals it before the waiter runs
        await rt.sleep_ns(1)
        assert lock.flags & MUTEX_FLAG_HANDOFF and lock.owner is thief
        mutex_unlock(lock, thief)
        assert lock.owner is waiter and lock.flags & MUTEX_FLAG_PICKUP
        assert not mutex_trylock(lock, thief)  # handed off: nobody else can take it
        await rt.wait_quiescent()

    rt.call(main)
    assert got == ["waiter"] and lock.owner is None and lock.flags == 0


@pytest.mark.parametrize("seed", range(20))
def test_mutex_lock_excludes_and_never_loses_a_wakeup_under_preemption(seed: int) -> None:
    """Under random preemption, four tasks each take the lock five times: never two holders
    at once, every acquisition completes (no task is left asleep)."""
    rt = Runtime(seed=seed, policy=PreemptPolicy.random(p=0.5, max_turns=3, max_delay_ns=50))
    lock = Mutex("m")
    inside: list[str] = []
    done: list[str] = []

    async def worker(t: TaskStruct) -> None:
        for _ in range(5):
            await mutex_lock(lock, t)
            inside.append(t.comm)
            assert len(inside) == 1, inside
            await rt.preempt("W-MAP-recalc")
            inside.remove(t.comm)
            mutex_unlock(lock, t)
            await rt.preempt("W-HOST-sched")
        done.append(t.comm)

    async def main() -> None:
        for i in range(4):
            t = TaskStruct(rt, f"w{i}")
            rt.spawn(t.comm, worker, t)
        await rt.wait_quiescent()

    rt.run(main)
    assert sorted(done) == ["w0", "w1", "w2", "w3"]
