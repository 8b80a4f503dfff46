"""drivers/virtio/virtio_ring.c (split ring, guest side): adding buffers, the kick decision,
reclaiming used buffers and re-enabling callbacks with event idx (spec §4.11, §16.9)."""

from __future__ import annotations

from dataclasses import dataclass

from vkick.vhost.vring import U16, VRING_USED_F_NO_NOTIFY, Vring, vring_need_event


@dataclass(slots=True, eq=False)
class Virtqueue:
    """The driver's view of one split virtqueue."""

    ring: Vring
    event_idx: bool = True
    free_head: int = 0
    num_added: int = 0
    last_used_idx: int = 0
    completed: int = 0


def virtqueue_add(vq: Virtqueue, length: int) -> int:
    """virtio_ring.c: virtqueue_add_split — one descriptor, published in the avail ring."""
    ring = vq.ring
    head = vq.free_head
    vq.free_head = (head + 1) % ring.num
    ring.desc[head].len = length
    ring.avail_ring[(ring.avail_idx + vq.num_added) % ring.num] = head
    vq.num_added += 1
    return head


def virtqueue_kick_prepare(vq: Virtqueue) -> bool:
    """virtio_ring.c: virtqueue_kick_prepare_split — publish the avail index, full barrier,
    then kick iff the device asked for it (avail_event / VRING_USED_F_NO_NOTIFY)."""
    ring = vq.ring
    old = ring.avail_idx
    new = ring.avail_idx = (old + vq.num_added) & U16
    vq.num_added = 0
    # virtio_mb: the index store is visible before avail_event / flags are read.
    if vq.event_idx:
        return vring_need_event(ring.avail_event, new, old)
    return not ring.used_flags & VRING_USED_F_NO_NOTIFY


def virtqueue_reclaim(vq: Virtqueue) -> int:
    """virtqueue_get_buf in a loop: take every used buffer; returns how many."""
    ring = vq.ring
    n = (ring.used_idx - vq.last_used_idx) & U16
    vq.last_used_idx = ring.used_idx
    vq.completed += n
    return n


def virtqueue_enable_cb(vq: Virtqueue) -> bool:
    """virtio_ring.c: virtqueue_enable_cb — write used_event = last_used_idx, full barrier,
    and report whether the device already added more (False: poll again).  Spec §16.9."""
    vq.ring.used_event = vq.last_used_idx
    return vq.ring.used_idx == vq.last_used_idx
