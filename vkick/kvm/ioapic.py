"""arch/x86/kvm/ioapic.c, ioapic.h: the in-kernel IOAPIC of KVM_CREATE_IRQCHIP.

24 pins, each with a redirection entry (vector, delivery mode, destination mode and id,
trigger mode, mask, remote IRR, delivery status) and an ``irr`` bit that follows the pin's
line (the OR of every interrupt source driving it).  An edge pin delivers on each 0→1
transition; a level pin delivers while its line is high and its remote IRR is clear, sets
remote IRR on delivery, and waits for the guest's EOI of that vector (broadcast by the
LAPIC, kvm_ioapic_update_eoi) to run the GSI's ack notifiers — the irqfd resampler among
them — clear remote IRR and deliver again if the line is still high.  The guest programs
entries through the IOREGSEL/IOWIN MMIO window.  Spec §8.9, §9.2, §11.8, §13.4; the file
itself is §19 "not specified in detail", so this follows the v5.13 source (identical in
5.12.9 and 5.14-rc5).

Covered: kvm_ioapic_init, kvm_ioapic_reset, ioapic_in_kernel, ioapic_set_irq,
kvm_ioapic_set_irq, ioapic_service, ioapic_read_indirect,
ioapic_write_indirect, ioapic_in_range, ioapic_mmio_read, ioapic_mmio_write,
kvm_ioapic_update_eoi, kvm_ioapic_update_eoi_one, kvm_ioapic_eoi_inject_work,
kvm_ioapic_scan_entry, kvm_arch_post_irq_ack_notifier_list_update, kvm_get_ioapic,
kvm_set_ioapic, kvm_ioapic_inject_all.
Left out (said where it matters): the PIC (i8259.c) and its half of the default routing;
the RTC (pin 8) coalescing check and EOI tracking, which engage only for pin 8 with
``line_status`` true (KVM_IRQ_LINE_STATUS, and kvm_ioapic_inject_all restoring a saved
state) — vkick models no RTC, so ``line_status`` is carried but never acted on, and
``rtc_irq_eoi`` and ``ioapic_lazy_update_eoi`` (AMD AVIC) are omitted; mask notifiers (used
by the PIT only).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import ClassVar, Final

from vkick.kernel.workqueue import DelayedWork, WorkStruct, schedule_delayed_work
from vkick.kvm.irq import __kvm_irq_line_state, irqchip_kernel
from vkick.kvm.irq_comm import kvm_irq_delivery_to_apic
from vkick.kvm.kvm_host import (
    APIC_DEST_LOGICAL,
    APIC_DEST_NOSHORT,
    APIC_DEST_PHYSICAL,
    APIC_DM_FIXED,
    APIC_SPIV_DIRECTED_EOI,
    KVM_IOAPIC_NUM_PINS,
    KVM_IRQCHIP_IOAPIC,
    Kvm,
    KvmIoDeviceOps,
    KvmLapicIrq,
    KvmVcpu,
)
from vkick.kvm.kvm_main_io import kvm_io_bus_register_dev
from vkick.kvm.lapic_map import kvm_apic_match_dest, kvm_bitmap_or_dest_vcpus

IOAPIC_NUM_PINS: Final = KVM_IOAPIC_NUM_PINS
IOAPIC_VERSION_ID: Final = 0x11
IOAPIC_EDGE_TRIG: Final = 0
IOAPIC_LEVEL_TRIG: Final = 1
IOAPIC_DEFAULT_BASE_ADDRESS: Final = 0xFEC00000
IOAPIC_MEM_LENGTH: Final = 0x100
IOAPIC_REG_SELECT: Final = 0x00  # direct registers
IOAPIC_REG_WINDOW: Final = 0x10
IOAPIC_REG_APIC_ID: Final = 0x00  # indirect registers
IOAPIC_REG_VERSION: Final = 0x01
IOAPIC_REG_ARB_ID: Final = 0x02
IOAPIC_FIXED: Final = 0x0  # delivery modes (3 bits, unshifted)
IOAPIC_LOWEST_PRIORITY: Final = 0x1
IOAPIC_PMI: Final = 0x2
IOAPIC_NMI: Final = 0x4
IOAPIC_INIT: Final = 0x5
IOAPIC_EXTINT: Final = 0x7
RTC_GSI: Final = 8
IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT: Final = 10000
EOI_INJECT_DELAY_NS: Final = 10_000_000  # HZ / 100 jiffies


@dataclass(slots=True)
class KvmIoapicRedirectEntry:
    """arch/x86/kvm/ioapic.h: union kvm_ioapic_redirect_entry, its bit fields as fields.

    Bits: 7:0 vector, 10:8 delivery mode, 11 destination mode (1 logical), 12 delivery
    status, 13 polarity, 14 remote IRR, 15 trigger mode (1 level), 16 mask, 55:17 reserved
    (kept, as the union keeps them), 63:56 destination id.
    """

    vector: int = 0
    delivery_mode: int = 0
    dest_mode: int = 0
    delivery_status: int = 0
    polarity: int = 0
    remote_irr: int = 0
    trig_mode: int = 0
    mask: int = 0
    reserved: int = 0
    dest_id: int = 0


def redirect_entry_bits(e: KvmIoapicRedirectEntry) -> int:
    """``entry.bits``: the union read as one 64-bit value."""
    return (e.vector | e.delivery_mode << 8 | e.dest_mode << 11 | e.delivery_status << 12
            | e.polarity << 13 | e.remote_irr << 14 | e.trig_mode << 15 | e.mask << 16
            | e.reserved << 17 | e.dest_id << 56)


def redirect_entry_set_bits(e: KvmIoapicRedirectEntry, bits: int) -> None:
    """``entry.bits = bits``: the union written as one 64-bit value."""
    e.vector = bits & 0xFF
    e.delivery_mode = bits >> 8 & 7
    e.dest_mode = bits >> 11 & 1
    e.delivery_status = bits >> 12 & 1
    e.polarity = bits >> 13 & 1
    e.remote_irr = bits >> 14 & 1
    e.trig_mode = bits >> 15 & 1
    e.mask = bits >> 16 & 1
    e.reserved = bits >> 17 & ((1 << 39) - 1)
    e.dest_id = bits >> 56 & 0xFF


def _redirtbl() -> list[KvmIoapicRedirectEntry]:
    return [KvmIoapicRedirectEntry() for _ in range(IOAPIC_NUM_PINS)]


@dataclass(slots=True, eq=False)
class KvmIoapic:
    """arch/x86/kvm/ioapic.h: struct kvm_ioapic

    ``irr`` has bit ``pin`` set while the pin's line is high (edge pins: from the rising
    edge until the line falls); ``irr_delivered`` marks edge pins already delivered (only
    KVM_GET_IRQCHIP reads it); ``irq_states[pin]`` is the bitmap of the interrupt sources
    holding the line up; ``irq_eoi[pin]`` counts back-to-back re-deliveries at EOI (storm
    guard).  ``pin_irqs`` is vkick bookkeeping with no kernel counterpart: the correlation
    ids of the signals that asserted each pin (dropped when the line falls; an edge
    delivery consumes them, a level line's deliveries all carry them).
    """

    ops: ClassVar[KvmIoDeviceOps]  # its struct kvm_io_device: ioapic_mmio_ops
    kvm: Kvm
    eoi_inject: DelayedWork
    base_address: int = IOAPIC_DEFAULT_BASE_ADDRESS
    ioregsel: int = 0
    id: int = 0
    irr: int = 0
    redirtbl: list[KvmIoapicRedirectEntry] = field(default_factory=_redirtbl)
    irq_states: list[int] = field(default_factory=lambda: [0] * IOAPIC_NUM_PINS)
    irq_eoi: list[int] = field(default_factory=lambda: [0] * IOAPIC_NUM_PINS)
    irr_delivered: int = 0
    pin_irqs: list[list[int]] = field(
        default_factory=lambda: [[] for _ in range(IOAPIC_NUM_PINS)])


@dataclass(slots=True)
class KvmIoapicState:
    """arch/x86/include/uapi/asm/kvm.h: struct kvm_ioapic_state (KVM_GET/SET_IRQCHIP)."""

    base_address: int = IOAPIC_DEFAULT_BASE_ADDRESS
    ioregsel: int = 0
    id: int = 0
    irr: int = 0
    redirtbl: list[int] = field(default_factory=lambda: [0] * IOAPIC_NUM_PINS)


def ioapic_in_kernel(kvm: Kvm) -> bool:
    """arch/x86/kvm/ioapic.h: ioapic_in_kernel — the full in-kernel irqchip."""
    return irqchip_kernel(kvm)


def kvm_lapic_irq_dest_mode(dest_mode_logical: int) -> int:
    """arch/x86/kvm/lapic.h: kvm_lapic_irq_dest_mode — entry bit 11 → APIC_DEST_*."""
    return APIC_DEST_LOGICAL if dest_mode_logical else APIC_DEST_PHYSICAL


def _emit_set_irq(ioapic: KvmIoapic, pin: int, entry_bits: int, coalesced: bool) -> None:
    kvm = ioapic.kvm
    bus = kvm.rt.bus
    if bus.on:
        bus.emit("kvm_ioapic_set_irq", vm=kvm.name, e=entry_bits, pin=pin, coalesced=coalesced,
                 irq=kvm.rt.cur_irq)


def ioapic_set_irq(ioapic: KvmIoapic, irq: int, irq_level: int, line_status: bool) -> int:
    """arch/x86/kvm/ioapic.c: ioapic_set_irq  [atomic: ioapic->lock held]

    The pin's line is now ``irq_level``.  Low: clear ``irr`` (1).  High: an edge pin whose
    line was already high is coalesced (0: no new edge — a previous edge has not been
    re-armed by a fall); otherwise set ``irr`` and try to deliver (ioapic_service: -1 if
    masked or a level pin waits for its EOI, else the number of CPUs reached).  Traced as
    ``kvm_ioapic_set_irq`` with ``coalesced`` = (result 0).
    Differs from the kernel: the RTC coalescing check (pin 8 with ``line_status``) is left
    out (see the module docstring).
    """
    entry = ioapic.redirtbl[irq]
    entry_bits = redirect_entry_bits(entry)
    edge = entry.trig_mode == IOAPIC_EDGE_TRIG
    mask = 1 << irq
    if not irq_level:
        ioapic.irr &= ~mask
        ioapic.pin_irqs[irq] = []
        _emit_set_irq(ioapic, irq, entry_bits, False)
        return 1
    rt = ioapic.kvm.rt
    if rt.cur_irq:
        ids = ioapic.pin_irqs[irq]
        ids.append(rt.cur_irq)
        ids.extend(rt.cur_merged)
    old_irr = ioapic.irr
    ioapic.irr |= mask
    if edge:
        ioapic.irr_delivered &= ~mask
        if old_irr == ioapic.irr:
            _emit_set_irq(ioapic, irq, entry_bits, True)
            return 0
    ret = ioapic_service(ioapic, irq, line_status)
    _emit_set_irq(ioapic, irq, entry_bits, ret == 0)
    return ret


def kvm_ioapic_inject_all(ioapic: KvmIoapic, irr: int) -> None:
    """arch/x86/kvm/ioapic.c: kvm_ioapic_inject_all — raise every pin set in ``irr``
    (KVM_SET_IRQCHIP restoring a saved state)."""
    for idx in range(IOAPIC_NUM_PINS):
        if irr >> idx & 1:
            ioapic_set_irq(ioapic, idx, 1, True)


def kvm_ioapic_scan_entry(vcpu: KvmVcpu, ioapic_handled_vectors: int) -> int:
    """arch/x86/kvm/ioapic.c: kvm_ioapic_scan_entry  [vCPU thread: KVM_REQ_SCAN_IOAPIC]

    The vectors whose EOI on this vCPU must reach the IOAPIC: those of level-triggered
    pins, of pins with an ack notifier (the irqfd resampler's GSI) and of the RTC pin —
    whether masked or not — whose destination matches this vCPU or which are still pending
    or in service here (IRR/ISR).  With APICv these become the EOI-exit bitmap (spec §13.4).
    Differs from the kernel: returns the updated bitmap instead of setting bits in place;
    the RTC's missing-EOI bit (its dest_map) is always empty here.
    """
    from vkick.kvm.eventfd import kvm_irq_has_notifier  # noqa: PLC0415
    from vkick.kvm.lapic import kvm_apic_pending_eoi  # noqa: PLC0415

    kvm = vcpu.kvm
    ioapic: KvmIoapic = kvm.arch.vioapic
    for index in range(IOAPIC_NUM_PINS):
        e = ioapic.redirtbl[index]
        if (e.trig_mode == IOAPIC_LEVEL_TRIG
                or kvm_irq_has_notifier(kvm, KVM_IRQCHIP_IOAPIC, index)
                or index == RTC_GSI):
            dm = kvm_lapic_irq_dest_mode(e.dest_mode)
            if (kvm_apic_match_dest(vcpu, None, APIC_DEST_NOSHORT, e.dest_id, dm)
                    or kvm_apic_pending_eoi(vcpu, e.vector)):
                ioapic_handled_vectors |= 1 << e.vector
    return ioapic_handled_vectors


def kvm_arch_post_irq_ack_notifier_list_update(kvm: Kvm) -> None:
    """arch/x86/kvm/ioapic.c: kvm_arch_post_irq_ack_notifier_list_update — an ack notifier
    came or went: with the in-kernel IOAPIC every vCPU rescans its IOAPIC-handled vectors
    (an edge pin with a notifier needs its EOI too)."""
    from vkick.kvm.x86 import kvm_make_scan_ioapic_request  # noqa: PLC0415

    if not ioapic_in_kernel(kvm):
        return
    kvm_make_scan_ioapic_request(kvm)


def ioapic_read_indirect(ioapic: KvmIoapic) -> int:
    """arch/x86/kvm/ioapic.c: ioapic_read_indirect — IOWIN read of the IOREGSEL register:
    version (0x11, 23 = last pin), id, or one half of a redirection entry (all ones beyond
    pin 23)."""
    sel = ioapic.ioregsel
    if sel == IOAPIC_REG_VERSION:
        return ((IOAPIC_NUM_PINS - 1) & 0xFF) << 16 | (IOAPIC_VERSION_ID & 0xFF)
    if sel in (IOAPIC_REG_APIC_ID, IOAPIC_REG_ARB_ID):
        return (ioapic.id & 0xF) << 24
    redir_index = (sel - 0x10) >> 1
    redir_content = (1 << 64) - 1
    if 0 <= redir_index < IOAPIC_NUM_PINS:
        redir_content = redirect_entry_bits(ioapic.redirtbl[redir_index])
    return (redir_content >> 32) & 0xFFFFFFFF if sel & 1 else redir_content & 0xFFFFFFFF


def _dest_vcpu_bitmap(ioapic: KvmIoapic, e: KvmIoapicRedirectEntry, old_dest_id: int,
                      old_dest_mode: int) -> int:
    """The FIXED-mode half of ioapic_write_indirect: the vCPUs the entry's old and new
    destinations name (kvm_bitmap_or_dest_vcpus twice)."""
    irq = KvmLapicIrq(vector=e.vector, delivery_mode=e.delivery_mode << 8,
                      dest_mode=kvm_lapic_irq_dest_mode(e.dest_mode), level=False,
                      trig_mode=e.trig_mode, shorthand=APIC_DEST_NOSHORT, dest_id=e.dest_id,
                      msi_redir_hint=False)
    vcpu_bitmap = kvm_bitmap_or_dest_vcpus(ioapic.kvm, irq, 0)
    if old_dest_mode != e.dest_mode or old_dest_id != e.dest_id:
        # The previous destination too, to keep ioapic_handled_vectors in sync.  The kernel
        # takes the *new* destination mode with the old id here; kept as written.
        irq.dest_id = old_dest_id
        irq.dest_mode = kvm_lapic_irq_dest_mode(e.dest_mode)
        vcpu_bitmap = kvm_bitmap_or_dest_vcpus(ioapic.kvm, irq, vcpu_bitmap)
    return vcpu_bitmap


def ioapic_write_indirect(ioapic: KvmIoapic, val: int) -> None:
    """arch/x86/kvm/ioapic.c: ioapic_write_indirect  [vCPU thread: ioapic->lock held]

    IOWIN write of the IOREGSEL register.  For a redirection entry: replace its low or
    high half, keeping the read-only remote IRR and delivery status — except that an
    entry made edge-triggered has remote IRR cleared (what Linux and Xen rely on to EOI an
    IOAPIC without an EOI register); a level pin whose line is high is serviced at once
    (so unmasking delivers a pending level interrupt); then every vCPU the old or new
    destination names (FIXED) — or every vCPU (other modes) — must rescan its
    IOAPIC-handled vectors (KVM_REQ_SCAN_IOAPIC).  v5.13 delivers a level pin's pending
    bit on unmask even if it is stale (a oneshot guest acked the device after the EOI,
    while the pin was masked: a spurious interrupt); toggle ``fix-resample-on-unmask``
    applies the later kernels' resample-instead-of-deliver (see the code).
    Differs from the kernel: mask notifiers (the PIT's) are not fired.
    """
    from vkick.kvm.x86 import (  # noqa: PLC0415
        kvm_make_scan_ioapic_request,
        kvm_make_scan_ioapic_request_mask,
    )

    sel = ioapic.ioregsel
    kvm = ioapic.kvm
    bus = kvm.rt.bus
    if sel == IOAPIC_REG_VERSION:
        return  # writes are ignored
    if sel == IOAPIC_REG_APIC_ID:
        ioapic.id = (val >> 24) & 0xF
        return
    if sel == IOAPIC_REG_ARB_ID:
        return
    index = (sel - 0x10) >> 1
    if not 0 <= index < IOAPIC_NUM_PINS:
        return
    e = ioapic.redirtbl[index]
    old_remote_irr = e.remote_irr
    old_delivery_status = e.delivery_status
    old_dest_id = e.dest_id
    old_dest_mode = e.dest_mode
    bits = redirect_entry_bits(e)
    if sel & 1:
        bits = (bits & 0xFFFFFFFF) | (val & 0xFFFFFFFF) << 32
    else:
        bits = (bits & ~0xFFFFFFFF) | (val & 0xFFFFFFFF)
    redirect_entry_set_bits(e, bits)
    e.remote_irr = old_remote_irr
    e.delivery_status = old_delivery_status
    if e.trig_mode == IOAPIC_EDGE_TRIG:
        e.remote_irr = 0
    if bus.on:
        bus.emit("ioapic_write_indirect", vm=kvm.name, pin=index, half=sel & 1,
                 val=val & 0xFFFFFFFF, e=redirect_entry_bits(e))
    if "fix-resample-on-unmask" in kvm.toggles:
        # Later kernels (seen in 6.3.2; "KVM: x86/ioapic: Resample the pending state of an
        # IRQ when unmasking"): the pending bit of a level pin may be stale — a guest
        # handling it as a oneshot interrupt acks the device after the EOI, while the pin
        # is masked — so with a resampler the unmask clears it and asks the VMM to
        # resample instead of delivering a spurious interrupt.
        if (e.trig_mode == IOAPIC_LEVEL_TRIG and ioapic.irr >> index & 1 and not e.mask
                and not e.remote_irr):
            from vkick.kvm.eventfd import kvm_notify_irqfd_resampler  # noqa: PLC0415

            if kvm_notify_irqfd_resampler(kvm, KVM_IRQCHIP_IOAPIC, index):
                ioapic.irr &= ~(1 << index)
                ioapic.pin_irqs[index] = []
            else:
                ioapic_service(ioapic, index, False)
    elif e.trig_mode == IOAPIC_LEVEL_TRIG and ioapic.irr >> index & 1:
        ioapic_service(ioapic, index, False)
    if e.delivery_mode == APIC_DM_FIXED:
        kvm_make_scan_ioapic_request_mask(
            kvm, _dest_vcpu_bitmap(ioapic, e, old_dest_id, old_dest_mode))
    else:
        kvm_make_scan_ioapic_request(kvm)


def ioapic_service(ioapic: KvmIoapic, irq: int, line_status: bool) -> int:
    """arch/x86/kvm/ioapic.c: ioapic_service  [atomic: ioapic->lock held]

    Deliver pin ``irq`` as its entry says: -1 (nothing sent) if masked or a level pin
    still waits for its EOI (remote IRR); otherwise build a kvm_lapic_irq (level 1, the
    entry's trigger mode) and send it through kvm_irq_delivery_to_apic (spec §9.6) —
    so the accepting LAPIC sets TMR for a level pin.  A level pin that reached anyone
    (result ≠ 0) sets remote IRR; an edge pin is marked delivered.
    Differs from the kernel: no RTC dest_map tracking (pin 8 with ``line_status``).
    """
    entry = ioapic.redirtbl[irq]
    kvm = ioapic.kvm
    rt = kvm.rt
    bus = rt.bus
    if entry.mask or (entry.trig_mode == IOAPIC_LEVEL_TRIG and entry.remote_irr):
        if bus.on:
            bus.emit("ioapic_service", vm=kvm.name, pin=irq, vector=entry.vector, r=-1,
                     irq=list(ioapic.pin_irqs[irq]))
        return -1
    irqe = KvmLapicIrq(dest_id=entry.dest_id, vector=entry.vector,
                       dest_mode=kvm_lapic_irq_dest_mode(entry.dest_mode),
                       trig_mode=entry.trig_mode, delivery_mode=entry.delivery_mode << 8,
                       level=True, shorthand=APIC_DEST_NOSHORT, msi_redir_hint=False)
    if irqe.trig_mode == IOAPIC_EDGE_TRIG:
        ioapic.irr_delivered |= 1 << irq
    # The signals that asserted the pin travel with this delivery (vkick bookkeeping): an
    # edge consumes them; a level line keeps them until it falls, so a re-delivery at EOI
    # of a line still held carries the assertion it serves.
    ids = ioapic.pin_irqs[irq]
    if irqe.trig_mode == IOAPIC_EDGE_TRIG:
        ioapic.pin_irqs[irq] = []
    else:
        ids = list(ids)
    saved_irq, saved_merged = rt.cur_irq, rt.cur_merged
    if ids:
        rt.cur_irq, rt.cur_merged = ids[0], ids[1:]
    try:
        ret = kvm_irq_delivery_to_apic(kvm, None, irqe, None)
    finally:
        rt.cur_irq, rt.cur_merged = saved_irq, saved_merged
    if ret and irqe.trig_mode == IOAPIC_LEVEL_TRIG:
        entry.remote_irr = 1
    if bus.on:
        bus.emit("ioapic_service", vm=kvm.name, pin=irq, vector=entry.vector, r=ret, irq=ids)
    return ret


def kvm_ioapic_set_irq(ioapic: KvmIoapic, irq: int, irq_source_id: int, level: int,
                       line_status: bool) -> int:
    """arch/x86/kvm/ioapic.c: kvm_ioapic_set_irq  [atomic: takes ioapic->lock]

    Source ``irq_source_id`` drives pin ``irq`` to ``level``; the pin follows the OR of all
    sources (__kvm_irq_line_state), then ioapic_set_irq.  Returns its result.
    """
    assert 0 <= irq < IOAPIC_NUM_PINS
    irq_level = __kvm_irq_line_state(ioapic.irq_states, irq, irq_source_id, level)
    return ioapic_set_irq(ioapic, irq, irq_level, line_status)


def kvm_ioapic_eoi_inject_work(work: WorkStruct) -> None:
    """arch/x86/kvm/ioapic.c: kvm_ioapic_eoi_inject_work  [process: kworker]

    The delayed re-delivery after an EOI storm: service every level pin whose line is
    high and whose remote IRR is clear.
    """
    ioapic: KvmIoapic = work.owner
    for i in range(IOAPIC_NUM_PINS):
        ent = ioapic.redirtbl[i]
        if ent.trig_mode != IOAPIC_LEVEL_TRIG:
            continue
        if ioapic.irr >> i & 1 and not ent.remote_irr:
            ioapic_service(ioapic, i, False)


def kvm_ioapic_update_eoi_one(vcpu: KvmVcpu, ioapic: KvmIoapic, trigger_mode: int,
                              pin: int) -> None:
    """arch/x86/kvm/ioapic.c: kvm_ioapic_update_eoi_one  [vCPU thread; drops ioapic->lock]

    The EOI of ``pin``'s vector: first the GSI's ack notifiers run with the IOAPIC lock
    dropped (the irqfd resampler de-asserts its line and signals the resamplefds, spec
    §8.9); then, for a level EOI (TMR set) without directed EOI, remote IRR is cleared and
    a line still high is delivered again — after 10000 such back-to-back re-deliveries
    the next one is deferred by 10 ms (what real hardware does to a guest that never
    quiets a level interrupt).
    Differs from the kernel: the dropped-lock window is not a preemption point (the EOI
    path is synchronous here); a re-assert there would land in ``irr`` and be delivered by
    the check below, the same outcome as a re-assert just after.
    """
    from vkick.kvm.eventfd import kvm_notify_acked_irq  # noqa: PLC0415

    apic = vcpu.arch.apic
    assert apic is not None
    ent = ioapic.redirtbl[pin]
    kvm_notify_acked_irq(ioapic.kvm, KVM_IRQCHIP_IOAPIC, pin)
    if trigger_mode != IOAPIC_LEVEL_TRIG or apic.spiv & APIC_SPIV_DIRECTED_EOI:
        return
    ent.remote_irr = 0
    if not ent.mask and ioapic.irr >> pin & 1:
        ioapic.irq_eoi[pin] += 1
        if ioapic.irq_eoi[pin] == IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT:
            schedule_delayed_work(ioapic.eoi_inject, EOI_INJECT_DELAY_NS)
            ioapic.irq_eoi[pin] = 0
            bus = ioapic.kvm.rt.bus
            if bus.on:
                bus.emit("kvm_ioapic_delayed_eoi_inj", vm=ioapic.kvm.name,
                         e=redirect_entry_bits(ent))
        else:
            ioapic_service(ioapic, pin, False)
    else:
        ioapic.irq_eoi[pin] = 0


def kvm_ioapic_update_eoi(vcpu: KvmVcpu, vector: int, trigger_mode: int) -> None:
    """arch/x86/kvm/ioapic.c: kvm_ioapic_update_eoi  [vCPU thread: takes ioapic->lock]

    The LAPIC broadcast the EOI of ``vector`` (apic_set_eoi / the APICv EOI-induced exit,
    kvm_ioapic_send_eoi): every pin programmed with that vector gets
    kvm_ioapic_update_eoi_one, in pin order.  Spec §11.8.
    """
    kvm = vcpu.kvm
    ioapic: KvmIoapic = kvm.arch.vioapic
    bus = kvm.rt.bus
    if bus.on:
        bus.emit("kvm_ioapic_update_eoi", vm=kvm.name, vcpu=vcpu.vcpu_id, vector=vector,
                 trigger_mode=trigger_mode)
    for i in range(IOAPIC_NUM_PINS):
        if ioapic.redirtbl[i].vector != vector:
            continue
        kvm_ioapic_update_eoi_one(vcpu, ioapic, trigger_mode, i)


def ioapic_in_range(ioapic: KvmIoapic, addr: int) -> bool:
    """arch/x86/kvm/ioapic.c: ioapic_in_range — the 256-byte MMIO window."""
    return ioapic.base_address <= addr < ioapic.base_address + IOAPIC_MEM_LENGTH


def ioapic_mmio_read(vcpu: KvmVcpu | None, ioapic: KvmIoapic, addr: int,
                     length: int) -> tuple[int, int]:
    """arch/x86/kvm/ioapic.c: ioapic_mmio_read → (0 or -EOPNOTSUPP, value)  [vCPU thread]

    IOREGSEL reads back the selector, IOWIN the selected register, other offsets 0.
    Differs from the kernel: returns the value (truncated to ``length`` bytes) instead of
    storing it through a pointer.
    """
    if not ioapic_in_range(ioapic, addr):
        return -errno.EOPNOTSUPP, 0
    off = addr & 0xFF
    if off == IOAPIC_REG_SELECT:
        result = ioapic.ioregsel
    elif off == IOAPIC_REG_WINDOW:
        result = ioapic_read_indirect(ioapic)
    else:
        result = 0
    if length in (1, 2, 4):
        result &= (1 << (8 * length)) - 1
    return 0, result


def ioapic_mmio_write(vcpu: KvmVcpu | None, ioapic: KvmIoapic, addr: int, length: int,
                      val: int) -> int:
    """arch/x86/kvm/ioapic.c: ioapic_mmio_write → 0 or -EOPNOTSUPP  [vCPU thread]

    The guest's MMIO write: IOREGSEL takes the low 8 bits, IOWIN goes to
    ioapic_write_indirect (4- and 8-byte writes carry 32 bits, 2- and 1-byte writes
    fewer); other offsets are ignored.
    """
    if not ioapic_in_range(ioapic, addr):
        return -errno.EOPNOTSUPP
    if length in (8, 4):
        data = val & 0xFFFFFFFF
    elif length == 2:
        data = val & 0xFFFF
    elif length == 1:
        data = val & 0xFF
    else:
        return 0  # printk "ioapic: Unsupported size"
    off = addr & 0xFF
    if off == IOAPIC_REG_SELECT:
        ioapic.ioregsel = data & 0xFF
    elif off == IOAPIC_REG_WINDOW:
        ioapic_write_indirect(ioapic, data)
    return 0


# ioapic_mmio_ops (the read op is not on the bus here: vkick's guests only write).
KvmIoapic.ops = KvmIoDeviceOps(write=ioapic_mmio_write)


def kvm_ioapic_reset(ioapic: KvmIoapic) -> None:
    """arch/x86/kvm/ioapic.c: kvm_ioapic_reset — every pin masked, default base address,
    no line high, id 0.
    Differs from the kernel: a pending eoi_inject timer is not cancelled (reset runs only
    at creation here)."""
    for e in ioapic.redirtbl:
        e.mask = 1
    ioapic.base_address = IOAPIC_DEFAULT_BASE_ADDRESS
    ioapic.ioregsel = 0
    ioapic.irr = 0
    ioapic.irr_delivered = 0
    ioapic.id = 0
    ioapic.irq_eoi = [0] * IOAPIC_NUM_PINS


def kvm_ioapic_init(kvm: Kvm) -> int:
    """arch/x86/kvm/ioapic.c: kvm_ioapic_init — create and reset the IOAPIC
    (``kvm->arch.vioapic``) and put its 256-byte window on the MMIO bus at its base
    address (0xFEC00000), where the guest's writes reach ioapic_mmio_write."""
    eoi_inject = DelayedWork(kvm.rt, kvm_ioapic_eoi_inject_work, f"{kvm.name}.eoi_inject")
    ioapic = KvmIoapic(kvm=kvm, eoi_inject=eoi_inject)
    eoi_inject.work.owner = ioapic
    kvm.arch.vioapic = ioapic
    kvm_ioapic_reset(ioapic)
    ret = kvm_io_bus_register_dev(kvm, ioapic.base_address, IOAPIC_MEM_LENGTH, ioapic)
    if ret < 0:
        kvm.arch.vioapic = None
    return ret


def kvm_get_ioapic(kvm: Kvm) -> KvmIoapicState:
    """arch/x86/kvm/ioapic.c: kvm_get_ioapic (KVM_GET_IRQCHIP, chip 2) — the state, with
    edge pins already delivered not reported as pending."""
    ioapic: KvmIoapic = kvm.arch.vioapic
    return KvmIoapicState(base_address=ioapic.base_address, ioregsel=ioapic.ioregsel,
                          id=ioapic.id, irr=ioapic.irr & ~ioapic.irr_delivered,
                          redirtbl=[redirect_entry_bits(e) for e in ioapic.redirtbl])


def kvm_set_ioapic(kvm: Kvm, state: KvmIoapicState) -> None:
    """arch/x86/kvm/ioapic.c: kvm_set_ioapic (KVM_SET_IRQCHIP, chip 2) — load the state
    (remote IRR included), rescan everywhere, then raise the pins ``state.irr`` names
    (kvm_ioapic_inject_all)."""
    from vkick.kvm.x86 import kvm_make_scan_ioapic_request  # noqa: PLC0415

    ioapic: KvmIoapic = kvm.arch.vioapic
    ioapic.base_address = state.base_address
    ioapic.ioregsel = state.ioregsel
    ioapic.id = state.id
    for e, bits in zip(ioapic.redirtbl, state.redirtbl, strict=True):
        redirect_entry_set_bits(e, bits)
    ioapic.irr = 0
    ioapic.irr_delivered = 0
    kvm_make_scan_ioapic_request(kvm)
    kvm_ioapic_inject_all(ioapic, state.irr)
