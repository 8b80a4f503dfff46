"""drivers/vhost/net.c: the TX handler, in the shape spec §4.5 gives for vkick.

``handle_tx``: disable guest kicks, consume available descriptors up to the weight, add them
to the used ring in batches of ≤ VHOST_NET_BATCH with one ``vhost_signal`` per batch,
re-enable kicks when the ring is empty and look again if buffers slipped in; requeue
itself when the weight is exceeded (``vhost_exceeds_weight``).
"""

from __future__ import annotations

from typing import Final

from vkick.vhost.vhost import (
    VhostVirtqueue,
    vhost_add_used_n,
    vhost_disable_notify,
    vhost_enable_notify,
    vhost_get_vq_desc,
    vhost_signal,
)
from vkick.vhost.worker import VhostDev, VhostWork, vhost_work_queue

VHOST_NET_BATCH: Final = 64
VHOST_NET_WEIGHT: Final = 0x80000
VHOST_NET_PKT_WEIGHT: Final = 256


def vhost_exceeds_weight(dev: VhostDev, work: VhostWork, pkts: int, total_len: int) -> bool:
    """drivers/vhost/vhost.c: vhost_exceeds_weight — requeue ourselves for fairness."""
    if pkts >= VHOST_NET_PKT_WEIGHT or total_len >= VHOST_NET_WEIGHT:
        vhost_work_queue(dev, work)
        return True
    return False


def handle_tx(dev: VhostDev, vq: VhostVirtqueue, work: VhostWork) -> int:
    """drivers/vhost/net.c: handle_tx → handle_tx_copy  [process: vhost worker]

    Returns the packets sent this round.
    """
    vhost_disable_notify(vq)
    pkts = total = 0
    batch: list[tuple[int, int]] = []
    ring = vq.ring
    while True:
        if len(batch) == VHOST_NET_BATCH:
            vhost_add_used_n(vq, batch)
            vhost_signal(vq)
            batch = []
        head = vhost_get_vq_desc(vq)
        if head == ring.num:  # empty
            if vhost_enable_notify(vq):
                vhost_disable_notify(vq)
                continue
            break
        length = ring.desc[head].len
        batch.append((head, 0))
        pkts += 1
        total += length
        if vhost_exceeds_weight(dev, work, pkts, total):
            break
    if batch:
        vhost_add_used_n(vq, batch)
        vhost_signal(vq)
    bus = dev.rt.bus
    if bus.on:
        bus.emit("vhost_handle_kick", dev=dev.name, vq=vq.name, pkts=pkts, bytes=total)
    return pkts
