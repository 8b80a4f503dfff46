"""drivers/net/virtio_net.c (v5.13): the guest's virtio-net driver — RX refill and NAPI
receive, TX with napi_tx completion handling, per-queue MSI-X interrupts.

One queue pair per vhost-net device queue; the RX and TX virtqueues of pair ``i`` have their
own MSI-X vectors, both affine to one vCPU (virtnet_set_affinity), whose NAPI instances live
on that vCPU's softnet data, and whose transmitting application runs there too (XPS).  CPU
time is charged to that vCPU (``GuestCpu.charge``) from the costs in :class:`VirtnetCosts`.

v5.13 is the 5.12.9 form of the TX path (checked against the v5.13-era hinlin tree):
``start_xmit`` frees old buffers and, with napi_tx, re-enables the TX callback *delayed*;
``virtnet_poll_tx`` frees and then ``virtqueue_napi_complete``s; the 5.14 "disable cb
aggressively" loop is not there.  Mergeable RX buffers of ``rx_buf_len`` bytes, carved from
the queue's page fragment; a packet longer than one buffer takes ``num_buffers`` of them.
When an atomic refill runs out of memory (only by fault injection: ``vi.fail_page_alloc``)
the refill delayed work (``refill_work``) refills every queue from the CPU that scheduled
it: it stops each queue's NAPI (napi_disable), refills, and re-enables and schedules NAPI
there — so a queue's poll may run on another vCPU than its interrupt's.  Left out: XDP,
GSO, the control vq, big/small buffer modes.

Re-enabling a queue's interrupt loads ``last_used_idx`` and then stores ``used_event``;
W-GUEST-enable-cb lies between the two.  v5.13 does it while NAPI is still scheduled
(SCHED: the implicit NAPI lock), so nobody else can take buffers there.  Toggle
``bug-guest-enable-cb-outside-napi`` (research/bugs.md #15, fixed by cbdadbbf0c79 in
v3.11) restores the pre-3.11 order — napi_complete first, then the re-enable — in which
another CPU can poll the queue inside the window and store a newer ``used_event``: a
refill_work that takes SCHED there, or, when the poll in the window is a refill_work's, the
queue's own vCPU scheduled by its interrupt.  The window's end then moves ``used_event``
backwards, the device's next notifications all miss it and the queue stalls (spec §17.17).
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from vkick.guest.cpu import GuestCpu, run_on
from vkick.guest.napi import (
    NapiStruct,
    SoftnetData,
    __napi_schedule,
    local_bh_enable,
    napi_complete_done,
    napi_disable,
    napi_enable,
    napi_schedule_prep,
)
from vkick.guest.page_alloc import GFP_ATOMIC, GFP_KERNEL, FailPageAlloc
from vkick.guest.sock import PageFrag, skb_page_frag_refill
from vkick.guest.timer import HZ, msleep
from vkick.guest.virtio_ring import (
    VringVirtqueue,
    enable_cb_prepare_load,
    enable_cb_prepare_store,
    more_used_split,
    virtqueue_add_inbuf,
    virtqueue_add_outbuf,
    virtqueue_disable_cb,
    virtqueue_enable_cb_delayed,
    virtqueue_get_buf,
    virtqueue_kick_prepare,
    virtqueue_notify,
    virtqueue_poll,
    vring_interrupt,
)
from vkick.guest.workqueue import DelayedWork, schedule_delayed_work
from vkick.kernel.skbuff import SkBuff

MAX_SKB_FRAGS: Final = 17  # 65536 / PAGE_SIZE + 1
TX_QUEUE_LEN: Final = 1000  # the qdisc limit (dev->tx_queue_len)
VNET_HDR_LEN: Final = 12  # struct virtio_net_hdr_mrg_rxbuf
NET_XMIT_SUCCESS: Final = 0
NET_XMIT_DROP: Final = 1
# research/bugs.md #15: the RX re-enable after napi_complete (fixed by cbdadbbf0c79, v3.11).
ENABLE_CB_OUTSIDE_NAPI_TOGGLE: Final = "bug-guest-enable-cb-outside-napi"


@dataclass(slots=True)
class VirtnetCosts:
    """Guest CPU time, in emulated ns, of the driver's work (vkick-only)."""

    napi_poll_ns: int = 300  # fixed cost of one NAPI poll
    rx_packet_ns: int = 400  # receive one packet (driver + stack)
    tx_packet_ns: int = 600  # start_xmit one packet
    tx_reclaim_ns: int = 50  # free one transmitted buffer
    refill_ns: int = 50  # add one receive buffer


@dataclass(slots=True, eq=False)
class ReceiveQueue:
    """drivers/net/virtio_net.c: struct receive_queue."""

    vq: VringVirtqueue
    napi: NapiStruct
    index: int
    guest: Any  # the GuestCpu of the vCPU this queue is affine to
    vi: VirtnetInfo
    packets: int = 0
    bytes: int = 0
    kicks: int = 0
    polls: int = 0
    buf_seq: int = 0  # receive buffer tokens
    alloc_frag: PageFrag = field(default_factory=PageFrag)  # rq->alloc_frag
    oom: int = 0  # atomic refills that ran out of memory


@dataclass(slots=True, eq=False)
class SendQueue:
    """drivers/net/virtio_net.c: struct send_queue (+ its netdev TX queue's stopped state
    and the qdisc backlog in front of it)."""

    vq: VringVirtqueue
    napi: NapiStruct
    index: int
    guest: Any
    vi: VirtnetInfo
    stopped: bool = False  # __QUEUE_STATE_DRV_XOFF
    backlog: deque[SkBuff] = field(default_factory=deque)  # the qdisc (pfifo_fast)
    packets: int = 0  # completed (freed) transmissions
    bytes: int = 0
    kicks: int = 0
    sent: int = 0  # handed to the ring
    dropped: int = 0


@dataclass(slots=True, eq=False)
class VirtnetInfo:
    """drivers/net/virtio_net.c: struct virtnet_info.

    ``on_receive(rq, skb)`` is the guest stack above the driver (napi_gro_receive → the
    application); ``on_complete(sq, skb)`` sees each freed TX packet.  ``toggles``: the
    VM's bug toggles; ``fail_page_alloc``: the guest's page-allocation fault injection
    (Differs from the kernel: per device — vkick has no guest-wide memory manager).
    """

    name: str
    vm: str
    costs: VirtnetCosts
    rx_buf_len: int = 1536
    napi_tx: bool = True
    napi_weight: int = 64  # napi_weight module parameter (NAPI_POLL_WEIGHT)
    rq: list[ReceiveQueue] = field(default_factory=list)
    sq: list[SendQueue] = field(default_factory=list)
    on_receive: Callable[[ReceiveQueue, SkBuff], None] | None = None
    on_complete: Callable[[SendQueue, SkBuff], None] | None = None
    bus: Any = None  # the run's event bus
    toggles: frozenset[str] = frozenset()
    fail_page_alloc: FailPageAlloc | None = None
    refill: DelayedWork = field(init=False)  # vi->refill

    def __post_init__(self) -> None:
        self.refill = DelayedWork(refill_work, self)


# ------------------------------------------------------------------------ NAPI glue


def virtqueue_napi_schedule(napi: NapiStruct, vq: VringVirtqueue, sd: SoftnetData) -> None:
    """drivers/net/virtio_net.c: virtqueue_napi_schedule — mask the vq, schedule NAPI on
    this CPU (``sd``: the softnet data of the CPU running the caller)."""
    if napi_schedule_prep(napi):
        virtqueue_disable_cb(vq)
        __napi_schedule(napi, sd)


def virtqueue_napi_complete(napi: NapiStruct, vq: VringVirtqueue, processed: int) -> None:
    """drivers/net/virtio_net.c: virtqueue_napi_complete — re-enable the vq's interrupt,
    complete NAPI, and poll again if the device used more meanwhile (spec §16.9: the
    prepare writes ``used_event``, virtqueue_poll's full barrier precedes the re-read).

    The prepare runs while this poll still owns SCHED (cbdadbbf0c79): in W-GUEST-enable-cb
    no other CPU can take the vq's buffers — its napi_disable waits, its interrupt only
    sets MISSED — so the ``used_event`` stored is the newest.
    """
    _enable_cb_window(napi, vq, _napi_complete_rest, processed)


def _napi_complete_rest(napi: NapiStruct, vq: VringVirtqueue, processed: int, opaque: int,
                        sd: SoftnetData) -> None:
    """virtqueue_napi_complete after the store of ``used_event`` (``sd``: this CPU's)."""
    if napi_complete_done(napi, processed):
        if virtqueue_poll(vq, opaque):
            virtqueue_napi_schedule(napi, vq, sd)
    else:
        virtqueue_disable_cb(vq)


_EnableCbRest = Callable[[NapiStruct, VringVirtqueue, int, int, SoftnetData], None]


def _enable_cb_window(napi: NapiStruct, vq: VringVirtqueue, then: _EnableCbRest,
                      processed: int) -> None:
    """vkick: the re-enable of a queue's callbacks split at W-GUEST-enable-cb — load
    ``last_used_idx`` (the prepare's first half), the window, then on the CPU running the
    poll store ``used_event`` and go on with ``then(napi, vq, processed, last_used_idx,
    sd)`` (``sd``: that CPU's softnet data, read before the window: another CPU may list
    the instance meanwhile)."""
    sd = napi.sd  # this CPU's: the poll runs where its poll list is
    last_used_idx = enable_cb_prepare_load(vq)
    guest = sd.guest
    if not guest.rt.preempt_enabled:
        # preempt_then would not split (policy none): go on at once, with no closures.
        _enable_cb_store(napi, vq, then, processed, last_used_idx, sd)
        return

    def rest() -> None:
        _enable_cb_store(napi, vq, then, processed, last_used_idx, sd)

    # W-GUEST-enable-cb: last_used_idx loaded ↔ used_event stored.  v5.13 (SCHED held):
    # the device may publish more used buffers; the re-check after the store sees them.
    # Before 3.11 (SCHED clear, bug #15): a refill_work on another CPU may napi_disable,
    # refill, poll the vq and store a newer used_event here; so may a poll on the queue's
    # own vCPU, scheduled by its interrupt, when this poll is the refill_work's.
    if not guest.preempt_then("W-GUEST-enable-cb", lambda vcpu: run_on(
            napi.owner.guest, vcpu.guest, rest)):
        rest()


def _enable_cb_store(napi: NapiStruct, vq: VringVirtqueue, then: _EnableCbRest,  # noqa: PLR0917
                     processed: int, last_used_idx: int, sd: SoftnetData) -> None:
    """The far side of W-GUEST-enable-cb: store ``used_event`` (flagging one that lags,
    bug #15) and go on with ``then``."""
    _check_used_event(vq, last_used_idx)
    enable_cb_prepare_store(vq, last_used_idx)
    then(napi, vq, processed, last_used_idx, sd)


def _check_used_event(vq: VringVirtqueue, used_event: int) -> None:
    """vkick: the ``used_event`` about to be stored lags the vq's ``last_used_idx`` — another
    CPU took buffers since it was loaded, so the event index moves backwards (bug #15)."""
    if used_event == vq.last_used_idx:
        return
    owner = vq.owner
    bus = owner.vi.bus if owner is not None else None
    if bus is not None and bus.on:
        bus.emit("vkick_used_event_stale", vm=owner.vi.vm, dev=owner.vi.name, vq=vq.name,
                 used_event=used_event, last_used_idx=vq.last_used_idx)


def virtnet_poll_complete_pre_3_11(napi: NapiStruct, vq: VringVirtqueue,
                                   processed: int) -> None:
    """drivers/net/virtio_net.c: virtnet_poll's completion before cbdadbbf0c79 (v3.11)
    [guest softirq]  (toggle ``bug-guest-enable-cb-outside-napi``, research/bugs.md #15)

    napi_complete first — SCHED is clear, anyone may schedule or disable the instance —
    then v3.10's virtqueue_enable_cb: clear the flag, load ``last_used_idx``, store
    ``used_event``, virtio_mb, and poll again if more_used, which re-reads the *current*
    ``last_used_idx``.  A refill_work on another CPU that takes SCHED in W-GUEST-enable-cb
    and polls the vq stores a newer ``used_event`` that this store then moves backwards;
    more_used, seeing that CPU's ``last_used_idx``, finds nothing to do: the interrupt for
    the next buffer is never sent.
    Differs from the kernel: 3.10's ``goto again`` (poll once more inside this call) is
    v5.13's reschedule; napi_complete is v5.13's napi_complete_done (MISSED: stays
    scheduled, callbacks stay off).
    """
    if napi_complete_done(napi, processed):
        _enable_cb_window(napi, vq, _enable_cb_pre_3_11_rest, processed)


def _enable_cb_pre_3_11_rest(napi: NapiStruct, vq: VringVirtqueue, processed: int,
                             last_used_idx: int, sd: SoftnetData) -> None:
    """v3.10 virtqueue_enable_cb after the store, and virtnet_poll's reschedule on this
    CPU (``sd``)."""
    # virtio_mb; more_used: the vq's last_used_idx now, not the one loaded above.
    if more_used_split(vq):
        virtqueue_napi_schedule(napi, vq, sd)


def skb_recv_done(rvq: VringVirtqueue) -> None:
    """drivers/net/virtio_net.c: skb_recv_done — the RX vq's callback  [guest hardirq]"""
    rq: ReceiveQueue = rvq.owner
    # The vector is affine to rq.guest's vCPU (its handler is registered only there).
    virtqueue_napi_schedule(rq.napi, rvq, rq.guest.softnet)


def skb_xmit_done(vq: VringVirtqueue) -> None:
    """drivers/net/virtio_net.c: skb_xmit_done — the TX vq's callback  [guest hardirq]

    Suppress further TX interrupts; with napi_tx schedule the TX NAPI, else wake the queue.
    """
    sq: SendQueue = vq.owner
    virtqueue_disable_cb(vq)
    if sq.napi.weight:
        virtqueue_napi_schedule(sq.napi, vq, sq.guest.softnet)
    else:
        netif_tx_wake_queue(sq)


# ------------------------------------------------------------------------ receive


def add_recvbuf_mergeable(vi: VirtnetInfo, rq: ReceiveQueue, gfp: int = GFP_KERNEL) -> int:
    """drivers/net/virtio_net.c: add_recvbuf_mergeable — post one receive buffer carved
    from the queue's page fragment: 0, -ENOMEM (no page), or -ENOSPC (ring full).

    Differs from the kernel: the buffer length is ``rx_buf_len`` (no EWMA sizing, no XDP
    headroom, the page's tail hole is not added to the last buffer).
    """
    length = vi.rx_buf_len
    frag = rq.alloc_frag
    if not skb_page_frag_refill(length, frag, gfp, vi.fail_page_alloc):
        return -errno.ENOMEM
    rq.buf_seq += 1
    err = virtqueue_add_inbuf(rq.vq, rq.buf_seq, length)
    if not err:
        frag.offset += length
        rq.guest.charge(vi.costs.refill_ns)
    return err


def try_fill_recv(vi: VirtnetInfo, rq: ReceiveQueue, gfp: int = GFP_KERNEL) -> bool:
    """drivers/net/virtio_net.c: try_fill_recv — fill the RX ring, then kick if the device
    asked for it.  False if a buffer could not be allocated (out of memory)."""
    oom = False
    while True:
        err = add_recvbuf_mergeable(vi, rq, gfp)
        oom = err == -errno.ENOMEM
        if err:
            break
        if not rq.vq.num_free:
            break
    if virtqueue_kick_prepare(rq.vq) and virtqueue_notify(rq.vq):
        rq.kicks += 1
    return not oom


def refill_work(work: DelayedWork, vcpu: Any) -> None:
    """drivers/net/virtio_net.c: refill_work — refill every queue pair's RX ring after an
    atomic refill ran out of memory  [guest process: kworker]

    For each queue: napi_disable (wait until no poll runs, and keep new ones off), fill
    with GFP_KERNEL, virtnet_napi_enable — which schedules the queue's NAPI on *this* CPU
    and runs it at local_bh_enable.  A queue left empty tries again in HZ/2.
    Differs from the kernel: each queue is one guest step, the next one queued behind the
    CPU's other work (the kworker thread continues after the softirq it ran).
    """
    _refill_queue(work.owner, 0, vcpu)


def _refill_queue(vi: VirtnetInfo, i: int, vcpu: Any) -> None:
    """refill_work's loop body for queue ``i``, then its continuation for ``i + 1``."""
    cpu: GuestCpu = vcpu.guest
    rq = vi.rq[i]
    got = napi_disable(rq.napi)
    bus = vi.bus
    if bus is not None and bus.on:
        bus.emit("refill_work", vm=vi.vm, dev=vi.name, vq=rq.vq.name, vcpu=vcpu.vcpu_id,
                 busy=not got)
    if not got:  # a poll holds SCHED: msleep(1) and try again
        msleep(cpu, 1, lambda v: _refill_queue(vi, i, v))
        return
    still_empty = not run_on(rq.guest, cpu, lambda: try_fill_recv(vi, rq, GFP_KERNEL))
    virtnet_napi_enable(rq.vq, rq.napi, vcpu)
    if still_empty:
        schedule_delayed_work(vi.refill, HZ // 2, cpu)
    if i + 1 < len(vi.rq):
        cpu.push("call", lambda v: _refill_queue(vi, i + 1, v))


def receive_buf(vi: VirtnetInfo, rq: ReceiveQueue, data: Any, length: int) -> None:
    """drivers/net/virtio_net.c: receive_buf → receive_mergeable → napi_gro_receive.

    The device wrote the packet into the first buffer (``desc.addr``) with num_buffers; the
    rest of its buffers are taken here too.
    """
    skb, num_buffers = data
    if num_buffers > 1:
        for _ in range(num_buffers - 1):
            if virtqueue_get_buf(rq.vq) is None:
                break
    rq.packets += 1
    rq.bytes += skb.len
    rq.guest.charge(vi.costs.rx_packet_ns)
    if vi.on_receive is not None:
        vi.on_receive(rq, skb)


def virtnet_receive(rq: ReceiveQueue, budget: int) -> int:
    """drivers/net/virtio_net.c: virtnet_receive → packets received (≤ budget).

    Take used buffers until the budget; refill once more than half the ring is free.
    """
    vi = rq.vi
    vq = rq.vq
    ring = vq.ring
    desc_addr = ring.desc_addr
    used_id = ring.used_id
    num = ring.num
    mask = num - 1
    packets = 0
    while packets < budget:
        # virtqueue_get_buf, reading what the device wrote into the buffer first (vkick: a
        # buffer's content is its descriptor's ``addr``, at the used head).
        last_used_idx = vq.last_used_idx
        if last_used_idx == ring.used_idx:
            break
        content = desc_addr[used_id[last_used_idx & mask]]
        got = virtqueue_get_buf(vq)
        assert got is not None
        receive_buf(vi, rq, content, got[1])
        packets += 1
    if vq.num_free > (budget if budget < num else num) // 2 and not try_fill_recv(
            vi, rq, GFP_ATOMIC):
        rq.oom += 1
        schedule_delayed_work(vi.refill, 0, rq.guest.this_cpu())
    return packets


def virtnet_poll(napi: NapiStruct, budget: int) -> int:
    """drivers/net/virtio_net.c: virtnet_poll — the RX NAPI poll  [guest softirq]

    Reclaim this pair's TX buffers, receive up to ``budget``, and complete (re-enabling the
    RX interrupt) when the ring ran dry before the budget.  The poll runs on the CPU whose
    poll list held the instance (``napi.sd``), its queue's vCPU or a refill_work's.
    """
    rq: ReceiveQueue = napi.owner
    cpu = napi.sd.guest
    guest = rq.guest
    if cpu is not guest and guest.running_on is not cpu:
        return run_on(guest, cpu, lambda: virtnet_poll(napi, budget))
    rq.polls += 1
    vi = rq.vi
    virtnet_poll_cleantx(rq)
    guest.charge(vi.costs.napi_poll_ns)
    received = virtnet_receive(rq, budget)
    vq = rq.vq
    if received < budget:
        if ENABLE_CB_OUTSIDE_NAPI_TOGGLE in vi.toggles:
            virtnet_poll_complete_pre_3_11(napi, vq, received)
        else:
            virtqueue_napi_complete(napi, vq, received)
    bus = vi.bus
    if bus is not None and bus.on:
        bus.emit("virtnet_poll", vm=vi.vm, dev=vi.name, vq=vq.name, pkts=received,
                 last_used_idx=vq.last_used_idx, complete=received < budget)
    return received


# ------------------------------------------------------------------------ transmit


def free_old_xmit_skbs(sq: SendQueue, in_napi: bool) -> int:
    """drivers/net/virtio_net.c: free_old_xmit_skbs — take every used TX buffer."""
    vi = sq.vi
    vq = sq.vq
    on_complete = vi.on_complete
    packets = 0
    while (got := virtqueue_get_buf(vq)) is not None:
        skb: SkBuff = got[0]
        packets += 1
        sq.bytes += skb.len
        if on_complete is not None:
            on_complete(sq, skb)
    if packets:
        sq.packets += packets
        sq.guest.charge(packets * vi.costs.tx_reclaim_ns)
    return packets


def virtnet_poll_cleantx(rq: ReceiveQueue) -> None:
    """drivers/net/virtio_net.c: virtnet_poll_cleantx — with napi_tx, the RX poll frees its
    pair's TX buffers too (under __netif_tx_trylock, which always succeeds here: guest
    steps are atomic, so no other CPU is inside start_xmit)."""
    sq = rq.vi.sq[rq.index]
    if not sq.napi.weight:
        return
    free_old_xmit_skbs(sq, True)
    if sq.vq.num_free >= 2 + MAX_SKB_FRAGS:
        netif_tx_wake_queue(sq)


def virtnet_poll_tx(napi: NapiStruct, budget: int) -> int:
    """drivers/net/virtio_net.c: virtnet_poll_tx — the TX NAPI poll: free, complete,
    wake the queue; always reports 0 work (TX completions never use the budget)."""
    sq: SendQueue = napi.owner
    free_old_xmit_skbs(sq, True)
    sq.guest.charge(sq.vi.costs.napi_poll_ns)
    virtqueue_napi_complete(napi, sq.vq, 0)
    if sq.vq.num_free >= 2 + MAX_SKB_FRAGS:
        netif_tx_wake_queue(sq)
    return 0


def xmit_skb(sq: SendQueue, skb: SkBuff) -> int:
    """drivers/net/virtio_net.c: xmit_skb — the packet (header pushed in front: one
    descriptor with VIRTIO_F_ANY_LAYOUT) goes on the TX ring."""
    return virtqueue_add_outbuf(sq.vq, skb, skb.len + VNET_HDR_LEN)


def start_xmit(skb: SkBuff, sq: SendQueue, xmit_more: bool) -> int:
    """drivers/net/virtio_net.c: start_xmit  [guest, BH disabled]

    Free what the device finished, re-arm the delayed TX interrupt (napi_tx), add the
    packet, stop the queue when fewer than 2 + MAX_SKB_FRAGS slots are left, and kick
    unless more packets follow (``xmit_more``) — or the queue just stopped.
    """
    vi = sq.vi
    kick = not xmit_more
    use_napi = bool(sq.napi.weight)
    free_old_xmit_skbs(sq, False)
    if use_napi and kick:
        virtqueue_enable_cb_delayed(sq.vq)
    sq.guest.charge(vi.costs.tx_packet_ns)
    if xmit_skb(sq, skb):
        sq.dropped += 1  # tx_fifo_errors, tx_dropped: "this should not happen"
        return NET_XMIT_DROP
    sq.sent += 1
    if sq.vq.num_free < 2 + MAX_SKB_FRAGS:
        sq.stopped = True  # netif_stop_subqueue
        if not use_napi and not virtqueue_enable_cb_delayed(sq.vq):
            free_old_xmit_skbs(sq, False)
            if sq.vq.num_free >= 2 + MAX_SKB_FRAGS:
                sq.stopped = False  # netif_start_subqueue
                virtqueue_disable_cb(sq.vq)
    if (kick or sq.stopped) and virtqueue_kick_prepare(sq.vq) and virtqueue_notify(sq.vq):
        sq.kicks += 1
    return NET_XMIT_SUCCESS


def netif_tx_wake_queue(sq: SendQueue) -> None:
    """include/linux/netdevice.h: netif_tx_wake_queue — restart a stopped queue and run
    its qdisc (__netif_schedule; vkick runs qdisc_run right away)."""
    if sq.stopped:
        sq.stopped = False
        qdisc_run(sq)


def dev_queue_xmit(sq: SendQueue, skb: SkBuff) -> int:
    """net/core/dev.c: dev_queue_xmit → __dev_xmit_skb: enqueue on the qdisc (drop when
    full) and run it unless the queue is stopped."""
    if len(sq.backlog) >= TX_QUEUE_LEN:
        sq.dropped += 1
        return NET_XMIT_DROP
    sq.backlog.append(skb)
    if not sq.stopped:
        qdisc_run(sq)
    return NET_XMIT_SUCCESS


def qdisc_run(sq: SendQueue) -> None:
    """net/sched/sch_generic.c: __qdisc_run → sch_direct_xmit — dequeue while the queue runs;
    every packet but the last of the burst goes with xmit_more (one kick per burst)."""
    backlog = sq.backlog
    while backlog and not sq.stopped:
        skb = backlog.popleft()
        start_xmit(skb, sq, xmit_more=bool(backlog))


# ------------------------------------------------------------------------ setup


def virtnet_napi_enable(vq: VringVirtqueue, napi: NapiStruct, vcpu: Any) -> None:
    """drivers/net/virtio_net.c: virtnet_napi_enable — enable, then schedule once on this
    CPU (``vcpu``'s) with BHs off: buffers the device filled before NAPI was enabled raise
    no interrupt."""
    napi_enable(napi)
    virtqueue_napi_schedule(napi, vq, vcpu.guest.softnet)
    local_bh_enable(vcpu)


def virtnet_open(vi: VirtnetInfo, vcpus: list[Any]) -> None:
    """drivers/net/virtio_net.c: virtnet_open — fill every RX ring, enable the NAPIs (the
    TX one only with napi_tx)  [guest process, on each queue's vCPU]."""
    for i, rq in enumerate(vi.rq):
        if not try_fill_recv(vi, rq, GFP_KERNEL):  # out of memory: let the work refill
            schedule_delayed_work(vi.refill, 0, vcpus[i].guest)
        virtnet_napi_enable(rq.vq, rq.napi, vcpus[i])
        sq = vi.sq[i]
        if sq.napi.weight:
            virtnet_napi_enable(sq.vq, sq.napi, vcpus[i])


def make_queue_pair(vi: VirtnetInfo, index: int, rx: VringVirtqueue, tx: VringVirtqueue, *,
                    sd: SoftnetData, guest: Any) -> None:
    """vkick: one queue pair's share of drivers/net/virtio_net.c: virtnet_alloc_queues
    (the queues and their NAPI instances, netif_napi_add) and virtnet_find_vqs (the vq
    callbacks) — vkick's own builder, called per pair by vkick/scenario/build.py."""
    rq_napi = NapiStruct(virtnet_poll, sd, weight=vi.napi_weight, name=f"{vi.name}.rx{index}")
    sq_napi = NapiStruct(virtnet_poll_tx, sd, weight=vi.napi_weight if vi.napi_tx else 0,
                         name=f"{vi.name}.tx{index}")
    rq = ReceiveQueue(rx, rq_napi, index, guest, vi)
    sq = SendQueue(tx, sq_napi, index, guest, vi)
    rq_napi.owner = rq
    sq_napi.owner = sq
    rx.owner, rx.callback = rq, skb_recv_done
    tx.owner, tx.callback = sq, skb_xmit_done
    # netif_napi_add leaves SCHED set until napi_enable.
    rq_napi.sched = sq_napi.sched = True
    vi.rq.append(rq)
    vi.sq.append(sq)


def vp_interrupt_handler(vq: VringVirtqueue) -> Callable[[Any], None]:
    """vkick: the guest handler of a per-vq MSI-X vector — drivers/virtio/virtio_pci_common.c:
    vp_find_vqs_msix requests such a vector with vring_interrupt itself (vp_vring_interrupt,
    which walks every vq, is the shared vector's handler)."""

    def handler(vcpu: Any) -> None:
        vring_interrupt(vq)

    return handler
