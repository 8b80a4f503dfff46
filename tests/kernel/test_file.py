"""struct file references (vkick/kernel/file.py) and the eventfd's release through them, and
the KASAN tombstones (vkick/kernel/kasan.py)."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create, eventfd_ctx_fdget
from vkick.kernel.file import close_fd, fdget, fdput, fget, fput
from vkick.kernel.irqbypass import (
    IrqBypassConsumer,
    IrqBypassProducer,
    irq_bypass_register_consumer,
    irq_bypass_register_producer,
)
from vkick.kernel.kasan import kasan_report, kfree
from vkick.kernel.wait import EPOLLHUP, WaitQueueEntry, add_wait_queue
from vkick.runtime import Runtime
from vkick.testing import capture_events


def _ctx(rt: Runtime) -> EventfdCtx:
    ctx = eventfd_ctx_create(rt, name="e")
    assert isinstance(ctx, EventfdCtx)
    return ctx


def _hup_log(ctx: EventfdCtx) -> list[int]:
    keys: list[int] = []

    def func(wait: WaitQueueEntry, mode: int, sync: int, key: int) -> int:
        keys.append(key)
        return 0

    add_wait_queue(ctx.wqh, WaitQueueEntry(func))
    return keys


def test_close_fd_releases_an_unshared_file_at_once(rt: Runtime) -> None:
    """close(2) drops the fd table's reference; when it is the last, eventfd_release runs
    and wakes the queue with EPOLLHUP (spec §5.8)."""
    ctx = _ctx(rt)
    keys = _hup_log(ctx)
    assert ctx.file.f_count == 1
    assert close_fd(ctx.file) == 0
    assert keys == [EPOLLHUP]
    assert ctx.released and ctx.kref == 0
    assert close_fd(ctx.file) == -errno.EBADF


def test_fdget_pins_the_file_so_close_releases_it_at_the_fdput(rt: Runtime) -> None:
    """A multi-threaded VMM's fdget takes a reference: another thread's close releases
    nothing until the holder's fdput (research/bugs.md #12b)."""
    ctx = _ctx(rt)
    keys = _hup_log(ctx)
    f = fdget(ctx.file)
    assert f is ctx.file and f.f_count == 2
    assert close_fd(ctx.file) == 0
    assert keys == [] and not ctx.released
    assert fget(ctx.file) is None  # the fd is gone: a later lookup is -EBADF
    fdput(f)
    assert keys == [EPOLLHUP] and ctx.released


def test_fput_without_a_reference_is_refused(rt: Runtime) -> None:
    """A double fput is an error, not a negative count."""
    ctx = _ctx(rt)
    close_fd(ctx.file)
    with pytest.raises(RuntimeError, match="double fput"):
        fput(ctx.file)


def test_eventfd_ctx_fdget_takes_a_context_reference_or_fails_with_ebadf(rt: Runtime) -> None:
    """eventfd_ctx_fdget: a context reference (the file's lookup reference is dropped
    again), -EBADF once the fd is closed."""
    ctx = _ctx(rt)
    assert eventfd_ctx_fdget(ctx) is ctx
    assert ctx.kref == 2 and ctx.file.f_count == 1
    close_fd(ctx.file)
    assert ctx.kref == 1  # the released file dropped its reference; ours remains
    assert eventfd_ctx_fdget(ctx) == -errno.EBADF


def test_kasan_report_emits_a_use_after_free_event(rt: Runtime) -> None:
    """kfree poisons the object; kasan_report is the event the oracle consumes."""
    consumer = IrqBypassConsumer()
    kfree(consumer)
    assert consumer.kasan_freed
    with capture_events(rt.bus, "vkick_use_after_free") as events:
        kasan_report(rt, "thing", "somewhere", "vm0")
    assert [(e["what"], e["where"], e["vm"]) for e in events] == [
        ("thing", "somewhere", "vm0")]


def test_irq_bypass_register_producer_reports_a_freed_consumer_on_its_list(
        rt: Runtime) -> None:
    """The bypass manager walks its consumer list: a consumer freed with its irqfd while
    still registered (bug #12) is a use after free at the next registration."""
    token = _ctx(rt)
    calls: list[str] = []

    def add(cons: IrqBypassConsumer, prod: IrqBypassProducer) -> int:
        calls.append("add_producer")
        return 0

    def delete(cons: IrqBypassConsumer, prod: IrqBypassProducer) -> None:
        calls.append("del_producer")

    consumer = IrqBypassConsumer(token=token, add_producer=add, del_producer=delete)
    assert irq_bypass_register_consumer(rt, consumer) == 0
    kfree(consumer)
    events: list[Any]
    with capture_events(rt.bus, "vkick_use_after_free") as events:
        assert irq_bypass_register_producer(rt, IrqBypassProducer(token=token, irq=5)) == 0
    assert [e["where"] for e in events] == ["irq_bypass_register_producer"]
    assert events[0]["what"] == "irq_bypass_consumer e"
    assert calls == ["add_producer"]  # and it connects to the freed consumer


def test_irq_bypass_register_producer_reads_consumers_only_up_to_the_match(
        rt: Runtime) -> None:
    """list_for_each_entry stops at the consumer with the producer's token: a freed consumer
    further down the list is never read, so no use after free is reported for it; one the
    walk does reach is."""

    def add(cons: IrqBypassConsumer, prod: IrqBypassProducer) -> int:
        return 0

    def delete(cons: IrqBypassConsumer, prod: IrqBypassProducer) -> None:
        pass

    older, newer = (IrqBypassConsumer(token=_ctx(rt), add_producer=add, del_producer=delete)
                    for _ in range(2))
    for consumer in (older, newer):
        assert irq_bypass_register_consumer(rt, consumer) == 0  # list_add: newer first
    kfree(older)
    events: list[Any]
    with capture_events(rt.bus, "vkick_use_after_free") as events:
        assert irq_bypass_register_producer(rt, IrqBypassProducer(token=newer.token)) == 0
    assert events == []  # the walk broke at newer, before reaching older
    with capture_events(rt.bus, "vkick_use_after_free") as events:
        assert irq_bypass_register_producer(rt, IrqBypassProducer(token=older.token)) == 0
    assert [e["where"] for e in events] == ["irq_bypass_register_producer"]
