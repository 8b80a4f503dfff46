"""arch/x86/kvm/lapic.c (LAPIC half): IRR/ISR/TMR bookkeeping, TPR/PPR, interrupt acknowledge,
EOI, ``__apic_accept_irq`` for every delivery mode, guest register writes and IPIs.

The APIC-map half of lapic.c (map recalculation, fast destination lookup, slow-path
matching) is in :mod:`vkick.kvm.lapic_map`.  With APICv the register fields of
:class:`~vkick.kvm.kvm_host.KvmLapic` *are* the virtual-APIC page the hardware model reads
and writes (VIRR = ``irr``, VISR = ``isr``, VTPR = ``tpr``, VPPR = ``ppr``).

Covered: kvm_create_lapic, find_highest_vector, apic_search_irr, apic_find_highest_irr,
kvm_lapic_find_highest_irr, kvm_lapic_set_irr, apic_clear_irr, __kvm_apic_update_irr,
kvm_apic_update_irr, apic_set_isr, apic_clear_isr, apic_find_highest_isr, __apic_update_ppr,
apic_update_ppr, apic_has_interrupt_for_ppr, apic_set_tpr, kvm_apic_has_interrupt,
kvm_get_apic_interrupt, kvm_apic_pending_eoi, kvm_ioapic_handles_vector, kvm_ioapic_send_eoi,
apic_set_eoi, kvm_apic_set_eoi_accelerated, kvm_apic_set_irq,
__apic_accept_irq, kvm_apic_accept_events, kvm_lapic_reg_write, kvm_x2apic_msr_write,
kvm_apic_send_ipi, and the state side: kvm_lapic_set_base, kvm_lapic_get_base,
kvm_apic_update_apicv, kvm_lapic_reset, kvm_apic_state_fixup, kvm_apic_get_state,
kvm_apic_set_state.  Left out: timers, LVT entries, the PIC, Hyper-V SynIC, nested.  The
IOAPIC is :mod:`vkick.kvm.ioapic`; EOIs reach it through kvm_ioapic_send_eoi.
Fix switches for APICv toggled at run time (research/bugs.md; off = v5.13):
``fix-no-pir-sync-when-apicv-inhibited`` (bug #7, apic_has_interrupt_for_ppr),
``fix-irr-pending-scan-on-deactivate`` (#8a), ``fix-irr-pending-not-set-on-restore``
(#8b) and ``fix-isr-cache-not-purged`` (#9), all in kvm_apic_update_apicv.
"""

from __future__ import annotations

import dataclasses
import errno
from typing import Final

from vkick.hw.apicv import merge_pir_ids

# irq (here), kvm_main and vmx (below) import nothing from here at module level: no cycles.
from vkick.kvm.irq import irqchip_split
from vkick.kvm.kvm_host import (
    APIC_BASE_MSR,
    APIC_DEFAULT_PHYS_BASE,
    APIC_DEST_MASK,
    APIC_DEST_SELF,
    APIC_DFR,
    APIC_DFR_FLAT,
    APIC_DM_EXTINT,
    APIC_DM_FIXED,
    APIC_DM_INIT,
    APIC_DM_LOWEST,
    APIC_DM_NMI,
    APIC_DM_REMRD,
    APIC_DM_SMI,
    APIC_DM_STARTUP,
    APIC_EOI,
    APIC_ICR,
    APIC_ICR2,
    APIC_ICR_BUSY,
    APIC_ID,
    APIC_INT_ASSERT,
    APIC_INT_LEVELTRIG,
    APIC_LDR,
    APIC_MODE_MASK,
    APIC_SELF_IPI,
    APIC_SHORT_MASK,
    APIC_SPIV,
    APIC_SPIV_APIC_ENABLED,
    APIC_TASKPRI,
    APIC_VECTOR_MASK,
    KVM_APIC_INIT,
    KVM_APIC_SIPI,
    KVM_REQ_EVENT,
    KVM_REQ_IOAPIC_EOI_EXIT,
    KVM_REQ_NMI,
    KVM_REQ_SMI,
    MSR_IA32_APICBASE_ENABLE,
    X2APIC_ENABLE,
    KvmLapic,
    KvmLapicIrq,
    KvmLapicState,
    KvmVcpu,
    MpState,
)
from vkick.kvm.kvm_main import kvm_make_request, kvm_vcpu_kick
from vkick.kvm.vmx.vmx import (
    pir_sync_allowed,
    vmx_apicv_post_state_restore,
    vmx_deliver_posted_interrupt,
    vmx_hwapic_isr_update,
    vmx_set_rvi,
    vmx_sync_pir_to_irr,
)

APIC_MAP_DIRTY: Final = 2

_ALL: Final = (1 << 256) - 1


def _emit_warn(vcpu: KvmVcpu, what: str) -> None:
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vkick_warn", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, what=what)


def kvm_create_lapic(vcpu: KvmVcpu) -> KvmLapic:
    """arch/x86/kvm/lapic.c: kvm_create_lapic  [process]

    A zeroed register page, hardware-enabled (``apic_base`` = MSR_IA32_APICBASE_ENABLE, so
    that kvm_lapic_set_base sees no change at reset) and software-disabled.  The map is not
    touched here: kvm_lapic_reset (via kvm_vcpu_reset) sets the reset registers and marks
    it dirty.
    """
    apic = KvmLapic(vcpu=vcpu)
    apic.spiv = 0
    apic.sw_enabled = False
    apic.dfr = 0
    apic.hw_enabled = True
    apic.x2apic_mode = False
    vcpu.arch.apic = apic
    return apic


def kvm_apic_calc_x2apic_ldr(id_: int) -> int:
    """arch/x86/kvm/lapic.c: kvm_apic_calc_x2apic_ldr — cluster in 31:16, bit in 15:0."""
    return ((id_ >> 4) << 16) | (1 << (id_ & 0xF))


# ---------------------------------------------------------------------------- predicates


def kvm_apic_present(vcpu: KvmVcpu) -> bool:
    """arch/x86/kvm/lapic.h: kvm_apic_present — in-kernel LAPIC, hardware-enabled."""
    apic = vcpu.arch.apic
    return apic is not None and apic.hw_enabled


def kvm_apic_sw_enabled(apic: KvmLapic) -> bool:
    """arch/x86/kvm/lapic.h: kvm_apic_sw_enabled — SPIV bit 8."""
    return apic.sw_enabled


def apic_enabled(apic: KvmLapic) -> bool:
    """arch/x86/kvm/lapic.h: apic_enabled — hardware and software enabled."""
    return apic.sw_enabled and apic.hw_enabled


def kvm_lapic_enabled(vcpu: KvmVcpu) -> bool:
    """arch/x86/kvm/lapic.h: kvm_lapic_enabled — present and software-enabled."""
    apic = vcpu.arch.apic
    return apic is not None and apic.hw_enabled and apic.sw_enabled


def apic_x2apic_mode(apic: KvmLapic) -> bool:
    """arch/x86/kvm/lapic.h: apic_x2apic_mode."""
    return apic.x2apic_mode


def kvm_xapic_id(apic: KvmLapic) -> int:
    """arch/x86/kvm/lapic.h: kvm_xapic_id — APIC_ID bits 31:24."""
    return (apic.id >> 24) & 0xFF


# ---------------------------------------------------------------------------- vector search


def find_highest_vector(bitmap: int) -> int:
    """arch/x86/kvm/lapic.c: find_highest_vector — highest set vector of a 256-bit map, or -1."""
    return bitmap.bit_length() - 1


def count_vectors(bitmap: int) -> int:
    """arch/x86/kvm/lapic.c: count_vectors."""
    return bitmap.bit_count()


def apic_search_irr(apic: KvmLapic) -> int:
    """arch/x86/kvm/lapic.c: apic_search_irr."""
    return apic.irr.bit_length() - 1


def apic_find_highest_irr(apic: KvmLapic) -> int:
    """arch/x86/kvm/lapic.c: apic_find_highest_irr — -1 unless ``irr_pending`` says look."""
    if not apic.irr_pending:
        return -1
    return apic.irr.bit_length() - 1


def kvm_lapic_find_highest_irr(vcpu: KvmVcpu) -> int:
    """arch/x86/kvm/lapic.c: kvm_lapic_find_highest_irr

    Racy against a concurrent ``__apic_accept_irq`` by design: the kick that accompanies
    every accept guarantees a re-evaluation before the next VM entry (spec §11.2).
    """
    apic = vcpu.arch.apic
    assert apic is not None
    return apic_find_highest_irr(apic)


# ---------------------------------------------------------------------------- IRR writers


def kvm_lapic_set_irr(vec: int, apic: KvmLapic) -> None:
    """arch/x86/kvm/lapic.h: kvm_lapic_set_irr  [atomic]

    Bit first, then the ``irr_pending`` hint, so apic_clear_irr on the vCPU cannot clear the
    hint after our bit landed without seeing it (spec §11.3).
    """
    apic.irr |= 1 << vec
    apic.irr_pending = True


def apic_clear_irr(vec: int, apic: KvmLapic) -> None:
    """arch/x86/kvm/lapic.c: apic_clear_irr — with APICv also refresh RVI."""
    vcpu = apic.vcpu
    if vcpu.arch.apicv_active:
        apic.irr &= ~(1 << vec)
        vmx_set_rvi(vcpu, apic_find_highest_irr(apic))  # vmx_hwapic_irr_update (not nested)
    else:
        apic.irr_pending = False
        apic.irr &= ~(1 << vec)
        if apic.irr:
            apic.irr_pending = True


def __kvm_apic_update_irr(pir: list[int], apic: KvmLapic) -> tuple[bool, int]:
    """arch/x86/kvm/lapic.c: __kvm_apic_update_irr  [atomic]

    ``pir`` is a one-element list holding the 256-bit PIR (taken and zeroed here, the xchg of
    each 32-bit word).  Returns (a new highest vector arrived, max_irr).  Vectors already in
    IRR are simply OR-ed (coalesced).  Spec §11.3.
    """
    taken = pir[0]
    pir[0] = 0
    new_bits = taken & ~apic.irr
    apic.irr |= taken
    merge_pir_ids(apic.vcpu.arch, taken)
    max_irr = apic.irr.bit_length() - 1
    max_updated_irr = new_bits.bit_length() - 1
    return (max_updated_irr != -1 and max_updated_irr == max_irr), max_irr


def kvm_apic_update_irr(vcpu: KvmVcpu, pir: list[int]) -> tuple[bool, int]:
    """arch/x86/kvm/lapic.c: kvm_apic_update_irr — __kvm_apic_update_irr on this vCPU."""
    apic = vcpu.arch.apic
    assert apic is not None
    result = __kvm_apic_update_irr(pir, apic)
    apic.irr_pending = True
    return result


# ---------------------------------------------------------------------------- ISR bookkeeping


def apic_set_isr(vec: int, apic: KvmLapic) -> None:
    """arch/x86/kvm/lapic.c: apic_set_isr — the new vector is by construction the highest.

    With APICv the processor changes ISR behind KVM's back, so nothing is cached: only SVI
    is set.  Without, ``isr_count`` and ``highest_isr_cache`` follow (spec §11.4).
    """
    bit = 1 << vec
    if apic.isr & bit:
        return
    apic.isr |= bit
    if apic.vcpu.arch.apicv_active:
        vmx_hwapic_isr_update(apic.vcpu, vec)  # kvm_x86_hwapic_isr_update
    else:
        apic.isr_count += 1
        apic.highest_isr_cache = vec


def apic_find_highest_isr(apic: KvmLapic) -> int:
    """arch/x86/kvm/lapic.c: apic_find_highest_isr — -1 with ``isr_count`` 0, else the
    cache if valid, else a scan of ISR.

    It does not look at APICv: it relies on ``isr_count`` being pinned to 1 and the cache
    to -1 while APICv is active (kvm_apic_update_apicv), so a cache left over from before
    an activation is believed (bug #9).  Spec §11.4.
    """
    if apic.isr_count == 0:
        return -1
    if apic.highest_isr_cache != -1:
        return apic.highest_isr_cache
    return apic.isr.bit_length() - 1


def apic_clear_isr(vec: int, apic: KvmLapic) -> None:
    """arch/x86/kvm/lapic.c: apic_clear_isr — with APICv (reached only through the Hyper-V
    EOI enlightenment) refresh SVI and leave the counters alone."""
    bit = 1 << vec
    if not apic.isr & bit:
        return
    apic.isr &= ~bit
    if apic.vcpu.arch.apicv_active:
        vmx_hwapic_isr_update(apic.vcpu, apic_find_highest_isr(apic))
    else:
        apic.isr_count -= 1
        apic.highest_isr_cache = -1


# ---------------------------------------------------------------------------- priority


def __apic_update_ppr(apic: KvmLapic) -> tuple[bool, int]:
    """arch/x86/kvm/lapic.c: __apic_update_ppr → (PPR decreased, new PPR).  Spec §11.5."""
    old_ppr = apic.ppr
    tpr = apic.tpr
    isrv = apic_find_highest_isr(apic)
    isrv = 0 if isrv < 0 else isrv
    ppr = tpr & 0xFF if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0
    if old_ppr != ppr:
        apic.ppr = ppr
    return ppr < old_ppr, ppr


def apic_has_interrupt_for_ppr(apic: KvmLapic, ppr: int) -> int:
    """arch/x86/kvm/lapic.c: apic_has_interrupt_for_ppr

    The highest IRR vector whose class is above PPR's, or -1.  With APICv the PIR is
    harvested first (vmx_sync_pir_to_irr), so every runnability check sees posted vectors.
    v5.13 harvests only while APICv is active for the vCPU; with
    ``fix-no-pir-sync-when-apicv-inhibited`` (bug #7, 37c4dbf337c5) whenever the VM could
    have posted at all (``kvm_x86_ops.sync_pir_to_irr`` set: enable_apicv).
    """
    vcpu = apic.vcpu
    if pir_sync_allowed(vcpu):
        highest_irr = vmx_sync_pir_to_irr(vcpu)
    else:
        highest_irr = apic_find_highest_irr(apic)
    if highest_irr == -1 or (highest_irr & 0xF0) <= ppr:
        return -1
    return highest_irr


def apic_update_ppr(apic: KvmLapic) -> None:
    """arch/x86/kvm/lapic.c: apic_update_ppr — raise KVM_REQ_EVENT when a held vector frees."""
    decreased, ppr = __apic_update_ppr(apic)
    if decreased and apic_has_interrupt_for_ppr(apic, ppr) != -1:
        kvm_make_request(KVM_REQ_EVENT, apic.vcpu)


def apic_set_tpr(apic: KvmLapic, tpr: int) -> None:
    """arch/x86/kvm/lapic.c: apic_set_tpr."""
    apic.tpr = tpr
    apic_update_ppr(apic)


def kvm_apic_has_interrupt(vcpu: KvmVcpu) -> int:
    """arch/x86/kvm/lapic.c: kvm_apic_has_interrupt — deliverable vector or -1 (IF not read)."""
    apic = vcpu.arch.apic
    if apic is None or not apic.hw_enabled:
        return -1
    _, ppr = __apic_update_ppr(apic)
    return apic_has_interrupt_for_ppr(apic, ppr)


def kvm_get_apic_interrupt(vcpu: KvmVcpu) -> int:
    """arch/x86/kvm/lapic.c: kvm_get_apic_interrupt — interrupt acknowledge: IRR → ISR.

    Used by software injection; PPR rises to the vector's class, so nothing of the same or a
    lower class can be above PPR until the EOI (spec §11.7, invariant §17.7).
    """
    vector = kvm_apic_has_interrupt(vcpu)
    if vector == -1:
        return -1
    apic = vcpu.arch.apic
    assert apic is not None
    apic_clear_irr(vector, apic)
    apic_set_isr(vector, apic)
    __apic_update_ppr(apic)
    return vector


# ---------------------------------------------------------------------------- EOI


def kvm_apic_pending_eoi(vcpu: KvmVcpu, vector: int) -> bool:
    """arch/x86/kvm/lapic.c: kvm_apic_pending_eoi — ``vector`` is in service or pending
    here (ISR or IRR), so its EOI is still to come."""
    apic = vcpu.arch.apic
    assert apic is not None
    return bool((apic.isr | apic.irr) >> vector & 1)


def kvm_ioapic_handles_vector(apic: KvmLapic, vector: int) -> bool:
    """arch/x86/kvm/lapic.c: kvm_ioapic_handles_vector — in ioapic_handled_vectors."""
    return bool(apic.vcpu.arch.ioapic_handled_vectors >> vector & 1)


def kvm_ioapic_send_eoi(apic: KvmLapic, vector: int) -> None:
    """arch/x86/kvm/lapic.c: kvm_ioapic_send_eoi  [vCPU thread]

    Broadcast the EOI to the IOAPIC only for a vector it handles (vcpu_scan_ioapic).  On a
    split irqchip the userspace IOAPIC is told through KVM_EXIT_IOAPIC_EOI
    (KVM_REQ_IOAPIC_EOI_EXIT); with the in-kernel IOAPIC the EOI is level-triggered iff
    the vector's TMR bit is set (kvm_ioapic_update_eoi: ack notifiers, remote IRR).
    Edge MSIs — TMR clear, never IOAPIC-handled unless a pin shares the vector — have no
    side effect here (spec §11.8, §17.13).
    """
    if not kvm_ioapic_handles_vector(apic, vector):
        return
    vcpu = apic.vcpu
    if irqchip_split(vcpu.kvm):
        vcpu.arch.pending_ioapic_eoi = vector
        kvm_make_request(KVM_REQ_IOAPIC_EOI_EXIT, vcpu)
        return
    from vkick.kvm.ioapic import (  # noqa: PLC0415  (ioapic → lapic_map → this module)
        IOAPIC_EDGE_TRIG,
        IOAPIC_LEVEL_TRIG,
        kvm_ioapic_update_eoi,
    )

    trigger_mode = IOAPIC_LEVEL_TRIG if apic.tmr >> vector & 1 else IOAPIC_EDGE_TRIG
    kvm_ioapic_update_eoi(vcpu, vector, trigger_mode)


def apic_set_eoi(apic: KvmLapic) -> int:
    """arch/x86/kvm/lapic.c: apic_set_eoi — retire the highest in-service vector.

    Architectural: whatever vector the guest believes it is finishing, the highest ISR bit
    is cleared; an EOI with nothing in service does nothing (invariant §17.8).  Then the
    EOI goes on to the IOAPIC if it handles the vector (kvm_ioapic_send_eoi, spec §11.8).
    """
    vcpu = apic.vcpu
    vector = apic_find_highest_isr(apic)
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("kvm_eoi", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, vector=vector)
    if vector == -1:
        return vector
    apic_clear_isr(vector, apic)
    apic_update_ppr(apic)
    kvm_ioapic_send_eoi(apic, vector)
    kvm_make_request(KVM_REQ_EVENT, vcpu)
    return vector


def kvm_apic_set_eoi_accelerated(vcpu: KvmVcpu, vector: int) -> None:
    """arch/x86/kvm/lapic.c: kvm_apic_set_eoi_accelerated — the APICv EOI-induced exit
    (trap-like: the hardware already cleared VISR and updated SVI/VPPR): only the IOAPIC
    side effects remain (kvm_ioapic_send_eoi).  Spec §11.8, §13.4."""
    apic = vcpu.arch.apic
    assert apic is not None
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("kvm_eoi", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, vector=vector)
    kvm_ioapic_send_eoi(apic, vector)
    kvm_make_request(KVM_REQ_EVENT, vcpu)


# ---------------------------------------------------------------------------- accept


def kvm_apic_set_irq(vcpu: KvmVcpu, irq: KvmLapicIrq, dest_map: object = None) -> int:
    """arch/x86/kvm/lapic.c: kvm_apic_set_irq."""
    apic = vcpu.arch.apic
    assert apic is not None
    return __apic_accept_irq(apic, irq.delivery_mode, irq.vector, irq.level, irq.trig_mode,
                             dest_map)


def __apic_accept_irq(  # noqa: PLR0917  (the kernel's signature)
        apic: KvmLapic, delivery_mode: int, vector: int, level: bool,
                      trig_mode: int, dest_map: object = None) -> int:
    """arch/x86/kvm/lapic.c: __apic_accept_irq  [any context, often atomic]

    1 if accepted (coalescing into an already pending bit counts as accepted: v5.13 does not
    report it), 0 if discarded.  Fixed/Lowest go to posted interrupts, or to IRR +
    KVM_REQ_EVENT + kick when APICv is inactive.  Spec §11.10.
    """
    vcpu = apic.vcpu
    kvm = vcpu.kvm
    rt = kvm.rt
    bus = rt.bus
    result = 0
    if delivery_mode == APIC_DM_LOWEST:
        vcpu.arch.apic_arb_prio += 1
        delivery_mode = APIC_DM_FIXED
    if delivery_mode == APIC_DM_FIXED:
        if trig_mode and not level:
            return 0
        if not (apic.sw_enabled and apic.hw_enabled):
            if bus.on:
                bus.emit("kvm_apic_accept_irq", vm=kvm.name, vcpu=vcpu.vcpu_id, dm=0,
                         tm=trig_mode, vector=vector, irq=rt.cur_irq, path="dropped",
                         coalesced=False)
            return 0
        result = 1
        bit = 1 << vector
        if trig_mode:
            apic.tmr |= bit
        elif apic.tmr & bit:
            apic.tmr &= ~bit
        posted = vmx_deliver_posted_interrupt(vcpu, vector) == 0
        if rt.cur_irq:
            # Correlation ids follow the pending instance: in PIR until merged into IRR.
            table = vcpu.arch.pir_ids if posted else vcpu.arch.irq_ids
            ids = table.get(vector)
            if ids is None:
                ids = table[vector] = []
            ids.append(rt.cur_irq)
            if rt.cur_merged:
                ids.extend(rt.cur_merged)
        path = vcpu.arch.path_hint
        if not posted:
            coalesced = bool(apic.irr & bit)
            kvm_lapic_set_irr(vector, apic)
            kvm_make_request(KVM_REQ_EVENT, vcpu)
            halted = vcpu.arch.mp_state == MpState.KVM_MP_STATE_HALTED
            path = "wakeup" if halted else "irr_kick"
            kvm_vcpu_kick(vcpu)
        else:
            coalesced = vcpu.arch.path_hint == "coalesced"
            path = vcpu.arch.path_hint
        if bus.on:
            if rt.cur_path:
                path = rt.cur_path
            bus.emit("kvm_apic_accept_irq", vm=kvm.name, vcpu=vcpu.vcpu_id, dm=delivery_mode,
                     tm=trig_mode, vector=vector, irq=rt.cur_irq, path=path,
                     coalesced=coalesced)
        return result
    if delivery_mode == APIC_DM_REMRD:
        vcpu.arch.pv_unhalted = True
        kvm_make_request(KVM_REQ_EVENT, vcpu)
        kvm_vcpu_kick(vcpu)
        return 1
    if delivery_mode == APIC_DM_SMI:
        kvm_make_request(KVM_REQ_SMI, vcpu)
        kvm_vcpu_kick(vcpu)
        return 1
    if delivery_mode == APIC_DM_NMI:
        vcpu.arch.nmi_queued += 1  # kvm_inject_nmi
        kvm_make_request(KVM_REQ_NMI, vcpu)
        kvm_vcpu_kick(vcpu)
        return 1
    if delivery_mode == APIC_DM_INIT:
        if not trig_mode or level:
            apic.pending_events = 1 << KVM_APIC_INIT
            kvm_make_request(KVM_REQ_EVENT, vcpu)
            kvm_vcpu_kick(vcpu)
            return 1
        return 0
    if delivery_mode == APIC_DM_STARTUP:
        apic.sipi_vector = vector
        apic.pending_events |= 1 << KVM_APIC_SIPI
        kvm_make_request(KVM_REQ_EVENT, vcpu)
        kvm_vcpu_kick(vcpu)
        return 1
    if delivery_mode == APIC_DM_EXTINT:
        _emit_warn(vcpu, "ExtINT delivery is handled by the PIC path, which vkick does not "
                         "model: the interrupt is refused (0)")
        return 0
    # The kernel's own message for this case (printk KERN_ERR in __apic_accept_irq).
    _emit_warn(vcpu, f"TODO: unsupported delivery mode {delivery_mode:#x}")
    return 0


async def kvm_apic_accept_events(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/lapic.c: kvm_apic_accept_events  [vCPU thread]

    Take the latched INIT/SIPI: an INIT resets the vCPU (kvm_vcpu_reset with init_event:
    the LAPIC back to its INIT state, base MSR and APIC ID kept) and leaves the BSP
    RUNNABLE, an AP in INIT_RECEIVED; a SIPI then makes an AP in INIT_RECEIVED RUNNABLE.
    v5.13 returns nothing.
    Differs from the kernel: no nested events or INIT latching (SMM, VMX root mode); the
    SIPI vector is not delivered (no real-mode guest state).
    """
    apic = vcpu.arch.apic
    if apic is None or not apic.pending_events:
        return
    pe = apic.pending_events
    apic.pending_events = 0
    if pe & (1 << KVM_APIC_INIT):
        from vkick.kvm.x86 import kvm_vcpu_reset  # noqa: PLC0415  (x86 imports this module)

        await kvm_vcpu_reset(vcpu, True)
        vcpu.arch.mp_state = (MpState.KVM_MP_STATE_RUNNABLE if vcpu.vcpu_id == 0
                              else MpState.KVM_MP_STATE_INIT_RECEIVED)
    if pe & (1 << KVM_APIC_SIPI) and vcpu.arch.mp_state == MpState.KVM_MP_STATE_INIT_RECEIVED:
        vcpu.arch.mp_state = MpState.KVM_MP_STATE_RUNNABLE


# ---------------------------------------------------------------------------- register writes


def kvm_apic_set_xapic_id(apic: KvmLapic, id_: int) -> None:
    """arch/x86/kvm/lapic.c: kvm_apic_set_xapic_id  [vCPU thread or ioctl]

    APIC_ID = (u8)id << 24, map DIRTY.

    The ID is a u8: a vCPU id above 255 wraps around in the xAPIC ID (the map keeps such a
    vCPU under its x2APIC ID as well, spec §10.2 5b–c).
    """
    apic.id = (id_ & 0xFF) << 24
    apic.vcpu.kvm.arch.apic_map_dirty = APIC_MAP_DIRTY  # atomic_set_release


def kvm_apic_set_ldr(apic: KvmLapic, id_: int) -> None:
    """arch/x86/kvm/lapic.c: kvm_apic_set_ldr  [vCPU thread] — store APIC_LDR, map DIRTY."""
    apic.ldr = id_
    apic.vcpu.kvm.arch.apic_map_dirty = APIC_MAP_DIRTY  # atomic_set_release


def kvm_apic_set_dfr(apic: KvmLapic, val: int) -> None:
    """arch/x86/kvm/lapic.c: kvm_apic_set_dfr  [vCPU thread] — store APIC_DFR, map DIRTY."""
    apic.dfr = val
    apic.vcpu.kvm.arch.apic_map_dirty = APIC_MAP_DIRTY  # atomic_set_release


def kvm_apic_set_x2apic_id(apic: KvmLapic, id_: int) -> None:
    """arch/x86/kvm/lapic.c: kvm_apic_set_x2apic_id  [vCPU thread or ioctl]

    APIC_ID = id (the vCPU id), the LDR derived from it (cluster 31:16, bit 15:0), map DIRTY.
    """
    apic.id = id_
    apic.ldr = kvm_apic_calc_x2apic_ldr(id_)
    apic.vcpu.kvm.arch.apic_map_dirty = APIC_MAP_DIRTY  # atomic_set_release


def apic_set_spiv(apic: KvmLapic, val: int) -> None:
    """arch/x86/kvm/lapic.c: apic_set_spiv  [vCPU thread or ioctl]

    Store SPIV; a software-enable change marks the map DIRTY (a software-disabled APIC has no
    logical entry, spec §10.2 5d).
    """
    enabled = bool(val & APIC_SPIV_APIC_ENABLED)
    apic.spiv = val
    if enabled != apic.sw_enabled:
        apic.sw_enabled = enabled
        apic.vcpu.kvm.arch.apic_map_dirty = APIC_MAP_DIRTY  # atomic_set_release


async def kvm_lapic_reg_write(apic: KvmLapic, reg: int, val: int) -> int:
    """arch/x86/kvm/lapic.c: kvm_lapic_reg_write  [vCPU thread]

    The guest's register writes that matter on this path (ID, LDR and DFR only in xAPIC
    mode; SPIV; TPR; EOI; ICR/ICR2; SELF_IPI in x2APIC mode).  Every write ends with
    kvm_recalculate_apic_map in this thread: a no-op when the map is clean, else it may
    sleep on apic_map_lock.  Returns 1 for a write the register does not accept.  Spec
    §11.12, §10.2.
    Differs from the kernel: SPIV disabling does not mask the LVT entries (not modelled);
    SELF_IPI sends directly rather than through a nested ICR write (same IPI).
    """
    from vkick.kvm.lapic_map import kvm_recalculate_apic_map  # noqa: PLC0415

    vcpu = apic.vcpu
    kvm = vcpu.kvm
    bus = kvm.rt.bus
    if bus.on:
        bus.emit("kvm_apic", vm=kvm.name, vcpu=vcpu.vcpu_id, rw="write", reg=reg, val=val)
    ret = 0
    if reg == APIC_ID:
        if not apic.x2apic_mode:
            kvm_apic_set_xapic_id(apic, val >> 24)
        else:
            ret = 1
    elif reg == APIC_TASKPRI:
        apic_set_tpr(apic, val & 0xFF)
    elif reg == APIC_EOI:
        apic_set_eoi(apic)
    elif reg == APIC_LDR:
        if not apic.x2apic_mode:
            kvm_apic_set_ldr(apic, val & 0xFF000000)  # APIC_LDR_MASK
        else:
            ret = 1
    elif reg == APIC_DFR:
        if not apic.x2apic_mode:
            kvm_apic_set_dfr(apic, val | 0x0FFFFFFF)
        else:
            ret = 1
    elif reg == APIC_SPIV:
        apic_set_spiv(apic, val & 0x3FF)
    elif reg == APIC_ICR:
        val &= ~APIC_ICR_BUSY
        kvm_apic_send_ipi(apic, val, apic.icr2)
        apic.icr = val
    elif reg == APIC_ICR2:
        apic.icr2 = val if apic.x2apic_mode else val & 0xFF000000
    elif reg == APIC_SELF_IPI:
        if apic.x2apic_mode:
            kvm_apic_send_ipi(apic, APIC_DEST_SELF | (val & APIC_VECTOR_MASK), 0)
        else:
            ret = 1
    else:
        ret = 1
    task = vcpu.task
    assert task is not None, "a register write runs in the vCPU thread"
    await kvm_recalculate_apic_map(kvm, task)
    return ret


async def kvm_x2apic_msr_write(vcpu: KvmVcpu, msr: int, data: int) -> int:
    """arch/x86/kvm/lapic.c: kvm_x2apic_msr_write  [vCPU thread]

    MSR 0x800 + (offset >> 4); ICR is one 64-bit MSR: the destination (ICR2) is written
    before the command; ICR2 itself is not an x2APIC MSR.
    """
    apic = vcpu.arch.apic
    if apic is None or not apic.x2apic_mode:
        return 1
    reg = (msr - APIC_BASE_MSR) << 4
    if reg == APIC_ICR2:
        return 1
    if reg == APIC_ICR:
        await kvm_lapic_reg_write(apic, APIC_ICR2, (data >> 32) & 0xFFFFFFFF)
    return await kvm_lapic_reg_write(apic, reg, data & 0xFFFFFFFF)


def kvm_apic_send_ipi(apic: KvmLapic, icr_low: int, icr_high: int) -> None:
    """arch/x86/kvm/lapic.c: kvm_apic_send_ipi — an ICR write becomes a kvm_lapic_irq.

    Delivered through kvm_irq_delivery_to_apic with the sending LAPIC as source; the IPI is
    an interrupt source of its own (a new correlation id).
    """
    from vkick.kvm.irq_comm import kvm_irq_delivery_to_apic  # noqa: PLC0415

    irq = KvmLapicIrq(
        vector=icr_low & APIC_VECTOR_MASK,
        delivery_mode=icr_low & APIC_MODE_MASK,
        dest_mode=icr_low & APIC_DEST_MASK,
        level=bool(icr_low & APIC_INT_ASSERT),
        trig_mode=icr_low & APIC_INT_LEVELTRIG,
        shorthand=icr_low & APIC_SHORT_MASK,
        msi_redir_hint=False,
        dest_id=icr_high if apic.x2apic_mode else (icr_high >> 24) & 0xFF,
    )
    vcpu = apic.vcpu
    rt = vcpu.kvm.rt
    saved = rt.cur_irq
    rt.cur_irq = rt.next_irq_id()
    bus = rt.bus
    if bus.on:
        bus.emit("kvm_apic_ipi", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, icr_low=icr_low,
                 dest_id=irq.dest_id, vector=irq.vector, irq=rt.cur_irq)
    try:
        kvm_irq_delivery_to_apic(vcpu.kvm, apic, irq, None)
    finally:
        rt.cur_irq = saved


def apic_dfr_is_flat(apic: KvmLapic) -> bool:
    """The xAPIC DFR model bits read as flat (0xF) rather than cluster (0x0)."""
    return apic.dfr == APIC_DFR_FLAT



# ---------------------------------------------------------------------------- state (ioctls)


def kvm_lapic_set_base(vcpu: KvmVcpu, value: int) -> None:
    """arch/x86/kvm/lapic.c: kvm_lapic_set_base  [vCPU thread]

    Store the APIC base MSR; enabling the APIC resets the xAPIC ID to the vCPU id, disabling
    it marks the map DIRTY, entering x2APIC mode sets the x2APIC ID and derived LDR (each
    marks the map DIRTY).  The caller recalculates the map (kvm_set_apic_base).
    Differs from the kernel: ``apic_base`` is kept as the two bits vkick uses
    (``hw_enabled``, ``x2apic_mode``); the BSP bit and the base address are not stored.
    """
    apic = vcpu.arch.apic
    if apic is None:
        return
    old_value = kvm_lapic_get_base(vcpu)  # vcpu->arch.apic_base
    apic.hw_enabled = bool(value & MSR_IA32_APICBASE_ENABLE)  # vcpu->arch.apic_base = value
    apic.x2apic_mode = bool(value & X2APIC_ENABLE)
    changed = old_value ^ value
    if changed & MSR_IA32_APICBASE_ENABLE:
        if value & MSR_IA32_APICBASE_ENABLE:
            kvm_apic_set_xapic_id(apic, vcpu.vcpu_id)
        else:
            vcpu.kvm.arch.apic_map_dirty = APIC_MAP_DIRTY  # atomic_set_release
    if changed & X2APIC_ENABLE and value & X2APIC_ENABLE:
        kvm_apic_set_x2apic_id(apic, vcpu.vcpu_id)


def kvm_lapic_get_base(vcpu: KvmVcpu) -> int:
    """arch/x86/kvm/lapic.c: kvm_lapic_get_base  [any context] — the APIC base MSR value."""
    apic = vcpu.arch.apic
    assert apic is not None
    return (APIC_DEFAULT_PHYS_BASE | (MSR_IA32_APICBASE_ENABLE if apic.hw_enabled else 0)
            | (X2APIC_ENABLE if apic.x2apic_mode else 0))


async def kvm_apic_update_apicv(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/lapic.c: kvm_apic_update_apicv  [vCPU thread or ioctl]

    Bring the software bookkeeping in line with ``apicv_active``: with APICv
    ``irr_pending`` is always true and ``isr_count`` pinned to 1; without, ``isr_count``
    counts ISR and v5.13 recomputes ``irr_pending`` by scanning IRR.  Spec §11.1.
    The scan races with anyone still setting IRR bits: the hardware is still posting from
    its point of view, or a sender that already sees APICv off sets its bit and
    ``irr_pending`` inside the W-APICV-update window — and then the stale "empty" is
    stored over it, hiding the vector from apic_find_highest_irr until another IRR write
    (bug #8a).  ``fix-irr-pending-scan-on-deactivate`` (755c2bf87860, v5.17) leaves
    ``irr_pending`` alone on deactivation (true from the active period; cleared as
    vectors are injected).  v5.13 keeps ``highest_isr_cache`` across the change, so a
    vector in service when APICv is activated stays "highest in service" after the
    hardware retired it (bug #9); ``fix-isr-cache-not-purged`` (97a71c444a14, v6.3)
    resets it to -1.  The 8a fix alone regressed KVM_SET_LAPIC with APICv off: restored
    IRR bits stay hidden behind the ``irr_pending`` of before (bug #8b);
    ``fix-irr-pending-not-set-on-restore`` (d3ddef46f22e, v6.12) sets ``irr_pending``
    unconditionally (it subsumes the 8a fix).
    """
    apic = vcpu.arch.apic
    assert apic is not None
    toggles = vcpu.kvm.toggles
    if "fix-irr-pending-not-set-on-restore" in toggles:
        apic.irr_pending = True
        apic.isr_count = 1 if vcpu.arch.apicv_active else count_vectors(apic.isr)
    elif vcpu.arch.apicv_active:
        apic.irr_pending = True
        apic.isr_count = 1
    else:
        if "fix-irr-pending-scan-on-deactivate" not in toggles:
            pending = apic_search_irr(apic) != -1
            # W-APICV-update: the IRR scan ↔ the store of irr_pending.  Another CPU may
            # set an IRR bit here (an __apic_accept_irq that sees APICv off for this
            # vCPU: kvm_lapic_set_irr), whose irr_pending store the one below overwrites.
            await vcpu.kvm.rt.preempt("W-APICV-update")
            apic.irr_pending = pending
        apic.isr_count = count_vectors(apic.isr)
    if "fix-isr-cache-not-purged" in toggles:
        apic.highest_isr_cache = -1


def _drop_stale_irq_ids(vcpu: KvmVcpu, irr: int) -> None:
    """vkick: the source ids of vectors no longer in the IRR (a reset cleared it, or
    KVM_SET_LAPIC replaced it) go with them; else the next interrupt on such a vector
    would be delivered carrying a source the reset discarded."""
    ids = vcpu.arch.irq_ids
    for vector in [v for v in ids if not irr >> v & 1]:
        del ids[vector]


async def kvm_lapic_reset(vcpu: KvmVcpu, init_event: bool = False) -> None:
    """arch/x86/kvm/lapic.c: kvm_lapic_reset  [vCPU thread or ioctl]

    The architectural reset state: enabled (base MSR), xAPIC ID = vCPU id (RESET only, not
    INIT), DFR flat, SVR 0xFF (software-disabled), TPR 0, LDR 0 (xAPIC), ICR 0, IRR/ISR/TMR
    clear, the APICv counters (kvm_apic_update_apicv), PPR; with APICv active an emptied PI
    descriptor (vmx_apicv_post_state_restore) and RVI/SVI cleared; then the map is
    recalculated.  Each setter marked the map DIRTY; at vCPU creation the recalculation
    runs before the vCPU is visible in kvm->vcpus, so it does not see itself.
    Differs from the kernel: no timers, LVTs or PV EOI; the BSP bit is not kept.
    """
    from vkick.kvm.lapic_map import kvm_recalculate_apic_map  # noqa: PLC0415

    apic = vcpu.arch.apic
    if apic is None:
        return
    if not init_event:
        kvm_lapic_set_base(vcpu, APIC_DEFAULT_PHYS_BASE | MSR_IA32_APICBASE_ENABLE)
        kvm_apic_set_xapic_id(apic, vcpu.vcpu_id)
    kvm_apic_set_dfr(apic, 0xFFFFFFFF)
    apic_set_spiv(apic, 0xFF)
    apic.tpr = 0
    if not apic.x2apic_mode:
        kvm_apic_set_ldr(apic, 0)
    apic.icr = apic.icr2 = 0
    apic.irr = apic.isr = apic.tmr = 0
    _drop_stale_irq_ids(vcpu, apic.irr)
    await kvm_apic_update_apicv(vcpu)
    apic.highest_isr_cache = -1
    apic_update_ppr(apic)
    if vcpu.arch.apicv_active:
        vmx_apicv_post_state_restore(vcpu)  # kvm_x86_apicv_post_state_restore
        vmx_set_rvi(vcpu, -1)  # kvm_x86_hwapic_irr_update(vcpu, -1)
        vmx_hwapic_isr_update(vcpu, -1)  # kvm_x86_hwapic_isr_update(vcpu, -1)
    vcpu.arch.apic_arb_prio = 0
    task = vcpu.task
    assert task is not None
    await kvm_recalculate_apic_map(vcpu.kvm, task)


def kvm_apic_state_fixup(vcpu: KvmVcpu, s: KvmLapicState, set_: bool) -> int:
    """arch/x86/kvm/lapic.c: kvm_apic_state_fixup  [vCPU ioctl]

    In x2APIC mode the ID is the vCPU id with the 32-bit-ID API (anything else is -EINVAL),
    else userspace sees it shifted into bits 31:24; on set the LDR is derived from the ID.
    """
    apic = vcpu.arch.apic
    assert apic is not None
    if apic.x2apic_mode:
        if vcpu.kvm.arch.x2apic_format:
            if s.id != vcpu.vcpu_id:
                return -errno.EINVAL
        else:
            s.id = (s.id >> 24) if set_ else (s.id << 24) & 0xFFFFFFFF
        if set_:
            s.ldr = kvm_apic_calc_x2apic_ldr(s.id)
    return 0


def kvm_apic_get_state(vcpu: KvmVcpu) -> KvmLapicState:
    """arch/x86/kvm/lapic.c: kvm_apic_get_state (KVM_GET_LAPIC)  [vCPU ioctl]"""
    apic = vcpu.arch.apic
    assert apic is not None
    s = KvmLapicState(id=apic.id, tpr=apic.tpr, ldr=apic.ldr, dfr=apic.dfr, spiv=apic.spiv,
                      icr=apic.icr, icr2=apic.icr2, irr=apic.irr, isr=apic.isr, tmr=apic.tmr)
    kvm_apic_state_fixup(vcpu, s, False)
    return s


async def kvm_apic_set_state(vcpu: KvmVcpu, s: KvmLapicState) -> int:
    """arch/x86/kvm/lapic.c: kvm_apic_set_state (KVM_SET_LAPIC)  [vCPU ioctl, process]

    Re-apply the base MSR, set SPIV first (the software-enable accounting), fix up the
    x2APIC ID/LDR, copy the registers, then force the map DIRTY and recalculate — the copy
    itself marks nothing, so without the forced DIRTY a restored or hot-plugged vCPU whose
    SPIV did not change never enters the map (bug #10 hotplug variant, fixed by
    af28dfacbe00 "kvm: lapic: fix broken vcpu hotplug", 5.8-rc3; toggle
    ``apic-map-no-recalc-on-set-state`` removes the forced DIRTY).  Then PPR, the APICv
    state and KVM_REQ_EVENT.  Returns 0 or -EINVAL.  Spec §10.1.
    Differs from the kernel: no timers or LVTs; ``s`` is copied, not modified.
    """
    from vkick.kvm.lapic_map import kvm_recalculate_apic_map  # noqa: PLC0415

    apic = vcpu.arch.apic
    assert apic is not None
    kvm = vcpu.kvm
    task = vcpu.task
    assert task is not None
    s = dataclasses.replace(s)
    kvm_lapic_set_base(vcpu, kvm_lapic_get_base(vcpu))
    apic_set_spiv(apic, s.spiv)
    r = kvm_apic_state_fixup(vcpu, s, True)
    if r:
        await kvm_recalculate_apic_map(kvm, task)
        return r
    # memcpy(apic->regs, s->regs, sizeof(*s))
    apic.id, apic.tpr, apic.ldr, apic.dfr = s.id, s.tpr, s.ldr, s.dfr
    apic.spiv, apic.icr, apic.icr2 = s.spiv, s.icr, s.icr2
    apic.irr, apic.isr, apic.tmr = s.irr, s.isr, s.tmr
    _drop_stale_irq_ids(vcpu, apic.irr)
    if "apic-map-no-recalc-on-set-state" not in kvm.toggles:
        kvm.arch.apic_map_dirty = APIC_MAP_DIRTY  # atomic_set_release
    await kvm_recalculate_apic_map(kvm, task)
    apic_update_ppr(apic)
    await kvm_apic_update_apicv(vcpu)
    apic.highest_isr_cache = -1
    if vcpu.arch.apicv_active:
        vmx_apicv_post_state_restore(vcpu)  # kvm_x86_apicv_post_state_restore
        vmx_set_rvi(vcpu, apic_find_highest_irr(apic))  # kvm_x86_hwapic_irr_update
        vmx_hwapic_isr_update(vcpu, apic_find_highest_isr(apic))  # ..._isr_update
    kvm_make_request(KVM_REQ_EVENT, vcpu)
    vcpu.arch.apic_arb_prio = 0
    bus = kvm.rt.bus
    if bus.on:
        bus.emit("kvm_apic_set_state", vm=kvm.name, vcpu=vcpu.vcpu_id, id=apic.id,
                 spiv=apic.spiv)
    return 0
