"""drivers/vhost/vhost.c (virtqueue half): taking avail buffers, publishing used ones,
deciding whether the guest must be interrupted, and turning guest kicks off and on.

Covered: vhost_get_vq_desc (the next head), vhost_discard_vq_desc, __vhost_add_used_n,
vhost_add_used_n, vhost_notify, vhost_signal, vhost_add_used_and_signal_n,
vhost_enable_notify, vhost_disable_notify, vhost_exceeds_weight.  The worker half
(vhost_poll, vhost_work_queue, vhost_worker) is :mod:`vkick.vhost.worker`.

The barriers of spec §16.9 are kept as step order (x86 TSO: only the store→load pair
matters).  ``W-VQ-notify`` sits in vhost_notify between the full barrier and the read of
the guest's suppression state.  Test-only toggle ``vhost-notify-no-barrier`` (on the
device, ``dev.toggles``) removes that ``smp_mb``: the read of ``used_event`` / avail flags
is then satisfied before the ``used->idx`` store leaves the store buffer, and the store
becomes visible only after the window — the classic lost-notification hang.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Final

from vkick.kernel.eventfd import EventfdCtx, eventfd_signal
from vkick.vhost.vring import (
    U16,
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_RING_F_EVENT_IDX,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    Vring,
    vring_need_event,
)
from vkick.vhost.worker import VhostDev, VhostPoll, vhost_poll_queue

NO_BARRIER_TOGGLE: Final = "vhost-notify-no-barrier"


@dataclass(slots=True, eq=False)
class VhostVirtqueue:
    """drivers/vhost/vhost.h: struct vhost_virtqueue (the fields on this path).

    ``poll`` is the kick poll (its work is the handler: handle_tx_kick / handle_rx_kick).
    ``used_idx_store`` is vkick's store buffer for the no-barrier toggle (-1: empty).
    """

    ring: Vring
    acked_features: int = 1 << VIRTIO_RING_F_EVENT_IDX
    dev: VhostDev | None = None
    poll: VhostPoll | None = None
    last_avail_idx: int = 0
    avail_idx: int = 0  # cached copy of the guest's avail->idx
    last_used_idx: int = 0
    used_flags: int = 0  # host copy of used->flags
    signalled_used: int = 0
    signalled_used_valid: bool = False
    call_ctx: EventfdCtx | None = None  # VHOST_SET_VRING_CALL: the irqfd's eventfd
    name: str = "vq0"
    vm: str = "vm0"
    devname: str = "net0"
    used_idx_store: int = -1
    stats: dict[str, int] = field(default_factory=lambda: {"signalled": 0, "suppressed": 0})

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def __repr__(self) -> str:
        return (f"<vhost_virtqueue {self.vm}/{self.devname}/{self.name} "
                f"last_avail={self.last_avail_idx} avail={self.avail_idx} "
                f"last_used={self.last_used_idx} signalled={self.signalled_used}"
                f"{'' if self.signalled_used_valid else '(invalid)'} flags={self.used_flags}>")


def vhost_get_vq_desc(vq: VhostVirtqueue) -> int:
    """drivers/vhost/vhost.c: vhost_get_vq_desc → the next available head, or ``num`` when
    the ring is empty  [process: vhost worker, vq->mutex held]

    The guest's avail->idx is re-read only when the cached copy is used up (then smp_rmb:
    entries are read after the index that exposed them).
    """
    ring = vq.ring
    last_avail_idx = vq.last_avail_idx
    if last_avail_idx == vq.avail_idx:
        vq.avail_idx = avail_idx = ring.avail_idx
        if last_avail_idx == avail_idx:
            return ring.num
    head = ring.avail_ring[last_avail_idx & (ring.num - 1)]
    vq.last_avail_idx = (last_avail_idx + 1) & U16
    return head


def vhost_discard_vq_desc(vq: VhostVirtqueue, n: int) -> None:
    """drivers/vhost/vhost.c: vhost_discard_vq_desc — give back the last ``n`` heads."""
    vq.last_avail_idx = (vq.last_avail_idx - n) & U16


def __vhost_add_used_n(vq: VhostVirtqueue, heads: Sequence[tuple[int, int]]) -> int:
    """drivers/vhost/vhost.c: __vhost_add_used_n — write the elements, then (smp_wmb) the
    index; invalidate ``signalled_used`` if the new range overtook it.  Spec §4.6."""
    ring = vq.ring
    mask = ring.num - 1
    used_id = ring.used_id
    used_len = ring.used_len
    old = idx = vq.last_used_idx
    for head, length in heads:
        slot = idx & mask
        used_id[slot] = head
        used_len[slot] = length
        idx += 1
    new = vq.last_used_idx = idx & U16
    if ((new - vq.signalled_used) & U16) < ((new - old) & U16):
        vq.signalled_used_valid = False
    # smp_wmb: the elements are visible before the index.
    dev = vq.dev
    if dev is not None and NO_BARRIER_TOGGLE in dev.toggles:
        vq.used_idx_store = new  # sits in the store buffer until vhost_notify's window
    else:
        ring.used_idx = new
    return 0


def vhost_add_used_n(vq: VhostVirtqueue, heads: Sequence[tuple[int, int]]) -> int:
    """drivers/vhost/vhost.c: vhost_add_used_n (the split at the ring end has no effect
    here: slots are taken mod num)."""
    return __vhost_add_used_n(vq, heads)


async def vhost_notify(vq: VhostVirtqueue) -> bool:
    """drivers/vhost/vhost.c: vhost_notify — must the guest be interrupted?  Spec §4.7.

    smp_mb: the used index is visible before the guest's suppression state is read (pairs
    with the barrier in the guest's virtqueue_poll, §16.9).  NOTIFY_ON_EMPTY: always when
    the cached avail ring is empty.  Without event idx: unless VRING_AVAIL_F_NO_INTERRUPT.
    With it: iff ``used_event`` lies in [signalled_used, last_used_idx), or on the first
    signal after an invalidation.
    """
    ring = vq.ring
    dev = vq.dev
    no_barrier = dev is not None and NO_BARRIER_TOGGLE in dev.toggles
    # Without the barrier the loads below are satisfied before the used->idx store drains.
    early_flags = ring.avail_flags
    early_event = ring.used_event
    if dev is not None:
        # W-VQ-notify: used idx published + smp_mb ↔ used_event / avail->flags read.  The
        # guest may re-enable callbacks here and re-check used->idx: either it sees the new
        # index, or this read sees its new used_event (store-buffering pair, spec §16.9).
        await dev.rt.preempt("W-VQ-notify")
    if vq.used_idx_store >= 0:
        ring.used_idx = vq.used_idx_store  # the store buffer drains
        vq.used_idx_store = -1
    if vq.has_feature(VIRTIO_F_NOTIFY_ON_EMPTY) and vq.avail_idx == vq.last_avail_idx:
        return True
    if not vq.has_feature(VIRTIO_RING_F_EVENT_IDX):
        flags = early_flags if no_barrier else ring.avail_flags
        return not flags & VRING_AVAIL_F_NO_INTERRUPT
    old = vq.signalled_used
    v = vq.signalled_used_valid
    new = vq.signalled_used = vq.last_used_idx
    vq.signalled_used_valid = True
    if not v:
        return True
    event = early_event if no_barrier else ring.used_event
    return vring_need_event(event, new, old)


async def vhost_signal(vq: VhostVirtqueue) -> bool:
    """drivers/vhost/vhost.c: vhost_signal — eventfd_signal(call_ctx, 1) if vhost_notify
    says so  [process: vhost worker]

    A signal is an interrupt source: it takes a correlation id (``rt.next_irq_id``) that
    travels with the interrupt to the guest handler.  Returns whether it signalled.
    """
    ctx = vq.call_ctx
    runtime = vq.dev.rt if vq.dev is not None else ctx.rt if ctx is not None else None
    if ctx is None and vq.used_idx_store >= 0:
        # vhost-notify-no-barrier: no load follows to be reordered with the buffered
        # used->idx store; it drains (becomes visible) on its own.
        vq.ring.used_idx = vq.used_idx_store
        vq.used_idx_store = -1
    if ctx is None or not await vhost_notify(vq):
        vq.stats["suppressed"] += 1
        if runtime is not None and runtime.bus.on:
            runtime.bus.emit("vhost_signal", vm=vq.vm, dev=vq.devname, vq=vq.name, irq=0,
                             signalled=False)
        return False
    vq.stats["signalled"] += 1
    assert runtime is not None
    saved = runtime.cur_irq
    runtime.cur_irq = irq = runtime.next_irq_id()
    try:
        bus = runtime.bus
        if bus.on:
            bus.emit("vhost_signal", vm=vq.vm, dev=vq.devname, vq=vq.name, irq=irq,
                     signalled=True)
        eventfd_signal(ctx, 1)
    finally:
        runtime.cur_irq = saved
    return True


def vhost_add_used_and_signal_n(vq: VhostVirtqueue,
                                heads: Sequence[tuple[int, int]]) -> Awaitable[bool]:
    """drivers/vhost/vhost.c: vhost_add_used_and_signal_n  [process: vhost worker]

    Returns vhost_signal's awaitable (callers write ``await vhost_add_used_and_signal_n``).
    NOTE: a plain ``def``, not a coroutine: one coroutine frame less per signal; the heads
    are added when it is called."""
    vhost_add_used_n(vq, heads)
    return vhost_signal(vq)


def vhost_disable_notify(vq: VhostVirtqueue) -> None:
    """drivers/vhost/vhost.c: vhost_disable_notify — stop guest kicks while polling (with
    event idx nothing is written: the device just stops moving ``avail_event``)."""
    used_flags = vq.used_flags
    if used_flags & VRING_USED_F_NO_NOTIFY:
        return
    vq.used_flags = used_flags = used_flags | VRING_USED_F_NO_NOTIFY
    if not vq.has_feature(VIRTIO_RING_F_EVENT_IDX):
        vq.ring.used_flags = used_flags


def vhost_enable_notify(vq: VhostVirtqueue) -> bool:
    """drivers/vhost/vhost.c: vhost_enable_notify → True if the caller must poll again.

    Re-enable kicks (flags, or ``avail_event = avail_idx``), then (smp_mb) re-read the
    guest's avail index: buffers added after our last look but before the guest saw the
    enable would otherwise never be kicked for.  Spec §4.8, §16.9.
    """
    used_flags = vq.used_flags
    if not used_flags & VRING_USED_F_NO_NOTIFY:
        return False
    vq.used_flags = used_flags = used_flags & ~VRING_USED_F_NO_NOTIFY
    ring = vq.ring
    if not vq.has_feature(VIRTIO_RING_F_EVENT_IDX):
        ring.used_flags = used_flags
    else:
        ring.avail_event = vq.avail_idx
    return ring.avail_idx != vq.avail_idx


def vhost_exceeds_weight(vq: VhostVirtqueue, pkts: int, total_len: int) -> bool:
    """drivers/vhost/vhost.c: vhost_exceeds_weight — past the packet or byte weight: requeue
    the vq's poll work (so processing continues after others had a turn) and stop."""
    dev = vq.dev
    assert dev is not None
    if (dev.byte_weight and total_len >= dev.byte_weight) or pkts >= dev.weight:
        if vq.poll is not None:
            vhost_poll_queue(vq.poll)
        return True
    return False
