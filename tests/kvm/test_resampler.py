"""Unit tests of the irqfd resampler (virt/kvm/eventfd.c, spec §8.3, §8.5, §8.8, §8.9):
assignment, the shared per-GSI resampler, the ack notifier, teardown ordering, and the
v5.13 EOI-exit-bitmap bug that hides level EOIs from the IOAPIC under APICv."""

from __future__ import annotations

import errno
import functools
from typing import Any

import pytest
from helpers import ioapic as _ioapic
from helpers import lapic, vm_between_ioctls
from helpers import new_eventfd as _efd
from helpers import program_rte as _program

from vkick.kernel.eventfd import EventfdCtx, eventfd_signal
from vkick.kvm.eventfd import (
    KVM_IRQFD_FLAG_RESAMPLE,
    KvmIrqAckNotifier,
    irqfd_resampler_ack,
    kvm_irq_has_notifier,
    kvm_irqfd_assign,
    kvm_irqfd_deassign,
    kvm_notify_acked_irq,
    kvm_register_irq_ack_notifier,
    kvm_unregister_irq_ack_notifier,
)
from vkick.kvm.irqchip import IrqchipRoute, MsiRoute, kvm_set_irq_routing
from vkick.kvm.kvm_host import (
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID,
    KVM_REQ_SCAN_IOAPIC,
    Kvm,
)
from vkick.kvm.kvm_main import kvm_test_request
from vkick.runtime.sched import PreemptPolicy
from vkick.runtime.tasks import Runtime
from vkick.scenario.runner import build_vm, start_vcpus
from vkick.testing import call_settled, capture_events

LEVEL = 1 << 15
FIX = frozenset({"fix-eoi-exitmap-uninitialized"})



_vm = functools.partial(vm_between_ioctls, n=1, irqchip="kernel")



def _level_pin(kvm: Kvm, gsi: int = 5, pin: int = 5, vector: int = 0x61) -> None:
    kvm_set_irq_routing(kvm, [IrqchipRoute(gsi, KVM_IRQCHIP_IOAPIC, pin)])
    _program(kvm, pin, vector | LEVEL)


async def _running_intx(rt: Runtime, apicv: bool,
                        toggles: frozenset[str]) -> tuple[Kvm, EventfdCtx, EventfdCtx]:
    """One running vCPU, the full in-kernel irqchip, level pin 5 behind a resampling irqfd
    (``intx`` and its resamplefd ``intx.r``), as a VMM sets up INTx of an assigned device."""
    kvm = await build_vm(rt, nr_vcpus=1, apicv=apicv, x2apic=False, eoi_auto=True,
                         irqchip="kernel", toggles=toggles)
    _level_pin(kvm)
    ctx, resamplefd = _efd(rt, "intx"), _efd(rt, "intx.r")
    await kvm_irqfd_assign(kvm, ctx, 5, KVM_IRQFD_FLAG_RESAMPLE, resamplefd)
    start_vcpus(rt, kvm)
    return kvm, ctx, resamplefd


# ------------------------------------------------------------------ assignment


def test_kvm_irqfd_assign_resample_needs_the_full_in_kernel_irqchip(rt: Runtime) -> None:
    """Split irqchip: -EINVAL (kvm_arch_irqfd_allowed); no resamplefd: -EBADF."""
    split = _vm(rt, irqchip="split")
    assert call_settled(rt, kvm_irqfd_assign, split, _efd(rt, "a"), 5, KVM_IRQFD_FLAG_RESAMPLE,
                 _efd(rt, "a.r")) == -errno.EINVAL
    assert call_settled(rt, kvm_irqfd_assign, split, _efd(rt, "b"), 5) == 0  # plain irqfd: fine
    kvm = _vm(rt)
    assert call_settled(rt, kvm_irqfd_assign, kvm, _efd(rt, "c"), 5, KVM_IRQFD_FLAG_RESAMPLE) \
        == -errno.EBADF
    resamplefd = _efd(rt, "d.r")
    assert call_settled(rt, kvm_irqfd_assign, kvm, _efd(rt, "d"), 5, KVM_IRQFD_FLAG_RESAMPLE,
                 resamplefd) == 0
    assert resamplefd.kref == 2  # eventfd_ctx_fdget's reference


def test_kvm_irqfd_assign_resample_shares_one_resampler_per_gsi(rt: Runtime) -> None:
    """Two resampling irqfds on GSI 5 share a resampler and its one ack notifier (list
    newest first); GSI 6 gets its own; registering asks every vCPU to rescan."""
    kvm = _vm(rt, n=2)
    for v in kvm.vcpus:
        v.requests = 0
    a, b, c = (_efd(rt, n) for n in "abc")
    for ctx, gsi in ((a, 5), (b, 5), (c, 6)):
        assert call_settled(rt, kvm_irqfd_assign, kvm, ctx, gsi, KVM_IRQFD_FLAG_RESAMPLE,
                     _efd(rt, f"{ctx.name}.r")) == 0
    assert [r.notifier.gsi for r in kvm.resampler_list] == [6, 5]
    assert [n.gsi for n in kvm.irq_ack_notifier_list] == [6, 5]
    five = kvm.resampler_list[1]
    assert [irqfd.eventfd for irqfd in five.list] == [b, a]
    assert all(kvm_test_request(KVM_REQ_SCAN_IOAPIC, v) for v in kvm.vcpus)


def test_kvm_irqfd_assign_resample_busy_undoes_the_resampler_step(rt: Runtime) -> None:
    """-EBUSY (eventfd already used) removes the new resampler and drops the reference."""
    kvm = _vm(rt)
    ctx = _efd(rt, "a")
    assert call_settled(rt, kvm_irqfd_assign, kvm, ctx, 4) == 0
    resamplefd = _efd(rt, "a.r")
    assert call_settled(rt, kvm_irqfd_assign, kvm, ctx, 5, KVM_IRQFD_FLAG_RESAMPLE,
                 resamplefd) == -errno.EBUSY
    assert kvm.resampler_list == [] and kvm.irq_ack_notifier_list == []
    assert resamplefd.kref == 1


# ------------------------------------------------------------------ inject, ack


def test_irqfd_inject_with_a_resampler_only_asserts(rt: Runtime) -> None:
    """A resampling irqfd leaves the line up (resampler source); a plain one pulses it."""
    kvm = _vm(rt)
    kvm_set_irq_routing(kvm, [IrqchipRoute(5, KVM_IRQCHIP_IOAPIC, 5),
                              IrqchipRoute(6, KVM_IRQCHIP_IOAPIC, 6)])
    _program(kvm, 5, 0x61 | LEVEL)
    _program(kvm, 6, 0x62 | LEVEL)
    level, plain = _efd(rt, "level"), _efd(rt, "plain")
    call_settled(rt, kvm_irqfd_assign, kvm, level, 5, KVM_IRQFD_FLAG_RESAMPLE, _efd(rt, "l.r"))
    call_settled(rt, kvm_irqfd_assign, kvm, plain, 6)
    call_settled(rt, eventfd_signal, level, 1)
    call_settled(rt, eventfd_signal, plain, 1)
    ioapic = _ioapic(kvm)
    assert ioapic.irq_states[5] == 1 << KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID
    assert ioapic.irq_states[6] == 0
    assert ioapic.irr == 1 << 5
    assert lapic(kvm.vcpus[0]).irr == 1 << 0x61 | 1 << 0x62  # both delivered once, TMR set
    assert lapic(kvm.vcpus[0]).tmr == 1 << 0x61 | 1 << 0x62


def test_irqfd_resampler_ack_deasserts_once_then_signals_every_resamplefd(
        rt: Runtime) -> None:
    """The ack: one kvm_set_irq(level 0) with the resampler source, then each resamplefd."""
    kvm = _vm(rt)
    _level_pin(kvm)
    ra, rb = _efd(rt, "a.r"), _efd(rt, "b.r")
    call_settled(rt, kvm_irqfd_assign, kvm, _efd(rt, "a"), 5, KVM_IRQFD_FLAG_RESAMPLE, ra)
    call_settled(rt, kvm_irqfd_assign, kvm, _efd(rt, "b"), 5, KVM_IRQFD_FLAG_RESAMPLE, rb)
    kian = kvm.resampler_list[0].notifier
    with capture_events(rt.bus, "kvm_set_irq", "eventfd_signal",
                        "irqfd_resampler_ack") as events:
        irqfd_resampler_ack(kian)
    assert [(e["ev"], e.get("efd", e.get("level"))) for e in events] == [
        ("kvm_set_irq", 0), ("irqfd_resampler_ack", None), ("eventfd_signal", "b.r"),
        ("eventfd_signal", "a.r")]
    assert events[0]["irq_source_id"] == KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID
    assert (ra.count, rb.count) == (1, 1)


def test_kvm_notify_acked_irq_finds_notifiers_through_the_pins_gsi(rt: Runtime) -> None:
    """Pin 3 routed from GSI 9: a notifier on GSI 9 runs; an unrouted pin runs nothing."""
    kvm = _vm(rt)
    kvm_set_irq_routing(kvm, [IrqchipRoute(9, KVM_IRQCHIP_IOAPIC, 3)])
    acked: list[int] = []
    kian = KvmIrqAckNotifier(9, lambda k: acked.append(k.gsi))
    kvm_register_irq_ack_notifier(kvm, kian)
    assert kvm_irq_has_notifier(kvm, KVM_IRQCHIP_IOAPIC, 3)
    assert not kvm_irq_has_notifier(kvm, KVM_IRQCHIP_IOAPIC, 9)
    with capture_events(rt.bus, "kvm_ack_irq") as events:
        kvm_notify_acked_irq(kvm, KVM_IRQCHIP_IOAPIC, 3)
        kvm_notify_acked_irq(kvm, KVM_IRQCHIP_IOAPIC, 9)
    assert acked == [9] and [e["pin"] for e in events] == [3, 9]
    call_settled(rt, kvm_unregister_irq_ack_notifier, kvm, kian)
    kvm_notify_acked_irq(kvm, KVM_IRQCHIP_IOAPIC, 3)
    assert acked == [9]


def test_irqfd_resampler_ack_is_not_reached_from_an_msi_gsi(rt: Runtime) -> None:
    """A resampling irqfd on an MSI GSI is accepted and delivers through the fast path;
    its ack notifier is keyed by a GSI no IOAPIC pin maps to, so it never runs."""
    kvm = _vm(rt)
    kvm_set_irq_routing(kvm, [MsiRoute(1, 0xFEE00000, 0x41)])
    ctx, resamplefd = _efd(rt, "msi"), _efd(rt, "msi.r")
    assert call_settled(rt, kvm_irqfd_assign, kvm, ctx, 1, KVM_IRQFD_FLAG_RESAMPLE, resamplefd) == 0
    with capture_events(rt.bus, "irqfd_wakeup") as events:
        call_settled(rt, eventfd_signal, ctx, 1)
    assert events[0]["r"] == 1 and lapic(kvm.vcpus[0]).irr == 1 << 0x41
    for pin in range(24):
        kvm_notify_acked_irq(kvm, KVM_IRQCHIP_IOAPIC, pin)
    assert resamplefd.count == 0


# ------------------------------------------------------------------ teardown


def test_irqfd_resampler_shutdown_last_irqfd_deasserts_and_unregisters(rt: Runtime) -> None:
    """Deassigning one of two irqfds keeps the line and the resampler; the last one lowers
    the line and removes the ack notifier."""
    kvm = _vm(rt)
    _level_pin(kvm)
    a, b = _efd(rt, "a"), _efd(rt, "b")
    call_settled(rt, kvm_irqfd_assign, kvm, a, 5, KVM_IRQFD_FLAG_RESAMPLE, _efd(rt, "a.r"))
    call_settled(rt, kvm_irqfd_assign, kvm, b, 5, KVM_IRQFD_FLAG_RESAMPLE, _efd(rt, "b.r"))
    call_settled(rt, eventfd_signal, a, 1)
    ioapic = _ioapic(kvm)
    assert ioapic.irr == 1 << 5
    call_settled(rt, kvm_irqfd_deassign, kvm, a, 5)
    assert ioapic.irr == 1 << 5 and len(kvm.resampler_list) == 1
    assert len(kvm.resampler_list[0].list) == 1
    call_settled(rt, kvm_irqfd_deassign, kvm, b, 5)
    assert ioapic.irr == 0 and ioapic.irq_states[5] == 0
    assert kvm.resampler_list == [] and kvm.irq_ack_notifier_list == []


def test_irqfd_shutdown_flushes_a_queued_inject_before_leaving_the_resampler(
        rt: Runtime) -> None:
    """A signal just before the deassign: its inject runs (asserts) before the resampler
    shutdown de-asserts, so the line is low when the deassign returns."""
    kvm = _vm(rt)
    _level_pin(kvm)
    ctx = _efd(rt, "a")
    call_settled(rt, kvm_irqfd_assign, kvm, ctx, 5, KVM_IRQFD_FLAG_RESAMPLE, _efd(rt, "a.r"))
    with capture_events(rt.bus, "kvm_set_irq") as events:

        async def signal_then_deassign() -> None:
            eventfd_signal(ctx, 1)  # inject queued, not yet run
            await kvm_irqfd_deassign(kvm, ctx, 5)

        rt.call(signal_then_deassign)
    assert [e["level"] for e in events] == [1, 0]
    assert _ioapic(kvm).irr == 0


def _teardown_race(seed: int, apicv: bool) -> tuple[int, int, list[str]]:
    """A running guest (auto EOI) takes a resampled level interrupt again and again — the
    VMM re-signals on every resample — while the VMM deassigns the irqfd.  Returns the
    resamplefd count at the deassign's return and at the end, and the events after the
    return that touch the line or the resamplefd."""
    rt = Runtime(seed=seed, policy=PreemptPolicy.random(p=0.5, max_turns=3,
                                                         max_delay_ns=2_000))
    after: list[str] = []
    returned = [False]
    counts = [0, 0]

    def sink(rec: dict[str, Any]) -> None:
        if not returned[0]:
            return
        ev = rec["ev"]
        if ((ev == "kvm_set_irq" and rec["level"] == 1)
                or (ev == "ioapic_service" and rec["r"] > 0)
                or (ev == "eventfd_signal" and rec["efd"] == "intx.r")):
            after.append(f"{ev}@{rec['t']}")

    rt.bus.subscribe(sink)

    async def main() -> None:
        kvm, ctx, resamplefd = await _running_intx(rt, apicv, FIX)

        async def vmm() -> None:
            seen = 0
            for _ in range(200):
                await rt.sleep_ns(300)
                if resamplefd.count != seen:
                    seen = resamplefd.count
                    eventfd_signal(ctx, 1)  # the device is still pending

        rt.spawn("vmm", vmm)
        eventfd_signal(ctx, 1)
        await rt.sleep_ns(5_000 + seed * 97 % 5_000)
        await kvm_irqfd_deassign(kvm, ctx, 5)
        returned[0] = True
        counts[0] = resamplefd.count
        await rt.sleep_ns(100_000)
        counts[1] = resamplefd.count

    rt.run(main)
    return counts[0], counts[1], after


@pytest.mark.parametrize("apicv", [True, False])
def test_kvm_irqfd_deassign_no_resample_or_delivery_after_it_returns(apicv: bool) -> None:
    """Spec §8.8/§16.8 under random preemption: once KVM_IRQFD(DEASSIGN) returns the line
    is never raised or delivered again and the resamplefd is never signalled again."""
    for seed in range(12):
        at_return, at_end, after = _teardown_race(seed, apicv)
        assert at_return >= 1, f"seed {seed}: the workload never resampled"
        assert at_end == at_return and not after, f"seed {seed}: {after}"


# ------------------------------------------------------------------ the v5.13 EOI-exit bug


def _level_round_trips(seed: int, apicv: bool, toggles: frozenset[str]) -> int:
    """How often the resamplefd fires when a level irqfd is signalled, EOIed by the guest's
    handler and re-signalled on every resample, five times."""
    rt = Runtime(seed=seed, policy=PreemptPolicy.random(p=0.5, max_turns=3,
                                                         max_delay_ns=2_000))
    result = [0]

    async def main() -> None:
        _, ctx, resamplefd = await _running_intx(rt, apicv, toggles)
        await rt.wait_quiescent()
        for i in range(5):
            eventfd_signal(ctx, 1)
            await rt.sleep_ns(20_000)
            if resamplefd.count <= i:
                break
        result[0] = resamplefd.count

    rt.run(main)
    return result[0]


def test_vcpu_load_eoi_exitmap_v5_13_loses_level_eois_under_apicv_and_the_fix_does_not(
        ) -> None:
    """v5.13 (no fix) with APICv: the first level EOI never reaches the IOAPIC, so the
    resamplefd never fires; with fix-eoi-exitmap-uninitialized, or without APICv, every
    round trip completes, over the same seeds."""
    for seed in range(6):
        assert _level_round_trips(seed, True, frozenset()) == 0
        assert _level_round_trips(seed, True, FIX) == 5
        assert _level_round_trips(seed, False, frozenset()) == 5
