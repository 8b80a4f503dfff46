"""Unit tests of the in-kernel IOAPIC (arch/x86/kvm/ioapic.c), IRQCHIP routes, the LAPIC's
EOI broadcast and the EOI-exit-bitmap scan, against the v5.13 source and spec §9, §11.8,
§13.4.  vCPU threads are not running (as between ioctls) unless a test starts them."""

from __future__ import annotations

import errno

import pytest
from helpers import ioapic as _ioapic
from helpers import lapic as _apic
from helpers import new_eventfd as _efd
from helpers import program_rte as _program
from helpers import vm_between_ioctls

from vkick.kernel.eventfd import eventfd_signal
from vkick.kvm.eventfd import KvmIrqAckNotifier, kvm_irqfd_assign, kvm_register_irq_ack_notifier
from vkick.kvm.ioapic import (
    EOI_INJECT_DELAY_NS,
    IOAPIC_REG_WINDOW,
    IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT,
    ioapic_mmio_read,
    ioapic_mmio_write,
    ioapic_service,
    ioapic_set_irq,
    kvm_get_ioapic,
    kvm_ioapic_scan_entry,
    kvm_ioapic_set_irq,
    kvm_ioapic_update_eoi,
    kvm_set_ioapic,
    redirect_entry_bits,
)
from vkick.kvm.irq_comm import kvm_arch_set_irq_inatomic
from vkick.kvm.irqchip import (
    IrqchipRoute,
    KvmKernelIrqRoutingEntry,
    MsiRoute,
    OtherRoute,
    RoutingError,
    kvm_irq_map_chip_pin,
    kvm_irq_map_gsi,
    kvm_set_irq_routing,
)
from vkick.kvm.kvm_host import (
    APIC_EOI,
    APIC_SPIV_DIRECTED_EOI,
    CALL_FUNCTION_VECTOR,
    EXITING_GUEST_MODE,
    IN_GUEST_MODE,
    KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_KERNEL,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID,
    KVM_REQ_IOAPIC_EOI_EXIT,
    KVM_REQ_LOAD_EOI_EXITMAP,
    KVM_REQ_SCAN_IOAPIC,
    KVM_USERSPACE_IRQ_SOURCE_ID,
    Kvm,
    KvmLapic,
    KvmVcpu,
)
from vkick.kvm.kvm_main import (
    kvm_clear_request,
    kvm_create_vm,
    kvm_make_vcpus_request_mask,
    kvm_test_request,
    kvm_vm_ioctl_create_vcpu,
)
from vkick.kvm.lapic import apic_set_eoi, kvm_apic_set_eoi_accelerated, kvm_lapic_reg_write
from vkick.kvm.x86 import (
    kvm_arch_vm_ioctl_create_irqchip,
    kvm_vm_ioctl_irq_line,
    vcpu_load_eoi_exitmap,
    vcpu_scan_ioapic,
)
from vkick.obs.tracepoints import validate
from vkick.runtime.tasks import Runtime
from vkick.scenario.runner import build_vm
from vkick.testing import call_settled, capture_events

BASE = 0xFEC00000
LEVEL = 1 << 15
MASKED = 1 << 16



def _vm(rt: Runtime, n: int = 2, apicv: bool = False,
        toggles: frozenset[str] = frozenset()) -> Kvm:
    """A VM with the in-kernel IOAPIC whose vCPU threads are not running, no request
    pending."""
    kvm = vm_between_ioctls(rt, n, apicv, irqchip="kernel", toggles=toggles)
    for v in kvm.vcpus:
        v.requests = 0
    return kvm


# ------------------------------------------------------------------ creation, registers


def test_kvm_arch_vm_ioctl_create_irqchip_installs_reset_ioapic_and_default_routing(
        rt: Runtime) -> None:
    """KVM_CREATE_IRQCHIP: all 24 pins masked, GSI n routed to IOAPIC pin n."""
    kvm = kvm_create_vm(rt)
    assert kvm_arch_vm_ioctl_create_irqchip(kvm) == 0
    assert kvm.arch.irqchip_mode == KVM_IRQCHIP_KERNEL
    ioapic = _ioapic(kvm)
    assert all(e.mask == 1 for e in ioapic.redirtbl) and ioapic.base_address == BASE
    for gsi in (0, 8, 23):
        (e,) = kvm_irq_map_gsi(kvm, gsi)
        assert (e.type, e.irqchip, e.pin) == (KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQCHIP_IOAPIC, gsi)
        assert kvm_irq_map_chip_pin(kvm, KVM_IRQCHIP_IOAPIC, gsi) == gsi
    assert kvm_arch_vm_ioctl_create_irqchip(kvm) == -errno.EEXIST


def test_kvm_arch_vm_ioctl_create_irqchip_after_a_vcpu_is_einval(rt: Runtime) -> None:
    """The irqchip must come before the first vCPU."""
    kvm = kvm_create_vm(rt)
    rt.call(lambda: kvm_vm_ioctl_create_vcpu(kvm, 0))
    assert kvm_arch_vm_ioctl_create_irqchip(kvm) == -errno.EINVAL
    assert kvm.arch.vioapic is None


def test_ioapic_read_indirect_version_id_and_entry_halves(rt: Runtime) -> None:
    """IOWIN reads: version 0x11 with 23 as the last pin, halves of entries, ~0 past 23."""
    kvm = _vm(rt)
    ioapic = _ioapic(kvm)

    def read(reg: int) -> int:
        ioapic_mmio_write(None, ioapic, BASE, 4, reg)
        r, val = ioapic_mmio_read(None, ioapic, BASE + IOAPIC_REG_WINDOW, 4)
        assert r == 0
        return val

    assert read(0x01) == 0x170011
    _program(kvm, 2, 0x0300_0000_0000_8041)
    assert read(0x14) == 0x8041 and read(0x15) == 0x0300_0000
    assert read(0x10 + 2 * 24) == 0xFFFFFFFF
    assert ioapic_mmio_read(None, ioapic, BASE, 4) == (0, 0x10 + 2 * 24)
    assert ioapic_mmio_read(None, ioapic, BASE + 0x100, 4)[0] == -errno.EOPNOTSUPP
    assert ioapic_mmio_write(None, ioapic, BASE - 4, 4, 0) == -errno.EOPNOTSUPP


def test_ioapic_write_indirect_keeps_remote_irr_and_delivery_status_read_only(
        rt: Runtime) -> None:
    """A level entry keeps remote IRR across a rewrite; making it edge clears remote IRR."""
    kvm = _vm(rt)
    ioapic = _ioapic(kvm)
    _program(kvm, 5, 0x61 | LEVEL)
    e = ioapic.redirtbl[5]
    e.remote_irr = 1
    e.delivery_status = 1
    _program(kvm, 5, 0x62 | LEVEL | 1 << 14 | 0 << 12)  # guest tries to write RO bits
    assert (e.vector, e.remote_irr, e.delivery_status) == (0x62, 1, 1)
    _program(kvm, 5, 0x62 | 1 << 14)  # edge now
    assert e.remote_irr == 0 and e.delivery_status == 1


def test_ioapic_write_indirect_unmasking_services_a_high_level_pin(rt: Runtime) -> None:
    """A level pin asserted while masked is delivered by the write that unmasks it."""
    kvm = _vm(rt)
    _program(kvm, 9, 0x59 | LEVEL | MASKED)
    assert kvm_ioapic_set_irq(_ioapic(kvm), 9, KVM_USERSPACE_IRQ_SOURCE_ID, 1, False) == -1
    assert _apic(kvm.vcpus[0]).irr == 0
    _program(kvm, 9, 0x59 | LEVEL)
    assert _apic(kvm.vcpus[0]).irr == 1 << 0x59
    assert _ioapic(kvm).redirtbl[9].remote_irr == 1


def test_ioapic_write_indirect_requests_a_scan_from_the_old_and_new_destinations(
        rt: Runtime) -> None:
    """FIXED entries ask only the vCPUs of the old and new destination to rescan."""
    kvm = _vm(rt, n=3)
    _program(kvm, 1, 0x41 | 1 << 56)  # from APIC 0 (reset) to APIC 1
    assert [kvm_test_request(KVM_REQ_SCAN_IOAPIC, v) for v in kvm.vcpus] == [True, True,
                                                                              False]
    for v in kvm.vcpus:
        kvm_clear_request(KVM_REQ_SCAN_IOAPIC, v)
    ioapic_mmio_write(None, _ioapic(kvm), BASE, 4, 0x13)
    ioapic_mmio_write(None, _ioapic(kvm), BASE + IOAPIC_REG_WINDOW, 4, 2 << 24)  # 1 → 2
    assert [kvm_test_request(KVM_REQ_SCAN_IOAPIC, v) for v in kvm.vcpus] == [False, True,
                                                                              True]
    for v in kvm.vcpus:
        kvm_clear_request(KVM_REQ_SCAN_IOAPIC, v)
    _program(kvm, 1, 0x41 | 4 << 8 | 2 << 56)  # NMI delivery: everyone rescans
    assert all(kvm_test_request(KVM_REQ_SCAN_IOAPIC, v) for v in kvm.vcpus)


def test_kvm_make_vcpus_request_mask_ipis_only_vcpus_in_guest_mode(rt: Runtime) -> None:
    """KVM_REQ_SCAN_IOAPIC (WAIT|NO_WAKEUP): IPI a vCPU in guest mode, none outside."""
    kvm = _vm(rt, n=3)
    kvm.vcpus[1].mode = IN_GUEST_MODE
    with capture_events(rt.bus, "vkick_host_ipi") as ipis:
        kvm_make_vcpus_request_mask(kvm, KVM_REQ_SCAN_IOAPIC, None, 0b011)
    assert [(e["pcpu"], e["hvector"]) for e in ipis] == [(1, CALL_FUNCTION_VECTOR)]
    assert kvm.vcpus[1].mode == EXITING_GUEST_MODE
    assert [kvm_test_request(KVM_REQ_SCAN_IOAPIC, v) for v in kvm.vcpus] == [True, True,
                                                                              False]


# ------------------------------------------------------------------ lines and delivery


def test_ioapic_set_irq_edge_pin_delivers_on_each_rising_edge_only(rt: Runtime) -> None:
    """Edge: 0→1 delivers (1 CPU), 1→1 is coalesced (0), 1→0 returns 1 and re-arms."""
    kvm = _vm(rt)
    ioapic = _ioapic(kvm)
    _program(kvm, 4, 0x44)
    with capture_events(rt.bus, "kvm_ioapic_set_irq") as events:
        assert ioapic_set_irq(ioapic, 4, 1, False) == 1
        assert ioapic_set_irq(ioapic, 4, 1, False) == 0
        assert ioapic_set_irq(ioapic, 4, 0, False) == 1
        assert ioapic_set_irq(ioapic, 4, 1, False) == 1
    assert [e["coalesced"] for e in events] == [False, True, False, False]
    assert _apic(kvm.vcpus[0]).irr == 1 << 0x44 and _apic(kvm.vcpus[0]).tmr == 0
    assert ioapic.redirtbl[4].remote_irr == 0


def test_ioapic_set_irq_level_pin_sets_remote_irr_and_tmr_and_waits_for_the_eoi(
        rt: Runtime) -> None:
    """Level: the first assert delivers with TMR set and remote IRR; more asserts give -1."""
    kvm = _vm(rt)
    ioapic = _ioapic(kvm)
    _program(kvm, 5, 0x61 | LEVEL | 1 << 56)
    assert ioapic_set_irq(ioapic, 5, 1, False) == 1
    assert ioapic.redirtbl[5].remote_irr == 1
    assert _apic(kvm.vcpus[1]).tmr == 1 << 0x61 and _apic(kvm.vcpus[1]).irr == 1 << 0x61
    assert ioapic_set_irq(ioapic, 5, 1, False) == -1
    assert ioapic.irr == 1 << 5


def test_ioapic_service_masked_pin_sends_nothing(rt: Runtime) -> None:
    """A masked pin returns -1 and leaves the LAPICs untouched."""
    kvm = _vm(rt)
    _program(kvm, 6, 0x66 | MASKED)
    assert ioapic_service(_ioapic(kvm), 6, False) == -1
    assert all(_apic(v).irr == 0 for v in kvm.vcpus)


def test_ioapic_service_level_pin_reaching_nobody_sets_no_remote_irr(rt: Runtime) -> None:
    """A level delivery that no APIC accepts (result 0: no such APIC ID) leaves remote IRR
    clear."""
    kvm = _vm(rt)
    _program(kvm, 6, 0x66 | LEVEL | 7 << 56)
    assert ioapic_service(_ioapic(kvm), 6, False) == 0
    assert _ioapic(kvm).redirtbl[6].remote_irr == 0


def test_kvm_ioapic_set_irq_line_is_the_or_of_its_sources(rt: Runtime) -> None:
    """The userspace and resampler sources hold a line up independently."""
    kvm = _vm(rt)
    ioapic = _ioapic(kvm)
    _program(kvm, 7, 0x77 | LEVEL | MASKED)
    kvm_ioapic_set_irq(ioapic, 7, KVM_USERSPACE_IRQ_SOURCE_ID, 1, False)
    kvm_ioapic_set_irq(ioapic, 7, KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID, 1, False)
    assert ioapic.irq_states[7] == 0b11
    kvm_ioapic_set_irq(ioapic, 7, KVM_USERSPACE_IRQ_SOURCE_ID, 0, False)
    assert ioapic.irr >> 7 & 1
    kvm_ioapic_set_irq(ioapic, 7, KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID, 0, False)
    assert not ioapic.irr >> 7 & 1 and ioapic.irq_states[7] == 0


def test_kvm_vm_ioctl_irq_line_reports_delivered_coalesced_and_ignored(rt: Runtime) -> None:
    """KVM_IRQ_LINE status: 1 delivered, 0 coalesced (edge already high), -1 no route."""
    kvm = _vm(rt)
    _program(kvm, 4, 0x44)
    assert kvm_vm_ioctl_irq_line(kvm, 4, 1) == 1
    assert kvm_vm_ioctl_irq_line(kvm, 4, 1) == 0
    kvm_set_irq_routing(kvm, [MsiRoute(1, 0xFEE00000, 0x41)])
    assert kvm_vm_ioctl_irq_line(kvm, 4, 1) == -1
    assert kvm_vm_ioctl_irq_line(kvm, 1, 1) == 1  # an MSI GSI: asserting delivers
    assert kvm_vm_ioctl_irq_line(kvm, 1, 0) == -1  # an MSI has no de-assert


def test_kvm_get_ioapic_hides_delivered_edge_pins_and_kvm_set_ioapic_reinjects(
        rt: Runtime) -> None:
    """KVM_GET_IRQCHIP masks irr with irr_delivered; KVM_SET_IRQCHIP raises the saved irr
    (a level pin whose saved remote IRR is clear is delivered again)."""
    kvm = _vm(rt)
    ioapic = _ioapic(kvm)
    _program(kvm, 4, 0x44)
    _program(kvm, 5, 0x55 | LEVEL | MASKED)
    ioapic_set_irq(ioapic, 4, 1, False)
    ioapic_set_irq(ioapic, 5, 1, False)
    state = kvm_get_ioapic(kvm)
    assert state.irr == 1 << 5 and state.redirtbl[4] == redirect_entry_bits(ioapic.redirtbl[4])
    state.redirtbl[5] &= ~MASKED
    kvm_set_ioapic(kvm, state)
    assert _apic(kvm.vcpus[0]).irr == 1 << 0x44 | 1 << 0x55
    assert ioapic.redirtbl[5].remote_irr == 1


# ------------------------------------------------------------------ EOI


def _deliver_level(kvm: Kvm, pin: int, vector: int, src: int = KVM_USERSPACE_IRQ_SOURCE_ID
                   ) -> KvmLapic:
    """Program ``pin`` level to APIC 0, raise it, and let vCPU 0 acknowledge it (IRR→ISR)."""
    _program(kvm, pin, vector | LEVEL)
    kvm_ioapic_set_irq(_ioapic(kvm), pin, src, 1, False)
    apic = _apic(kvm.vcpus[0])
    assert apic.irr >> vector & 1
    apic.irr &= ~(1 << vector)
    apic.isr |= 1 << vector
    apic.isr_count += 1
    apic.highest_isr_cache = vector
    vcpu_scan_ioapic(kvm.vcpus[0])
    return apic


def test_kvm_ioapic_update_eoi_one_redelivers_while_the_line_is_high(rt: Runtime) -> None:
    """EOI of a level pin: remote IRR cleared and, the line still high, delivered again."""
    kvm = _vm(rt)
    apic = _deliver_level(kvm, 10, 0x52)
    with capture_events(rt.bus, "kvm_ioapic_update_eoi", "kvm_ack_irq") as events:
        assert rt.call(lambda: kvm_lapic_reg_write(apic, APIC_EOI, 0)) == 0
    assert [e["ev"] for e in events] == ["kvm_ioapic_update_eoi", "kvm_ack_irq"]
    assert events[0]["trigger_mode"] == 1
    assert apic.isr == 0 and apic.irr == 1 << 0x52
    assert _ioapic(kvm).redirtbl[10].remote_irr == 1  # set again by the re-delivery


def test_kvm_ioapic_update_eoi_one_line_low_clears_remote_irr_only(rt: Runtime) -> None:
    """EOI after the line fell: remote IRR cleared, nothing delivered."""
    kvm = _vm(rt)
    apic = _deliver_level(kvm, 10, 0x52)
    kvm_ioapic_set_irq(_ioapic(kvm), 10, KVM_USERSPACE_IRQ_SOURCE_ID, 0, False)
    apic_set_eoi(apic)
    assert apic.irr == 0 and _ioapic(kvm).redirtbl[10].remote_irr == 0


def test_kvm_ioapic_update_eoi_one_directed_eoi_leaves_remote_irr(rt: Runtime) -> None:
    """With SPIV directed EOI the broadcast runs the notifiers but keeps remote IRR."""
    kvm = _vm(rt)
    apic = _deliver_level(kvm, 10, 0x52)
    apic.spiv |= APIC_SPIV_DIRECTED_EOI
    with capture_events(rt.bus, "kvm_ack_irq") as acks:
        kvm_ioapic_update_eoi(kvm.vcpus[0], 0x52, 1)
    assert acks and _ioapic(kvm).redirtbl[10].remote_irr == 1


def test_kvm_ioapic_update_eoi_one_defers_the_10000th_redelivery(rt: Runtime) -> None:
    """An EOI storm: the 10000th back-to-back re-delivery waits 10 ms (delayed work)."""
    kvm = _vm(rt)
    apic = _deliver_level(kvm, 10, 0x52)
    ioapic = _ioapic(kvm)
    ioapic.irq_eoi[10] = IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT - 1
    with capture_events(rt.bus, "kvm_ioapic_delayed_eoi_inj") as events:
        apic_set_eoi(apic)
    assert len(events) == 1 and validate(events[0]) == []
    assert apic.irr == 0 and ioapic.irq_eoi[10] == 0 and ioapic.redirtbl[10].remote_irr == 0

    async def later() -> int:
        t0 = rt.now_ns()
        await rt.wait_quiescent()
        return rt.now_ns() - t0

    assert rt.call(later) >= EOI_INJECT_DELAY_NS
    assert apic.irr == 1 << 0x52 and ioapic.redirtbl[10].remote_irr == 1


def test_kvm_ioapic_send_eoi_edge_msi_vector_has_no_ioapic_side_effect(rt: Runtime) -> None:
    """An edge MSI's EOI (TMR clear, vector not IOAPIC-handled) never reaches the IOAPIC."""
    kvm = _vm(rt)
    kvm_set_irq_routing(kvm, [MsiRoute(1, 0xFEE00000, 0x41)])
    kvm_vm_ioctl_irq_line(kvm, 1, 1)
    apic = _apic(kvm.vcpus[0])
    apic.irr, apic.isr, apic.isr_count, apic.highest_isr_cache = 0, 1 << 0x41, 1, 0x41
    vcpu_scan_ioapic(kvm.vcpus[0])
    with capture_events(rt.bus, "kvm_ioapic_update_eoi", "kvm_eoi") as events:
        assert apic_set_eoi(apic) == 0x41
    assert [e["ev"] for e in events] == ["kvm_eoi"]


def test_kvm_ioapic_send_eoi_edge_pin_with_notifier_is_an_edge_eoi(rt: Runtime) -> None:
    """An edge pin with an ack notifier is IOAPIC-handled: its EOI runs the notifier as an
    edge EOI (trigger_mode 0, remote IRR untouched)."""
    kvm = _vm(rt)
    acked: list[int] = []
    kvm_register_irq_ack_notifier(kvm, KvmIrqAckNotifier(3, lambda k: acked.append(k.gsi)))
    _program(kvm, 3, 0x33)
    kvm_ioapic_set_irq(_ioapic(kvm), 3, 0, 1, False)
    apic = _apic(kvm.vcpus[0])
    apic.irr, apic.isr, apic.isr_count, apic.highest_isr_cache = 0, 1 << 0x33, 1, 0x33
    vcpu_scan_ioapic(kvm.vcpus[0])
    with capture_events(rt.bus, "kvm_ioapic_update_eoi") as events:
        apic_set_eoi(apic)
    assert acked == [3] and events[0]["trigger_mode"] == 0


def test_kvm_apic_set_eoi_accelerated_broadcasts_a_level_eoi(rt: Runtime) -> None:
    """The APICv EOI-induced exit (ISR already cleared by hardware) reaches the IOAPIC."""
    kvm = _vm(rt, apicv=True)
    _program(kvm, 10, 0x52 | LEVEL)
    kvm_ioapic_set_irq(_ioapic(kvm), 10, 0, 1, False)
    kvm_ioapic_set_irq(_ioapic(kvm), 10, 0, 0, False)
    vcpu_scan_ioapic(kvm.vcpus[0])
    assert _ioapic(kvm).redirtbl[10].remote_irr == 1
    kvm_apic_set_eoi_accelerated(kvm.vcpus[0], 0x52)
    assert _ioapic(kvm).redirtbl[10].remote_irr == 0


def test_kvm_ioapic_send_eoi_split_irqchip_requests_the_userspace_exit(rt: Runtime) -> None:
    """Split irqchip: an IOAPIC-handled vector's EOI becomes KVM_REQ_IOAPIC_EOI_EXIT."""
    kvm = rt.call(lambda: build_vm(rt, nr_vcpus=1, apicv=False, x2apic=False, eoi_auto=True))
    vcpu = kvm.vcpus[0]
    apic = _apic(vcpu)
    vcpu.arch.ioapic_handled_vectors = 1 << 0x41
    apic.isr, apic.isr_count, apic.highest_isr_cache = 1 << 0x41, 1, 0x41
    apic_set_eoi(apic)
    assert kvm_test_request(KVM_REQ_IOAPIC_EOI_EXIT, vcpu)
    assert vcpu.arch.pending_ioapic_eoi == 0x41


# ------------------------------------------------------------------ scan and EOI-exit bitmap


def test_kvm_ioapic_scan_entry_level_notifier_and_rtc_pins_are_handled(rt: Runtime) -> None:
    """Handled: level pins and pins with ack notifiers (masked or not) aimed at this vCPU,
    the RTC pin, and pins whose vector is pending here; not: plain edge pins."""
    kvm = _vm(rt)
    kvm_register_irq_ack_notifier(kvm, KvmIrqAckNotifier(3, lambda k: None))
    _program(kvm, 2, 0x42 | LEVEL | MASKED)  # level, masked, to APIC 0
    _program(kvm, 3, 0x43)  # edge with a notifier
    _program(kvm, 4, 0x44)  # plain edge
    _program(kvm, 5, 0x45 | LEVEL | 1 << 56)  # level, to APIC 1
    _program(kvm, 8, 0x48 | 1 << 56)  # RTC, to APIC 1
    _program(kvm, 9, 0x49 | LEVEL | 1 << 56)  # level to APIC 1, but pending on vCPU 0
    _apic(kvm.vcpus[0]).isr |= 1 << 0x49
    def handled(vcpu: KvmVcpu) -> set[int]:
        bitmap = kvm_ioapic_scan_entry(vcpu, 0)
        return {v for v in range(256) if bitmap >> v & 1}

    assert handled(kvm.vcpus[0]) == {0x42, 0x43, 0x49}
    assert handled(kvm.vcpus[1]) == {0x45, 0x48, 0x49}


def test_vcpu_load_eoi_exitmap_v5_13_loads_no_vector(rt: Runtime) -> None:
    """v5.13: the bitmap is never written (modelled as zero); the fix loads the scan."""
    # With the fix: 0x61 (level pin 5) and 0x00 (the RTC pin 8, vector 0 at reset, aimed at
    # APIC 0: scanned whatever its state).
    for toggles, expected in ((frozenset(), 0),
                              (frozenset({"fix-eoi-exitmap-uninitialized"}), 1 << 0x61 | 1)):
        kvm = _vm(rt, apicv=True, toggles=toggles)
        _program(kvm, 5, 0x61 | LEVEL)
        vcpu = kvm.vcpus[0]
        vcpu_scan_ioapic(vcpu)
        assert vcpu.arch.ioapic_handled_vectors >> 0x61 & 1
        assert kvm_test_request(KVM_REQ_LOAD_EOI_EXITMAP, vcpu)
        vcpu_load_eoi_exitmap(vcpu)
        assert vcpu.arch.eoi_exit_bitmap == expected


# ------------------------------------------------------------------ routing


def test_kvm_set_routing_entry_irqchip_routes(rt: Runtime) -> None:
    """IOAPIC pins 0..23 only; a PIC pin or an unmodelled type is a RoutingError."""
    kvm = _vm(rt)
    assert kvm_set_irq_routing(kvm, [IrqchipRoute(30, KVM_IRQCHIP_IOAPIC, 24)]) == -errno.EINVAL
    with pytest.raises(RoutingError, match=r"routes\[0\]\.irqchip: .*PIC is not modelled"):
        kvm_set_irq_routing(kvm, [IrqchipRoute(3, KVM_IRQCHIP_PIC_MASTER, 3)])
    with pytest.raises(RoutingError, match=r"routes\[1\]\.type: .*type 4 is not modelled"):
        kvm_set_irq_routing(kvm, [MsiRoute(1, 0xFEE00000, 0x41), OtherRoute(2, 4)])
    assert kvm_set_irq_routing(kvm, [IrqchipRoute(30, KVM_IRQCHIP_IOAPIC, 5),
                                     IrqchipRoute(31, KVM_IRQCHIP_IOAPIC, 5)]) == 0
    assert kvm_irq_map_chip_pin(kvm, KVM_IRQCHIP_IOAPIC, 5) == 31  # the last one wins


def test_kvm_set_routing_entry_irqchip_refused_on_a_split_irqchip(rt: Runtime) -> None:
    """Without KVM_CREATE_IRQCHIP (split irqchip) an IRQCHIP route is -EINVAL."""
    kvm = rt.call(lambda: build_vm(rt, nr_vcpus=1, apicv=False, x2apic=False, eoi_auto=True))
    assert kvm_set_irq_routing(kvm, [IrqchipRoute(5, KVM_IRQCHIP_IOAPIC, 5)]) == -errno.EINVAL


def test_setup_routing_entry_a_gsi_takes_one_entry_per_chip(rt: Runtime) -> None:
    """Two IOAPIC entries, or an MSI beside an IOAPIC entry, on one GSI: -EINVAL."""
    kvm = _vm(rt)
    assert kvm_set_irq_routing(kvm, [IrqchipRoute(5, KVM_IRQCHIP_IOAPIC, 5),
                                     IrqchipRoute(5, KVM_IRQCHIP_IOAPIC, 6)]) == -errno.EINVAL
    assert kvm_set_irq_routing(kvm, [IrqchipRoute(5, KVM_IRQCHIP_IOAPIC, 5),
                                     MsiRoute(5, 0xFEE00000, 0x41)]) == -errno.EINVAL


def test_kvm_arch_set_irq_inatomic_irqchip_route_takes_the_workqueue_path(
        rt: Runtime) -> None:
    """An irqfd on an IOAPIC GSI: irqfd_wakeup gets -EWOULDBLOCK and irqfd_inject asserts
    then de-asserts the line (an edge)."""
    kvm = _vm(rt)
    kvm_set_irq_routing(kvm, [IrqchipRoute(4, KVM_IRQCHIP_IOAPIC, 4)])
    (e,) = kvm_irq_map_gsi(kvm, 4)
    assert kvm_arch_set_irq_inatomic(e, kvm, 0, 1, False) == -errno.EWOULDBLOCK
    _program(kvm, 4, 0x44)
    ctx = _efd(rt, "edge")
    assert call_settled(rt, kvm_irqfd_assign, kvm, ctx, 4) == 0
    with capture_events(rt.bus, "irqfd_wakeup", "irqfd_inject", "kvm_set_irq") as events:
        call_settled(rt, eventfd_signal, ctx, 1)
    assert [ev["ev"] for ev in events] == ["irqfd_wakeup", "irqfd_inject", "kvm_set_irq",
                                          "kvm_set_irq"]
    assert events[0]["r"] == -errno.EWOULDBLOCK
    assert [(ev["level"], ev["irq_source_id"]) for ev in events[2:]] == [(1, 0), (0, 0)]
    assert _apic(kvm.vcpus[0]).irr == 1 << 0x44 and _ioapic(kvm).irr == 0


def test_kvm_irqchip_entry_copy_keeps_chip_and_pin(rt: Runtime) -> None:
    """kvm_irq_map_gsi copies IRQCHIP entries whole (irqchip, pin, set)."""
    kvm = _vm(rt)
    kvm_set_irq_routing(kvm, [IrqchipRoute(9, KVM_IRQCHIP_IOAPIC, 3)])
    (e,) = kvm_irq_map_gsi(kvm, 9)
    assert isinstance(e, KvmKernelIrqRoutingEntry) and (e.irqchip, e.pin) == (2, 3)
    assert e.set is not None


def test_ioapic_write_indirect_fix_resample_on_unmask_resamples_instead_of_delivering(
        rt: Runtime) -> None:
    """Toggle fix-resample-on-unmask (later kernels): unmasking a pending level pin that has
    an irqfd resampler clears its irr bit and signals the resamplefd instead of delivering;
    without a resampler it still delivers."""
    from vkick.kvm.eventfd import KVM_IRQFD_FLAG_RESAMPLE  # noqa: PLC0415

    kvm = _vm(rt, toggles=frozenset({"fix-resample-on-unmask"}))
    kvm_set_irq_routing(kvm, [IrqchipRoute(5, KVM_IRQCHIP_IOAPIC, 5),
                              IrqchipRoute(6, KVM_IRQCHIP_IOAPIC, 6)])
    ctx, resamplefd = _efd(rt, "intx"), _efd(rt, "intx.r")
    call_settled(rt, kvm_irqfd_assign, kvm, ctx, 5, KVM_IRQFD_FLAG_RESAMPLE, resamplefd)
    _program(kvm, 5, 0x61 | LEVEL | MASKED)
    _program(kvm, 6, 0x62 | LEVEL | MASKED)
    call_settled(rt, eventfd_signal, ctx, 1)
    kvm_vm_ioctl_irq_line(kvm, 6, 1)
    ioapic = _ioapic(kvm)
    assert ioapic.irr == 1 << 5 | 1 << 6
    with capture_events(rt.bus, "kvm_notify_irqfd_resampler") as events:
        _program(kvm, 5, 0x61 | LEVEL)
        _program(kvm, 6, 0x62 | LEVEL)
    assert [e["gsi"] for e in events] == [5] and validate(events[0]) == []
    assert resamplefd.count == 1 and ioapic.irr == 1 << 6
    assert _apic(kvm.vcpus[0]).irr == 1 << 0x62  # pin 6 has no resampler: delivered


def test_ioapic_service_correlation_ids_follow_the_line(rt: Runtime) -> None:
    """vkick bookkeeping: an edge delivery consumes the asserting signal's id; every
    delivery of a held level line carries it; the line's fall drops it."""
    kvm = _vm(rt)
    ioapic = _ioapic(kvm)
    _program(kvm, 4, 0x44)
    _program(kvm, 5, 0x55 | LEVEL)
    with capture_events(rt.bus, "ioapic_service") as events:
        rt.cur_irq = 7
        kvm_ioapic_set_irq(ioapic, 4, 0, 1, False)
        kvm_ioapic_set_irq(ioapic, 5, 0, 1, False)
        rt.cur_irq = 0
        ioapic.redirtbl[5].remote_irr = 0  # as an EOI would
        ioapic_service(ioapic, 5, False)
    assert [(e["pin"], e["irq"]) for e in events] == [(4, [7]), (5, [7]), (5, [7])]
    assert ioapic.pin_irqs[4] == [] and ioapic.pin_irqs[5] == [7]
    kvm_ioapic_set_irq(ioapic, 5, 0, 0, False)
    assert ioapic.pin_irqs[5] == []
