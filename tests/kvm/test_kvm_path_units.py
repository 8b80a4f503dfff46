"""Unit tests of the kernel functions on the interrupt path, against spec §8–§15."""

from __future__ import annotations

import errno
import functools
from typing import Any

import pytest
from helpers import new_eventfd as _efd
from helpers import vm_between_ioctls as _vm
from hypothesis import given
from hypothesis import strategies as st

from vkick.kernel.eventfd import eventfd_signal
from vkick.kernel.sched import TASK_INTERRUPTIBLE, TaskStruct
from vkick.kvm import lapic
from vkick.kvm.eventfd import (
    KvmIoeventfd,
    ioeventfd_write,
    kvm_irqfd_assign,
    kvm_irqfd_deassign,
)
from vkick.kvm.irq_comm import kvm_arch_set_irq_inatomic, kvm_send_userspace_msi, kvm_set_msi_irq
from vkick.kvm.irqchip import KvmKernelIrqRoutingEntry, MsiRoute, kvm_set_irq, kvm_set_irq_routing
from vkick.kvm.kvm_host import (
    APIC_DEST_LOGICAL,
    APIC_DEST_PHYSICAL,
    APIC_DM_EXTINT,
    APIC_DM_FIXED,
    APIC_DM_INIT,
    APIC_DM_LOWEST,
    APIC_DM_NMI,
    APIC_LDR,
    APIC_SPIV,
    EXITING_GUEST_MODE,
    IN_GUEST_MODE,
    KVM_APIC_INIT,
    KVM_IRQ_ROUTING_MSI,
    KVM_REQ_EVENT,
    KVM_REQ_NMI,
    OUTSIDE_GUEST_MODE,
    POSTED_INTR_VECTOR,
    RESCHEDULE_VECTOR,
    Kvm,
    KvmLapicIrq,
    KvmVcpu,
)
from vkick.kvm.kvm_main import kvm_test_request, kvm_vcpu_kick
from vkick.kvm.lapic_map import kvm_vector_to_index
from vkick.kvm.vmx.vmx import vmx_deliver_posted_interrupt, vmx_sync_pir_to_irr
from vkick.runtime.tasks import Runtime
from vkick.scenario.runner import build_vm
from vkick.testing import call_settled, capture_events


def _irr(v: KvmVcpu) -> int:
    assert v.arch.apic is not None
    return v.arch.apic.irr


# ------------------------------------------------------------------ irq_comm / irqchip


def test_kvm_arch_set_irq_inatomic_returns_ewouldblock_for_non_msi_routes(rt: Runtime) -> None:
    kvm = _vm(rt)
    no_route = KvmKernelIrqRoutingEntry(gsi=1, type=0)
    irqchip = KvmKernelIrqRoutingEntry(gsi=1, type=1)
    assert kvm_arch_set_irq_inatomic(no_route, kvm, 0, 1, False) == -errno.EWOULDBLOCK
    assert kvm_arch_set_irq_inatomic(irqchip, kvm, 0, 1, False) == -errno.EWOULDBLOCK


def test_kvm_arch_set_irq_inatomic_declines_broadcast_and_delivers_physical(rt: Runtime) -> None:
    kvm = _vm(rt)
    bcast = KvmKernelIrqRoutingEntry(1, KVM_IRQ_ROUTING_MSI, 0xFEEFF000, 0, 0x41)
    assert kvm_arch_set_irq_inatomic(bcast, kvm, 0, 1, False) == -errno.EWOULDBLOCK
    phys = KvmKernelIrqRoutingEntry(1, KVM_IRQ_ROUTING_MSI, 0xFEE01000, 0, 0x42)
    assert kvm_arch_set_irq_inatomic(phys, kvm, 0, 1, False) == 1
    assert _irr(kvm.vcpus[1]) == 1 << 0x42 and _irr(kvm.vcpus[0]) == 0


def test_kvm_arch_set_irq_inatomic_rejects_invalid_x2apic_format_route(rt: Runtime) -> None:
    kvm = _vm(rt)
    kvm.arch.x2apic_format = True
    e = KvmKernelIrqRoutingEntry(1, KVM_IRQ_ROUTING_MSI, 0xFEE00000, 0x1, 0x41)
    assert kvm_arch_set_irq_inatomic(e, kvm, 0, 1, False) == -errno.EINVAL


@given(dest=st.integers(0, 255), vector=st.integers(16, 255), dm=st.sampled_from((0, 1, 4)),
       logical=st.booleans(), rh=st.booleans(), level=st.booleans(), assert_=st.booleans())
def test_kvm_set_msi_irq_decodes_every_field(dest: int, vector: int, dm: int, logical: bool,
                                             rh: bool, level: bool, assert_: bool) -> None:
    rt = Runtime()
    kvm = Kvm(rt=rt)
    addr = 0xFEE00000 | dest << 12 | int(rh) << 3 | int(logical) << 2
    data = vector | dm << 8 | int(assert_) << 14 | int(level) << 15
    irq = KvmLapicIrq()
    kvm_set_msi_irq(kvm, KvmKernelIrqRoutingEntry(0, KVM_IRQ_ROUTING_MSI, addr, 0, data), irq)
    assert (irq.dest_id, irq.vector, irq.delivery_mode) == (dest, vector, dm << 8)
    assert irq.dest_mode == (APIC_DEST_LOGICAL if logical else APIC_DEST_PHYSICAL)
    assert irq.msi_redir_hint == rh and irq.trig_mode == int(level)
    assert irq.level is True  # data bit 14 is ignored
    rt.close()


def test_kvm_set_irq_returns_minus_one_for_a_gsi_without_route(rt: Runtime) -> None:
    kvm = _vm(rt)
    assert kvm_set_irq(kvm, 0, 5, 1, False) == -1


def test_kvm_set_irq_routing_refuses_vector_below_16(rt: Runtime) -> None:
    kvm = _vm(rt)
    with pytest.raises(ValueError, match=r"routes\[0\]\.data: expected an MSI vector ≥ 16"):
        kvm_set_irq_routing(kvm, [MsiRoute(1, 0xFEE00000, 0x0F)])


# ------------------------------------------------------------------ irqfd


def test_kvm_irqfd_assign_second_irqfd_on_same_eventfd_is_ebusy(rt: Runtime) -> None:
    kvm = _vm(rt)
    ctx = _efd(rt)
    assert call_settled(rt, kvm_irqfd_assign, kvm, ctx, 1) == 0
    assert call_settled(rt, kvm_irqfd_assign, kvm, ctx, 2) == -errno.EBUSY


def test_irqfd_wakeup_signal_while_inject_pending_is_merged(rt: Runtime) -> None:
    kvm = _vm(rt)
    call_settled(rt, kvm_set_irq_routing, kvm, [MsiRoute(1, 0xFEEFF000, 0x41)])  # broadcast: slow
    ctx = _efd(rt)
    call_settled(rt, kvm_irqfd_assign, kvm, ctx, 1)
    with capture_events(rt.bus, "irqfd_inject", "workqueue_queue_work") as events:

        async def two_signals() -> None:
            for _ in range(2):
                rt.cur_irq = rt.next_irq_id()
                eventfd_signal(ctx, 1)  # the kworker has not run yet: the 2nd is merged
            rt.cur_irq = 0
            await rt.wait_quiescent()

        rt.call(two_signals)
    queued = [e["queued"] for e in events if e["ev"] == "workqueue_queue_work"]
    injects = [e for e in events if e["ev"] == "irqfd_inject"]
    assert queued == [True, False]
    assert len(injects) == 1 and len(injects[0]["irq"]) == 2
    assert all(_irr(v) == 1 << 0x41 for v in kvm.vcpus)


def test_kvm_irqfd_deassign_then_signal_injects_nothing(rt: Runtime) -> None:
    kvm = _vm(rt)
    call_settled(rt, kvm_set_irq_routing, kvm, [MsiRoute(1, 0xFEE00000, 0x41)])
    ctx = _efd(rt)
    call_settled(rt, kvm_irqfd_assign, kvm, ctx, 1)
    call_settled(rt, kvm_irqfd_deassign, kvm, ctx, 1)
    call_settled(rt, eventfd_signal, ctx, 1)
    assert _irr(kvm.vcpus[0]) == 0 and ctx.count == 1 and not list(ctx.wqh)


def test_kvm_irqfd_assign_injects_once_for_an_already_signalled_eventfd(rt: Runtime) -> None:
    kvm = _vm(rt)
    call_settled(rt, kvm_set_irq_routing, kvm, [MsiRoute(1, 0xFEE00000, 0x41)])
    ctx = _efd(rt)
    for _ in range(3):
        eventfd_signal(ctx, 1)
    call_settled(rt, kvm_irqfd_assign, kvm, ctx, 1)
    assert _irr(kvm.vcpus[0]) == 1 << 0x41
    assert ctx.count == 3  # not drained at assignment (spec §8.5 step 8)


# ------------------------------------------------------------------ kick / posting


@pytest.mark.parametrize(("mode", "ipi"), [(IN_GUEST_MODE, True), (OUTSIDE_GUEST_MODE, False),
                                           (EXITING_GUEST_MODE, False)])
def test_kvm_vcpu_kick_sends_an_ipi_only_from_in_guest_mode(rt: Runtime, mode: Any,
                                                            ipi: bool) -> None:
    kvm = _vm(rt)
    vcpu = kvm.vcpus[1]
    vcpu.mode = mode
    with capture_events(rt.bus, "vkick_host_ipi") as events:
        kvm_vcpu_kick(vcpu)
    assert bool(events) is ipi
    if ipi:
        assert events[0]["hvector"] == RESCHEDULE_VECTOR and vcpu.mode == EXITING_GUEST_MODE


def test_kvm_vcpu_kick_wakes_a_sleeping_vcpu_instead_of_an_ipi(rt: Runtime) -> None:
    kvm = _vm(rt)
    vcpu = kvm.vcpus[1]
    task = TaskStruct(rt, "sleeper")
    task.state = TASK_INTERRUPTIBLE
    vcpu.wait_task = task
    with capture_events(rt.bus, "vkick_host_ipi", "kvm_vcpu_kick") as events:
        kvm_vcpu_kick(vcpu)
    assert [e["ev"] for e in events] == ["kvm_vcpu_kick"] and events[0]["woke"] is True
    assert vcpu.stat.halt_wakeup == 1


def test_vmx_deliver_posted_interrupt_returns_minus_one_without_apicv(rt: Runtime) -> None:
    kvm = _vm(rt, apicv=False)
    assert vmx_deliver_posted_interrupt(kvm.vcpus[0], 0x41) == -1


def test_vmx_deliver_posted_interrupt_notifies_once_and_coalesces(rt: Runtime) -> None:
    kvm = _vm(rt, apicv=True)
    vcpu = kvm.vcpus[1]
    vcpu.mode = IN_GUEST_MODE
    with capture_events(rt.bus, "vkick_host_ipi", "kvm_pi_post") as events:
        assert vmx_deliver_posted_interrupt(vcpu, 0x41) == 0  # PIR, ON, notification
        assert vmx_deliver_posted_interrupt(vcpu, 0x41) == 0  # PIR bit already set
        assert vmx_deliver_posted_interrupt(vcpu, 0x42) == 0  # ON already set
    ipis = [e for e in events if e["ev"] == "vkick_host_ipi"]
    assert [e["hvector"] for e in ipis] == [POSTED_INTR_VECTOR]
    notify = [e["notify"] for e in events if e["ev"] == "kvm_pi_post"]
    assert notify == ["ipi", "coalesced_pir", "coalesced_on"]
    assert vcpu.pi_desc.pir == (1 << 0x41 | 1 << 0x42) and vcpu.pi_desc.on


def test_vmx_sync_pir_to_irr_reads_pir_only_when_on_is_set(rt: Runtime) -> None:
    kvm = _vm(rt, apicv=True)
    vcpu = kvm.vcpus[0]
    vcpu.pi_desc.pir = 1 << 0x51
    vcpu.pi_desc.on = False
    assert vmx_sync_pir_to_irr(vcpu) == -1 and vcpu.pi_desc.pir == 1 << 0x51
    vcpu.pi_desc.on = True
    assert vmx_sync_pir_to_irr(vcpu) == 0x51
    assert vcpu.pi_desc.pir == 0 and not vcpu.pi_desc.on
    assert _irr(vcpu) == 1 << 0x51 and vcpu.arch.rvi == 0x51


# ------------------------------------------------------------------ LAPIC


@given(tpr=st.integers(0, 255), isr=st.integers(0, 255), vector=st.integers(16, 255))
def test_kvm_apic_has_interrupt_delivers_only_classes_above_ppr(tpr: int, isr: int,
                                                                vector: int) -> None:
    rt = Runtime()
    kvm = _vm(rt, n=1)
    apic = kvm.vcpus[0].arch.apic
    assert apic is not None
    apic.tpr = tpr
    if isr >= 16:
        lapic.apic_set_isr(isr, apic)
    lapic.kvm_lapic_set_irr(vector, apic)
    got = lapic.kvm_apic_has_interrupt(kvm.vcpus[0])
    isrv = isr if isr >= 16 else 0
    ppr = tpr if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0
    assert apic.ppr == ppr
    assert got == (vector if vector >> 4 > ppr >> 4 else -1)
    rt.close()


def test_apic_set_eoi_retires_the_highest_in_service_vector(rt: Runtime) -> None:
    kvm = _vm(rt, n=1)
    apic = kvm.vcpus[0].arch.apic
    assert apic is not None
    assert lapic.apic_set_eoi(apic) == -1  # nothing in service: spurious EOI
    lapic.apic_set_isr(0x41, apic)
    lapic.apic_set_isr(0x81, apic)
    assert lapic.apic_set_eoi(apic) == 0x81
    assert apic.isr == 1 << 0x41
    assert kvm_test_request(KVM_REQ_EVENT, kvm.vcpus[0])


def test_kvm_get_apic_interrupt_moves_irr_to_isr_and_raises_ppr(rt: Runtime) -> None:
    kvm = _vm(rt, n=1)
    vcpu = kvm.vcpus[0]
    apic = vcpu.arch.apic
    assert apic is not None
    lapic.kvm_lapic_set_irr(0x41, apic)
    lapic.kvm_lapic_set_irr(0x45, apic)
    assert lapic.kvm_get_apic_interrupt(vcpu) == 0x45
    assert apic.isr == 1 << 0x45 and apic.irr == 1 << 0x41 and apic.ppr == 0x40
    assert lapic.kvm_get_apic_interrupt(vcpu) == -1  # 0x41 is the same class: held


def test___apic_accept_irq_drops_fixed_for_a_software_disabled_apic(rt: Runtime) -> None:
    kvm = _vm(rt, n=1)
    apic = kvm.vcpus[0].arch.apic
    assert apic is not None
    call_settled(rt, lapic.kvm_lapic_reg_write, apic, APIC_SPIV, 0xFF)
    assert lapic.__apic_accept_irq(apic, APIC_DM_FIXED, 0x41, True, 0) == 0
    assert apic.irr == 0


def test___apic_accept_irq_tmr_follows_the_trigger_mode(rt: Runtime) -> None:
    kvm = _vm(rt, n=1)
    apic = kvm.vcpus[0].arch.apic
    assert apic is not None
    assert lapic.__apic_accept_irq(apic, APIC_DM_FIXED, 0x41, True, 1) == 1
    assert apic.tmr == 1 << 0x41
    assert lapic.__apic_accept_irq(apic, APIC_DM_FIXED, 0x41, True, 0) == 1
    assert apic.tmr == 0
    assert lapic.__apic_accept_irq(apic, APIC_DM_FIXED, 0x42, False, 1) == 0  # de-assert


def test___apic_accept_irq_other_delivery_modes(rt: Runtime) -> None:
    kvm = _vm(rt, n=1)
    vcpu = kvm.vcpus[0]
    apic = vcpu.arch.apic
    assert apic is not None
    assert lapic.__apic_accept_irq(apic, APIC_DM_LOWEST, 0x41, True, 0) == 1
    assert vcpu.arch.apic_arb_prio == 1
    assert lapic.__apic_accept_irq(apic, APIC_DM_NMI, 0, True, 0) == 1
    assert vcpu.arch.nmi_queued == 1 and kvm_test_request(KVM_REQ_NMI, vcpu)
    assert lapic.__apic_accept_irq(apic, APIC_DM_INIT, 0, True, 0) == 1
    assert apic.pending_events == 1 << KVM_APIC_INIT
    with capture_events(rt.bus, "vkick_warn") as warns:
        assert lapic.__apic_accept_irq(apic, APIC_DM_EXTINT, 0x41, True, 0) == 0
    assert warns and "ExtINT" in warns[0]["what"]


def test_kvm_send_userspace_msi_logical_flat_reaches_the_matching_set(rt: Runtime) -> None:
    kvm = _vm(rt, n=3)
    for i, v in enumerate(kvm.vcpus):
        assert v.arch.apic is not None
        call_settled(rt, lapic.kvm_lapic_reg_write, v.arch.apic, APIC_LDR, (1 << i) << 24)
    assert kvm_send_userspace_msi(kvm, 0xFEE05004, 0x61) == 2  # mask 0b101
    assert [_irr(v) == 1 << 0x61 for v in kvm.vcpus] == [True, False, True]


@given(vector=st.integers(0, 255), bitmap=st.integers(1, 0xFFFF))
def test_kvm_vector_to_index_picks_the_vector_mod_n_th_set_bit(vector: int, bitmap: int) -> None:
    bits = [i for i in range(16) if bitmap >> i & 1]
    assert kvm_vector_to_index(vector, len(bits), bitmap, 16) == bits[vector % len(bits)]


def test_ioeventfd_write_signals_only_on_a_matching_access(rt: Runtime) -> None:
    ctx = _efd(rt, "kick")
    any_len = KvmIoeventfd(addr=0x1000, eventfd=ctx)
    assert ioeventfd_write(any_len, 0x1004, 2, 0) == -errno.EOPNOTSUPP
    assert ioeventfd_write(any_len, 0x1000, 2, 7) == 0 and ctx.count == 1
    match = KvmIoeventfd(addr=0x2000, eventfd=ctx, length=4, datamatch=5)
    assert ioeventfd_write(match, 0x2000, 4, 6) == -errno.EOPNOTSUPP
    assert ioeventfd_write(match, 0x2000, 2, 5) == -errno.EOPNOTSUPP
    assert ioeventfd_write(match, 0x2000, 4, 5) == 0 and ctx.count == 2


def test_x2apic_icr_fastpath_sends_with_the_sender_still_in_guest_mode(rt: Runtime) -> None:
    from vkick.kvm.x86 import handle_fastpath_set_x2apic_icr_irqoff  # noqa: PLC0415

    kvm: Kvm = rt.call(functools.partial(build_vm, rt, nr_vcpus=2, apicv=False,
                                         x2apic=True, eoi_auto=True))
    sender, target = kvm.vcpus
    sender.mode = IN_GUEST_MODE
    modes: list[Any] = []

    def sink(rec: dict[str, Any]) -> None:
        if rec["ev"] == "kvm_apic_accept_irq":
            modes.append(sender.mode)

    rt.bus.subscribe(sink)
    assert handle_fastpath_set_x2apic_icr_irqoff(sender, 1 << 32 | 0x4051)
    assert _irr(target) == 1 << 0x51 and modes == [IN_GUEST_MODE]
    # Shorthands, logical destinations and broadcasts take the full exit handler.
    assert not handle_fastpath_set_x2apic_icr_irqoff(sender, 0xFFFFFFFF << 32 | 0x4052)
    assert not handle_fastpath_set_x2apic_icr_irqoff(sender, 0x44053)
