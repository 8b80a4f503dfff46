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
    assert set(summary["queues"]) == {"e"}  # per signalled (call) eventfd
    assert summary["queues"]["e"]["latency_ns"]["count"] == 1
    # The log stays in seq order: each vkick_irq comes right after its delivery.
    seqs = [r["seq"] for r in seen]
    assert seqs == sorted(seqs)


def test_invariant_checker_reports_lost_spurious_and_after_deassign_with_traces() -> None:
    from vkick.obs.invariants import InvariantChecker  # noqa: PLC0415

    clock = VirtualClock()
    bus = EventBus(clock)
    checker = InvariantChecker(stall_ns=1_000)
    life = attach(bus, checker)

    def at(t: int, ev: str, **f: Any) -> None:
        clock.ns = t
        bus.emit(ev, **f)

    at(0, "eventfd_signal", efd="e", n=1, count=1, irq=1)
    at(10, "irqfd_wakeup", vm="vm0", gsi=1, efd="e", irq=[1], r=1)
    at(20, "irqfd_deassign", vm="vm0", gsi=1, efd="e")
    at(30, "eventfd_signal", efd="e", n=1, count=1, irq=2)
    at(40, "irqfd_wakeup", vm="vm0", gsi=1, efd="e", irq=[2], r=1)  # after deassign: a violation
    at(50, "vkick_guest_irq", vm="vm0", vcpu=0, vector=0x41, irq=[])  # spurious
    at(5_000, "vkick_guest_irq", vm="vm0", vcpu=0, vector=0x41, irq=[1])  # late
    life.finish()  # irq 2 never delivered: lost
    found = {v.invariant: v for v in checker.violations}
    assert set(found) == {"17.15 no delivery after deassign", "17.2 no spurious delivery",
                          "17.1 no lost interrupt (bound)", "17.1 no lost interrupt"}
    lost = found["17.1 no lost interrupt"]
    assert lost.irq == 2 and [r["ev"] for r in lost.trace][:2] == ["eventfd_signal",
                                                                   "irqfd_wakeup"]


def test_default_run_has_no_violations() -> None:
    """The default configuration, APICv on and off, over a few seeds: no violation."""
    import tomllib  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from vkick.testing import run_config  # noqa: PLC0415

    # A signal posted into PIR while its vector is pending in IRR, and one landing between
    # injection and VM entry, both once left a delivery without its source here.
    configs = Path(__file__).resolve().parent.parent / "configs"
    for name in ("default", "no-apicv"):
        cfg = tomllib.loads((configs / f"{name}.toml").read_text())
        for seed in range(4):
            result = run_config(cfg, seed=seed)
            assert [v.detail for v in result.violations] == [], (name, seed)
