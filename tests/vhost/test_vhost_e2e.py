"""The whole path: guest TX → doorbell → ioeventfd → vhost poll → vhost worker → handle_tx →
used ring → vhost_signal → eventfd → irqfd → LAPIC / posted interrupt → guest handler."""

from __future__ import annotations

from typing import Any

import pytest

from vkick.guest.virtio_ring import (
    Virtqueue,
    virtqueue_add,
    virtqueue_enable_cb,
    virtqueue_kick_prepare,
    virtqueue_reclaim,
)
from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create
from vkick.kvm.eventfd import KvmIoeventfd, ioeventfd_write, kvm_irqfd_assign
from vkick.kvm.irqchip import MsiRoute, kvm_set_irq_routing_sync
from vkick.obs.invariants import InvariantChecker
from vkick.obs.irqlife import attach
from vkick.obs.stats import RunStats
from vkick.runtime.sched import PreemptPolicy
from vkick.runtime.tasks import Runtime
from vkick.scenario.runner import build_vm, start_vcpus
from vkick.vhost.net import handle_tx
from vkick.vhost.vhost import VhostVirtqueue
from vkick.vhost.vring import VIRTIO_RING_F_EVENT_IDX, Vring
from vkick.vhost.worker import VhostDev, vhost_dev_start, vhost_poll_init, vhost_poll_start

DOORBELL = 0x1000


def run_tx(apicv: bool, event_idx: bool, packets: int, seed: int = 0,
           policy: PreemptPolicy | None = None) -> tuple[Virtqueue, dict[str, Any], list[Any]]:
    rt = Runtime(seed=seed, policy=policy)
    stats, checker = RunStats(), InvariantChecker()
    life = attach(rt.bus, stats, checker)
    ring = Vring(256)
    gvq = Virtqueue(ring, event_idx=event_idx)

    async def main() -> None:
        kvm = await build_vm(rt, nr_vcpus=1, apicv=apicv, x2apic=False, eoi_auto=True,
                       handler_ns=300)
        vcpu = kvm.vcpus[0]
        await kvm_set_irq_routing_sync(kvm, [MsiRoute(1, 0xFEE00000, 0x41)])
        call = eventfd_ctx_create(rt, name="net0.tx.call")
        kick = eventfd_ctx_create(rt, name="net0.tx.kick")
        assert isinstance(call, EventfdCtx) and isinstance(kick, EventfdCtx)
        await kvm_irqfd_assign(kvm, call, 1)
        ioeventfd = KvmIoeventfd(DOORBELL, kick)
        kvm.io_bus = lambda _vcpu, addr, val: ioeventfd_write(ioeventfd, addr, 4, val)
        features = (1 << VIRTIO_RING_F_EVENT_IDX) if event_idx else 0
        hvq = VhostVirtqueue(ring, acked_features=features, call_ctx=call, name="tx0")
        dev = VhostDev(rt, "net0")
        poll = vhost_poll_init(dev, lambda work: handle_tx(dev, hvq, work), hvq)
        vhost_dev_start(dev)
        vhost_poll_start(poll, kick)

        def tx_interrupt(_vcpu: Any) -> None:
            # vring_interrupt → NAPI (inline here): reclaim, re-enable, re-check.
            virtqueue_reclaim(gvq)
            while not virtqueue_enable_cb(gvq):
                virtqueue_reclaim(gvq)

        vcpu.guest.handlers[0x41] = tx_interrupt

        def xmit(_vcpu: Any) -> None:
            virtqueue_add(gvq, 1500)
            if virtqueue_kick_prepare(gvq):
                vcpu.guest.actions.appendleft(("mmio", DOORBELL, 0))

        start_vcpus(rt, kvm)
        await rt.wait_quiescent()
        for _ in range(packets):
            vcpu.guest.push("call", xmit)
            await rt.sleep_ns(3_000)
        await rt.sleep_ns(100_000)
        await rt.wait_quiescent()

    rt.run(main)
    life.finish()
    return gvq, stats.to_json(), checker.violations


@pytest.mark.parametrize("apicv", [True, False])
@pytest.mark.parametrize("event_idx", [True, False])
def test_tx_completions_reach_the_guest_through_vhost_signal(apicv: bool,
                                                             event_idx: bool) -> None:
    gvq, summary, violations = run_tx(apicv, event_idx, packets=50)
    assert gvq.completed == 50  # every buffer used and reclaimed by the guest
    assert violations == []
    assert summary["delivered"] > 0 and summary["undelivered"] == 0
    assert summary["sources"] == {"signal": summary["signalled"]}


def test_tx_path_keeps_its_invariants_under_random_preemption() -> None:
    for seed in range(20):
        gvq, _, violations = run_tx(True, True, packets=20, seed=seed,
                                    policy=PreemptPolicy.random(max_delay_ns=1_000))
        assert gvq.completed == 20 and violations == [], seed
