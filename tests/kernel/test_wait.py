"""Wait queues (vkick/kernel/wait.py): insertion positions, the wake-up walk, sleeping (§6)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vkick.kernel.sched import TASK_INTERRUPTIBLE, TASK_NORMAL, TASK_RUNNING, TaskStruct
from vkick.kernel.wait import (
    EPOLLHUP,
    EPOLLIN,
    WAITQUEUE_WALK_BREAK_CNT,
    WQ_FLAG_EXCLUSIVE,
    WQ_FLAG_PRIORITY,
    WaitQueueEntry,
    WaitQueueHead,
    __wake_up_common,
    add_wait_queue,
    add_wait_queue_exclusive,
    add_wait_queue_priority,
    add_wait_queue_priority_exclusive,
    autoremove_wake_function,
    default_wake_function,
    finish_wait,
    prepare_to_wait,
    prepare_to_wait_exclusive,
    remove_wait_queue,
    wait_event,
    waitqueue_active,
    wake_up,
    wake_up_all,
    wake_up_locked_poll,
    wake_up_poll,
)
from vkick.runtime import PreemptPolicy, Runtime, SitePolicy


def _recorder(log: list[Any], tag: Any, ret: int = 0) -> WaitQueueEntry:
    def func(entry: WaitQueueEntry, mode: int, wake_flags: int, key: int) -> int:
        log.append((tag, key))
        return ret

    return WaitQueueEntry(func, private=tag)


ops = st.lists(st.tuples(st.sampled_from(["add", "excl", "prio", "remove"]),
                         st.integers(0, 20)), max_size=40)


@given(ops)
def test_add_wait_queue_positions_match_spec_table(steps: list[tuple[str, int]]) -> None:
    """add → head behind leading PRIORITY entries; exclusive → tail; priority → front behind
    older PRIORITY entries; remove unlinks (spec §6.2)."""
    wq = WaitQueueHead("q")
    model: list[tuple[int, int]] = []  # (tag, flags)
    entries: dict[int, WaitQueueEntry] = {}
    for n, (op, pick) in enumerate(steps):
        if op == "remove":
            if not model:
                continue
            tag = model[pick % len(model)][0]
            remove_wait_queue(wq, entries[tag])
            model = [m for m in model if m[0] != tag]
            continue
        entry = entries[n] = WaitQueueEntry(private=n)
        lead = 0
        while lead < len(model) and model[lead][1] & WQ_FLAG_PRIORITY:
            lead += 1
        if op == "add":
            add_wait_queue(wq, entry)
            model.insert(lead, (n, 0))
        elif op == "excl":
            add_wait_queue_exclusive(wq, entry)
            model.append((n, WQ_FLAG_EXCLUSIVE))
        else:
            add_wait_queue_priority(wq, entry)
            model.insert(lead, (n, WQ_FLAG_EXCLUSIVE | WQ_FLAG_PRIORITY))
    assert [(e.private, e.flags) for e in wq] == model
    assert waitqueue_active(wq) == bool(model)
    # The backward links agree with the forward ones.
    back = []
    curr = wq.head.prev
    while curr is not wq.head:
        back.append(curr.private)
        curr = curr.prev
    assert back == [m[0] for m in reversed(model)]


def test_add_wait_queue_twice_is_rejected() -> None:
    """Adding a queued entry again is emulator misuse and raises (it corrupts a kernel list)."""
    wq = WaitQueueHead()
    entry = WaitQueueEntry(private=1)
    add_wait_queue(wq, entry)
    with pytest.raises(RuntimeError, match="already on a wait queue"):
        add_wait_queue_exclusive(wq, entry)


walk = st.lists(st.tuples(st.booleans(), st.sampled_from([-1, 0, 1, 2])), max_size=12)


@given(walk, st.integers(0, 4))
def test___wake_up_common_follows_nr_exclusive_rules(spec: list[tuple[bool, int]],
                                                     nr_exclusive: int) -> None:
    """Entries are called in order; a negative return stops; an accepting EXCLUSIVE entry
    uses one of nr_exclusive and the walk stops at 0; the remainder is returned (§6.4)."""
    wq = WaitQueueHead()
    log: list[Any] = []
    for i, (excl, ret) in enumerate(spec):
        entry = _recorder(log, i, ret)
        entry.flags = WQ_FLAG_EXCLUSIVE if excl else 0
        # Build the list in order at the tail (flags kept).
        entry.prev = entry.next = entry
        wq_tail = wq.head.prev
        entry.prev, entry.next = wq_tail, wq.head
        wq_tail.next = entry
        wq.head.prev = entry
    expected_calls = []
    nr = nr_exclusive
    for i, (excl, ret) in enumerate(spec):
        expected_calls.append(i)
        if ret < 0:
            break
        if ret and excl:
            nr -= 1
            if nr == 0:
                break
    got = __wake_up_common(wq, TASK_NORMAL, nr_exclusive, 0, EPOLLIN)
    assert [tag for tag, _ in log] == expected_calls
    assert got == nr
    assert all(key == EPOLLIN for _, key in log)


def test___wake_up_common_on_empty_queue_returns_nr_exclusive() -> None:
    """An empty queue returns nr_exclusive untouched (§6.4 step 1)."""
    assert __wake_up_common(WaitQueueHead(), TASK_NORMAL, 3, 0, EPOLLIN) == 3


def _irqfd_like(log: list[Any], tag: Any) -> WaitQueueEntry:
    """Like irqfd_wakeup: 1 for EPOLLIN (accept), 0 for EPOLLHUP."""
    def func(entry: WaitQueueEntry, mode: int, wake_flags: int, key: int) -> int:
        log.append((tag, key))
        return 1 if key & EPOLLIN else 0

    return WaitQueueEntry(func)


def test_wake_up_locked_poll_priority_exclusive_entry_stops_walk() -> None:
    """An EPOLLIN wake stops at the accepting PRIORITY|EXCLUSIVE entry: later waiters (a
    second irqfd, a VMM poller) are not called (§6.4 consequence; bug #13)."""
    wq = WaitQueueHead()
    log: list[Any] = []
    add_wait_queue(wq, _recorder(log, "vmm", 1))
    add_wait_queue_priority(wq, _irqfd_like(log, "irqfd1"))
    add_wait_queue_priority(wq, _irqfd_like(log, "irqfd2"))
    wake_up_locked_poll(wq, EPOLLIN)
    assert log == [("irqfd1", EPOLLIN)]


def test_add_wait_queue_priority_nonexclusive_fix_lets_walk_continue() -> None:
    """With the v6.17 fix (no EXCLUSIVE on priority entries) every irqfd is notified."""
    wq = WaitQueueHead()
    log: list[Any] = []
    add_wait_queue_priority(wq, _irqfd_like(log, "irqfd1"), exclusive=False)
    add_wait_queue_priority(wq, _irqfd_like(log, "irqfd2"), exclusive=False)
    wake_up_locked_poll(wq, EPOLLIN)
    assert [t for t, _ in log] == ["irqfd1", "irqfd2"]


def test_add_wait_queue_priority_exclusive_refuses_a_second_priority_waiter() -> None:
    """v6.17 (bug #13's fix): the first priority waiter goes to the front, exclusive; a
    second one gets -EBUSY and is not queued; ordinary waiters do not count."""
    wq = WaitQueueHead()
    log: list[Any] = []
    vhost = _irqfd_like(log, "vhost")
    add_wait_queue(wq, vhost)
    first = _irqfd_like(log, "irqfd1")
    assert add_wait_queue_priority_exclusive(wq, first) == 0
    assert first.flags == WQ_FLAG_EXCLUSIVE | WQ_FLAG_PRIORITY
    second = _irqfd_like(log, "irqfd2")
    assert add_wait_queue_priority_exclusive(wq, second) == -errno.EBUSY
    assert not second.queued()
    assert list(wq) == [first, vhost]
    wake_up_locked_poll(wq, EPOLLIN)
    assert [t for t, _ in log] == ["irqfd1"]  # KVM and only KVM is notified
    remove_wait_queue(wq, first)
    assert add_wait_queue_priority_exclusive(wq, second) == 0


def test_wake_up_poll_epollhup_calls_everyone() -> None:
    """EPOLLHUP: irqfd-like entries return 0, so every entry sees the HUP (§5.8, §6.4)."""
    wq = WaitQueueHead()
    log: list[Any] = []
    add_wait_queue_priority(wq, _irqfd_like(log, "irqfd1"))
    add_wait_queue_priority(wq, _irqfd_like(log, "irqfd2"))
    add_wait_queue(wq, _irqfd_like(log, "vhost"))
    wake_up_poll(wq, EPOLLHUP)
    assert log == [("irqfd1", EPOLLHUP), ("irqfd2", EPOLLHUP), ("vhost", EPOLLHUP)]


@pytest.mark.parametrize("n", [1, WAITQUEUE_WALK_BREAK_CNT, WAITQUEUE_WALK_BREAK_CNT + 1,
                               3 * WAITQUEUE_WALK_BREAK_CNT + 5])
def test_wake_up_poll_bookmark_slices_call_each_entry_once(n: int) -> None:
    """__wake_up's bookmarked slices of 64 still call every entry once, in order, and leave
    no bookmark behind (§6.4 step 2)."""
    wq = WaitQueueHead()
    log: list[Any] = []
    for i in range(n):
        add_wait_queue_exclusive(wq, _recorder(log, i, 0))
    wake_up_poll(wq, EPOLLHUP)
    assert [t for t, _ in log] == list(range(n))
    assert [e.private for e in wq] == list(range(n))


def test___wake_up_common_entry_removing_itself_is_safe() -> None:
    """The next entry is fetched before the call: an entry unlinking itself does not end
    the walk (§6.4 step 2)."""
    wq = WaitQueueHead()
    log: list[Any] = []

    def self_remove(entry: WaitQueueEntry, mode: int, wake_flags: int, key: int) -> int:
        log.append(entry.private)
        remove_wait_queue(wq, entry)
        return 0

    for i in range(3):
        add_wait_queue_exclusive(wq, WaitQueueEntry(self_remove, private=i))
    wake_up_all(wq)
    assert log == [0, 1, 2]
    assert not waitqueue_active(wq)


def test___wake_up_common_entry_removing_the_next_skips_it() -> None:
    """A callback that unlinks the *next* entry: that entry is not called, the walk goes on
    to the one after it (vkick's defined behaviour; the kernel leaves it undefined)."""
    wq = WaitQueueHead()
    log: list[Any] = []
    entries: list[WaitQueueEntry] = []

    def remove_next(entry: WaitQueueEntry, mode: int, wake_flags: int, key: int) -> int:
        log.append(entry.private)
        if entry.private == 0:
            remove_wait_queue(wq, entries[1])
            remove_wait_queue(wq, entries[2])
        return 0

    for i in range(4):
        entries.append(WaitQueueEntry(remove_next, private=i))
        add_wait_queue_exclusive(wq, entries[-1])
    wake_up_all(wq)
    assert log == [0, 3]
    assert [e.private for e in wq] == [0, 3]


def test___wake_up_common_entry_added_at_tail_during_walk() -> None:
    """As with the kernel's safe list walk, an entry appended during the walk is visited
    unless the caller was the last entry (its next, the head, was fetched already)."""
    wq = WaitQueueHead()
    log: list[Any] = []
    late = _recorder(log, "late")

    def adder(entry: WaitQueueEntry, mode: int, wake_flags: int, key: int) -> int:
        log.append((entry.private, key))
        if entry.private == "first":
            add_wait_queue_exclusive(wq, late)
        return 0

    add_wait_queue_exclusive(wq, WaitQueueEntry(adder, private="first"))
    add_wait_queue_exclusive(wq, WaitQueueEntry(adder, private="second"))
    wake_up_all(wq)
    assert [t for t, _ in log] == ["first", "second", "late"]

    wq2 = WaitQueueHead()
    log.clear()
    late2 = _recorder(log, "late")

    def adder2(entry: WaitQueueEntry, mode: int, wake_flags: int, key: int) -> int:
        log.append((entry.private, key))
        add_wait_queue_exclusive(wq2, late2)
        return 0

    add_wait_queue_exclusive(wq2, WaitQueueEntry(adder2, private="only"))
    wake_up_all(wq2)
    assert [t for t, _ in log] == ["only"]


def test_default_wake_function_wakes_only_sleeping_tasks() -> None:
    """default_wake_function returns 1 and sets RUNNING for a sleeping task, 0 otherwise."""
    rt = Runtime()
    try:
        task = TaskStruct(rt, "t")
        entry = WaitQueueEntry(default_wake_function, task)
        assert default_wake_function(entry, TASK_NORMAL, 0, 0) == 0
        task.state = TASK_INTERRUPTIBLE
        assert default_wake_function(entry, TASK_NORMAL, 0, 0) == 1
        assert task.state == TASK_RUNNING
    finally:
        rt.close()


def test_autoremove_wake_function_unlinks_only_on_success() -> None:
    """autoremove unlinks the entry when it woke the task, not when the task was running."""
    rt = Runtime()
    try:
        task = TaskStruct(rt, "t")
        wq = WaitQueueHead()
        entry = WaitQueueEntry(autoremove_wake_function, task)
        add_wait_queue(wq, entry)
        wake_up(wq)
        assert entry.queued()
        prepare_to_wait(wq, entry, TASK_INTERRUPTIBLE)
        wake_up(wq)
        assert not entry.queued()
        assert task.state == TASK_RUNNING
    finally:
        rt.close()


def test_prepare_to_wait_positions_and_finish_wait() -> None:
    """prepare_to_wait queues at the head (once), _exclusive at the tail; finish_wait
    unlinks and sets RUNNING (§6.2)."""
    rt = Runtime()
    try:
        wq = WaitQueueHead()
        a, b = TaskStruct(rt, "a"), TaskStruct(rt, "b")
        add_wait_queue(wq, WaitQueueEntry(private="x"))
        ea = WaitQueueEntry(autoremove_wake_function, a)
        eb = WaitQueueEntry(autoremove_wake_function, b)
        prepare_to_wait(wq, ea, TASK_INTERRUPTIBLE)
        prepare_to_wait(wq, ea, TASK_INTERRUPTIBLE)
        prepare_to_wait_exclusive(wq, eb, TASK_INTERRUPTIBLE)
        assert [e.private for e in wq] == [a, "x", b]
        assert eb.flags & WQ_FLAG_EXCLUSIVE
        assert a.state == TASK_INTERRUPTIBLE
        finish_wait(wq, ea)
        assert a.state == TASK_RUNNING
        assert [e.private for e in wq] == ["x", b]
    finally:
        rt.close()


def test_wait_event_wake_between_check_and_sleep_is_not_lost() -> None:
    """A waker that sets the condition and wakes the queue right after the sleeper's
    failing check (before schedule) still wakes it (§16.3)."""
    rt = Runtime()
    wq = WaitQueueHead("q")
    flag = [False]
    checks = [0]

    def cond() -> bool:
        checks[0] += 1
        result = flag[0]
        if checks[0] == 2:  # the check inside the loop, after prepare_to_wait
            flag[0] = True
            wake_up(wq)
        return result

    async def main() -> int:
        await wait_event(wq, TaskStruct(rt, "sleeper"), cond)
        return checks[0]

    assert rt.run(main) == 3
    assert not waitqueue_active(wq)


@pytest.mark.parametrize("seed", range(12))
def test_wait_event_never_loses_a_wake_under_random_preemption(seed: int) -> None:
    """With preemption between check and sleep, a concurrent waker is never lost: the run
    ends instead of deadlocking (§16.3)."""
    rt = Runtime(seed=seed, policy=PreemptPolicy.random(
        p=0.5, max_turns=3, sites={"W-BLK-sleep": SitePolicy(p=0.9, max_turns=4)}))
    wq = WaitQueueHead("q")
    state = {"n": 0}

    async def waker() -> None:
        for _ in range(5):
            await rt.preempt("W-PI-send")
            state["n"] += 1
            wake_up(wq)

    async def main() -> int:
        task = TaskStruct(rt, "sleeper")
        rt.spawn("waker", waker)
        await wait_event(wq, task, lambda: state["n"] >= 5, window="W-BLK-sleep")
        return state["n"]

    assert rt.run(main) == 5
