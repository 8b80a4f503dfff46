"""fs/eventfd.c model (vkick/kernel/eventfd.py): signal, read, poll, release (spec §5)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vkick.kernel.eventfd import (
    EFD_NONBLOCK,
    EFD_SEMAPHORE,
    ULLONG_MAX,
    EventfdCtx,
    eventfd_ctx_create,
    eventfd_ctx_do_read,
    eventfd_ctx_fileget,
    eventfd_ctx_put,
    eventfd_ctx_remove_wait_queue,
    eventfd_poll,
    eventfd_poll_async,
    eventfd_read,
    eventfd_read_blocking,
    eventfd_release,
    eventfd_signal,
    eventfd_signal_count,
    eventfd_write,
    eventfd_write_blocking,
)
from vkick.kernel.sched import TaskStruct
from vkick.kernel.wait import (
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    WaitQueueEntry,
    WaitQueueHead,
    add_wait_queue,
    add_wait_queue_priority,
)
from vkick.runtime import PreemptPolicy, Runtime, SitePolicy
from vkick.testing import capture_events


def _ctx(rt: Runtime, initval: int = 0, flags: int = 0) -> EventfdCtx:
    ctx = eventfd_ctx_create(rt, initval, flags)
    assert isinstance(ctx, EventfdCtx)
    return ctx


def _entry(log: list[Any], tag: str, ret: int = 0) -> WaitQueueEntry:
    def func(entry: WaitQueueEntry, mode: int, wake_flags: int, key: int) -> int:
        log.append((tag, key))
        return ret

    return WaitQueueEntry(func)


@given(st.integers(0, ULLONG_MAX), st.integers(0, ULLONG_MAX))
def test_eventfd_signal_saturates_at_ullong_max(start: int, n: int) -> None:
    """count += n caps at ULLONG_MAX; the amount actually added is returned (§5.2 step 4)."""
    rt = Runtime()
    try:
        ctx = EventfdCtx(rt, "e", start)
        added = eventfd_signal(ctx, n)
        assert added == min(n, ULLONG_MAX - start)
        assert ctx.count == min(start + n, ULLONG_MAX)
    finally:
        rt.close()


def test_eventfd_signal_wakes_even_when_capped_to_zero(rt: Runtime) -> None:
    """At ULLONG_MAX the signal adds 0 but still runs the callbacks (§5.2 step 5)."""
    ctx = EventfdCtx(rt, "e", ULLONG_MAX)
    log: list[Any] = []
    add_wait_queue(ctx.wqh, _entry(log, "w"))
    assert eventfd_signal(ctx, 5) == 0
    assert log == [("w", EPOLLIN)]


def test_eventfd_signal_nested_from_callback_is_dropped(rt: Runtime) -> None:
    """A signal issued from a wake-up callback of another signal is dropped, returns 0 and
    warns; the guard is released afterwards (§5.2 step 1, §16.10)."""
    outer, inner = _ctx(rt), _ctx(rt)
    got: list[int] = []

    def chain(entry: WaitQueueEntry, mode: int, wake_flags: int, key: int) -> int:
        got.append(eventfd_signal_count())
        got.append(eventfd_signal(inner, 1))
        return 0

    add_wait_queue(outer.wqh, WaitQueueEntry(chain))
    with capture_events(rt.bus, "vkick_warn", "eventfd_signal") as events:
        assert eventfd_signal(outer, 1) == 1
    assert got == [1, 0]
    assert inner.count == 0
    assert [e["ev"] for e in events] == ["eventfd_signal", "vkick_warn"]
    assert eventfd_signal_count() == 0
    assert eventfd_signal(inner, 2) == 2


def test_eventfd_signal_emits_event_with_efd_n_count(rt: Runtime) -> None:
    """The eventfd_signal event carries efd, n (added) and the new count."""
    ctx = EventfdCtx(rt, "call0", 1)
    with capture_events(rt.bus, "eventfd_signal") as events:
        eventfd_signal(ctx, 2)
    assert [{k: e[k] for k in ("efd", "n", "count")} for e in events] == [
        {"efd": "call0", "n": 2, "count": 3}]


def test_eventfd_ctx_do_read_semaphore_underflow_quirk(rt: Runtime) -> None:
    """v5.13: a semaphore read at count 0 wraps to ULLONG_MAX (bug #14, kept on purpose);
    the v6.6 fix reads 0 instead (§5.3)."""
    ctx = _ctx(rt, 0, EFD_SEMAPHORE)
    assert eventfd_ctx_do_read(ctx) == 1
    assert ctx.count == ULLONG_MAX
    fixed = EventfdCtx(rt, "f", 0, EFD_SEMAPHORE, fix_semaphore_underflow=True)
    assert eventfd_ctx_do_read(fixed) == 0
    assert fixed.count == 0


def test_eventfd_ctx_do_read_semaphore_underflow_is_reported(rt: Runtime) -> None:
    """The eventfd model's assertion: a semaphore read at count 0 emits
    vkick_eventfd_underflow (the oracle's "count never wraps", bug #14); a read at count > 0
    and the fixed form do not."""
    ctx = _ctx(rt, 1, EFD_SEMAPHORE)
    fixed = EventfdCtx(rt, "f", 0, EFD_SEMAPHORE, fix_semaphore_underflow=True)
    with capture_events(rt.bus, "vkick_eventfd_underflow") as events:
        eventfd_ctx_do_read(ctx)
        eventfd_ctx_do_read(fixed)
        assert events == []
        eventfd_ctx_do_read(ctx)
    assert [(e["efd"], e["cnt"], e["count"]) for e in events] == [
        (ctx.name, 1, ULLONG_MAX)]


def test_eventfd_ctx_do_read_plain_takes_everything(rt: Runtime) -> None:
    """Non-semaphore: the whole count is read and reset to 0 (§5.3)."""
    ctx = _ctx(rt, 7)
    assert eventfd_ctx_do_read(ctx) == 7
    assert ctx.count == 0


def test_eventfd_read_semaphore_takes_one_and_wakes_writers(rt: Runtime) -> None:
    """A semaphore read returns 1 and wakes the queue with EPOLLOUT (§5.4 steps 3–4)."""
    ctx = _ctx(rt, 3, EFD_SEMAPHORE)
    log: list[Any] = []
    add_wait_queue(ctx.wqh, _entry(log, "w"))
    assert eventfd_read(ctx) == 1
    assert ctx.count == 2
    assert log == [("w", EPOLLOUT)]
    assert eventfd_read(ctx, size=4) == -errno.EINVAL


def test_eventfd_read_zero_count_is_eagain(rt: Runtime) -> None:
    """The synchronous read cannot sleep: count 0 gives -EAGAIN (§5.4 step 2)."""
    assert eventfd_read(_ctx(rt)) == -errno.EAGAIN


def test_eventfd_write_runs_callbacks_with_epollin(rt: Runtime) -> None:
    """write(2) adds and wakes with EPOLLIN; a write of 0 still wakes (§5.5 steps 3–4)."""
    ctx = _ctx(rt)
    log: list[Any] = []
    add_wait_queue(ctx.wqh, _entry(log, "w"))
    assert eventfd_write(ctx, 0) == 8
    assert eventfd_write(ctx, 5) == 8
    assert ctx.count == 5
    assert log == [("w", EPOLLIN), ("w", EPOLLIN)]


@pytest.mark.parametrize(("count", "mask"), [
    (0, EPOLLOUT), (1, EPOLLIN | EPOLLOUT), (ULLONG_MAX - 2, EPOLLIN | EPOLLOUT),
    (ULLONG_MAX - 1, EPOLLIN), (ULLONG_MAX, EPOLLIN | EPOLLERR)])
def test_eventfd_poll_mask(rt: Runtime, count: int, mask: int) -> None:
    """EPOLLIN if count > 0, EPOLLERR at ULLONG_MAX, EPOLLOUT below ULLONG_MAX − 1 (§5.6)."""
    assert eventfd_poll(EventfdCtx(rt, "e", count), None) == mask


def test_eventfd_poll_adds_entry_before_reading_count(rt: Runtime) -> None:
    """The queueing procedure runs first; the mask reflects the count read after it: a
    signal from inside the queueing step is seen by the read (§5.6)."""
    ctx = _ctx(rt)
    log: list[Any] = []
    entry = _entry(log, "irqfd", 1)

    def qproc(wqh: WaitQueueHead) -> None:
        add_wait_queue_priority(wqh, entry)
        eventfd_signal(ctx, 1)  # a signal right after the add: the callback sees it

    assert eventfd_poll(ctx, qproc) & EPOLLIN
    assert log == [("irqfd", EPOLLIN)]


def _poll_race(seed: int, count_first: bool) -> tuple[int, list[Any]]:
    """A poller registers (eventfd_poll_async) while a signaller signals once."""
    rt = Runtime(seed=seed, policy=PreemptPolicy.random(
        p=0.0, sites={"W-EFD-poll": SitePolicy(p=1.0, max_turns=2)}))
    ctx = _ctx(rt)
    log: list[Any] = []
    entry = _entry(log, "cb", 1)
    result: list[int] = []

    async def poller() -> None:
        mask = await eventfd_poll_async(ctx, lambda wqh: add_wait_queue_priority(wqh, entry),
                                        count_first=count_first)
        result.append(mask)

    async def signaller() -> None:
        eventfd_signal(ctx, 1)

    async def main() -> None:
        rt.spawn("poller", poller)
        rt.spawn("signaller", signaller)
        await rt.wait_quiescent()

    rt.run(main)
    return result[0], log


@pytest.mark.parametrize("seed", range(5))
def test_eventfd_poll_async_signal_in_window_not_lost(seed: int) -> None:
    """A signal between the add and the count read is seen by the callback, the mask, or
    both — never by neither (§16.6)."""
    mask, log = _poll_race(seed, count_first=False)
    assert mask & EPOLLIN or log


def test_eventfd_poll_async_count_first_toggle_loses_signal() -> None:
    """Bug toggle §16.6: reading the count before adding the entry lets a signal in the
    window be missed by both sides."""
    mask, log = _poll_race(0, count_first=True)
    assert not mask & EPOLLIN
    assert log == []


def test_eventfd_ctx_remove_wait_queue_drains_and_unlinks(rt: Runtime) -> None:
    """Drain the count and unlink atomically; others get EPOLLOUT if something was read;
    0 if the count was non-zero, else -EAGAIN (§5.7)."""
    ctx = _ctx(rt, 4)
    log: list[Any] = []
    mine = _entry(log, "irqfd")
    other = _entry(log, "other")
    add_wait_queue(ctx.wqh, mine)
    add_wait_queue(ctx.wqh, other)
    assert eventfd_ctx_remove_wait_queue(ctx, mine) == 0
    assert ctx.count == 0
    assert list(ctx.wqh) == [other]
    assert log == [("other", EPOLLOUT)]
    assert eventfd_ctx_remove_wait_queue(ctx, other) == -errno.EAGAIN


def test_eventfd_release_wakes_everyone_with_epollhup(rt: Runtime) -> None:
    """Closing the file wakes every entry with EPOLLHUP, even behind an exclusive priority
    entry, and drops the file's reference (§5.8)."""
    ctx = eventfd_ctx_fileget(_ctx(rt))
    log: list[Any] = []
    add_wait_queue(ctx.wqh, _entry(log, "vhost", 1))
    add_wait_queue_priority(ctx.wqh, _entry(log, "irqfd", 0))
    eventfd_release(ctx)
    assert log == [("irqfd", EPOLLHUP), ("vhost", EPOLLHUP)]
    assert ctx.kref == 1
    eventfd_ctx_put(ctx)
    with pytest.raises(RuntimeError, match="double put"):
        eventfd_ctx_put(ctx)


def test_eventfd_read_blocking_sleeps_until_signal() -> None:
    """A blocking read with count 0 sleeps and returns the value once a signal arrives;
    its wait entry is gone afterwards (§5.4)."""
    rt = Runtime()
    ctx = _ctx(rt)
    got: list[int] = []

    async def reader() -> None:
        got.append(await eventfd_read_blocking(ctx, TaskStruct(rt, "reader")))

    async def main() -> None:
        rt.spawn("reader", reader)
        await rt.sleep_ns(100)
        assert got == []
        assert len(list(ctx.wqh)) == 1
        eventfd_signal(ctx, 3)
        await rt.wait_quiescent()

    rt.run(main)
    assert got == [3]
    assert list(ctx.wqh) == []


def test_eventfd_read_blocking_nonblock_file_is_eagain(rt: Runtime) -> None:
    """With EFD_NONBLOCK the blocking form returns -EAGAIN instead of sleeping."""
    ctx = _ctx(rt, 0, EFD_NONBLOCK)

    async def main() -> int:
        return await eventfd_read_blocking(ctx, TaskStruct(rt, "r"))

    assert rt.call(main) == -errno.EAGAIN


def test_eventfd_write_blocking_waits_for_room() -> None:
    """A write that would reach ULLONG_MAX sleeps until a read makes room (§5.5 step 3)."""
    rt = Runtime()
    ctx = EventfdCtx(rt, "e", ULLONG_MAX - 1)
    done: list[int] = []

    async def writer() -> None:
        done.append(await eventfd_write_blocking(ctx, TaskStruct(rt, "writer"), 5))

    async def main() -> None:
        rt.spawn("writer", writer)
        await rt.wait_quiescent()
        assert done == []
        assert eventfd_read(ctx) == ULLONG_MAX - 1
        await rt.wait_quiescent()

    rt.run(main)
    assert done == [8]
    assert ctx.count == 5


def test_eventfd_read_blocking_deadlock_names_the_reader() -> None:
    """A reader nobody signals is reported in the DeadlockError by name and wait."""
    from vkick.runtime import DeadlockError  # noqa: PLC0415

    rt = Runtime()
    ctx = EventfdCtx(rt, "lonely")

    async def main() -> int:
        return await eventfd_read_blocking(ctx, TaskStruct(rt, "vkick-main"))

    with pytest.raises(DeadlockError, match=r"eventfd_read\(lonely\)"):
        rt.run(main)
