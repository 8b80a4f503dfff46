"""arch/x86/kvm/vmx/posted_intr.c and posted_intr.h: the posted-interrupt descriptor's atomic
helpers and what scheduling does to it.

Covered: pi_test_and_set_pir, pi_test_and_set_on, pi_test_and_clear_on, pi_test_on,
pi_set_sn, pi_clear_sn, pi_is_pir_empty, vmx_vcpu_pi_load, vmx_vcpu_pi_put, pi_pre_block,
pi_post_block, pi_wakeup_handler.  For a vhost-only VM (no assigned device, no IOMMU
posting) SN is never set and NV never changes: pi_pre_block returns 0 at once.
"""

from __future__ import annotations

from vkick.kvm.kvm_host import POSTED_INTR_VECTOR, KvmVcpu, PiDesc


def pi_test_and_set_pir(vector: int, pi_desc: PiDesc) -> bool:
    """posted_intr.h: pi_test_and_set_pir — atomic; returns the old bit."""
    bit = 1 << vector
    old = bool(pi_desc.pir & bit)
    pi_desc.pir |= bit
    return old


def pi_test_and_set_on(pi_desc: PiDesc) -> bool:
    """posted_intr.h: pi_test_and_set_on — LOCK-prefixed: a full barrier."""
    old = pi_desc.on
    pi_desc.on = True
    return old


def pi_test_and_clear_on(pi_desc: PiDesc) -> bool:
    """posted_intr.h: pi_test_and_clear_on."""
    old = pi_desc.on
    pi_desc.on = False
    return old


def pi_test_on(pi_desc: PiDesc) -> bool:
    """posted_intr.h: pi_test_on."""
    return pi_desc.on


def pi_set_sn(pi_desc: PiDesc) -> None:
    """posted_intr.h: pi_set_sn."""
    pi_desc.sn = True


def pi_clear_sn(pi_desc: PiDesc) -> None:
    """posted_intr.h: pi_clear_sn."""
    pi_desc.sn = False


def pi_is_pir_empty(pi_desc: PiDesc) -> bool:
    """posted_intr.h: pi_is_pir_empty — a plain read of all 256 bits."""
    return pi_desc.pir == 0


def vmx_vcpu_pi_load(vcpu: KvmVcpu, cpu: int) -> None:
    """arch/x86/kvm/vmx/posted_intr.c: vmx_vcpu_pi_load — on every load, before vcpu->cpu
    changes: re-point NDST on migration, clear SN, and set ON if PIR collected bits while
    notifications were suppressed.  Spec §12.6."""
    pi = vcpu.pi_desc
    if not pi.sn and vcpu.cpu == cpu:
        return
    if pi.nv != POSTED_INTR_VECTOR or vcpu.cpu == cpu:
        pi.sn = False
    else:
        pi.ndst = cpu << 8  # xAPIC host: (id << 8) & 0xFF00
        pi.sn = False
    if not pi_is_pir_empty(pi):
        pi.on = True


def vmx_vcpu_pi_put(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/vmx/posted_intr.c: vmx_vcpu_pi_put — sets SN on preemption, but only with
    an assigned device and IOMMU posting: never for a vhost-only VM."""
    if not getattr(vcpu.kvm, "assigned_device", False) or not vcpu.arch.apicv_active:
        return
    if vcpu.preempted:
        pi_set_sn(vcpu.pi_desc)


def pi_pre_block(vcpu: KvmVcpu) -> int:
    """arch/x86/kvm/vmx/posted_intr.c: pi_pre_block → 1 "do not block", 0 "block".

    Without (assigned device ∧ IOMMU posting ∧ APICv) there is nothing to switch: 0 — the
    kernel's first step, and the only one a vhost-only VM ever takes.
    Differs from the kernel: VT-d posting (the wakeup-vector switch, the per-CPU blocked
    list) is not modelled, so this always returns 0.
    """
    return 0


def pi_post_block(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/vmx/posted_intr.c: pi_post_block — nothing to undo without VT-d posting."""
    return
