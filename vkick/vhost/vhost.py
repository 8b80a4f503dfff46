"""drivers/vhost/vhost.c: the device side of a virtqueue — taking avail buffers, publishing
used ones, deciding whether the guest must be interrupted, and turning guest kicks on/off.

Covered: vhost_get_vq_desc (next head only), vhost_add_used_n / __vhost_add_used_n,
vhost_notify, vhost_enable_notify, vhost_disable_notify, vhost_signal.  The barriers of
spec §16.9 are kept as step order (x86: only the store→load pair matters, and the device
side's ``smp_mb`` in vhost_notify is where the guest's re-enable can race; the async worker
will put ``W-VQ-notify`` there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


@dataclass(slots=True, eq=False)
class VhostVirtqueue:
    """drivers/vhost/vhost.h: struct vhost_virtqueue (the fields on this path)."""

    ring: Vring
    acked_features: int = 1 << VIRTIO_RING_F_EVENT_IDX
    last_avail_idx: int = 0
    avail_idx: int = 0  # cached copy of the guest's avail->idx
    last_used_idx: int = 0
    used_flags: int = 0  # host copy of used->flags
    signalled_used: int = 0
    signalled_used_valid: bool = False
    call_ctx: EventfdCtx | None = None  # VHOST_SET_VRING_CALL: the irqfd's eventfd
    name: str = "vq0"
    vm: str = "vm0"
    dev: str = "net0"
    stats: dict[str, int] = field(default_factory=lambda: {"signalled": 0, "suppressed": 0})

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)


def vhost_get_vq_desc(vq: VhostVirtqueue) -> int:
    """drivers/vhost/vhost.c: vhost_get_vq_desc — the next available head, or ``num`` when
    the ring is empty (re-reading the guest's avail->idx when the cached copy is used up)."""
    ring = vq.ring
    if vq.last_avail_idx == vq.avail_idx:
        vq.avail_idx = ring.avail_idx
        if vq.last_avail_idx == vq.avail_idx:
            return ring.num
    head = ring.avail_ring[vq.last_avail_idx % ring.num]
    vq.last_avail_idx = (vq.last_avail_idx + 1) & U16
    return head


def __vhost_add_used_n(vq: VhostVirtqueue, heads: list[tuple[int, int]]) -> int:
    """drivers/vhost/vhost.c: __vhost_add_used_n — write the elements, then (smp_wmb) the
    index; invalidate ``signalled_used`` if the new range overtook it."""
    ring = vq.ring
    start = vq.last_used_idx
    for i, elem in enumerate(heads):
        ring.used_ring[(start + i) % ring.num] = elem
    old = vq.last_used_idx
    new = vq.last_used_idx = (old + len(heads)) & U16
    if ((new - vq.signalled_used) & U16) < ((new - old) & U16):
        vq.signalled_used_valid = False
    ring.used_idx = new  # smp_wmb: elements visible before the index
    return 0


def vhost_add_used_n(vq: VhostVirtqueue, heads: list[tuple[int, int]]) -> int:
    """drivers/vhost/vhost.c: vhost_add_used_n (the wrap-around split has no effect here:
    slots are taken mod num)."""
    return __vhost_add_used_n(vq, heads)


def vhost_notify(vq: VhostVirtqueue) -> bool:
    """drivers/vhost/vhost.c: vhost_notify — should the guest be interrupted?  Spec §4.7.

    (smp_mb: the used index is visible before the guest's suppression state is read.)
    Without event idx: unless VRING_AVAIL_F_NO_INTERRUPT.  With it: iff ``used_event`` lies
    in [signalled_used, last_used_idx), or on the first signal after an invalidation.
    """
    ring = vq.ring
    if (vq.has_feature(VIRTIO_F_NOTIFY_ON_EMPTY) and vq.avail_idx == vq.last_avail_idx
            and ring.avail_idx == vq.last_avail_idx):
        return True
    if not vq.has_feature(VIRTIO_RING_F_EVENT_IDX):
        return not ring.avail_flags & VRING_AVAIL_F_NO_INTERRUPT
    old = vq.signalled_used
    v = vq.signalled_used_valid
    new = vq.signalled_used = vq.last_used_idx
    vq.signalled_used_valid = True
    if not v:
        return True
    return vring_need_event(ring.used_event, new, old)


def vhost_signal(vq: VhostVirtqueue, rt: Any = None) -> bool:
    """drivers/vhost/vhost.c: vhost_signal — eventfd_signal(call_ctx, 1) if vhost_notify.

    A signal is an interrupt source: it takes a correlation id (``rt.next_irq_id``).
    Returns whether it signalled.
    """
    ctx = vq.call_ctx
    runtime = rt if rt is not None else (ctx.rt if ctx is not None else None)
    if ctx is None or not vhost_notify(vq):
        vq.stats["suppressed"] += 1
        if runtime is not None and runtime.bus.on:
            runtime.bus.emit("vhost_signal", vm=vq.vm, dev=vq.dev, vq=vq.name, irq=0,
                             signalled=False)
        return False
    vq.stats["signalled"] += 1
    assert runtime is not None
    saved = runtime.cur_irq
    runtime.cur_irq = irq = runtime.next_irq_id()
    try:
        if runtime.bus.on:
            runtime.bus.emit("vhost_signal", vm=vq.vm, dev=vq.dev, vq=vq.name, irq=irq,
                             signalled=True)
        eventfd_signal(ctx, 1)
    finally:
        runtime.cur_irq = saved
    return True


def vhost_disable_notify(vq: VhostVirtqueue) -> None:
    """drivers/vhost/vhost.c: vhost_disable_notify — stop guest kicks while polling."""
    if vq.used_flags & VRING_USED_F_NO_NOTIFY:
        return
    vq.used_flags |= VRING_USED_F_NO_NOTIFY
    if not vq.has_feature(VIRTIO_RING_F_EVENT_IDX):
        vq.ring.used_flags = vq.used_flags


def vhost_enable_notify(vq: VhostVirtqueue) -> bool:
    """drivers/vhost/vhost.c: vhost_enable_notify → True if the caller must poll again.

    Re-enable kicks (flags, or ``avail_event = avail_idx``), then (smp_mb) re-read the
    guest's avail index: buffers added after our last look but before the guest saw the
    enable would otherwise never be kicked for.  Spec §4.8, §16.9.
    """
    if not vq.used_flags & VRING_USED_F_NO_NOTIFY:
        return False
    vq.used_flags &= ~VRING_USED_F_NO_NOTIFY
    if not vq.has_feature(VIRTIO_RING_F_EVENT_IDX):
        vq.ring.used_flags = vq.used_flags
    else:
        vq.ring.avail_event = vq.avail_idx
    return vq.ring.avail_idx != vq.avail_idx
