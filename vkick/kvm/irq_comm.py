"""arch/x86/kvm/irq_comm.c: MSI decode, the atomic fast path for irqfd, the ``set``
functions of MSI and IOAPIC routes, the slow delivery loop (kvm_irq_delivery_to_apic) and
the x86 half of routing-table construction.

Covered: kvm_set_msi_irq, kvm_msi_route_invalid, kvm_arch_set_irq_inatomic, kvm_set_msi,
kvm_set_ioapic_irq, kvm_irq_delivery_to_apic, kvm_set_routing_entry,
kvm_setup_default_irq_routing, kvm_arch_post_irq_routing_update, kvm_scan_ioapic_routes,
kvm_send_userspace_msi (virt/kvm/irqchip.c, KVM_SIGNAL_MSI), kvm_intr_is_single_vcpu (its
fast half, lapic.c's kvm_intr_is_single_vcpu_fast, is in :mod:`vkick.kvm.lapic_map`) and
kvm_host.h's kvm_irq_is_postable: the tests VT-d posting makes.  Left out: the PIC
(kvm_set_pic_irq), Hyper-V SynIC routes (kvm_hv_set_sint), mask notifiers (the PIT's).
"""

from __future__ import annotations

import errno

from vkick.kvm.irq import irqchip_split
from vkick.kvm.irqchip import (
    IrqchipRoute,
    KvmKernelIrqRoutingEntry,
    MsiRoute,
    Route,
    RoutingError,
    kvm_set_irq_routing,
)
from vkick.kvm.kvm_host import (
    APIC_DEST_LOGICAL,
    APIC_DEST_NOSHORT,
    APIC_DEST_PHYSICAL,
    APIC_DM_FIXED,
    APIC_DM_LOWEST,
    KVM_IOAPIC_NUM_PINS,
    KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    PIC_NUM_PINS,
    Kvm,
    KvmLapic,
    KvmLapicIrq,
    KvmVcpu,
)
from vkick.kvm.lapic import kvm_apic_present, kvm_apic_set_irq
from vkick.kvm.lapic_map import (
    kvm_apic_match_dest,
    kvm_intr_is_single_vcpu_fast,
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
    right here; everything else (IRQCHIP routes — the IOAPIC takes a lock and may run ack
    notifiers, so irqfds on irqchip GSIs always go through irqfd_inject —, type 0 = no
    cached route, broadcasts, unresolvable logical modes) returns -EWOULDBLOCK so the caller
    defers to irqfd_inject.  An invalid MSI route gives -EINVAL (dropped).  Spec §9.4.
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


def kvm_set_ioapic_irq(e: KvmKernelIrqRoutingEntry, kvm: Kvm, irq_source_id: int, level: int,
                       line_status: bool) -> int:
    """arch/x86/kvm/irq_comm.c: kvm_set_ioapic_irq — the ``set`` of IOAPIC routes: drive the
    route's pin for ``irq_source_id`` (kvm_ioapic_set_irq).  Spec §9.2."""
    from vkick.kvm.ioapic import kvm_ioapic_set_irq  # noqa: PLC0415

    return kvm_ioapic_set_irq(kvm.arch.vioapic, e.pin, irq_source_id, level, line_status)


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


def kvm_set_routing_entry(kvm: Kvm, e: KvmKernelIrqRoutingEntry, ue: Route, i: int = 0) -> int:
    """arch/x86/kvm/irq_comm.c: kvm_set_routing_entry  [process: KVM_SET_GSI_ROUTING]

    Fill one kernel routing entry from the userspace one: IRQCHIP (refused with -EINVAL on
    a split irqchip; the IOAPIC takes pins 0..23) gets ``kvm_set_ioapic_irq``, MSI gets
    ``kvm_set_msi`` (-EINVAL for an invalid x2APIC-format address).  Spec §8.6 step 1.
    Differs from the kernel: PIC pins and route types vkick does not model, MSI vectors
    below 16 and ExtINT/reserved MSI delivery modes raise RoutingError naming
    ``routes[i].field`` instead of being set up.
    """
    if isinstance(ue, IrqchipRoute):
        if irqchip_split(kvm):
            return -errno.EINVAL
        if ue.irqchip in (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE):
            if ue.pin >= PIC_NUM_PINS // 2:
                return -errno.EINVAL
            raise RoutingError(f"routes[{i}].irqchip: expected the IOAPIC "
                               f"({KVM_IRQCHIP_IOAPIC}); the PIC is not modelled")
        if ue.irqchip != KVM_IRQCHIP_IOAPIC:
            return -errno.EINVAL
        if not 0 <= ue.pin < KVM_IOAPIC_NUM_PINS:
            return -errno.EINVAL
        e.pin = ue.pin
        e.set = kvm_set_ioapic_irq
        e.irqchip = ue.irqchip
        return 0
    if isinstance(ue, MsiRoute):
        vector = ue.data & 0xFF
        if vector < 16:
            raise RoutingError(f"routes[{i}].data: expected an MSI vector ≥ 16 (bits 7:0), "
                               f"got {vector:#x}")
        dm = (ue.data >> 8) & 7
        if dm in (3, 7):
            raise RoutingError(f"routes[{i}].data: delivery mode {dm} (bits 10:8) is not "
                               f"supported for MSI routes (reserved/ExtINT)")
        e.set = kvm_set_msi
        e.address_lo = ue.address_lo
        e.address_hi = ue.address_hi
        e.data = ue.data
        if kvm_msi_route_invalid(kvm, e):
            return -errno.EINVAL
        return 0
    raise RoutingError(f"routes[{i}].type: expected an MSI ({KVM_IRQ_ROUTING_MSI}) or "
                       f"IRQCHIP ({KVM_IRQ_ROUTING_IRQCHIP}) route; type {ue.type} is not "
                       f"modelled")


def kvm_setup_default_irq_routing(kvm: Kvm) -> int:
    """arch/x86/kvm/irq_comm.c: kvm_setup_default_irq_routing — GSI n → IOAPIC pin n for
    n = 0..23 (installed by KVM_CREATE_IRQCHIP; the VMM's KVM_SET_GSI_ROUTING replaces it).
    Differs from the kernel: GSIs 0..15 are not also routed to the PIC (not modelled), so
    they carry one entry, not two (irqfds on them take the slow path either way).
    """
    return kvm_set_irq_routing(kvm, [IrqchipRoute(pin, KVM_IRQCHIP_IOAPIC, pin)
                                     for pin in range(KVM_IOAPIC_NUM_PINS)])


def kvm_arch_post_irq_routing_update(kvm: Kvm) -> None:
    """arch/x86/kvm/irq_comm.c: kvm_arch_post_irq_routing_update — on a split irqchip the
    level-triggered MSI routes of the reserved IOAPIC pins decide which EOIs exit to
    userspace, so every vCPU rescans (KVM_REQ_SCAN_IOAPIC)."""
    from vkick.kvm.x86 import kvm_make_scan_ioapic_request  # noqa: PLC0415

    if not irqchip_split(kvm):
        return
    kvm_make_scan_ioapic_request(kvm)


def kvm_scan_ioapic_routes(vcpu: KvmVcpu, ioapic_handled_vectors: int) -> int:
    """arch/x86/kvm/irq_comm.c: kvm_scan_ioapic_routes  [vCPU thread, split irqchip]

    The vectors of the level-triggered MSI routes on GSIs below ``nr_reserved_ioapic_pins``
    (those a userspace IOAPIC delivers) that target this vCPU.  vkick VMs reserve no pins,
    so this finds nothing unless a test sets ``kvm.arch.nr_reserved_ioapic_pins``.
    Differs from the kernel: returns the updated bitmap instead of setting bits in place.
    """
    kvm = vcpu.kvm
    table = kvm.irq_routing
    if table is None:
        return ioapic_handled_vectors
    nr_ioapic_pins = min(table.nr_rt_entries, kvm.arch.nr_reserved_ioapic_pins)
    for i in range(nr_ioapic_pins):
        for entry in table.map.get(i, ()):
            if entry.type != KVM_IRQ_ROUTING_MSI:
                continue
            irq = KvmLapicIrq()
            kvm_set_msi_irq(kvm, entry, irq)
            if irq.trig_mode and kvm_apic_match_dest(vcpu, None, APIC_DEST_NOSHORT,
                                                     irq.dest_id, irq.dest_mode):
                ioapic_handled_vectors |= 1 << irq.vector
    return ioapic_handled_vectors


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
