"""kernel/sched/wait.c and include/linux/wait.h: wait queues.

A wait queue is a list of entries, each with a callback ``func`` (``irqfd_wakeup``,
``vhost_poll_wakeup``, ``default_wake_function`` for a sleeping task) and ``flags``
(exclusive, priority).  Waking walks the list *synchronously in the waker* and calls the
callbacks in order; an exclusive entry that accepts the wake-up uses up one of
``nr_exclusive`` (spec §6).

The list is the kernel's circular doubly linked list (``head.head`` is the sentinel), so
insertion positions and the walk are exactly the kernel's.  The head's spinlock is implicit:
every function here is synchronous, so "under ``wq_head->lock``" is simply "in one call".

Covered: ``add_wait_queue``, ``add_wait_queue_exclusive``, ``add_wait_queue_priority``,
``add_wait_queue_priority_exclusive`` (v6.17, for bug #13's fix), ``remove_wait_queue``
(and the ``__`` forms), ``prepare_to_wait``, ``prepare_to_wait_exclusive``,
``finish_wait``, ``waitqueue_active``, ``__wake_up_common`` (with bookmarks),
``__wake_up``, ``__wake_up_locked_key``, ``wake_up_locked_poll``, ``wake_up_poll``,
``default_wake_function``, ``autoremove_wake_function`` and the ``wait_event`` macro (as
an async function over :mod:`vkick.kernel.sched`).
Left out: ``wake_up_bit`` / ``wait_on_bit``, ``wait_event_timeout``, signals.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any, Final

from vkick.kernel.sched import (
    TASK_INTERRUPTIBLE,
    TASK_NORMAL,
    TASK_RUNNING,
    TaskStruct,
    schedule,
    set_current_state,
    wake_up_process,
)
from vkick.runtime.windows import Window

# include/uapi/linux/eventpoll.h: poll masks (a wake-up's ``key`` is the mask; 0 = NULL key).
# Plain ints, not IntFlag: callbacks test ``key & EPOLLIN`` on the hot path.
EPOLLIN: Final = 0x001
EPOLLPRI: Final = 0x002
EPOLLOUT: Final = 0x004
EPOLLERR: Final = 0x008
EPOLLHUP: Final = 0x010

# include/linux/wait.h (v5.13 numbering)
WQ_FLAG_EXCLUSIVE: Final = 0x01
WQ_FLAG_WOKEN: Final = 0x02
WQ_FLAG_BOOKMARK: Final = 0x04
WQ_FLAG_CUSTOM: Final = 0x08
WQ_FLAG_DONE: Final = 0x10
WQ_FLAG_PRIORITY: Final = 0x20

# kernel/sched/wait.c: entries visited per lock hold by __wake_up_common_lock.
WAITQUEUE_WALK_BREAK_CNT: Final = 64

WaitQueueFunc = Callable[["WaitQueueEntry", int, int, int], int]
"""``func(wq_entry, mode, wake_flags, key) -> int``: > 0 woken, 0 not, < 0 stop the walk."""


def _never_called(wq_entry: WaitQueueEntry, mode: int, wake_flags: int, key: int) -> int:
    raise AssertionError("the wait-queue sentinel (or a bookmark) was called as an entry")


class WaitQueueEntry:
    """include/linux/wait.h: struct wait_queue_entry

    ``private`` is the task for sleeping-task entries (``default_wake_function``); callback
    entries (``init_waitqueue_func_entry``) may keep their container there, which is what the
    kernel gets with ``container_of``.  ``prev``/``next`` are the list links: an entry that is
    not queued has ``prev is self``.  After removal ``next`` keeps pointing where it did, so
    a wake-up walk standing on a removed entry can still move on (see ``__wake_up_common``).
    """

    __slots__ = ("flags", "func", "next", "prev", "private")

    def __init__(self, func: WaitQueueFunc | None = None, private: Any = None,
                 flags: int = 0) -> None:
        self.flags = flags
        self.private = private
        self.func: WaitQueueFunc = func if func is not None else default_wake_function
        self.prev: WaitQueueEntry = self
        self.next: WaitQueueEntry = self

    def queued(self) -> bool:
        """``!list_empty(&wq_entry->entry)``: whether the entry is on a wait queue."""
        return self.prev is not self

    def __repr__(self) -> str:
        name = getattr(self.func, "__name__", repr(self.func))
        state = "queued" if self.prev is not self else "unqueued"
        return f"<wait_queue_entry {name} flags={self.flags:#x} {state}>"


class WaitQueueHead:
    """include/linux/wait.h: struct wait_queue_head

    ``head`` is the list sentinel.  ``lock`` is implicit (see the module docstring); ``name``
    only labels the queue in reprs.
    """

    __slots__ = ("head", "name")

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.head = WaitQueueEntry(_never_called)

    def __iter__(self) -> Iterator[WaitQueueEntry]:
        """The queued entries, first to last (for tests and reprs; not removal-safe)."""
        sentinel = self.head
        curr = sentinel.next
        while curr is not sentinel:
            yield curr
            curr = curr.next

    def __repr__(self) -> str:
        return f"<wait_queue_head {self.name or hex(id(self))} {list(self)}>"


def init_waitqueue_func_entry(wq_entry: WaitQueueEntry, func: WaitQueueFunc) -> None:
    """include/linux/wait.h: init_waitqueue_func_entry

    flags 0, no task, ``func`` as the callback (irqfd, vhost poll).  Spec §6.1.
    """
    wq_entry.flags = 0
    wq_entry.private = None
    wq_entry.func = func


def init_waitqueue_entry(wq_entry: WaitQueueEntry, task: TaskStruct) -> None:
    """include/linux/wait.h: init_waitqueue_entry

    flags 0, ``task`` as private, ``default_wake_function`` as the callback.  Spec §6.1.
    """
    wq_entry.flags = 0
    wq_entry.private = task
    wq_entry.func = default_wake_function


# ----------------------------------------------------------------------------- list ops


def _list_add(new: WaitQueueEntry, prev: WaitQueueEntry) -> None:
    """include/linux/list.h: list_add(new, prev) — insert ``new`` right after ``prev``."""
    if new.prev is not new:
        raise RuntimeError(f"{new!r} is already on a wait queue; remove it before adding it")
    nxt = prev.next
    new.prev = prev
    new.next = nxt
    nxt.prev = new
    prev.next = new


def _list_del_init(entry: WaitQueueEntry) -> None:
    """include/linux/list.h: list_del_init — unlink; ``next`` is left as it was (see class)."""
    prev = entry.prev
    nxt = entry.next
    prev.next = nxt
    nxt.prev = prev
    entry.prev = entry


def __add_wait_queue(wq_head: WaitQueueHead, wq_entry: WaitQueueEntry) -> None:
    """include/linux/wait.h: __add_wait_queue  [atomic: wq_head->lock held]

    Insert at the head of the list, but behind every leading PRIORITY entry (so a new
    priority entry also goes behind older ones).  Spec §6.2.
    """
    sentinel = wq_head.head
    pos = sentinel
    curr = sentinel.next
    while curr is not sentinel and curr.flags & WQ_FLAG_PRIORITY:
        pos = curr
        curr = curr.next
    _list_add(wq_entry, pos)


def __add_wait_queue_entry_tail(wq_head: WaitQueueHead, wq_entry: WaitQueueEntry) -> None:
    """include/linux/wait.h: __add_wait_queue_entry_tail  [atomic: wq_head->lock held]

    Append at the tail.  Spec §6.2.
    """
    _list_add(wq_entry, wq_head.head.prev)


def __remove_wait_queue(wq_head: WaitQueueHead, wq_entry: WaitQueueEntry) -> None:
    """include/linux/wait.h: __remove_wait_queue  [atomic: wq_head->lock held]

    Unlink the entry.  Differs from the kernel: removing an entry that is not queued is a
    no-op (the kernel's ``list_del`` would corrupt the list).
    """
    if wq_entry.prev is not wq_entry:
        _list_del_init(wq_entry)


def add_wait_queue(wq_head: WaitQueueHead, wq_entry: WaitQueueEntry) -> None:
    """kernel/sched/wait.c: add_wait_queue  [takes wq_head->lock]

    Clear EXCLUSIVE and insert at the head, behind leading PRIORITY entries.  Spec §6.2.
    """
    wq_entry.flags &= ~WQ_FLAG_EXCLUSIVE
    __add_wait_queue(wq_head, wq_entry)


def add_wait_queue_exclusive(wq_head: WaitQueueHead, wq_entry: WaitQueueEntry) -> None:
    """kernel/sched/wait.c: add_wait_queue_exclusive  [takes wq_head->lock]

    Set EXCLUSIVE and append at the tail.  Spec §6.2.
    """
    wq_entry.flags |= WQ_FLAG_EXCLUSIVE
    __add_wait_queue_entry_tail(wq_head, wq_entry)


def add_wait_queue_priority(wq_head: WaitQueueHead, wq_entry: WaitQueueEntry, *,
                            exclusive: bool = True) -> None:
    """kernel/sched/wait.c: add_wait_queue_priority  [takes wq_head->lock]

    Set EXCLUSIVE | PRIORITY and insert at the front, behind older PRIORITY entries: the
    irqfd's entry, which then stops every EPOLLIN walk (spec §6.2, §6.4).
    ``exclusive=False`` is the v6.17 fix 867347bb21e1 ("Drop WQ_FLAG_EXCLUSIVE from
    add_wait_queue_priority()"), for bug #13 (exclusive priority waiter starves others).
    """
    wq_entry.flags |= (WQ_FLAG_EXCLUSIVE | WQ_FLAG_PRIORITY) if exclusive else WQ_FLAG_PRIORITY
    __add_wait_queue(wq_head, wq_entry)


def add_wait_queue_priority_exclusive(wq_head: WaitQueueHead,
                                      wq_entry: WaitQueueEntry) -> int:
    """kernel/sched/wait.c: add_wait_queue_priority_exclusive  [takes wq_head->lock]

    Not in v5.13: added with bug #13's fix (v6.17, series of 2cdd64cbf990).  Set
    EXCLUSIVE | PRIORITY; under the lock, refuse with -EBUSY if the first entry already is
    a PRIORITY one, else insert at the front.  So a queue has at most one such waiter: a
    second irqfd on an eventfd (in any VM) fails to bind instead of never being called
    (spec §6.2, §6.4).
    """
    wq_entry.flags |= WQ_FLAG_EXCLUSIVE | WQ_FLAG_PRIORITY
    sentinel = wq_head.head
    first = sentinel.next
    if first is not sentinel and first.flags & WQ_FLAG_PRIORITY:
        return -errno.EBUSY
    _list_add(wq_entry, sentinel)
    return 0


def remove_wait_queue(wq_head: WaitQueueHead, wq_entry: WaitQueueEntry) -> None:
    """kernel/sched/wait.c: remove_wait_queue  [takes wq_head->lock]

    Unlink the entry.  Spec §6.2.
    """
    __remove_wait_queue(wq_head, wq_entry)


def waitqueue_active(wq_head: WaitQueueHead) -> bool:
    """include/linux/wait.h: waitqueue_active

    Lock-free "is the list non-empty".  Safe here because callers hold the lock or order
    their condition store before it (spec §6.3).
    """
    sentinel = wq_head.head
    return sentinel.next is not sentinel


def prepare_to_wait(wq_head: WaitQueueHead, wq_entry: WaitQueueEntry, state: int) -> None:
    """kernel/sched/wait.c: prepare_to_wait  [takes wq_head->lock]

    Clear EXCLUSIVE, queue the entry at the head if it is not queued, then set the task's
    state: after this a wake-up makes ``schedule()`` return at once (spec §6.2, §16.3).
    """
    wq_entry.flags &= ~WQ_FLAG_EXCLUSIVE
    if wq_entry.prev is wq_entry:
        __add_wait_queue(wq_head, wq_entry)
    set_current_state(wq_entry.private, state)


def prepare_to_wait_exclusive(wq_head: WaitQueueHead, wq_entry: WaitQueueEntry,
                              state: int) -> None:
    """kernel/sched/wait.c: prepare_to_wait_exclusive  [takes wq_head->lock]

    As ``prepare_to_wait`` but EXCLUSIVE and at the tail.  Spec §6.2.
    """
    wq_entry.flags |= WQ_FLAG_EXCLUSIVE
    if wq_entry.prev is wq_entry:
        __add_wait_queue_entry_tail(wq_head, wq_entry)
    set_current_state(wq_entry.private, state)


def finish_wait(wq_head: WaitQueueHead, wq_entry: WaitQueueEntry) -> None:
    """kernel/sched/wait.c: finish_wait  [takes wq_head->lock if still queued]

    Set the task RUNNING and unlink the entry if a wake-up did not already.  Spec §6.2.
    """
    set_current_state(wq_entry.private, TASK_RUNNING)
    if wq_entry.prev is not wq_entry:
        _list_del_init(wq_entry)


# ----------------------------------------------------------------------------- wake functions


def default_wake_function(wq_entry: WaitQueueEntry, mode: int, wake_flags: int,
                          key: int) -> int:
    """kernel/sched/core.c: default_wake_function → try_to_wake_up(curr->private, mode)

    Wake the entry's task if its state is in ``mode``; 1 if it was woken, 0 if it was
    already running.  Spec §6.1.
    """
    task: TaskStruct = wq_entry.private
    if task.state & mode:
        return 1 if wake_up_process(task) else 0
    return 0


def autoremove_wake_function(wq_entry: WaitQueueEntry, mode: int, wake_flags: int,
                             key: int) -> int:
    """kernel/sched/wait.c: autoremove_wake_function  [atomic: wq_head->lock held]

    ``default_wake_function``, and unlink the entry when it woke the task.  Spec §6.2.
    """
    ret = default_wake_function(wq_entry, mode, wake_flags, key)
    if ret and wq_entry.prev is not wq_entry:
        _list_del_init(wq_entry)
    return ret


# ----------------------------------------------------------------------------- waking


def __wake_up_common(  # noqa: PLR0917  (the kernel's signature)
        wq_head: WaitQueueHead, mode: int, nr_exclusive: int, wake_flags: int, key: int,
        bookmark: WaitQueueEntry | None = None) -> int:
    """kernel/sched/wait.c: __wake_up_common  [atomic: wq_head->lock held]

    Call each entry's ``func`` in list order; stop on a negative return, or when an
    EXCLUSIVE entry that accepted the wake uses up the last of ``nr_exclusive``.  With a
    bookmark, stop after 64 entries and park the bookmark before the next one.  Returns the
    remaining ``nr_exclusive``.  Spec §6.4.
    Differs from the kernel: the kernel's walk survives only the removal of the *current*
    entry; vkick also skips entries that a callback removed further down the list (their
    stale ``next`` still leads back onto the list).  The kernel reads ``flags`` before the
    call, and so does vkick.
    """
    sentinel = wq_head.head
    if bookmark is not None and bookmark.flags & WQ_FLAG_BOOKMARK:
        curr = bookmark.next
        _list_del_init(bookmark)
        bookmark.flags = 0
    else:
        curr = sentinel.next
    if curr is sentinel:
        return nr_exclusive
    cnt = 0
    while curr is not sentinel:
        nxt = curr.next
        flags = curr.flags
        if flags & WQ_FLAG_BOOKMARK or curr.prev is curr:
            # Another walker's bookmark, or an entry unlinked by an earlier callback of this
            # walk (its stale next leads on): not a waiter, skip it.
            curr = nxt
            continue
        ret = curr.func(curr, mode, wake_flags, key)
        if ret < 0:
            break
        if ret and flags & WQ_FLAG_EXCLUSIVE:
            nr_exclusive -= 1
            if nr_exclusive == 0:
                break
        if bookmark is not None:
            cnt += 1
            if cnt > WAITQUEUE_WALK_BREAK_CNT and nxt is not sentinel:
                bookmark.flags = WQ_FLAG_BOOKMARK
                _list_add(bookmark, nxt.prev)  # list_add_tail(&bookmark->entry, &next->entry)
                break
        curr = nxt
    return nr_exclusive


def __wake_up_locked_key(wq_head: WaitQueueHead, mode: int, key: int) -> None:
    """kernel/sched/wait.c: __wake_up_locked_key  [atomic: wq_head->lock held]

    One walk with ``nr_exclusive = 1`` and no bookmark.  Spec §6.4.
    """
    __wake_up_common(wq_head, mode, 1, 0, key, None)


def __wake_up(wq_head: WaitQueueHead, mode: int, nr_exclusive: int, key: int) -> None:
    """kernel/sched/wait.c: __wake_up → __wake_up_common_lock  [takes wq_head->lock]

    Walk in slices of 64 entries, dropping and retaking the lock between slices (a
    bookmark keeps the place).  Spec §6.4.
    Differs from the kernel: nothing can run while the lock is dropped (the whole call is
    synchronous), so the slices only reproduce the kernel's bookkeeping.
    """
    bookmark = WaitQueueEntry(_never_called)
    while True:
        nr_exclusive = __wake_up_common(wq_head, mode, nr_exclusive, 0, key, bookmark)
        if not bookmark.flags & WQ_FLAG_BOOKMARK:
            break


def wake_up_locked_poll(wq_head: WaitQueueHead, m: int) -> None:
    """include/linux/wait.h: wake_up_locked_poll  [atomic: wq_head->lock held]

    ``__wake_up_locked_key(x, TASK_NORMAL, poll_to_key(m))``: what eventfd_signal uses; the
    callbacks run right here, synchronously.  Spec §6.4.
    """
    __wake_up_common(wq_head, TASK_NORMAL, 1, 0, m, None)


def wake_up_poll(wq_head: WaitQueueHead, m: int) -> None:
    """include/linux/wait.h: wake_up_poll  [takes wq_head->lock]

    ``__wake_up(x, TASK_NORMAL, 1, poll_to_key(m))``: what eventfd_release uses for
    EPOLLHUP (irqfd returns 0 for HUP, so every entry is called).  Spec §5.8, §6.4.
    """
    __wake_up(wq_head, TASK_NORMAL, 1, m)


def wake_up(wq_head: WaitQueueHead) -> None:
    """include/linux/wait.h: wake_up  [takes wq_head->lock]

    ``__wake_up(x, TASK_NORMAL, 1, NULL)``: wake all non-exclusive waiters and one exclusive.
    """
    __wake_up(wq_head, TASK_NORMAL, 1, 0)


def wake_up_all(wq_head: WaitQueueHead) -> None:
    """include/linux/wait.h: wake_up_all  [takes wq_head->lock]

    ``__wake_up(x, TASK_NORMAL, 0, NULL)``: ``nr_exclusive = 0`` never reaches 0, so all.
    """
    __wake_up(wq_head, TASK_NORMAL, 0, 0)


# ----------------------------------------------------------------------------- sleeping


async def wait_event(wq_head: WaitQueueHead, task: TaskStruct, condition: Callable[[], bool],
                     *, why: str = "", window: Window | None = None,
                     exclusive: bool = False) -> None:
    """include/linux/wait.h: wait_event_interruptible (___wait_event)  [process]

    Sleep ``task`` on ``wq_head`` until ``condition()`` is true.  Each round queues the
    entry and sets TASK_INTERRUPTIBLE *before* testing the condition, so a waker that sets
    the condition and then wakes the queue either is seen by the test or finds the entry
    and makes the task RUNNING, which ``schedule()`` then does not sleep through: no lost
    wake-up (spec §16.3).  ``window`` names an optional preemption point between the test
    and ``schedule()`` (the place a lost wake-up would hide); ``why`` names the wait in
    deadlock reports.
    Differs from the kernel: no signals (-ERESTARTSYS); a cancelled task still unlinks.
    """
    if condition():
        return
    wq_entry = WaitQueueEntry(autoremove_wake_function, task)
    rt = task.rt
    try:
        while True:
            if exclusive:
                prepare_to_wait_exclusive(wq_head, wq_entry, TASK_INTERRUPTIBLE)
            else:
                prepare_to_wait(wq_head, wq_entry, TASK_INTERRUPTIBLE)
            if condition():
                break
            if window is not None:
                # Condition tested false ↔ schedule(): a waker may set the condition and
                # wake the queue here.  Pairs with the waker's store-then-wake; the wake sets
                # TASK_RUNNING so schedule() below returns at once.  Spec §16.3.
                await rt.preempt(window)
            await schedule(task, why or f"wait_event({wq_head.name})")
    finally:
        finish_wait(wq_head, wq_entry)
