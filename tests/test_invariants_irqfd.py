"""The oracle's irqfd-lifecycle checks (vkick/obs/invariants.py) on hand-made event
streams: shared eventfds (bug #13), signals with no irqfd attached, use after free (#12),
eventfd underflow (#14), and §17.15 per VM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vkick.obs.invariants import InvariantChecker
from vkick.obs.irqlife import IrqLife, attach
from vkick.runtime.clock import VirtualClock
from vkick.runtime.events import EventBus

Emit = Callable[..., None]


def _checker(stall_ns: int = 1_000) -> tuple[InvariantChecker, IrqLife, Emit]:
    clock = VirtualClock()
    bus = EventBus(clock)
    checker = InvariantChecker(stall_ns=stall_ns)
    life = attach(bus, checker)

    def at(t: int, ev: str, **f: Any) -> None:
        clock.ns = t
        bus.emit(ev, **f)

    return checker, life, at


def _assign(at: Emit, t: int, vm: str, efd: str = "e") -> None:
    at(t, "irqfd_assign", vm=vm, gsi=1, efd=efd, pending=False, resample=False)


def _take(at: Emit, t: int, vm: str, *irqs: int) -> None:
    at(t, "vkick_guest_irq", vm=vm, vcpu=0, vector=0x41, irq=list(irqs))


def test_invariant_checker_owes_a_shared_eventfd_signal_to_every_attached_vm() -> None:
    """Two VMs' irqfds on one eventfd: each signal must reach both; the VM that never
    takes one is reported once per stall window, with the VM it shares with (§17.1,
    bug #13)."""
    checker, life, at = _checker()
    _assign(at, 0, "src")
    _assign(at, 5, "dst")
    at(10, "eventfd_signal", efd="e", n=1, count=1, irq=1)
    _take(at, 20, "src", 1)
    at(30, "eventfd_signal", efd="e", n=1, count=1, irq=2)
    _take(at, 40, "src", 2)
    _take(at, 45, "dst", 2)  # (as if dst had been called for this one)
    at(3_000, "eventfd_signal", efd="e", n=1, count=1, irq=3)  # irq 1 to dst is stale
    _take(at, 3_010, "src", 3)
    _take(at, 3_020, "dst", 3)
    life.finish()
    checker.finish(4_000)
    [v] = checker.violations
    assert v.invariant == "17.1 no lost interrupt (shared eventfd)" and v.irq == 1
    assert "1 signal(s) of e from t=10 ns" in v.detail and "shared with src" in v.detail
    assert v.detail.endswith("never reached dst")


def test_invariant_checker_does_not_owe_signals_of_an_unbound_eventfd() -> None:
    """A signal after the eventfd's only irqfd was shut down is owed to nobody (§17.1's
    precondition) — unless an irqfd binds the eventfd again, whose poll must inject it."""
    checker, life, at = _checker()
    _assign(at, 0, "vm0")
    at(10, "irqfd_shutdown", vm="vm0", gsi=1, efd="e")
    at(20, "eventfd_signal", efd="e", n=1, count=1, irq=1)
    at(30, "eventfd_signal", efd="f", n=1, count=1, irq=2)  # never seen bound: owed
    at(40, "irqfd_shutdown", vm="vm0", gsi=1, efd="g")
    at(50, "eventfd_signal", efd="g", n=1, count=1, irq=3)
    _assign(at, 60, "vm0", efd="g")  # bound again: irq 3 was pending at assignment
    life.finish()
    assert sorted(v.irq for v in checker.violations) == [2, 3]
    assert {v.invariant for v in checker.violations} == {"17.1 no lost interrupt"}


def test_invariant_checker_reports_use_after_free_once_per_site_and_underflow() -> None:
    """vkick_use_after_free is a violation (one per freed object and access site);
    vkick_eventfd_underflow is one too (bugs #12, #14)."""
    checker, _, at = _checker()
    for t in (10, 20):
        at(t, "vkick_use_after_free", vm="vm0", what="irqfd vm0/gsi1/e",
           where="irqfd_wakeup")
    at(30, "vkick_use_after_free", vm="vm0", what="irqfd vm0/gsi1/e", where="irqfd_inject")
    at(40, "vkick_eventfd_underflow", efd="e", cnt=1, count=(1 << 64) - 1)
    assert [v.invariant for v in checker.violations] == [
        "memory safety: no use after free", "memory safety: no use after free",
        "eventfd count never underflows"]
    assert "irqfd_wakeup touched freed irqfd vm0/gsi1/e at t=10" in checker.violations[0].detail


def test_invariant_checker_no_delivery_after_deassign_is_per_vm_and_eventfd() -> None:
    """§17.15 is about the deassigned irqfd: another VM's, or another eventfd's, irqfd on
    the same GSI may go on injecting; the deassigned one's irqfd_inject may not."""
    checker, _, at = _checker()
    at(0, "irqfd_deassign", vm="vm1", gsi=1, efd="e")
    at(10, "irqfd_wakeup", vm="vm2", gsi=1, efd="e", irq=[], r=1)
    at(20, "irqfd_wakeup", vm="vm1", gsi=1, efd="f", irq=[], r=1)
    at(30, "irqfd_inject", vm="vm1", gsi=1, efd="e", irq=[])
    [v] = checker.violations
    assert v.invariant == "17.15 no delivery after deassign" and "(irqfd_inject)" in v.detail


def test_invariant_checker_as_a_plain_sink_finds_what_its_handlers_find() -> None:
    """The checker called as a sink (``checker(rec)``, every record) reaches the same
    violations and traces as through the bus's routing to its handlers; its handlers
    cover exactly what it wants."""
    clock = VirtualClock()
    bus = EventBus(clock)
    routed, plain = InvariantChecker(stall_ns=1_000), InvariantChecker(stall_ns=1_000)

    def every(rec: dict[str, Any]) -> None:  # no wants, no handlers: every record, whole
        plain(rec)

    life = attach(bus, routed, every)

    def at(t: int, ev: str, **f: Any) -> None:
        clock.ns = t
        bus.emit(ev, **f)

    at(0, "irqfd_assign", vm="vm0", gsi=1, efd="e", pending=False, resample=False)
    at(1, "eventfd_signal", efd="e", n=1, count=1, irq=1)
    at(2, "irqfd_wakeup", vm="vm0", gsi=1, efd="e", irq=[1], r=1)
    at(3, "irqfd_deassign", vm="vm0", gsi=1, efd="e")
    at(4, "eventfd_signal", efd="e", n=1, count=1, irq=2)
    at(5, "irqfd_wakeup", vm="vm0", gsi=1, efd="e", irq=[2], r=1)  # after its deassign
    at(6, "kvm_apic_accept_irq", vm="vm0", vcpu=0, dm=0, tm=0, vector=0x41, irq=2,
       path="posted", coalesced=False)
    _take(at, 7, "vm0", 2)
    _take(at, 9_000, "vm0", 1)  # late
    _take(at, 9_001, "vm0")  # spurious
    life.finish()
    assert set(routed.handlers) == routed.wants
    assert [v.to_json() for v in plain.violations] == [v.to_json() for v in routed.violations]
    # The 17.15 violation's trace is the interrupt's, up to its delivery.
    after = next(v for v in routed.violations if v.invariant.startswith("17.15"))
    assert [r["ev"] for r in after.trace] == [
        "eventfd_signal", "irqfd_wakeup", "kvm_apic_accept_irq", "vkick_guest_irq", "vkick_irq"]
    assert {v.invariant for v in routed.violations} == {
        "17.15 no delivery after deassign", "17.1 no lost interrupt (bound)",
        "17.2 no spurious delivery"}
