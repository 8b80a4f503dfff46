"""Unit tests of the LAPIC reset and restore paths: kvm_lapic_reset, kvm_vcpu_reset and
vmx_apicv_post_state_restore (spec §10.1, §12)."""

from __future__ import annotations

import functools
from typing import Any

from vkick.kvm import lapic
from vkick.kvm.kvm_host import APIC_DM_INIT, APIC_SPIV_APIC_ENABLED, Kvm, KvmVcpu, MpState
from vkick.kvm.lapic import kvm_apic_accept_events, kvm_lapic_reset
from vkick.runtime.tasks import Runtime
from vkick.scenario.runner import build_vm

V = 0x61


def _vm(rt: Runtime, n: int = 2, apicv: bool = True) -> Kvm:
    """A VM whose vCPU threads are not running (as between ioctls)."""
    kvm: Kvm = rt.call(functools.partial(build_vm, rt, nr_vcpus=n, apicv=apicv,
                                         x2apic=False, eoi_auto=True))
    for v in kvm.vcpus:
        v.cpu = v.home_cpu
    return kvm


def _run(rt: Runtime, coro_fn: Any, *args: Any) -> Any:
    async def go() -> Any:
        return await coro_fn(*args)

    return rt.call(go)


def _post(vcpu: KvmVcpu, vector: int) -> None:
    """Leave ``vector`` posted: its PIR bit and ON set, a source id recorded."""
    vcpu.pi_desc.pir |= 1 << vector
    vcpu.pi_desc.on = True
    vcpu.arch.pir_ids[vector] = [7]


def test_kvm_lapic_reset_with_apicv_empties_the_pi_descriptor(rt: Runtime) -> None:
    """kvm_lapic_reset with APICv active runs vmx_apicv_post_state_restore: ON and every
    PIR bit are cleared, so nothing posted before the reset is harvested after it."""
    vcpu = _vm(rt, 1).vcpus[0]
    _post(vcpu, V)
    _run(rt, kvm_lapic_reset, vcpu, False)
    assert not vcpu.pi_desc.on
    assert vcpu.pi_desc.pir == 0
    assert vcpu.arch.pir_ids == {}


def test_kvm_lapic_reset_without_apicv_leaves_the_pi_descriptor(rt: Runtime) -> None:
    """kvm_lapic_reset calls the post-state-restore hook only with APICv active."""
    vcpu = _vm(rt, 1, apicv=False).vcpus[0]
    _post(vcpu, V)
    _run(rt, kvm_lapic_reset, vcpu, False)
    assert vcpu.pi_desc.on
    assert vcpu.pi_desc.pir == 1 << V


def test_kvm_apic_accept_events_init_resets_the_lapic_as_kvm_vcpu_reset_does(
        rt: Runtime) -> None:
    """An INIT runs kvm_vcpu_reset(vcpu, true): SPIV back to 0xFF (software-disabled), TPR,
    LDR, IRR/ISR cleared and the PI descriptor emptied, the APIC ID kept; an AP waits in
    INIT_RECEIVED."""
    kvm = _vm(rt, 2)
    vcpu = kvm.vcpus[1]
    apic = vcpu.arch.apic
    assert apic is not None
    assert apic.spiv & APIC_SPIV_APIC_ENABLED
    apic_id = apic.id
    apic.tpr = 0x20
    apic.ldr = 1 << 25
    apic.irr = 1 << V
    apic.isr = 1 << (V + 1)
    _post(vcpu, V + 2)
    assert lapic.__apic_accept_irq(apic, APIC_DM_INIT, 0, True, 0) == 1
    _run(rt, kvm_apic_accept_events, vcpu)
    assert apic.spiv == 0xFF and not apic.sw_enabled
    assert (apic.tpr, apic.ldr, apic.irr, apic.isr, apic.ppr) == (0, 0, 0, 0, 0)
    assert apic.id == apic_id
    assert not vcpu.pi_desc.on and vcpu.pi_desc.pir == 0
    assert vcpu.arch.mp_state == MpState.KVM_MP_STATE_INIT_RECEIVED


def test_kvm_lapic_reset_drops_the_source_ids_of_the_cleared_irr(rt: Runtime) -> None:
    """A vector pending in the IRR at reset is discarded with its source ids: the next
    interrupt on that vector carries only its own."""
    vcpu = _vm(rt, 1, apicv=False).vcpus[0]
    apic = vcpu.arch.apic
    assert apic is not None
    apic.irr = 1 << V
    vcpu.arch.irq_ids[V] = [7]
    _run(rt, kvm_lapic_reset, vcpu, True)
    assert vcpu.arch.irq_ids == {}


def test_kvm_apic_set_state_keeps_only_the_ids_of_the_restored_irr(rt: Runtime) -> None:
    """KVM_SET_LAPIC replaces the IRR: ids of vectors it keeps stay, the others go."""
    vcpu = _vm(rt, 1, apicv=False).vcpus[0]
    apic = vcpu.arch.apic
    assert apic is not None
    apic.irr = 1 << V | 1 << (V + 1)
    vcpu.arch.irq_ids.update({V: [7], V + 1: [8]})
    state = lapic.kvm_apic_get_state(vcpu)
    state.irr = 1 << (V + 1)
    assert _run(rt, lapic.kvm_apic_set_state, vcpu, state) == 0
    assert vcpu.arch.irq_ids == {V + 1: [8]}
