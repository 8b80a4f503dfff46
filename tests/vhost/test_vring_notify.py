"""The split ring's notification rules (spec §4.6–§4.9, §16.9, §17.17)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import given
from hypothesis import strategies as st

from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create
from vkick.runtime.tasks import Runtime
from vkick.vhost.vhost import (
    VhostVirtqueue,
    vhost_add_used_n,
    vhost_disable_notify,
    vhost_enable_notify,
    vhost_get_vq_desc,
    vhost_notify,
    vhost_signal,
)
from vkick.vhost.vring import (
    VIRTIO_RING_F_EVENT_IDX,
    VRING_AVAIL_F_NO_INTERRUPT,
    Vring,
    vring_need_event,
)

T = TypeVar("T")

u16 = st.integers(0, 0xFFFF)


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (no device, or policy none) to its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    raise AssertionError("the coroutine suspended")


@given(event=u16, old=u16, n=st.integers(0, 0x8000))
def test_vring_need_event_is_event_in_the_published_window(event: int, old: int,
                                                           n: int) -> None:
    new = (old + n) & 0xFFFF
    window = {(old + i) & 0xFFFF for i in range(n)}
    assert vring_need_event(event, new, old) == (event in window)


def _vq(event_idx: bool = True, num: int = 8) -> VhostVirtqueue:
    return VhostVirtqueue(Vring(num), acked_features=(1 << VIRTIO_RING_F_EVENT_IDX)
                          if event_idx else 0)


def test_vhost_notify_first_signal_after_invalidation_always_fires() -> None:
    vq = _vq()
    vhost_add_used_n(vq, [(0, 64)])
    vq.ring.used_event = 100  # far away, but signalled_used is not valid yet
    assert drive(vhost_notify(vq))
    vhost_add_used_n(vq, [(1, 64)])
    assert not drive(vhost_notify(vq))  # used_event (100) not in [1, 2)
    vq.ring.used_event = 2
    vhost_add_used_n(vq, [(2, 64), (3, 64)])
    assert drive(vhost_notify(vq))  # 2 in [2, 4)


def test_vhost_notify_without_event_idx_follows_no_interrupt_flag() -> None:
    vq = _vq(event_idx=False)
    vhost_add_used_n(vq, [(0, 64)])
    assert drive(vhost_notify(vq))
    vq.ring.avail_flags = VRING_AVAIL_F_NO_INTERRUPT
    assert not drive(vhost_notify(vq))


def test_vhost_add_used_n_invalidates_an_overtaken_signalled_used() -> None:
    vq = _vq()
    vhost_add_used_n(vq, [(0, 1)])
    assert drive(vhost_notify(vq)) and vq.signalled_used_valid
    vq.last_used_idx = 0xFFFF  # the range added next wraps past signalled_used
    vq.signalled_used = 0x0000
    vhost_add_used_n(vq, [(1, 1), (2, 1)])
    assert not vq.signalled_used_valid


def test_vhost_enable_notify_reports_buffers_added_meanwhile() -> None:
    vq = _vq()
    vq.ring.avail_ring[0] = 5
    vq.ring.avail_idx = 1
    assert vhost_get_vq_desc(vq) == 5
    assert vhost_get_vq_desc(vq) == vq.ring.num  # empty
    vhost_disable_notify(vq)
    vq.ring.avail_idx = 2  # the guest adds a buffer while kicks are off
    assert vhost_enable_notify(vq) is True  # must poll again (spec §4.8 step 4)
    assert vq.ring.avail_event == 1


def test_vhost_signal_signals_the_call_eventfd_with_a_new_interrupt_id() -> None:
    rt = Runtime()
    ctx = eventfd_ctx_create(rt, name="call0")
    assert isinstance(ctx, EventfdCtx)
    vq = _vq()
    vq.call_ctx = ctx
    vhost_add_used_n(vq, [(0, 64)])
    assert drive(vhost_signal(vq))
    assert ctx.count == 1 and ctx.irqs == [1]
    vhost_add_used_n(vq, [(1, 64)])
    vq.ring.used_event = 50
    assert not drive(vhost_signal(vq))  # suppressed by event idx
    assert vq.stats == {"signalled": 1, "suppressed": 1}
    rt.close()


def _run(event_idx: bool, batches: list[int], poll_every: int) -> tuple[int, bool]:
    """The device completes buffers in ``batches``.  The guest's interrupt only schedules
    its NAPI poll, which runs at the next multiple of ``poll_every`` batches: consume
    everything, re-enable callbacks (``used_event`` = what it consumed), full barrier,
    re-check ``used->idx`` and poll again if more arrived (spec §4.11, §16.9).
    Returns (signals, whether the guest was ever left waiting for an interrupt that the
    device then failed to send)."""
    vq = _vq(event_idx, num=256)
    consumed = 0
    signals = 0
    napi_scheduled = False
    waiting_since: int | None = None  # used idx the guest re-armed at, while it waits
    lost = False
    for i, n in enumerate(batches):
        vhost_add_used_n(vq, [(j % 256, 1) for j in range(n)])
        if drive(vhost_notify(vq)):
            signals += 1
            napi_scheduled = True
            waiting_since = None
        elif waiting_since is not None and vq.ring.used_idx != waiting_since:
            lost = True  # new completions, guest waiting, no interrupt: the classic hang
        if napi_scheduled and i % poll_every == 0:
            napi_scheduled = False
            while consumed != vq.ring.used_idx:  # virtqueue_enable_cb re-check loop
                consumed = vq.ring.used_idx
                vq.ring.used_event = consumed
            waiting_since = consumed
    return signals, lost


@given(batches=st.lists(st.integers(1, 8), min_size=1, max_size=200),
       poll_every=st.integers(1, 5))
def test_event_idx_never_leaves_the_guest_waiting_and_never_signals_more(
        batches: list[int], poll_every: int) -> None:
    with_idx, lost_idx = _run(True, batches, poll_every)
    without, lost = _run(False, batches, poll_every)
    assert not lost_idx and not lost
    assert with_idx <= without


def test_event_idx_measurably_reduces_interrupts_per_packet() -> None:
    batches = [1] * 1000  # one packet per completion
    with_idx, _ = _run(True, batches, poll_every=4)
    without, _ = _run(False, batches, poll_every=4)
    assert without == 1000
    assert with_idx <= 300  # roughly one interrupt per NAPI round
