"""Oracle: the published APIC map equals the map derived from the current registers
(research/bugs.md "Oracles beyond §17", bugs #10 and #11).

A state check, not an event consumer: call :func:`apic_map_diffs` when the VM is quiescent
(no register write or map rebuild in flight).  The derivation restates spec §10.2 steps 3–5
on its own, sized over every present vCPU, so it does not share code with the function it
checks.  With v5.13 a quiescent VM always passes: every write marks the map DIRTY and is
followed by a rebuild in the writer's thread, and a write that lands during a rebuild leaves
it DIRTY (§16.11).  A lost update (``apic-map-bool-dirty``) or a vCPU that never entered the
map (``apic-map-no-recalc-on-set-state``) shows as a slot that names the wrong vCPU.
"""

from __future__ import annotations

from vkick.kvm.kvm_host import (
    APIC_DFR_FLAT,
    KVM_APIC_MODE_X2APIC,
    KVM_APIC_MODE_XAPIC_CLUSTER,
    KVM_APIC_MODE_XAPIC_FLAT,
    Kvm,
    KvmLapic,
)
from vkick.kvm.lapic_map import CLEAN, DIRTY, KvmApicMap


def apic_map_from_registers(kvm: Kvm) -> KvmApicMap:
    """The map every visible vCPU's registers call for now (spec §10.2 steps 3–5)."""
    present = [v for v in kvm.vcpus if v.arch.apic is not None and v.arch.apic.hw_enabled]
    max_id = max([255] + [v.vcpu_id for v in present])
    amap = KvmApicMap(max_apic_id=max_id, phys_map=[None] * (max_id + 1))
    for vcpu in present:
        apic = vcpu.arch.apic
        assert apic is not None
        xapic_id = (apic.id >> 24) & 0xFF
        if apic.x2apic_mode or vcpu.vcpu_id > 0xFF:
            amap.phys_map[vcpu.vcpu_id] = apic
        if not apic.x2apic_mode and amap.phys_map[xapic_id] is None:
            amap.phys_map[xapic_id] = apic  # first vCPU wins a duplicate xAPIC ID
        if not apic.sw_enabled:
            continue
        if apic.x2apic_mode:
            amap.mode |= KVM_APIC_MODE_X2APIC  # its logical slot is its phys_map entry
            continue
        if not apic.ldr:
            continue
        flat = apic.dfr == APIC_DFR_FLAT
        amap.mode |= KVM_APIC_MODE_XAPIC_FLAT if flat else KVM_APIC_MODE_XAPIC_CLUSTER
        logical = (apic.ldr >> 24) & 0xFF
        # The slot is looked up under the mode accumulated so far (step 5f).
        if amap.mode == KVM_APIC_MODE_XAPIC_FLAT:
            cluster, mask = amap.xapic_flat_map, logical
        elif amap.mode == KVM_APIC_MODE_XAPIC_CLUSTER:
            cluster, mask = amap.xapic_cluster_map[logical >> 4], logical & 0xF
        else:
            continue
        if mask:
            cluster[(mask & -mask).bit_length() - 1] = apic  # a later vCPU overwrites
    return amap


def _who(apic: KvmLapic | None) -> str:
    return "nobody" if apic is None else f"vcpu {apic.vcpu.vcpu_id}"


def _slots(name: str, got: list[KvmLapic | None], want: list[KvmLapic | None]) -> list[str]:
    out = []
    for i in range(max(len(got), len(want))):
        g = got[i] if i < len(got) else None
        w = want[i] if i < len(want) else None
        if g is not w:
            out.append(f"apic map: {name}[{i}] is {_who(g)}, the registers say {_who(w)}")
    return out


def apic_map_diffs(kvm: Kvm) -> list[str]:
    """Differences between the published map and :func:`apic_map_from_registers` (empty
    when they agree), plus a map left not CLEAN."""
    want = apic_map_from_registers(kvm)
    got = kvm.arch.apic_map
    if got is None:
        return ["apic map: none published"]
    diffs = []
    state = kvm.arch.apic_map_dirty
    if state != CLEAN:
        name = "DIRTY" if state == DIRTY else "UPDATE_IN_PROGRESS"
        diffs.append(f"apic map: left {name} with no rebuild in flight")
    if got.max_apic_id != want.max_apic_id:
        diffs.append(f"apic map: max_apic_id {got.max_apic_id}, the registers say "
                     f"{want.max_apic_id}")
    if got.mode != want.mode:
        diffs.append(f"apic map: mode {got.mode}, the registers say {want.mode}")
    diffs += _slots("phys_map", got.phys_map, want.phys_map)
    if want.mode == KVM_APIC_MODE_XAPIC_FLAT:
        diffs += _slots("xapic_flat_map", got.xapic_flat_map, want.xapic_flat_map)
    elif want.mode == KVM_APIC_MODE_XAPIC_CLUSTER:
        for c in range(16):
            diffs += _slots(f"xapic_cluster_map[{c}]", got.xapic_cluster_map[c],
                            want.xapic_cluster_map[c])
    return diffs
