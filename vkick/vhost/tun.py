"""drivers/net/tun.c: the tap device's queue file, as vhost-net's backend socket.

One :class:`TunFile` per queue of a multiqueue tap.  Packets from the host stack to the
guest (``tun_net_xmit``) wait in the file's ptr_ring until vhost-net's ``handle_rx`` takes
them; a full ring drops (``tx_dropped``).  Adding a packet wakes the socket's wait queue,
where vhost-net's RX poll sits (``vhost_poll_wakeup`` → ``handle_rx_net``).  Packets the
guest sends (``tun_sendmsg`` from ``handle_tx``) go to the host stack: ``on_host_rx``.

Covered: tun_net_xmit, tun_chr_poll, tun_recvmsg (ring consume), tun_sendmsg,
tun_peek_len (vhost_net_buf_peek's view of the ring head).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from vkick.kernel.eventfd import PollQueueProc
from vkick.kernel.sched import TASK_INTERRUPTIBLE
from vkick.kernel.skbuff import SkBuff
from vkick.kernel.wait import (
    EPOLLIN,
    EPOLLOUT,
    EPOLLPRI,
    WaitQueueHead,
    __wake_up,
    waitqueue_active,
)
from vkick.runtime.tasks import Runtime

TUN_READQ_SIZE: Final = 500  # the ptr_ring size (dev->tx_queue_len)
NETDEV_TX_OK: Final = 0
EPOLLRDNORM: Final = 0x040
EPOLLRDBAND: Final = 0x080
EPOLLWRNORM: Final = 0x100
_READABLE_KEY: Final = EPOLLIN | EPOLLPRI | EPOLLRDNORM | EPOLLRDBAND  # sock_def_readable's


@dataclass(slots=True, eq=False)
class TunFile:
    """drivers/net/tun.c: struct tun_file — tx_ring (host → guest packets) and the socket's
    wait queue (``sk_sleep``).  ``vm``/``dev``/``vq`` name it in events."""

    rt: Runtime
    vm: str
    dev: str
    vq: str
    ring_size: int = TUN_READQ_SIZE
    tx_ring: deque[SkBuff] = field(default_factory=deque)
    wq: WaitQueueHead = field(default_factory=WaitQueueHead)
    tx_dropped: int = 0
    on_host_rx: Callable[[SkBuff], None] | None = None

    def f_op_poll(self, queue_proc: PollQueueProc | None) -> int:
        return tun_chr_poll(self, queue_proc)

    def __repr__(self) -> str:
        return f"<tun_file {self.vm}/{self.dev}/{self.vq} ring={len(self.tx_ring)}>"


def tun_net_xmit(tfile: TunFile, skb: SkBuff) -> int:
    """drivers/net/tun.c: tun_net_xmit — the host stack sends a packet to the guest
    [softirq / process on the host]

    Produce into the ptr_ring (full: drop, ``tx_dropped``), then ``sk_data_ready``
    (sock_def_readable: wake the socket's wait queue with EPOLLIN, synchronously).
    """
    tx_ring = tfile.tx_ring
    if len(tx_ring) >= tfile.ring_size:
        tfile.tx_dropped += 1
        bus = tfile.rt.bus
        if bus.on:
            bus.emit("vkick_tun_drop", vm=tfile.vm, dev=tfile.dev, vq=tfile.vq)
        return NETDEV_TX_OK
    tx_ring.append(skb)
    wq = tfile.wq
    if waitqueue_active(wq):
        __wake_up(wq, TASK_INTERRUPTIBLE, 1, _READABLE_KEY)
    return NETDEV_TX_OK


def tun_chr_poll(tfile: TunFile, queue_proc: PollQueueProc | None) -> int:
    """drivers/net/tun.c: tun_chr_poll — join the socket's wait queue (poll_wait), report
    readable when the ring holds a packet; a tap is always writable."""
    if queue_proc is not None:
        queue_proc(tfile.wq)
    mask = EPOLLOUT | EPOLLWRNORM
    if tfile.tx_ring:
        mask |= EPOLLIN | EPOLLRDNORM
    return mask


def tun_peek_len(tfile: TunFile) -> int:
    """drivers/vhost/net.c: vhost_net_rx_peek_head_len's answer for a tap — the length of
    the packet at the ring's head, 0 when empty."""
    tx_ring = tfile.tx_ring
    return tx_ring[0].len if tx_ring else 0


def tun_recvmsg(tfile: TunFile) -> SkBuff | None:
    """drivers/net/tun.c: tun_recvmsg → tun_do_read — consume the ring's head packet."""
    tx_ring = tfile.tx_ring
    return tx_ring.popleft() if tx_ring else None


def tun_sendmsg(tfile: TunFile, skb: SkBuff) -> int:
    """drivers/net/tun.c: tun_sendmsg → tun_get_user → netif_rx: a guest packet reaches the
    host stack.  Returns the length sent."""
    if tfile.on_host_rx is not None:
        tfile.on_host_rx(skb)
    return skb.len
