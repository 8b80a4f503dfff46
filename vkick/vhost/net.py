"""drivers/vhost/net.c: vhost-net — one device per virtio-net queue pair (one vhost-net fd,
one worker kthread), moving packets between the guest's rings and a tap queue.

TX (``handle_tx`` → ``handle_tx_copy``): disable guest kicks, take available buffers up to
the weight, send each to the tap (``sock_can_batch``: packets are batched and handed over at
``vhost_tx_batch``), add the heads to the used ring in batches of ``VHOST_NET_BATCH`` with one
``vhost_signal`` per batch, re-enable kicks when the ring is empty and look again if buffers
slipped in (spec §4.5).  RX (``handle_rx``): while the tap holds a packet, take enough guest
buffers for it (``get_rx_bufs``), copy it in, signal used buffers past the batch size; with
no guest buffers, re-enable kicks and wait for the guest's refill kick; with the tap empty,
re-arm the socket poll (``vhost_net_enable_vq``).

Time: copying a packet costs ``tx_packet_ns`` / ``rx_packet_ns`` of the worker's CPU time;
it is spent before the batch's used entries are published (and TX packets reach the tap).
Differs from the kernel: no busy polling (``busyloop_timeout`` 0, the default), no zerocopy,
the TX socket-writable poll is never armed (a tap never returns EAGAIN here).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Final

from vkick.kernel.skbuff import SkBuff
from vkick.vhost.tun import TunFile, tun_peek_len, tun_recvmsg, tun_sendmsg
from vkick.vhost.vhost import (
    VhostVirtqueue,
    vhost_add_used_and_signal_n,
    vhost_disable_notify,
    vhost_discard_vq_desc,
    vhost_enable_notify,
    vhost_exceeds_weight,
    vhost_get_vq_desc,
)
from vkick.vhost.worker import (
    VhostDev,
    VhostPoll,
    VhostWork,
    vhost_poll_init,
    vhost_poll_start,
    vhost_poll_stop,
)

VHOST_NET_BATCH: Final = 64
VHOST_NET_VQ_RX: Final = 0
VHOST_NET_VQ_TX: Final = 1
VNET_HDR_LEN: Final = 12  # sock_hlen: the tap passes struct virtio_net_hdr_mrg_rxbuf
UIO_MAXIOV: Final = 1024


@dataclass(slots=True, eq=False)
class VhostNetVirtqueue:
    """drivers/vhost/net.c: struct vhost_net_virtqueue (``heads``: the used elements not
    yet added — the kernel's ``vq->heads[0 .. done_idx)``, so ``done_idx`` is
    ``len(heads)``; ``pending_ns`` and ``batch`` are vkick's copy time and the TX packets
    built into the current batch)."""

    vq: VhostVirtqueue
    heads: list[tuple[int, int]] = field(default_factory=list)
    pending_ns: int = 0
    batch: list[SkBuff] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class VhostNet:
    """drivers/vhost/net.c: struct vhost_net — the device, its RX and TX queues, the socket
    polls and the backend (a tap queue)."""

    dev: VhostDev
    vqs: list[VhostNetVirtqueue]
    poll: list[VhostPoll] = field(default_factory=list)  # socket polls (RX: readable)
    sock: TunFile | None = None
    rx_packet_ns: int = 400
    tx_packet_ns: int = 300

    def __repr__(self) -> str:
        return f"<vhost_net {self.dev.name} rx={self.vqs[0].vq!r} tx={self.vqs[1].vq!r}>"


def vhost_net_open(dev: VhostDev, rx: VhostVirtqueue, tx: VhostVirtqueue) -> VhostNet:
    """drivers/vhost/net.c: vhost_net_open — the device with its two queues; each queue's
    kick poll runs its handler (handle_rx_kick / handle_tx_kick), the RX socket poll runs
    handle_rx_net."""
    net = VhostNet(dev, [VhostNetVirtqueue(rx), VhostNetVirtqueue(tx)])
    for q in (rx, tx):
        q.dev = dev
    rx.poll = vhost_poll_init(dev, handle_rx_kick, net)
    tx.poll = vhost_poll_init(dev, handle_tx_kick, net)
    net.poll = [vhost_poll_init(dev, handle_rx_net, net)]
    return net


def vhost_net_set_backend(net: VhostNet, sock: TunFile) -> None:
    """drivers/vhost/net.c: vhost_net_set_backend (VHOST_NET_SET_BACKEND) — attach the tap
    queue and start polling it for RX."""
    net.sock = sock
    vhost_net_enable_vq(net, net.vqs[VHOST_NET_VQ_RX].vq)


def vhost_net_enable_vq(net: VhostNet, vq: VhostVirtqueue) -> int:
    """drivers/vhost/net.c: vhost_net_enable_vq — poll the socket for this queue (RX only
    here): a packet already waiting queues handle_rx_net at once."""
    if net.sock is None or vq is not net.vqs[VHOST_NET_VQ_RX].vq:
        return 0
    return vhost_poll_start(net.poll[VHOST_NET_VQ_RX], net.sock)


def vhost_net_disable_vq(net: VhostNet, vq: VhostVirtqueue) -> None:
    """drivers/vhost/net.c: vhost_net_disable_vq — stop polling the socket for it."""
    if vq is net.vqs[VHOST_NET_VQ_RX].vq:
        vhost_poll_stop(net.poll[VHOST_NET_VQ_RX])


def _copy_time(nvq: VhostNetVirtqueue) -> Awaitable[None] | None:
    """The worker's copy time for what it did since the last flush, as a sleep to await
    (vkick-only), or None when there is none.  A plain function: no coroutine per flush."""
    ns = nvq.pending_ns
    if not ns:
        return None
    nvq.pending_ns = 0
    dev = nvq.vq.dev
    assert dev is not None
    return dev.rt.sleep_ns(ns)


async def vhost_net_signal_used(nvq: VhostNetVirtqueue) -> None:
    """drivers/vhost/net.c: vhost_net_signal_used — add the done heads, signal once.

    First the worker's copy time for what it did since the last flush (vkick-only)."""
    heads = nvq.heads
    if not heads:
        return
    copy = _copy_time(nvq)
    if copy is not None:
        await copy
    # vhost_add_used_n reads the heads before its first await (vhost_signal's); only this
    # worker adds to them, after this returns.
    await vhost_add_used_and_signal_n(nvq.vq, heads)
    heads.clear()


async def vhost_tx_batch(net: VhostNet, nvq: VhostNetVirtqueue) -> None:
    """drivers/vhost/net.c: vhost_tx_batch — hand the batched packets to the tap, then
    signal their used heads (the copy time passes first, as in vhost_net_signal_used)."""
    copy = _copy_time(nvq)
    if copy is not None:
        await copy
    sock = net.sock
    batch = nvq.batch
    if batch and sock is not None:
        for skb in batch:
            tun_sendmsg(sock, skb)
        batch.clear()
    await vhost_net_signal_used(nvq)


async def handle_tx(net: VhostNet) -> None:
    """drivers/vhost/net.c: handle_tx → handle_tx_copy  [process: vhost worker, vq->mutex]"""
    nvq = net.vqs[VHOST_NET_VQ_TX]
    vq = nvq.vq
    if net.sock is None:
        return
    vhost_disable_notify(vq)
    vhost_net_disable_vq(net, vq)
    ring = vq.ring
    desc_addr = ring.desc_addr
    desc_len = ring.desc_len
    num = ring.num
    heads = nvq.heads  # cleared in place by each flush
    batch = nvq.batch
    tx_packet_ns = net.tx_packet_ns
    sent_pkts = 0
    total_len = 0
    while True:
        if len(heads) == VHOST_NET_BATCH:  # done_idx
            await vhost_tx_batch(net, nvq)
        head = vhost_get_vq_desc(vq)
        if head == num:  # nothing new: wait for the guest's kick
            if vhost_enable_notify(vq):
                vhost_disable_notify(vq)
                continue
            break
        length = desc_len[head] - VNET_HDR_LEN
        total_len += length
        skb = desc_addr[head]
        if isinstance(skb, SkBuff):
            batch.append(skb)
        nvq.pending_ns += tx_packet_ns
        heads.append((head, 0))  # vq->heads[done_idx++]
        sent_pkts += 1
        if vhost_exceeds_weight(vq, sent_pkts, total_len):
            break
    await vhost_tx_batch(net, nvq)
    bus = net.dev.rt.bus
    if bus.on:
        bus.emit("handle_tx", vm=vq.vm, dev=vq.devname, vq=vq.name, pkts=sent_pkts,
                 bytes=total_len, used_idx=vq.last_used_idx)


def get_rx_bufs(vq: VhostVirtqueue, heads: list[tuple[int, int]], datalen: int) -> int:
    """drivers/vhost/net.c: get_rx_bufs → the number of heads taken for ``datalen`` bytes,
    appended to ``heads``; 0 (and nothing taken) when the guest has not posted enough
    buffers."""
    ring = vq.ring
    desc_len = ring.desc_len
    num = ring.num
    done = len(heads)
    limit = done + UIO_MAXIOV
    while datalen > 0 and len(heads) < limit:
        d = vhost_get_vq_desc(vq)
        if d == num:
            vhost_discard_vq_desc(vq, len(heads) - done)
            del heads[done:]
            return 0
        length = desc_len[d]
        heads.append((d, length if length < datalen else datalen))
        datalen -= length
    return len(heads) - done


async def handle_rx(net: VhostNet) -> None:
    """drivers/vhost/net.c: handle_rx  [process: vhost worker, vq->mutex held]"""
    nvq = net.vqs[VHOST_NET_VQ_RX]
    vq = nvq.vq
    sock = net.sock
    if sock is None:
        return
    vhost_disable_notify(vq)
    vhost_net_disable_vq(net, vq)
    desc_addr = vq.ring.desc_addr
    heads = nvq.heads  # cleared in place by each flush
    rx_packet_ns = net.rx_packet_ns
    recv_pkts = 0
    total_len = 0
    sock_len = 0
    out = False
    while True:
        sock_len = tun_peek_len(sock)
        if not sock_len:
            break
        vhost_len = sock_len + VNET_HDR_LEN
        done_idx = len(heads)
        headcount = get_rx_bufs(vq, heads, vhost_len)  # at vq->heads + done_idx
        if not headcount:
            if vhost_enable_notify(vq):
                # They slipped one in as we were doing that: check again.
                vhost_disable_notify(vq)
                continue
            out = True  # nothing new: wait for the guest's refill kick
            break
        skb = tun_recvmsg(sock)
        assert skb is not None
        desc_addr[heads[done_idx][0]] = (skb, headcount)  # the packet, num_buffers
        if headcount > 1:
            for i in range(done_idx + 1, done_idx + headcount):
                desc_addr[heads[i][0]] = None
        nvq.pending_ns += rx_packet_ns
        if len(heads) > VHOST_NET_BATCH:  # done_idx += headcount
            await vhost_net_signal_used(nvq)
        total_len += vhost_len
        recv_pkts += 1
        if vhost_exceeds_weight(vq, recv_pkts, total_len):
            break
    if not out and not sock_len:
        vhost_net_enable_vq(net, vq)
    await vhost_net_signal_used(nvq)
    bus = net.dev.rt.bus
    if bus.on:
        bus.emit("handle_rx", vm=vq.vm, dev=vq.devname, vq=vq.name, pkts=recv_pkts,
                 bytes=total_len, used_idx=vq.last_used_idx)


def handle_tx_kick(work: VhostWork) -> object:
    """drivers/vhost/net.c: handle_tx_kick — the TX queue's kick work."""
    return handle_tx(work.owner)


def handle_rx_kick(work: VhostWork) -> object:
    """drivers/vhost/net.c: handle_rx_kick — the RX queue's kick work (buffers refilled)."""
    return handle_rx(work.owner)


def handle_rx_net(work: VhostWork) -> object:
    """drivers/vhost/net.c: handle_rx_net — the socket became readable."""
    return handle_rx(work.owner)
