"""arch/x86/kvm/irq_comm.c: MSI decode, the atomic fast path for irqfd, the MSI ``set``
function and the slow delivery loop (kvm_irq_delivery_to_apic).

Covered: kvm_set_msi_irq, kvm_msi_route_invalid, kvm_arch_set_irq_inatomic, kvm_set_msi,
kvm_irq_delivery_to_apic, kvm_send_userspace_msi (virt/kvm/irqchip.c, KVM_SIGNAL_MSI),
kvm_intr_is_single_vcpu (with lapic.c's kvm_intr_is_single_vcpu_fast and kvm_host.h's
kvm_irq_is_postable, the tests VT-d posting makes).
"""

from __future__ import annotations

import errno

from vkick.kvm.irqchip import KvmKernelIrqRoutingEntry
from vkick.kvm.kvm_host import (
    APIC_DEST_LOGICAL,
    APIC_DEST_NOSHORT,
    APIC_DEST_PHYSICAL,
    APIC_DM_FIXED,
    APIC_DM_LOWEST,
    KVM_IRQ_ROUTING_MSI,
    Kvm,
    KvmLapic,
    KvmLapicIrq,
    KvmVcpu,
)
from vkick.kvm.lapic import kvm_apic_present, kvm_apic_set_irq
from vkick.kvm.lapic_map import (
    kvm_apic_map_get_dest_lapic,
    kvm_apic_match_dest,
    kvm_irq_delivery_to_apic_fast,
    kvm_lowest_prio_delivery,
    kvm_vector_to_index,
)


def kvm_set_msi_irq(kvm: Kvm, e: KvmKernelIrqRoutingEntry, irq: KvmLapicIrq) -> None:
    """arch/x86/kvm/irq_comm.c: kvm_set_msi_irq — decode an MSI into a kvm_lapic_irq.

    Address 19:12 dest id (+ address_hi 31:8 with the x2APIC API), bit 2 logical, bit 3
    redirection hint; data 7:0 vector, 10:8 delivery mode, 15 trigger.  Data bit 14 is
    ignored: level is always 1.  The extended destination ID (address 11:5) is not decoded in
    v5.13.  Spec §9.3.
    """
    bus = kvm.rt.bus
    if bus.on:
        address = (e.address_hi << 32 | e.address_lo) if kvm.arch.x2apic_format else e.address_lo
        bus.emit("kvm_msi_set_irq", vm=kvm.name, address=address, data=e.data,
                 irq=kvm.rt.cur_irq)
    dest_id = (e.address_lo >> 12) & 0xFF
    if kvm.arch.x2apic_format:
        dest_id |= (e.address_hi >> 8) << 8
    irq.dest_id = dest_id
    irq.vector = e.data & 0xFF
    irq.dest_mode = APIC_DEST_LOGICAL if e.address_lo & (1 << 2) else APIC_DEST_PHYSICAL
    irq.trig_mode = (e.data >> 15) & 1
    irq.delivery_mode = e.data & 0x700
    irq.msi_redir_hint = bool(e.address_lo & (1 << 3))
    irq.level = True
    irq.shorthand = APIC_DEST_NOSHORT


def kvm_msi_route_invalid(kvm: Kvm, e: KvmKernelIrqRoutingEntry) -> bool:
    """arch/x86/kvm/irq_comm.c: kvm_msi_route_invalid — reserved address_hi bits with the
    32-bit-ID x2APIC API."""
    return kvm.arch.x2apic_format and bool(e.address_hi & 0xFF)


def kvm_arch_set_irq_inatomic(e: KvmKernelIrqRoutingEntry, kvm: Kvm, irq_source_id: int,
                              level: int, line_status: bool) -> int:
    """arch/x86/kvm/irq_comm.c: kvm_arch_set_irq_inatomic  [atomic]

    The fast path irqfd_wakeup tries: MSI routes that the APIC map resolves are injected
    right here; everything else (other route types, type 0 = no cached route, broadcasts,
    unresolvable logical modes) returns -EWOULDBLOCK so the caller defers to irqfd_inject.
    An invalid MSI route gives -EINVAL (dropped).  Spec §9.4.
    """
    if e.type == KVM_IRQ_ROUTING_MSI:
        if kvm_msi_route_invalid(kvm, e):
            return -errno.EINVAL
        irq = KvmLapicIrq()
        kvm_set_msi_irq(kvm, e, irq)
        handled, r = kvm_irq_delivery_to_apic_fast(kvm, None, irq, None)
        if handled:
            return r
    return -errno.EWOULDBLOCK


def kvm_set_msi(e: KvmKernelIrqRoutingEntry, kvm: Kvm, irq_source_id: int, level: int,
                line_status: bool) -> int:
    """arch/x86/kvm/irq_comm.c: kvm_set_msi — the ``set`` of MSI routes (slow path, ioctl)."""
    if kvm_msi_route_invalid(kvm, e):
        return -errno.EINVAL
    if not level:
        return -1  # an MSI has no de-assert
    irq = KvmLapicIrq()
    kvm_set_msi_irq(kvm, e, irq)
    return kvm_irq_delivery_to_apic(kvm, None, irq, None)


def kvm_irq_delivery_to_apic(kvm: Kvm, src: KvmLapic | None, irq: KvmLapicIrq,
                             dest_map: object) -> int:
    """arch/x86/kvm/irq_comm.c: kvm_irq_delivery_to_apic  [process or vCPU]

    The fast resolver first; otherwise walk every vCPU in index order.  A physical
    lowest-priority broadcast becomes Fixed (it cannot be arbitrated); lowest priority picks
    the (vector % n)-th candidate with vector hashing, else the smallest arbitration
    priority.  Returns -1 when nobody matched.  Spec §9.6.
    """
    handled, r = kvm_irq_delivery_to_apic_fast(kvm, src, irq, dest_map)
    if handled:
        return r
    if (irq.dest_mode == APIC_DEST_PHYSICAL and irq.dest_id == 0xFF
            and kvm_lowest_prio_delivery(irq)):
        # printk_once "apic: phys broadcast and lowest prio".  Only the mode changes: with
        # the redirection hint still set the MSI is arbitrated below and reaches one vCPU
        # (checked against real KVM: tests/realkvm).
        irq.delivery_mode = APIC_DM_FIXED
    r = -1
    lowest_prio = kvm_lowest_prio_delivery(irq)
    candidates: list[int] = []
    lowest = None
    for vcpu in kvm.vcpus:
        if not kvm_apic_present(vcpu):
            continue
        if not kvm_apic_match_dest(vcpu, src, irq.shorthand, irq.dest_id, irq.dest_mode):
            continue
        if not lowest_prio:
            r = max(r, 0) + kvm_apic_set_irq(vcpu, irq, dest_map)
            continue
        apic = vcpu.arch.apic
        assert apic is not None
        if not apic.sw_enabled:
            continue
        if kvm.vector_hashing:
            candidates.append(vcpu.vcpu_idx)
        elif lowest is None or vcpu.arch.apic_arb_prio < lowest.arch.apic_arb_prio:
            lowest = vcpu
    if lowest_prio and kvm.vector_hashing and candidates:
        bitmap = 0
        for idx in candidates:
            bitmap |= 1 << idx
        idx = kvm_vector_to_index(irq.vector, len(candidates), bitmap, len(kvm.vcpus))
        lowest = kvm.vcpus[idx]
    if lowest is not None:
        r = kvm_apic_set_irq(lowest, irq, dest_map)
    return r


def kvm_send_userspace_msi(kvm: Kvm, address_lo: int, data: int, address_hi: int = 0,
                           flags: int = 0) -> int:
    """virt/kvm/irqchip.c: kvm_send_userspace_msi (KVM_SIGNAL_MSI)  [process: VMM ioctl]

    A new interrupt source: it takes its own correlation id.
    """
    rt = kvm.rt
    saved = rt.cur_irq
    rt.cur_irq = rt.next_irq_id()
    try:
        e = KvmKernelIrqRoutingEntry(0, KVM_IRQ_ROUTING_MSI, address_lo, address_hi, data)
        return kvm_set_msi(e, kvm, 0, 1, False)
    finally:
        rt.cur_irq = saved


def kvm_irq_is_postable(irq: KvmLapicIrq) -> bool:
    """arch/x86/include/asm/kvm_host.h: kvm_irq_is_postable  [any context]

    Only Fixed and Lowest-priority interrupts can be posted.
    """
    return irq.delivery_mode in (APIC_DM_FIXED, APIC_DM_LOWEST)


def kvm_intr_is_single_vcpu_fast(kvm: Kvm, irq: KvmLapicIrq) -> KvmVcpu | None:
    """arch/x86/kvm/lapic.c: kvm_intr_is_single_vcpu_fast → the one vCPU, or None  [RCU]

    Through the APIC map: no shorthand, resolvable, exactly one destination bit with an
    APIC behind it (lowest priority has picked its one destination already).
    """
    if irq.shorthand:
        return None
    ok, dst, offset, bitmap = kvm_apic_map_get_dest_lapic(kvm, None, irq, kvm.arch.apic_map)
    if not ok or bitmap.bit_count() != 1:
        return None
    apic = dst[offset + bitmap.bit_length() - 1]
    return None if apic is None else apic.vcpu


def kvm_intr_is_single_vcpu(kvm: Kvm, irq: KvmLapicIrq) -> KvmVcpu | None:
    """arch/x86/kvm/irq_comm.c: kvm_intr_is_single_vcpu → the one vCPU, or None  [process]

    The fast map lookup, else every present APIC matching the destination: exactly one.
    Differs from the kernel: returns the vCPU instead of a bool and an out-parameter.
    """
    vcpu = kvm_intr_is_single_vcpu_fast(kvm, irq)
    if vcpu is not None:
        return vcpu
    found: KvmVcpu | None = None
    for v in kvm.vcpus:
        if not kvm_apic_present(v):
            continue
        if not kvm_apic_match_dest(v, None, irq.shorthand, irq.dest_id, irq.dest_mode):
            continue
        if found is not None:
            return None
        found = v
    return found
