"""Traffic generators: when packets are born, how big they are, and who sends them.

Arrival processes (constant rate, Poisson, on/off bursts) draw from their own RNG stream,
named after the queue and direction, so adding a workload never shifts another's draws.

* ``rx``: a host task hands packets to the queue's tap (``tun_net_xmit``), as the host
  stack would — vhost-net's socket poll takes it from there.
* ``tx``: a host task stands for the guest application's clock: at each arrival it queues
  a send on the queue's vCPU (``dev_queue_xmit`` in guest code).  An idle (halted) vCPU is
  handed the send with a PV kick.  Differs from a real guest: no guest timer interrupt
  wakes the application (vkick does not model the LAPIC timer).
* ``rr``: closed loop — the guest sends a request, the host answers ``think_ns`` after it
  reached the tap, the guest sends the next request when the answer arrives; one
  ``vkick_rr`` event per exchange carries its round-trip time.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from vkick.guest.virtio_net import ReceiveQueue, dev_queue_xmit
from vkick.kernel.skbuff import SkBuff
from vkick.runtime.clock import NS_PER_S
from vkick.vhost.tun import tun_net_xmit

if TYPE_CHECKING:
    from vkick.runtime.tasks import Runtime
    from vkick.scenario.build import QueuePair
    from vkick.scenario.config import WorkloadConfig


def arrival_gaps(w: WorkloadConfig, rng: random.Random) -> Iterator[int]:
    """Inter-arrival gaps in ns (≥ 1) for the workload's pattern."""
    mean_ns = NS_PER_S / w.rate_pps
    if w.pattern == "constant":
        gap = max(1, round(mean_ns))
        while True:
            yield gap
    elif w.pattern == "poisson":
        expovariate = rng.expovariate
        while True:
            gap = round(expovariate(1.0) * mean_ns)
            yield gap if gap > 1 else 1
    else:  # burst: constant rate while on, nothing while off
        gap = max(1, round(mean_ns))
        period = w.burst_on + w.burst_off
        t = 0
        while True:
            nxt = t + gap
            if nxt % period >= w.burst_on:  # falls in an off phase: next on phase starts
                nxt = (nxt // period + 1) * period
            yield nxt - t
            t = nxt


def packet_size(w: WorkloadConfig, rng: random.Random) -> int:
    """A packet length: fixed, or uniform in [size, size_max]."""
    if w.size_max is None or w.size_max == w.size:
        return w.size
    return rng.randint(w.size, w.size_max)


async def _arrivals(rt: Runtime, qp: QueuePair, w: WorkloadConfig, t_end: int,
                    *, direction: str, send: Callable[[SkBuff], object]) -> None:
    """``send`` a packet at each arrival of ``w`` on ``qp`` until ``t_end`` (the draws come
    from the queue's and direction's own stream)."""
    rng = rt.rng.stream(f"workload.{qp.vm}.{qp.net}.q{qp.index}.{direction}")
    now_ns = rt.now_ns
    sleep_ns = rt.sleep_ns
    fixed = w.size if w.size_max is None or w.size_max == w.size else 0  # no size draws
    if w.start:
        await sleep_ns(w.start)
    for gap in arrival_gaps(w, rng):
        if now_ns() + gap >= t_end:
            return
        await sleep_ns(gap)
        send(SkBuff(fixed or packet_size(w, rng), now_ns()))


async def rx_generator(rt: Runtime, qp: QueuePair, w: WorkloadConfig, t_end: int) -> None:
    """The host stack sends to the guest through the queue's tap until ``t_end``."""
    await _arrivals(rt, qp, w, t_end, direction="rx",
                    send=functools.partial(tun_net_xmit, qp.tap))


async def tx_generator(rt: Runtime, qp: QueuePair, w: WorkloadConfig, t_end: int) -> None:
    """The guest application sends on the queue until ``t_end``."""
    sq = qp.txq
    guest = qp.vcpu.guest

    def send(skb: SkBuff) -> None:
        guest.push("call", lambda _vcpu: dev_queue_xmit(sq, skb))

    await _arrivals(rt, qp, w, t_end, direction="tx", send=send)


class RrFlow:
    """One request/response workload on one queue: the guest is the client."""

    __slots__ = ("guest", "qp", "rng", "rt", "rx_vq", "sent", "seq", "t_end", "w")

    def __init__(self, rt: Runtime, qp: QueuePair, w: WorkloadConfig, t_end: int) -> None:
        self.rt = rt
        self.qp = qp
        self.w = w
        self.t_end = t_end
        self.rng = rt.rng.stream(f"workload.{qp.vm}.{qp.net}.q{qp.index}.rr")
        self.guest = qp.vcpu.guest
        self.sent: dict[int, int] = {}  # seq → request time
        self.seq = 0
        self.rx_vq = f"rx{qp.index}"  # the answers' queue, named in vkick_rr events

    def start(self) -> None:
        for _ in range(self.w.outstanding):
            self.guest.push("call", self.send)

    def send(self, _vcpu: Any) -> None:
        """Guest code: send the next request (process context on the queue's vCPU)."""
        now = self.rt.now_ns()
        if now >= self.t_end:
            return
        self.seq += 1
        self.sent[self.seq] = now
        dev_queue_xmit(self.qp.txq, SkBuff(packet_size(self.w, self.rng), now, (self, self.seq)))

    def on_request(self, skb: SkBuff) -> None:
        """Host side: the request reached the tap; answer after ``think_ns``."""
        rt = self.rt
        answer = SkBuff(self.w.response_size, rt.now_ns(), skb.tag)
        tap = self.qp.tap
        if self.w.think_ns:
            rt.call_at_ns(rt.now_ns() + self.w.think_ns, tun_net_xmit, tap, answer)
        else:
            tun_net_xmit(tap, answer)

    def on_response(self, rq: ReceiveQueue, skb: SkBuff) -> None:
        """Guest stack: the answer arrived; record the round trip, send the next one."""
        t0 = self.sent.pop(skb.tag[1], None)
        if t0 is None:
            return
        rt = self.rt
        bus = rt.bus
        if bus.on:
            qp = self.qp
            bus.emit("vkick_rr", vm=qp.vm, vcpu=qp.vcpu.vcpu_id, dev=qp.net,
                     vq=self.rx_vq, rtt_ns=rt.now_ns() - t0)
        self.guest.push("call", self.send)


def on_host_rx(skb: SkBuff) -> None:
    """The host stack's end of a tap: requests are answered, other packets consumed."""
    tag = skb.tag
    if tag is not None:
        tag[0].on_request(skb)


def on_guest_rx(rq: ReceiveQueue, skb: SkBuff) -> None:
    """The guest stack above virtio-net: answers go to their flow, the rest is consumed."""
    tag = skb.tag
    if tag is not None:
        tag[0].on_response(rq, skb)
