"""arch/x86/kvm/lapic.c (APIC-map half): the optimised destination map, its publication, fast
destination resolution and the slow-path matching functions.

Split from :mod:`vkick.kvm.lapic` along the seam lapic.c already has.  Covered:
kvm_recalculate_apic_map, kvm_apic_map_get_logical_dest, kvm_apic_is_broadcast_dest,
kvm_apic_map_get_dest_lapic, kvm_irq_delivery_to_apic_fast, kvm_intr_is_single_vcpu_fast,
kvm_bitmap_or_dest_vcpus, kvm_apic_mda,
kvm_apic_match_physical_addr, kvm_apic_match_logical_addr, kvm_apic_match_dest,
kvm_vector_to_index, kvm_apic_compare_prio, kvm_lowest_prio_delivery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from vkick.kernel.mutex import mutex_lock, mutex_unlock
from vkick.kernel.sched import TaskStruct
from vkick.kvm.kvm_host import (
    APIC_BROADCAST,
    APIC_DEST_ALLBUT,
    APIC_DEST_ALLINC,
    APIC_DEST_LOGICAL,
    APIC_DEST_NOSHORT,
    APIC_DEST_PHYSICAL,
    APIC_DEST_SELF,
    APIC_DFR_CLUSTER,
    APIC_DFR_FLAT,
    APIC_DM_LOWEST,
    KVM_APIC_MODE_X2APIC,
    KVM_APIC_MODE_XAPIC_CLUSTER,
    KVM_APIC_MODE_XAPIC_FLAT,
    X2APIC_BROADCAST,
    Kvm,
    KvmLapic,
    KvmLapicIrq,
    KvmVcpu,
)
from vkick.kvm.lapic import kvm_apic_present, kvm_apic_set_irq, kvm_xapic_id

CLEAN: Final = 0
UPDATE_IN_PROGRESS: Final = 1
DIRTY: Final = 2


@dataclass(slots=True)
class KvmApicMap:
    """arch/x86/include/asm/kvm_host.h: struct kvm_apic_map."""

    mode: int = 0  # OR of KVM_APIC_MODE_* of software-enabled APICs with a logical ID
    max_apic_id: int = 255
    phys_map: list[KvmLapic | None] = field(default_factory=list)
    xapic_flat_map: list[KvmLapic | None] = field(default_factory=lambda: [None] * 8)
    xapic_cluster_map: list[list[KvmLapic | None]] = field(
        default_factory=lambda: [[None] * 4 for _ in range(16)])


def kvm_apic_map_get_logical_dest(amap: KvmApicMap, dest_id: int,
                                  ) -> tuple[bool, list[KvmLapic | None], int, int]:
    """arch/x86/kvm/lapic.c: kvm_apic_map_get_logical_dest → (ok, cluster, offset, mask).

    ``cluster[offset + i]`` is the slot of mask bit ``i``.  Declines (ok False) when the
    map's logical mode is not exactly one mode (spec §10.3).
    """
    mode = amap.mode
    if mode == KVM_APIC_MODE_X2APIC:
        offset = (dest_id >> 16) * 16
        if offset <= amap.max_apic_id:
            cluster_size = min(amap.max_apic_id - offset + 1, 16)
            return True, amap.phys_map, offset, dest_id & (0xFFFF >> (16 - cluster_size))
        return True, amap.phys_map, 0, 0
    if mode == KVM_APIC_MODE_XAPIC_FLAT:
        return True, amap.xapic_flat_map, 0, dest_id & 0xFF
    if mode == KVM_APIC_MODE_XAPIC_CLUSTER:
        return True, amap.xapic_cluster_map[(dest_id >> 4) & 0xF], 0, dest_id & 0xF
    return False, [], 0, 0


async def kvm_recalculate_apic_map(kvm: Kvm, current: TaskStruct) -> None:
    """arch/x86/kvm/lapic.c: kvm_recalculate_apic_map  [process: vCPU thread or ioctl]

    Rebuild and publish the map when it is dirty (spec §10.2, §16.11): an unlocked CLEAN
    check, then ``apic_map_lock`` (a mutex: the caller may sleep), the claim DIRTY →
    UPDATE_IN_PROGRESS, size the map by the highest present x2APIC ID, fill it from every
    visible vCPU's registers, publish (RCU) and UPDATE_IN_PROGRESS → CLEAN — a write that
    marked the map DIRTY meanwhile leaves it DIRTY for the next rebuild; then every vCPU
    rescans its IOAPIC-handled vectors (KVM_REQ_SCAN_IOAPIC).  ``current`` is the
    calling thread.  A vCPU whose x2APIC ID is above the size computed before the fill (it
    appeared or enabled its APIC in between) is left out of the physical map until the next
    rebuild (the v5.13 form of bug #11).

    Toggles: ``apic-map-bool-dirty`` (bug #10) re-creates the two-state flag of 4abaffce4d25
    (5.8-rc1): no claim, and "dirty = false" at the end whatever happened meanwhile — fixed
    by Paolo Bonzini's "KVM: LAPIC: ensure APIC map is up to date on concurrent update
    requests" (5.8-rc3).  ``fix-apic-map-retry`` (bug #11) gives the behaviour of
    4364b287982b (6.4) + 41e90a69a49b (6.5): an x2APIC ID above the size discards the map
    being filled and retries with the larger size.
    Differs from the kernel: the 6.5 retry is grafted onto the v5.13 function (6.x also
    split the fill into phys/logical helpers and disables the map on aliasing); the old map
    is dropped at once (Python references stand in for the RCU grace period).
    """
    arch = kvm.arch
    rt = kvm.rt
    bool_dirty = "apic-map-bool-dirty" in kvm.toggles
    retry_fix = "fix-apic-map-retry" in kvm.toggles
    # Read apic_map_dirty before apic_map (atomic_read_acquire).
    if arch.apic_map_dirty == CLEAN:
        return
    await mutex_lock(arch.apic_map_lock, current)
    max_id = 255  # enough space for any xAPIC ID; never shrinks across retries
    retries = 0
    while True:
        # Read apic_map_dirty before apic_map (if clean) or the registers (if dirty).
        if bool_dirty:
            claimed = arch.apic_map_dirty != CLEAN  # 5.8-rc1: re-check, no claim
        else:
            old = arch.apic_map_dirty  # atomic_cmpxchg_acquire(DIRTY → UPDATE_IN_PROGRESS)
            if old == DIRTY:
                arch.apic_map_dirty = UPDATE_IN_PROGRESS
            claimed = old != CLEAN
        if not claimed:
            # Someone else has updated the map.
            mutex_unlock(arch.apic_map_lock, current)
            return
        vcpus = kvm.vcpus
        for vcpu in vcpus:  # kvm_for_each_vcpu (up to online_vcpus)
            if kvm_apic_present(vcpu):
                max_id = max(max_id, vcpu.vcpu_id)  # kvm_x2apic_id
        # W-MAP-recalc: map sized ↔ registers read.  The lock is a mutex, so the thread
        # may be preempted here; another vCPU may become visible (KVM_CREATE_VCPU) or
        # enable its APIC with an x2APIC ID above max_id (bug #11), or write ID/LDR/SPIV.
        await rt.preempt("W-MAP-recalc")
        new = KvmApicMap(max_apic_id=max_id, phys_map=[None] * (max_id + 1))
        skipped: list[int] = []
        too_big = False
        i = 0
        while i < len(vcpus):  # kvm_for_each_vcpu re-reads online_vcpus every step
            vcpu = vcpus[i]
            i += 1
            apic = vcpu.arch.apic
            if apic is None or not kvm_apic_present(vcpu):
                continue
            xapic_id = kvm_xapic_id(apic)
            x2apic_id = vcpu.vcpu_id  # kvm_x2apic_id
            if retry_fix and x2apic_id > new.max_apic_id:
                too_big = True  # kvm_recalculate_phys_map: -E2BIG
                break
            # Hotplug hack: an ID above 0xff is reachable by its x2APIC ID ...
            if apic.x2apic_mode or x2apic_id > 0xFF:
                if x2apic_id <= new.max_apic_id:
                    new.phys_map[x2apic_id] = apic
                else:
                    skipped.append(x2apic_id)
            # ... and its wrapped xAPIC ID never masks a vCPU with an ID <= 0xff.
            if not apic.x2apic_mode and new.phys_map[xapic_id] is None:
                new.phys_map[xapic_id] = apic
            if apic.sw_enabled:
                if apic.x2apic_mode:
                    # The logical cluster slot is the vCPU's own phys_map entry.
                    new.mode |= KVM_APIC_MODE_X2APIC
                elif apic.ldr:
                    ldr = (apic.ldr >> 24) & 0xFF  # GET_APIC_LOGICAL_ID
                    new.mode |= (KVM_APIC_MODE_XAPIC_FLAT if apic.dfr == APIC_DFR_FLAT
                                 else KVM_APIC_MODE_XAPIC_CLUSTER)
                    ok, cluster, offset, mask = kvm_apic_map_get_logical_dest(new, ldr)
                    if ok and mask:
                        cluster[offset + ((mask & -mask).bit_length() - 1)] = apic
            # W-MAP-recalc: this APIC's registers read ↔ the next one's (or publication).
            # A write to an APIC already read here must leave the map DIRTY (bug #10).
            await rt.preempt("W-MAP-recalc")
        if too_big:
            retries += 1
            # cond_resched(); goto retry — W-MAP-recalc: a voluntary preemption point.
            await rt.preempt("W-MAP-recalc")
            continue
        break
    arch.apic_map = new  # rcu_assign_pointer
    # Write apic_map before clearing apic_map_dirty: atomic_cmpxchg_release(UPDATE_IN_PROGRESS
    # → CLEAN), so a write that came in meanwhile leaves it DIRTY.  The 5.8-rc1 boolean is
    # simply cleared, losing that write (bug #10).
    if bool_dirty or arch.apic_map_dirty == UPDATE_IN_PROGRESS:
        arch.apic_map_dirty = CLEAN
    left = arch.apic_map_dirty
    mutex_unlock(arch.apic_map_lock, current)
    bus = rt.bus
    if bus.on:
        bus.emit("kvm_recalculate_apic_map", vm=kvm.name, max_id=max_id,
                 visited=i, mode=new.mode, skipped=skipped, retries=retries,
                 dirty=left != CLEAN)
    # Destinations may have changed: every vCPU rescans its IOAPIC-handled vectors.
    from vkick.kvm.x86 import kvm_make_scan_ioapic_request  # noqa: PLC0415

    kvm_make_scan_ioapic_request(kvm)


def kvm_lowest_prio_delivery(irq: KvmLapicIrq) -> bool:
    """arch/x86/kvm/lapic.h: kvm_lowest_prio_delivery — LOWEST mode or the redirection hint."""
    return irq.delivery_mode == APIC_DM_LOWEST or irq.msi_redir_hint


def kvm_apic_is_broadcast_dest(kvm: Kvm, src: KvmLapic | None, irq: KvmLapicIrq,
                               amap: KvmApicMap) -> bool:
    """arch/x86/kvm/lapic.c: kvm_apic_is_broadcast_dest."""
    if kvm.arch.x2apic_broadcast_quirk_disabled:
        if irq.dest_id == 0xFF and amap.mode != KVM_APIC_MODE_X2APIC:
            return True
        return irq.dest_id == X2APIC_BROADCAST
    x2apic_ipi = src is not None and src.x2apic_mode
    return irq.dest_id == (X2APIC_BROADCAST if x2apic_ipi else APIC_BROADCAST)


def kvm_vector_to_index(vector: int, dest_vcpus: int, bitmap: int, bitmap_size: int) -> int:
    """arch/x86/kvm/lapic.c: kvm_vector_to_index — the (vector % n)-th set bit, from 0."""
    mod = vector % dest_vcpus
    idx = -1
    for _ in range(mod + 1):
        idx += 1
        while idx < bitmap_size and not bitmap >> idx & 1:
            idx += 1
    return idx


def kvm_apic_compare_prio(v1: KvmVcpu, v2: KvmVcpu) -> int:
    """arch/x86/kvm/lapic.c: kvm_apic_compare_prio."""
    return v1.arch.apic_arb_prio - v2.arch.apic_arb_prio


def kvm_apic_map_get_dest_lapic(kvm: Kvm, src: KvmLapic | None, irq: KvmLapicIrq,
                                amap: KvmApicMap | None,
                                ) -> tuple[bool, list[KvmLapic | None], int, int]:
    """arch/x86/kvm/lapic.c: kvm_apic_map_get_dest_lapic → (resolved, dst, offset, bitmap).

    False means "cannot resolve, use the slow path" (shorthands other than SELF, no map,
    broadcast, mixed logical mode).  Lowest priority picks one destination: with vector
    hashing the (vector % n)-th candidate, dropped (bitmap 0) if that slot is empty.
    """
    if irq.shorthand == APIC_DEST_SELF and src is not None:
        return True, [src], 0, 1
    if irq.shorthand:
        return False, [], 0, 0
    if amap is None or kvm_apic_is_broadcast_dest(kvm, src, irq, amap):
        return False, [], 0, 0
    if irq.dest_mode == APIC_DEST_PHYSICAL:
        if irq.dest_id > amap.max_apic_id:
            return True, amap.phys_map, 0, 0
        return True, amap.phys_map, irq.dest_id, 1
    ok, dst, offset, bitmap = kvm_apic_map_get_logical_dest(amap, irq.dest_id)
    if not ok:
        return False, [], 0, 0
    if not kvm_lowest_prio_delivery(irq):
        return True, dst, offset, bitmap
    if not kvm.vector_hashing:
        lowest = -1
        for i in range(16):
            if not bitmap >> i & 1:
                continue
            cand = dst[offset + i]
            if cand is None:
                continue
            if lowest < 0:
                lowest = i
                continue
            best = dst[offset + lowest]
            assert best is not None
            if kvm_apic_compare_prio(cand.vcpu, best.vcpu) < 0:
                lowest = i
        return True, dst, offset, (1 << lowest) if lowest >= 0 else 0
    if bitmap == 0:
        return True, dst, offset, 0
    lowest = kvm_vector_to_index(irq.vector, bitmap.bit_count(), bitmap, 16)
    if dst[offset + lowest] is None:
        # "Disabled LAPIC found during irq injection": dropped, not re-arbitrated.
        return True, dst, offset, 0
    return True, dst, offset, 1 << lowest


def kvm_irq_delivery_to_apic_fast(kvm: Kvm, src: KvmLapic | None, irq: KvmLapicIrq,
                                  dest_map: object = None) -> tuple[bool, int]:
    """arch/x86/kvm/lapic.c: kvm_irq_delivery_to_apic_fast → (handled, r)  [atomic: RCU]

    Up to 16 destinations are injected one after another inside the caller's context
    (inside irqfd_wakeup: under the eventfd's wqh.lock).  Spec §10.4.
    """
    r = -1
    if irq.shorthand == APIC_DEST_SELF:
        if src is None:
            return False, r
        return True, kvm_apic_set_irq(src.vcpu, irq, dest_map)
    amap = kvm.arch.apic_map  # rcu_dereference: one consistent snapshot
    ok, dst, offset, bitmap = kvm_apic_map_get_dest_lapic(kvm, src, irq, amap)
    if ok:
        r = 0
        i = 0
        while bitmap:
            if bitmap & 1:
                apic = dst[offset + i]
                if apic is not None:
                    r += kvm_apic_set_irq(apic.vcpu, irq, dest_map)
            bitmap >>= 1
            i += 1
    return ok, r


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


def kvm_bitmap_or_dest_vcpus(kvm: Kvm, irq: KvmLapicIrq, vcpu_bitmap: int) -> int:
    """arch/x86/kvm/lapic.c: kvm_bitmap_or_dest_vcpus — add (by vCPU index) the vCPUs
    ``irq``'s destination names: from the APIC map when it resolves the destination, else
    by matching every present APIC (the IOAPIC's rescan targets).
    Differs from the kernel: returns the updated bitmap instead of setting bits in place.
    """
    ok, dst, offset, bitmap = kvm_apic_map_get_dest_lapic(kvm, None, irq, kvm.arch.apic_map)
    if ok:
        for i in range(16):
            if bitmap >> i & 1:
                dest = dst[offset + i]
                if dest is not None:
                    vcpu_bitmap |= 1 << dest.vcpu.vcpu_idx
        return vcpu_bitmap
    for i, vcpu in enumerate(kvm.vcpus):
        if not kvm_apic_present(vcpu):
            continue
        if kvm_apic_match_dest(vcpu, None, irq.shorthand, irq.dest_id, irq.dest_mode):
            vcpu_bitmap |= 1 << i
    return vcpu_bitmap


def kvm_apic_mda(vcpu: KvmVcpu, dest_id: int, source: KvmLapic | None,
                 target: KvmLapic) -> int:
    """arch/x86/kvm/lapic.c: kvm_apic_mda — an MSI to 0xFF aimed at an x2APIC target is a
    broadcast (the default x2APIC broadcast quirk)."""
    ipi = source is not None
    if (not vcpu.kvm.arch.x2apic_broadcast_quirk_disabled and not ipi
            and dest_id == APIC_BROADCAST and target.x2apic_mode):
        return X2APIC_BROADCAST
    return dest_id


def kvm_apic_match_physical_addr(apic: KvmLapic, mda: int) -> bool:
    """arch/x86/kvm/lapic.c: kvm_apic_match_physical_addr."""
    if mda == (X2APIC_BROADCAST if apic.x2apic_mode else APIC_BROADCAST):
        return True
    if apic.x2apic_mode:
        return mda == apic.vcpu.vcpu_id
    if apic.vcpu.vcpu_id > 0xFF:
        return mda == apic.vcpu.vcpu_id
    return mda == kvm_xapic_id(apic)


def kvm_apic_match_logical_addr(apic: KvmLapic, mda: int) -> bool:
    """arch/x86/kvm/lapic.c: kvm_apic_match_logical_addr."""
    if mda == (X2APIC_BROADCAST if apic.x2apic_mode else APIC_BROADCAST):
        return True
    logical_id = apic.ldr
    if apic.x2apic_mode:
        return (logical_id >> 16) == (mda >> 16) and bool(logical_id & mda & 0xFFFF)
    logical_id = (logical_id >> 24) & 0xFF
    mda &= 0xFF
    if apic.dfr == APIC_DFR_FLAT:
        return bool(logical_id & mda)
    if apic.dfr == APIC_DFR_CLUSTER:
        return (logical_id >> 4) == (mda >> 4) and bool(logical_id & mda & 0xF)
    return False


def kvm_apic_match_dest(vcpu: KvmVcpu, source: KvmLapic | None, shorthand: int,
                        dest: int, dest_mode: int) -> bool:
    """arch/x86/kvm/lapic.c: kvm_apic_match_dest — slow-path matching (spec §10.5)."""
    target = vcpu.arch.apic
    assert target is not None
    mda = kvm_apic_mda(vcpu, dest, source, target)
    if shorthand == APIC_DEST_NOSHORT:
        if dest_mode == APIC_DEST_PHYSICAL:
            return kvm_apic_match_physical_addr(target, mda)
        return kvm_apic_match_logical_addr(target, mda)
    if shorthand == APIC_DEST_SELF:
        return target is source
    if shorthand == APIC_DEST_ALLINC:
        return True
    if shorthand == APIC_DEST_ALLBUT:
        return target is not source
    return False


__all__ = ["APIC_DEST_LOGICAL", "KvmApicMap", "kvm_recalculate_apic_map"]
