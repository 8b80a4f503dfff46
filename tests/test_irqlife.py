"""The per-interrupt lifecycle record and the statistics built on it."""

from __future__ import annotations

from typing import Any

from vkick.obs.irqlife import attach
from vkick.obs.stats import RunStats
from vkick.obs.tracepoints import validate
from vkick.runtime.clock import VirtualClock
from vkick.runtime.events import EventBus


def test_irqlife_follows_sources_to_deliveries_and_reports_the_undelivered() -> None:
    clock = VirtualClock()
    bus = EventBus(clock)
    stats = RunStats()
    seen: list[dict[str, Any]] = []
    life = attach(bus, stats, lambda r: seen.append(dict(r)))

    def at(t: int, ev: str, **f: Any) -> None:
        clock.ns = t
        bus.emit(ev, **f)

    at(100, "eventfd_signal", efd="e", n=1, count=1, irq=1)
    at(150, "kvm_apic_accept_irq", vm="vm0", vcpu=0, dm=0, tm=0, vector=0x41, irq=1,
       path="wakeup", coalesced=False)
    at(200, "kvm_msi_set_irq", vm="vm0", address=0xFEEFF000, data=0x42, irq=2)  # broadcast
    for v in (0, 1):
        at(210, "kvm_apic_accept_irq", vm="vm0", vcpu=v, dm=0, tm=0, vector=0x42, irq=2,
           path="irr_kick", coalesced=False)
    at(300, "eventfd_signal", efd="e", n=1, count=1, irq=3)  # never delivered
    at(400, "vkick_guest_irq", vm="vm0", vcpu=0, vector=0x42, irq=[2])
    at(450, "vkick_guest_irq", vm="vm0", vcpu=1, vector=0x42, irq=[2])
    at(500, "vkick_guest_irq", vm="vm0", vcpu=0, vector=0x41, irq=[1])
    life.finish()
    irqs = [r for r in seen if r["ev"] == "vkick_irq"]
    assert all(validate(r) == [] for r in irqs)
    assert [(r["irq"], r["vcpu"], r["first"], r["delivered"]) for r in irqs] == [
        (2, 0, True, True), (2, 1, False, True), (1, 0, True, True), (3, -1, True, False)]
    assert irqs[2]["latency_ns"] == 400 and irqs[2]["path"] == "wakeup"
    summary = stats.to_json()
    assert (summary["signalled"], summary["delivered"], summary["undelivered"]) == (3, 3, 1)
    assert summary["paths"] == {"irr_kick": 2, "wakeup": 1}
    assert summary["sources"] == {"msi": 1, "signal": 2}
    # The log stays in seq order: each vkick_irq comes right after its delivery.
    seqs = [r["seq"] for r in seen]
    assert seqs == sorted(seqs)
