"""The APIC map against spec §10.1–10.2, §11.12, §16.11: kvm_recalculate_apic_map and the
functions that mark it dirty (register writes, APIC base, KVM_SET_LAPIC, vCPU creation)."""

from __future__ import annotations

import errno
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from helpers import lapic as _apic

from vkick.kvm.irq_comm import kvm_send_userspace_msi
from vkick.kvm.kvm_host import (
    APIC_DEFAULT_PHYS_BASE,
    APIC_DFR,
    APIC_ID,
    APIC_LDR,
    APIC_SPIV,
    KVM_APIC_MODE_X2APIC,
    KVM_APIC_MODE_XAPIC_CLUSTER,
    KVM_APIC_MODE_XAPIC_FLAT,
    MSR_IA32_APICBASE_ENABLE,
    X2APIC_ENABLE,
    Kvm,
    MpState,
)
from vkick.kvm.kvm_main import kvm_create_vm, kvm_vm_ioctl_create_vcpu
from vkick.kvm.lapic import (
    kvm_apic_get_state,
    kvm_apic_set_state,
    kvm_lapic_reg_write,
    kvm_lapic_set_base,
)
from vkick.kvm.lapic_map import CLEAN, DIRTY, UPDATE_IN_PROGRESS, kvm_recalculate_apic_map
from vkick.kvm.x86 import kvm_set_apic_base
from vkick.obs.apicmap import apic_map_diffs
from vkick.runtime.tasks import Runtime
from vkick.runtime.windows import Window
from vkick.scenario.runner import build_vm, restore_booted_vcpu
from vkick.testing import call_settled, capture_events

NMI = 0x400  # MSI data: delivery mode NMI (accepted whatever SVR says)



def _run(rt: Runtime, fn: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
    """``call_settled`` with keyword arguments too."""
    return call_settled(rt, functools.partial(fn, *args, **kw))


def _booted(rt: Runtime, n: int, *, x2apic: bool = False,
            toggles: frozenset[str] = frozenset()) -> Kvm:
    kvm: Kvm = rt.call(functools.partial(build_vm, rt, nr_vcpus=n, apicv=False,
                                         x2apic=x2apic, eoi_auto=True, toggles=toggles))
    return kvm


def _phys(kvm: Kvm) -> dict[int, int]:
    """Physical map slots as {APIC ID: vCPU id}."""
    return {i: a.vcpu.vcpu_id for i, a in enumerate(kvm.arch.apic_map.phys_map)
            if a is not None}


def _in_window(rt: Runtime, window: Window, nth: int,
               action: Callable[[], None]) -> list[int]:
    """Run ``action`` (another CPU's step) at the ``nth`` hit of ``window``, then yield a
    few loop turns so spawned tasks run there.  Returns the hit counter."""
    hits = [0]
    orig = rt.preempt

    async def turns() -> None:
        for _ in range(20):
            await rt.sleep_ns(0)

    def preempt(w: Window) -> Awaitable[None]:
        if w == window:
            hits[0] += 1
            if hits[0] == nth:
                action()
                return turns()
        return orig(w)

    rt.preempt = preempt
    return hits


# ------------------------------------------------------------------ map contents (§10.2)


def test_kvm_recalculate_apic_map_physical_slots_follow_the_xapic_ids(rt: Runtime) -> None:
    """Step 5c: phys_map[xAPIC ID] = that APIC; on a duplicate ID the first vCPU wins."""
    kvm = _booted(rt, 3)
    assert _phys(kvm) == {0: 0, 1: 1, 2: 2}
    _run(rt, kvm_lapic_reg_write, _apic(kvm.vcpus[2]), APIC_ID, 7 << 24)
    assert _phys(kvm) == {0: 0, 1: 1, 7: 2}
    _run(rt, kvm_lapic_reg_write, _apic(kvm.vcpus[2]), APIC_ID, 1 << 24)
    assert _phys(kvm) == {0: 0, 1: 1}  # vCPU 1 keeps ID 1; vCPU 2 is unreachable
    assert kvm.arch.apic_map_dirty == CLEAN and not apic_map_diffs(kvm)


def test_kvm_recalculate_apic_map_logical_flat_and_cluster_slots(rt: Runtime) -> None:
    """Steps 5d–f: a software-enabled APIC with an LDR gets one logical slot (lowest set
    bit) under the accumulated mode; software-disabled APICs get none; mixed modes give a
    mode that declines (no slot)."""
    kvm = _booted(rt, 3)
    for i, v in enumerate(kvm.vcpus):
        _run(rt, kvm_lapic_reg_write, _apic(v), APIC_LDR, (0b11 << i) << 24)
    amap = kvm.arch.apic_map
    assert amap.mode == KVM_APIC_MODE_XAPIC_FLAT
    assert [a and a.vcpu.vcpu_id for a in amap.xapic_flat_map[:3]] == [0, 1, 2]
    _run(rt, kvm_lapic_reg_write, _apic(kvm.vcpus[1]), APIC_SPIV, 0xFF)
    assert kvm.arch.apic_map.xapic_flat_map[1] is None
    for v in kvm.vcpus:
        _run(rt, kvm_lapic_reg_write, _apic(v), APIC_DFR, 0x0FFFFFFF)
    _run(rt, kvm_lapic_reg_write, _apic(kvm.vcpus[2]), APIC_LDR, 0x24 << 24)
    amap = kvm.arch.apic_map
    assert amap.mode == KVM_APIC_MODE_XAPIC_CLUSTER
    assert amap.xapic_cluster_map[2][2] is _apic(kvm.vcpus[2])
    _run(rt, kvm_lapic_reg_write, _apic(kvm.vcpus[0]), APIC_DFR, 0xFFFFFFFF)
    assert kvm.arch.apic_map.mode == KVM_APIC_MODE_XAPIC_FLAT | KVM_APIC_MODE_XAPIC_CLUSTER
    assert not apic_map_diffs(kvm)


def test_kvm_recalculate_apic_map_sizes_for_x2apic_ids_above_255(rt: Runtime) -> None:
    """Steps 3–5b: max_apic_id = the highest present x2APIC ID; an x2APIC-mode vCPU sits at
    phys_map[vCPU id]; an xAPIC vCPU with id > 255 sits there too and at its wrapped ID."""
    kvm = kvm_create_vm(rt, "vm0", apicv=False)
    for vid in (0, 1, 300):
        _run(rt, kvm_vm_ioctl_create_vcpu, kvm, vid)
    for v in kvm.vcpus:
        _run(rt, restore_booted_vcpu, v, x2apic=v.vcpu_id != 1)
    amap = kvm.arch.apic_map
    assert amap.max_apic_id == 300 and len(amap.phys_map) == 301
    assert _phys(kvm) == {0: 0, 1: 1, 300: 300}
    assert amap.mode == KVM_APIC_MODE_X2APIC  # vCPU 1 (xAPIC) has no LDR: no logical mode
    _run(rt, kvm_set_apic_base, kvm.vcpus[2], APIC_DEFAULT_PHYS_BASE, host_initiated=True)
    _run(rt, kvm_set_apic_base, kvm.vcpus[2], APIC_DEFAULT_PHYS_BASE
         | MSR_IA32_APICBASE_ENABLE, host_initiated=True)
    assert _apic(kvm.vcpus[2]).id == (300 & 0xFF) << 24  # xAPIC ID wraps
    assert _phys(kvm) == {0: 0, 1: 1, 44: 300, 300: 300}
    assert not apic_map_diffs(kvm)
    kvm.arch.x2apic_format = True
    assert kvm_send_userspace_msi(kvm, 0xFEE00000 | (300 & 0xFF) << 12, NMI,
                                  (300 >> 8) << 8) == 1


# ------------------------------------------------------------------ dirty protocol (§16.11)


def test_kvm_recalculate_apic_map_returns_at_once_when_clean(rt: Runtime) -> None:
    """Step 1: a CLEAN map is neither locked nor rebuilt."""
    kvm = _booted(rt, 2)
    before = kvm.arch.apic_map
    with capture_events(rt.bus, "kvm_recalculate_apic_map") as evs:
        _run(rt, kvm_recalculate_apic_map, kvm, kvm.vcpus[0].task)
    assert kvm.arch.apic_map is before and not evs
    assert kvm.arch.apic_map_lock.owner is None


def test_kvm_recalculate_apic_map_write_during_the_rebuild_leaves_it_dirty(rt: Runtime) -> None:
    """Step 6: an LDR write landing after the rebuild read that APIC stores DIRTY; the
    UPDATE_IN_PROGRESS → CLEAN cmpxchg fails, and the writer's own recalculation (asleep on
    apic_map_lock meanwhile) rebuilds with the new value."""
    kvm = _booted(rt, 2)
    v0, v1 = kvm.vcpus
    states: list[int] = []

    def other_cpu() -> None:
        states.append(kvm.arch.apic_map_dirty)
        rt.spawn("vcpu1-write", kvm_lapic_reg_write, _apic(v0), APIC_LDR, 1 << 24)

    # Hits of W-MAP-recalc in vCPU 1's rebuild: 1 sized, 2 after vCPU 0, 3 after vCPU 1.
    _in_window(rt, "W-MAP-recalc", 3, other_cpu)
    with capture_events(rt.bus, "kvm_recalculate_apic_map") as evs:
        _run(rt, kvm_lapic_reg_write, _apic(v1), APIC_LDR, 2 << 24)
    assert states == [UPDATE_IN_PROGRESS]
    assert [e["dirty"] for e in evs] == [True, False]
    assert kvm.arch.apic_map.xapic_flat_map[0] is _apic(v0)
    assert kvm.arch.apic_map_dirty == CLEAN and not apic_map_diffs(kvm)


def test_kvm_recalculate_apic_map_bails_when_another_thread_rebuilt_it(rt: Runtime) -> None:
    """Step 2: a thread that passed the unlocked check sleeps on apic_map_lock; when it
    gets the lock the map is CLEAN (the holder rebuilt it), so it unlocks and returns."""
    kvm = _booted(rt, 2)
    v0, v1 = kvm.vcpus
    sleeping: list[str] = []

    def other_cpu() -> None:
        rt.spawn("vcpu0-recalc", kvm_recalculate_apic_map, kvm, v0.task)

    _in_window(rt, "W-MAP-recalc", 1, other_cpu)
    orig = rt.preempt

    def spy(w: Window) -> Awaitable[None]:
        assert v0.task is not None
        if v0.task.sleeping:
            sleeping.append(v0.task.why)
        return orig(w)

    rt.preempt = spy
    with capture_events(rt.bus, "kvm_recalculate_apic_map") as evs:
        _run(rt, kvm_lapic_reg_write, _apic(v1), APIC_LDR, 2 << 24)
    assert "mutex_lock(apic_map_lock)" in sleeping
    assert len(evs) == 1 and kvm.arch.apic_map_dirty == CLEAN
    assert kvm.arch.apic_map_lock.owner is None and not kvm.arch.apic_map_lock.wait_list


def test_kvm_lapic_reg_write_marks_the_map_dirty_only_for_addressing_registers(
        rt: Runtime) -> None:
    """§11.12: ID/LDR/DFR and a SPIV enable change mark the map DIRTY (then rebuilt); an
    unchanged SPIV enable bit and x2APIC-mode ID/LDR writes (refused, 1) do not."""
    kvm = _booted(rt, 1)
    apic = _apic(kvm.vcpus[0])
    with capture_events(rt.bus, "kvm_recalculate_apic_map") as evs:
        assert _run(rt, kvm_lapic_reg_write, apic, APIC_SPIV, 0x1FE) == 0
        assert not evs
        for reg, val in ((APIC_ID, 3 << 24), (APIC_LDR, 1 << 24), (APIC_DFR, 0),
                         (APIC_SPIV, 0xFF)):
            assert _run(rt, kvm_lapic_reg_write, apic, reg, val) == 0
        assert len(evs) == 4
    kvm2 = _booted(rt, 1, x2apic=True)
    apic2 = _apic(kvm2.vcpus[0])
    assert _run(rt, kvm_lapic_reg_write, apic2, APIC_ID, 5) == 1
    assert _run(rt, kvm_lapic_reg_write, apic2, APIC_LDR, 5) == 1
    assert apic2.id == 0 and kvm2.arch.apic_map_dirty == CLEAN


# ------------------------------------------------------------------ base MSR, SET_LAPIC


def test_kvm_lapic_set_base_x2apic_enable_sets_the_id_and_ldr(rt: Runtime) -> None:
    """Entering x2APIC mode: APIC_ID = vCPU id, LDR = cluster/bit form, map DIRTY;
    disabling the APIC marks it DIRTY too and the rebuild drops the vCPU."""
    kvm = _booted(rt, 2)
    v1 = kvm.vcpus[1]
    kvm_lapic_set_base(v1, MSR_IA32_APICBASE_ENABLE | X2APIC_ENABLE)
    assert _apic(v1).id == 1 and _apic(v1).ldr == 1 << 1
    assert kvm.arch.apic_map_dirty == DIRTY
    _run(rt, kvm_set_apic_base, v1, 0, host_initiated=True)
    assert _phys(kvm) == {0: 0}


def test_kvm_set_apic_base_refuses_illegal_mode_transitions(rt: Runtime) -> None:
    """x2APIC without enable is invalid; the guest may not go x2APIC → xAPIC or
    disabled → x2APIC (the WRMSR faults: 1); the host may."""
    kvm = _booted(rt, 1, x2apic=True)
    v = kvm.vcpus[0]
    base = APIC_DEFAULT_PHYS_BASE
    assert _run(rt, kvm_set_apic_base, v, base | X2APIC_ENABLE, host_initiated=True) == 1
    assert _run(rt, kvm_set_apic_base, v, base | MSR_IA32_APICBASE_ENABLE,
                host_initiated=False) == 1
    assert _run(rt, kvm_set_apic_base, v, base, host_initiated=False) == 0
    assert _run(rt, kvm_set_apic_base, v, base | MSR_IA32_APICBASE_ENABLE | X2APIC_ENABLE,
                host_initiated=False) == 1


def test_kvm_apic_set_state_forces_a_recalculation_and_fixes_up_x2apic_ids(
        rt: Runtime) -> None:
    """KVM_SET_LAPIC with unchanged registers still rebuilds the map (forced DIRTY); in
    x2APIC mode the ID is shifted (legacy API) or must equal the vCPU id (32-bit IDs)."""
    kvm = _booted(rt, 2, x2apic=True)
    v1 = kvm.vcpus[1]
    s = kvm_apic_get_state(v1)
    assert s.id == 1 << 24  # legacy x2APIC API: userspace sees the ID in bits 31:24
    with capture_events(rt.bus, "kvm_recalculate_apic_map") as evs:
        assert _run(rt, kvm_apic_set_state, v1, s) == 0
    assert len(evs) == 1 and _apic(v1).id == 1 and _apic(v1).ldr == 1 << 1
    kvm.arch.x2apic_format = True
    s = kvm_apic_get_state(v1)
    assert s.id == 1
    s.id = 7
    assert _run(rt, kvm_apic_set_state, v1, s) == -errno.EINVAL
    assert not apic_map_diffs(kvm)


# ------------------------------------------------------------------ vCPU creation


def test_kvm_vm_ioctl_create_vcpu_resets_the_lapic_and_is_not_yet_in_the_map(
        rt: Runtime) -> None:
    """The reset LAPIC (ID = vCPU id, SVR 0xFF, APs UNINITIALIZED) is recalculated before
    the vCPU is visible: an NMI MSI to it is dropped (0) until a later recalculation, and
    the next vCPU's creation puts it in (the sequence real KVM shows, test_realkvm_facts)."""
    kvm = kvm_create_vm(rt, "vm0", apicv=False)
    v0 = _run(rt, kvm_vm_ioctl_create_vcpu, kvm, 0)
    v1 = _run(rt, kvm_vm_ioctl_create_vcpu, kvm, 1)
    assert _apic(v1).id == 1 << 24 and _apic(v1).spiv == 0xFF and not _apic(v1).sw_enabled
    assert v0.arch.mp_state == MpState.KVM_MP_STATE_RUNNABLE
    assert v1.arch.mp_state == MpState.KVM_MP_STATE_UNINITIALIZED
    assert kvm_send_userspace_msi(kvm, 0xFEE01000, NMI) == 0
    assert kvm_send_userspace_msi(kvm, 0xFEE00000, NMI) == 1
    v2 = _run(rt, kvm_vm_ioctl_create_vcpu, kvm, 2)
    assert kvm_send_userspace_msi(kvm, 0xFEE01000, NMI) == 1
    assert kvm_send_userspace_msi(kvm, 0xFEE02000, NMI) == 0
    _run(rt, kvm_apic_set_state, v2, kvm_apic_get_state(v2))
    assert kvm_send_userspace_msi(kvm, 0xFEE02000, NMI) == 1
    with pytest.raises(OSError) as exc:
        _run(rt, kvm_vm_ioctl_create_vcpu, kvm, 2)
    assert exc.value.errno == errno.EEXIST
