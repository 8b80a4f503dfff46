"""drivers/virtio/virtio_ring.c (split ring, driver side): adding buffers, the kick decision,
taking used buffers, and turning device interrupts off and on (spec §4.11, §16.9).

One descriptor per buffer (a virtio-net packet with ``VIRTIO_F_ANY_LAYOUT`` takes one
descriptor, or one indirect descriptor), so a head is a descriptor index and the free list
is chained through ``desc_next[i]``.

v5.13 detail (checked against the 5.12.9 tree and the v5.13-era hinlin tree):
``virtqueue_disable_cb_split`` with event idx writes nothing to the ring (only the shadow
flag); the ``used_event = 0`` "hack" spec §4.11 describes came with 5.14's
``event_triggered`` rework and is not modelled.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from vkick.vhost.vring import (
    U16,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    Vring,
    vring_need_event,
)

IRQ_NONE: Final = 0
IRQ_HANDLED: Final = 1


def _no_notify(vq: VringVirtqueue) -> bool:
    return True


@dataclass(slots=True, eq=False)
class VringVirtqueue:
    """drivers/virtio/virtio_ring.c: struct vring_virtqueue (split ring fields).

    ``data`` is ``desc_state[i].data``: the token of the buffer at head ``i`` (None: free).
    ``callback`` is the driver's virtqueue callback (skb_recv_done, skb_xmit_done);
    ``notify`` writes the doorbell (vp_notify) and returns False if the device is gone.
    """

    ring: Vring
    name: str = "vq"
    index: int = 0  # the queue index written to the notify register
    event: bool = True  # VIRTIO_RING_F_EVENT_IDX negotiated
    num_free: int = 0
    free_head: int = 0
    num_added: int = 0
    last_used_idx: int = 0
    avail_flags_shadow: int = 0
    avail_idx_shadow: int = 0
    data: list[Any] = field(default_factory=list)
    callback: Callable[[VringVirtqueue], None] | None = None
    notify: Callable[[VringVirtqueue], bool] = _no_notify
    owner: Any = None  # the driver queue (receive_queue / send_queue) this vq belongs to

    def __post_init__(self) -> None:
        num = self.ring.num
        if not self.data:
            self.data = [None] * num
            self.num_free = num
            self.ring.desc_next[:] = array("H", range(1, num + 1))  # free list 0 → 1 → … → num

    def __repr__(self) -> str:
        return (f"<vring_virtqueue {self.name} free={self.num_free} avail={self.avail_idx_shadow}"
                f" last_used={self.last_used_idx} used={self.ring.used_idx}"
                f" flags={self.avail_flags_shadow}>")


def virtqueue_add_split(vq: VringVirtqueue, data: Any, length: int, *, write: bool) -> int:
    """virtio_ring.c: virtqueue_add_split — one buffer; 0 or -ENOSPC  [guest, any context]

    Take the free head, fill its descriptor, put it in the avail ring, and (after
    virtio_wmb) publish the new ``avail->idx`` at once: the device may see it before any
    kick.  ``write``: device-writable (a receive buffer).
    """
    num_free = vq.num_free
    if num_free < 1:
        return -errno.ENOSPC
    ring = vq.ring
    head = vq.free_head
    ring.desc_addr[head] = data  # the buffer's content (a TX packet; an RX buffer to fill)
    ring.desc_len[head] = length
    ring.desc_flags[head] = VRING_DESC_F_WRITE if write else 0
    vq.free_head = ring.desc_next[head]
    vq.num_free = num_free - 1
    vq.data[head] = data
    avail_idx = vq.avail_idx_shadow
    ring.avail_ring[avail_idx & (ring.num - 1)] = head
    # virtio_wmb: descriptor and ring entry are visible before the index.
    vq.avail_idx_shadow = ring.avail_idx = (avail_idx + 1) & U16
    vq.num_added += 1
    return 0


def virtqueue_add_outbuf(vq: VringVirtqueue, data: Any, length: int) -> int:
    """virtio_ring.c: virtqueue_add_outbuf — a device-readable buffer (a TX packet)."""
    return virtqueue_add_split(vq, data, length, write=False)


def virtqueue_add_inbuf(vq: VringVirtqueue, data: Any, length: int) -> int:
    """virtio_ring.c: virtqueue_add_inbuf_ctx — a device-writable buffer (an RX buffer)."""
    return virtqueue_add_split(vq, data, length, write=True)


def virtqueue_kick_prepare(vq: VringVirtqueue) -> bool:
    """virtio_ring.c: virtqueue_kick_prepare_split — must the device be notified?

    virtio_mb: the avail index stores are visible before the device's suppression state is
    read (pairs with vhost_enable_notify's barrier, spec §16.9 kick direction).  With event
    idx: kick iff ``avail_event`` lies in the entries added since the last kick.
    """
    ring = vq.ring
    new = vq.avail_idx_shadow
    old = (new - vq.num_added) & U16
    vq.num_added = 0
    if vq.event:
        return vring_need_event(ring.avail_event, new, old)
    return not ring.used_flags & VRING_USED_F_NO_NOTIFY


def virtqueue_notify(vq: VringVirtqueue) -> bool:
    """virtio_ring.c: virtqueue_notify — write the doorbell (a VM exit → ioeventfd)."""
    return vq.notify(vq)


def more_used_split(vq: VringVirtqueue) -> bool:
    """virtio_ring.c: more_used_split — the device has used buffers we have not taken."""
    return vq.last_used_idx != vq.ring.used_idx


def detach_buf_split(vq: VringVirtqueue, head: int) -> None:
    """virtio_ring.c: detach_buf_split — the descriptor goes back on the free list."""
    vq.data[head] = None
    vq.ring.desc_next[head] = vq.free_head
    vq.free_head = head
    vq.num_free += 1


def virtqueue_get_buf(vq: VringVirtqueue) -> tuple[Any, int] | None:
    """virtio_ring.c: virtqueue_get_buf_ctx_split → (token, len), or None when none is used.

    With callbacks enabled, ``used_event`` follows ``last_used_idx`` (virtio_store_mb): "if
    we expect an interrupt for the next entry, tell the host".
    """
    if not more_used_split(vq):
        return None
    ring = vq.ring
    # virtio_rmb: used elements are read only after the index that exposed them.
    last_used_idx = vq.last_used_idx
    slot = last_used_idx & (ring.num - 1)
    head = ring.used_id[slot]
    length = ring.used_len[slot]
    data = vq.data[head]
    if data is None:
        raise RuntimeError(f"{vq.name}: id {head} is not a head (BAD_RING)")
    detach_buf_split(vq, head)
    vq.last_used_idx = last_used_idx = (last_used_idx + 1) & U16
    if not vq.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
        ring.used_event = last_used_idx
    return data, length


def virtqueue_disable_cb(vq: VringVirtqueue) -> None:
    """virtio_ring.c: virtqueue_disable_cb_split — ask the device not to interrupt.

    A hint only: with event idx nothing is written (the device keeps its view of
    ``used_event``); without, ``VRING_AVAIL_F_NO_INTERRUPT`` goes to ``avail->flags``.
    """
    if not vq.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
        vq.avail_flags_shadow |= VRING_AVAIL_F_NO_INTERRUPT
        if not vq.event:
            vq.ring.avail_flags = vq.avail_flags_shadow


def _enable_interrupt_flag(vq: VringVirtqueue) -> None:
    """The enable paths' first step (virtqueue_enable_cb_prepare_split and
    virtqueue_enable_cb_delayed_split alike): clear ``VRING_AVAIL_F_NO_INTERRUPT`` in the
    shadow, and in ``avail->flags`` without event idx."""
    if vq.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
        vq.avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT
        if not vq.event:
            vq.ring.avail_flags = vq.avail_flags_shadow


def enable_cb_prepare_load(vq: VringVirtqueue) -> int:
    """virtio_ring.c: virtqueue_enable_cb_prepare_split up to the load of ``last_used_idx``
    → the index to poll against.

    The prepare clears the flag (written without event idx) and always points
    ``used_event`` at ``last_used_idx``: "interrupt me for the next used buffer".  Its load
    of ``last_used_idx`` and its store of ``used_event`` are two steps (this and
    :func:`enable_cb_prepare_store`), so that a caller can let another CPU run between
    them (W-GUEST-enable-cb).
    """
    _enable_interrupt_flag(vq)
    return vq.last_used_idx


def enable_cb_prepare_store(vq: VringVirtqueue, last_used_idx: int) -> int:
    """virtqueue_enable_cb_prepare_split from the store on: ``used_event`` = the index
    loaded before (which another CPU's consumption may have overtaken since)."""
    vq.ring.used_event = last_used_idx
    return last_used_idx


def virtqueue_poll(vq: VringVirtqueue, last_used_idx: int) -> bool:
    """virtio_ring.c: virtqueue_poll — virtio_mb, then: did the device use more since?

    The barrier orders the ``used_event``/flags store of the prepare before this load of
    ``used->idx`` (the guest half of the store-buffering pair of spec §16.9).
    """
    return (last_used_idx & U16) != vq.ring.used_idx


def virtqueue_enable_cb_delayed(vq: VringVirtqueue) -> bool:
    """virtio_ring.c: virtqueue_enable_cb_delayed_split — re-enable, but ask for the
    interrupt only after 3/4 of the outstanding buffers are used; False if that many
    already are (store + full barrier, then the re-check)."""
    _enable_interrupt_flag(vq)
    bufs = ((vq.avail_idx_shadow - vq.last_used_idx) & U16) * 3 // 4
    vq.ring.used_event = (vq.last_used_idx + bufs) & U16  # virtio_store_mb
    return ((vq.ring.used_idx - vq.last_used_idx) & U16) <= bufs


def vring_interrupt(vq: VringVirtqueue) -> int:
    """virtio_ring.c: vring_interrupt — the MSI-X vector's handler  [guest hardirq]

    IRQ_NONE when nothing was used (a spurious interrupt), else run the callback.
    """
    if not more_used_split(vq):
        return IRQ_NONE
    if vq.callback is not None:
        vq.callback(vq)
    return IRQ_HANDLED
