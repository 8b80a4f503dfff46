"""arch/x86/kvm/vmx/posted_intr.c and posted_intr.h: the posted-interrupt descriptor's atomic
helpers, what scheduling does to it, and blocking with VT-d posting.

Covered: pi_test_and_set_pir, pi_test_and_set_on, pi_test_and_clear_on, pi_test_on,
pi_set_on, pi_clear_on, pi_set_sn, pi_clear_sn, pi_test_sn, pi_is_pir_empty,
vmx_vcpu_pi_load, vmx_vcpu_pi_put, __pi_post_block, pi_pre_block, pi_post_block,
pi_wakeup_handler, pi_has_pending_interrupt, vmx_pi_start_assignment, pi_update_irte,
vmx_can_use_vtd_pi (the 5.16 guard, toggle ``fix-vtd-pi-stable-condition``).

Without an assigned device whose interrupts the IOMMU posts (a vhost-only VM) SN is never
set and NV never changes: pi_pre_block returns 0 at once (spec §12.6, §12.7).  With one,
a blocking vCPU switches NV to POSTED_INTR_WAKEUP_VECTOR, points NDST at its CPU and joins
that CPU's ``blocked_vcpu_on_cpu`` list, whose wakeup handler kicks it when the IOMMU posts.

The multi-field updates of ``control`` (ON, SN, NV, NDST) are cmpxchg loops.  Each has the
``W-PI-cas`` window between the read of ``control`` and the cmpxchg: another CPU or the
IOMMU may post there, and the cmpxchg then fails and the loop retries.  v5.13 writes
``old.control = new.control = pi_desc->control``; whether the compiler loads ``control``
once or twice is not knowable from the source.  vkick's default is one load (the behaviour
the code intends and the 5.16 fix cfb0e1306a37 makes explicit); bug toggle
``pi-control-torn-read`` (bug #4) loads ``new`` before the window and ``old`` after it, so
the cmpxchg succeeds with a stale ``new`` and can clear an ON set in between.
Other bug toggles (research/bugs.md): ``pi-sn-no-on-recompute`` (bug #5: drop the ON
recompute after clearing SN, as before c112b5f50232), ``pi-ndst-rewrite-when-blocked``
(bug #6: no "NV is the wakeup vector → only clear SN" shortcut, as between c112b5f50232
and the 5.4-rc8 fix "KVM: VMX: Do not change PID.NDST when loading a blocked vCPU").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import vkick.kvm
from vkick.hw.cpu import (
    POSTED_INTR_WAKEUP_VECTOR,
    current_pcpu,
    local_irq_disable,
    local_irq_enable,
)
from vkick.hw.iommu import IRQ_POSTING_CAP, VcpuData, irq_remapping_cap, irq_set_vcpu_affinity
from vkick.kvm.irq import irqchip_in_kernel
from vkick.kvm.kvm_host import (
    KVM_IRQ_ROUTING_MSI,
    KVM_REQ_UNBLOCK,
    POSTED_INTR_VECTOR,
    Kvm,
    KvmLapicIrq,
    KvmVcpu,
    PiDesc,
)

if TYPE_CHECKING:
    import vkick.kvm.x86

# x86.py imports this module: kvm_arch_has_assigned_device (read on every block and
# sched-out, _has_vtd_posting) is looked up on the package at call time, not imported.


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


def pi_set_on(pi_desc: PiDesc) -> None:
    """posted_intr.h: pi_set_on  [any context] — atomic set_bit."""
    pi_desc.on = True


def pi_clear_on(pi_desc: PiDesc) -> None:
    """posted_intr.h: pi_clear_on  [any context] — atomic clear_bit."""
    pi_desc.on = False


def pi_set_sn(pi_desc: PiDesc) -> None:
    """posted_intr.h: pi_set_sn."""
    pi_desc.sn = True


def pi_clear_sn(pi_desc: PiDesc) -> None:
    """posted_intr.h: pi_clear_sn."""
    pi_desc.sn = False


def pi_test_sn(pi_desc: PiDesc) -> bool:
    """posted_intr.h: pi_test_sn  [any context]"""
    return pi_desc.sn


def pi_is_pir_empty(pi_desc: PiDesc) -> bool:
    """posted_intr.h: pi_is_pir_empty — a plain read of all 256 bits."""
    return pi_desc.pir == 0


# ---------------------------------------------------------------------------- control word


class PiControl(NamedTuple):
    """The 64-bit ``control`` member of struct pi_desc, as one value (a load of it)."""

    on: bool
    sn: bool
    nv: int
    ndst: int


def _control(pi: PiDesc) -> PiControl:
    """A load of ``pi_desc->control``."""
    return PiControl(pi.on, pi.sn, pi.nv, pi.ndst)


def _cmpxchg64_control(pi: PiDesc, old: PiControl, new: PiControl) -> PiControl:
    """cmpxchg64(&pi_desc->control, old, new) → the value found (atomic)."""
    cur = _control(pi)
    if cur == old:
        pi.on, pi.sn, pi.nv, pi.ndst = new
    return cur


async def _control_for_cmpxchg(vcpu: KvmVcpu) -> tuple[PiControl, PiControl]:
    """``old.control = new.control = pi_desc->control`` → (old, new), with the W-PI-cas
    window before the cmpxchg; ``pi-control-torn-read`` loads ``old`` after the window
    (two loads, bug #4)."""
    pi = vcpu.pi_desc
    new = _control(pi)
    # W-PI-cas: the load of control ↔ the cmpxchg.  The IOMMU or another CPU may post here
    # (PIR, ON, a notification); the cmpxchg then fails and the loop retries — unless the
    # second load of a torn read already saw the change.
    await vcpu.kvm.rt.preempt("W-PI-cas")
    old = _control(pi) if "pi-control-torn-read" in vcpu.kvm.toggles else new
    return old, new


def pi_ndst(cpu: int) -> int:
    """NDST for host CPU ``cpu``: cpu_physical_id(cpu) in xAPIC format, ``(id << 8) & 0xFF00``
    (vkick's host runs its APICs in xAPIC mode; APIC ID = CPU number)."""
    return (cpu << 8) & 0xFF00


def vmx_can_use_vtd_pi(kvm: Kvm) -> bool:
    """arch/x86/kvm/vmx/posted_intr.c: vmx_can_use_vtd_pi  [any context] (53b7ca1a3593)

    VT-d posting is possible at all: an assigned device, an IOMMU that can post, an
    in-kernel irqchip and enable_apicv — a condition that does not change while the VM
    runs, unlike a vCPU's APICv state.
    """
    return _vtd_posting_capable(kvm) and irqchip_in_kernel(kvm) and kvm.enable_apicv


def _vtd_posting_capable(kvm: Kvm) -> bool:
    """kvm_arch_has_assigned_device ∧ irq_remapping_cap(IRQ_POSTING_CAP): the part of the
    VT-d posting condition that vmx_can_use_vtd_pi and v5.13's _has_vtd_posting and
    pi_update_irte share (each adds its own APICv term)."""
    host = kvm.host
    return (vkick.kvm.x86.kvm_arch_has_assigned_device(kvm) and host is not None
            and irq_remapping_cap(host, IRQ_POSTING_CAP))


def _has_vtd_posting(vcpu: KvmVcpu) -> bool:
    """The guard of vmx_vcpu_pi_put and pi_pre_block.  v5.13: kvm_arch_has_assigned_device
    ∧ irq_remapping_cap(IRQ_POSTING_CAP) ∧ kvm_vcpu_apicv_active(vcpu).  With APICv
    inhibited at run time the IRTEs still post to the vCPU (nothing rewrites them), but a
    blocking vCPU no longer switches to the wakeup vector: the IOMMU's notification goes to
    POSTED_INTR_VECTOR, which the host ignores, and the vCPU sleeps on.
    ``fix-vtd-pi-stable-condition`` uses vmx_can_use_vtd_pi instead (53b7ca1a3593,
    5.16-rc3)."""
    kvm = vcpu.kvm
    if "fix-vtd-pi-stable-condition" in kvm.toggles:
        return vmx_can_use_vtd_pi(kvm)
    return _vtd_posting_capable(kvm) and vcpu.arch.apicv_active


def _warn(vcpu: KvmVcpu, what: str) -> None:
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vkick_warn", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, what=what)


# ---------------------------------------------------------------------------- load / put


async def vmx_vcpu_pi_load(vcpu: KvmVcpu, cpu: int) -> None:
    """arch/x86/kvm/vmx/posted_intr.c: vmx_vcpu_pi_load  [vcpu_load / kvm_sched_in]

    Before ``vcpu->cpu`` changes: nothing if SN is clear and the CPU did not change; if NV
    is the wakeup vector (the vCPU is blocked: pi_post_block owns NDST, and the wakeup
    handler must find it on the list NDST names) or the CPU did not change, only clear SN;
    otherwise point NDST at ``cpu`` and clear SN in one cmpxchg.  Then — after a barrier —
    set ON if PIR has bits (posted while SN suppressed the notification).  Spec §12.6.
    Bug toggles: ``pi-ndst-rewrite-when-blocked`` (bug #6), ``pi-sn-no-on-recompute``
    (bug #5).
    """
    pi = vcpu.pi_desc
    toggles = vcpu.kvm.toggles
    if not pi_test_sn(pi) and vcpu.cpu == cpu:
        return
    if "pi-ndst-rewrite-when-blocked" in toggles:
        only_sn = vcpu.cpu == cpu
    else:
        only_sn = pi.nv == POSTED_INTR_WAKEUP_VECTOR or vcpu.cpu == cpu
    if only_sn:
        pi_clear_sn(pi)
    else:
        dest = pi_ndst(cpu)
        while True:  # the full case
            old, new = await _control_for_cmpxchg(vcpu)
            new = new._replace(ndst=dest, sn=False)
            if _cmpxchg64_control(pi, old, new) == old:
                break
    # after_clear_sn: smp_mb__after_atomic — SN is clear before PIR is read.
    if "pi-sn-no-on-recompute" not in toggles and not pi_is_pir_empty(pi):
        pi_set_on(pi)
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vmx_vcpu_pi_load", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, pcpu=cpu,
                 ndst=pi.ndst, on=pi.on)


def vmx_vcpu_pi_put(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/vmx/posted_intr.c: vmx_vcpu_pi_put  [vcpu_put / kvm_sched_out]

    Only with an assigned device, IOMMU posting and APICv: a vCPU preempted while runnable
    gets SN, so the IOMMU stops notifying a CPU it is not on (PIR still collects).  Never
    for a vhost-only VM.  Spec §12.6.
    """
    if not _has_vtd_posting(vcpu):
        return
    if vcpu.preempted:
        pi_set_sn(vcpu.pi_desc)
        bus = vcpu.kvm.rt.bus
        if bus.on:
            bus.emit("vmx_vcpu_pi_put", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, sn=True)


# ---------------------------------------------------------------------------- blocking


async def __pi_post_block(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/vmx/posted_intr.c: __pi_post_block  [vCPU thread, IRQs off]

    Undo pi_pre_block: NDST := this vCPU's CPU and NV := POSTED_INTR_VECTOR in one cmpxchg
    (warn if NV was not the wakeup vector), then leave ``pre_pcpu``'s blocked list.
    """
    pi = vcpu.pi_desc
    dest = pi_ndst(vcpu.cpu)
    while True:
        old, new = await _control_for_cmpxchg(vcpu)
        if old.nv != POSTED_INTR_WAKEUP_VECTOR:
            _warn(vcpu, "Wakeup handler not enabled while the VCPU is blocked")
        new = new._replace(ndst=dest, nv=POSTED_INTR_VECTOR)
        if _cmpxchg64_control(pi, old, new) == old:
            break
    pre = vcpu.pre_pcpu
    if pre == -1:
        _warn(vcpu, "__pi_post_block: pre_pcpu == -1")
        return
    host = vcpu.kvm.host
    lst = host.pcpus[pre].blocked_vcpu_on_cpu  # under blocked_vcpu_on_cpu_lock of pre
    if vcpu in lst:
        lst.remove(vcpu)
    vcpu.pre_pcpu = -1


async def pi_pre_block(vcpu: KvmVcpu) -> int:
    """arch/x86/kvm/vmx/posted_intr.c: pi_pre_block → 1 don't block, 0 block  [vCPU thread]

    Without (assigned device ∧ IOMMU posting ∧ APICv): 0 at once.  Otherwise, IRQs off:
    ``pre_pcpu`` := this CPU and join its blocked list; NDST := ``pre_pcpu``, NV :=
    POSTED_INTR_WAKEUP_VECTOR in one cmpxchg (warn if SN is set); then, if ON is set —
    something was posted before or during the switch, notified with the old vector —
    undo (__pi_post_block) and return 1.  IRQs on.  Spec §12.7, §16.13.
    """
    if not _has_vtd_posting(vcpu):
        return 0
    pi = vcpu.pi_desc
    host = vcpu.kvm.host
    pcpu = host.pcpus[vcpu.cpu]
    local_irq_disable(pcpu)
    if vcpu.pre_pcpu != -1:
        _warn(vcpu, "pi_pre_block: pre_pcpu != -1")
    else:
        vcpu.pre_pcpu = vcpu.cpu
        host.pcpus[vcpu.pre_pcpu].blocked_vcpu_on_cpu.append(vcpu)  # list_add_tail
    dest = pi_ndst(vcpu.pre_pcpu)
    while True:
        old, new = await _control_for_cmpxchg(vcpu)
        if pi.sn:
            _warn(vcpu, "Warning: SN field of posted-interrupts is set before blocking")
        new = new._replace(ndst=dest, nv=POSTED_INTR_WAKEUP_VECTOR)
        if _cmpxchg64_control(pi, old, new) == old:
            break
    if pi_test_on(pi):
        await __pi_post_block(vcpu)
    r = int(vcpu.pre_pcpu == -1)
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("pi_pre_block", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, pcpu=pcpu.id, r=r)
    local_irq_enable(pcpu)
    return r


async def pi_post_block(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/vmx/posted_intr.c: pi_post_block  [vCPU thread]

    After kvm_vcpu_block: if pi_pre_block switched to the wakeup vector, switch back (IRQs
    off, __pi_post_block) — NDST now names the CPU the vCPU runs on.
    """
    if vcpu.pre_pcpu == -1:
        return
    pcpu = vcpu.kvm.host.pcpus[vcpu.cpu]
    local_irq_disable(pcpu)
    await __pi_post_block(vcpu)
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("pi_post_block", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, pcpu=pcpu.id)
    local_irq_enable(pcpu)


def pi_wakeup_handler() -> None:
    """arch/x86/kvm/vmx/posted_intr.c: pi_wakeup_handler  [hardirq: POSTED_INTR_WAKEUP_VECTOR]

    Under this CPU's list lock, kick every vCPU on its ``blocked_vcpu_on_cpu`` list whose
    ON is set.  A vCPU listed on another CPU is not seen (bug #6).  Spec §12.7.
    """
    from vkick.kvm.kvm_main import kvm_vcpu_kick  # noqa: PLC0415

    pcpu = current_pcpu.get()
    if pcpu is None:
        return
    kicked = []
    for vcpu in list(pcpu.blocked_vcpu_on_cpu):
        if pi_test_on(vcpu.pi_desc):
            kicked.append(vcpu.vcpu_id)
            kvm_vcpu_kick(vcpu)
    bus = pcpu.rt.bus
    if bus.on:
        bus.emit("pi_wakeup_handler", pcpu=pcpu.id, kicked=kicked)


def pi_has_pending_interrupt(vcpu: KvmVcpu) -> bool:
    """arch/x86/kvm/vmx/posted_intr.c: pi_has_pending_interrupt  [any context]

    ON, or SN with PIR bits (the directed-yield hint, dy_apicv_has_pending_interrupt).
    """
    pi = vcpu.pi_desc
    return pi_test_on(pi) or (pi_test_sn(pi) and not pi_is_pir_empty(pi))


def vmx_pi_start_assignment(kvm: Kvm) -> None:
    """arch/x86/kvm/vmx/posted_intr.c: vmx_pi_start_assignment  [process]

    The VM's first assigned device: if the IOMMU can post, KVM_REQ_UNBLOCK to every vCPU,
    so one already blocked (with NV = POSTED_INTR_VECTOR and on no wakeup list: its
    pi_pre_block ran before the assignment) leaves kvm_vcpu_block and re-runs pi_pre_block
    (bug #3's fix a2486020a82e).  Spec §12.7.
    """
    from vkick.kvm.kvm_main import kvm_make_all_cpus_request  # noqa: PLC0415

    if kvm.host is None or not irq_remapping_cap(kvm.host, IRQ_POSTING_CAP):
        return
    kvm_make_all_cpus_request(kvm, KVM_REQ_UNBLOCK)


def pi_update_irte(kvm: Kvm, host_irq: int, guest_irq: int, set_: bool) -> int:
    """arch/x86/kvm/vmx/posted_intr.c: pi_update_irte  [process: irq bypass, routing update]

    With an assigned device, IOMMU posting and APICv (v5.13: vCPU 0's;
    ``fix-vtd-pi-stable-condition``: vmx_can_use_vtd_pi): for each MSI route of ``guest_irq``,
    post the host IRQ to the vCPU (IRTE in posted mode: that vCPU's descriptor and the
    route's vector) if the route targets exactly one vCPU with Fixed or Lowest-priority
    delivery; otherwise (multicast, broadcast, other modes) keep it remapped.  ``set_``
    False: back to remapped mode.  0, or the IOMMU driver's error.
    """
    from vkick.kernel.srcu import srcu_read_lock, srcu_read_unlock  # noqa: PLC0415
    from vkick.kvm.irq_comm import (  # noqa: PLC0415
        kvm_intr_is_single_vcpu,
        kvm_irq_is_postable,
        kvm_set_msi_irq,
    )
    from vkick.kvm.irqchip import kvm_irq_map_gsi  # noqa: PLC0415

    if "fix-vtd-pi-stable-condition" in kvm.toggles:
        if not vmx_can_use_vtd_pi(kvm):
            return 0
    elif (not _vtd_posting_capable(kvm)
            or not kvm.vcpus or not kvm.vcpus[0].arch.apicv_active):
        return 0  # v5.13: vCPU 0's APICv state stands for the VM's
    host = kvm.host
    assert host is not None
    idx = srcu_read_lock(kvm.irq_srcu)
    ret = 0
    try:
        entries = kvm_irq_map_gsi(kvm, guest_irq)
        if not entries:
            _warn(kvm.vcpus[0], f"no route for guest_irq {guest_irq} (broken user space?)")
            return 0
        for e in entries:
            if e.type != KVM_IRQ_ROUTING_MSI:
                continue
            irq = KvmLapicIrq()
            kvm_set_msi_irq(kvm, e, irq)
            vcpu = kvm_intr_is_single_vcpu(kvm, irq)
            if vcpu is None or not kvm_irq_is_postable(irq):
                ret = irq_set_vcpu_affinity(host, host_irq, None)  # stay remapped
                if ret < 0:
                    return ret
                continue
            info = VcpuData(vcpu.pi_desc, irq.vector, vcpu.arch.pir_ids,
                            (kvm.name, vcpu.vcpu_id))
            bus = kvm.rt.bus
            if bus.on:
                bus.emit("kvm_pi_irte_update", vm=kvm.name, host_irq=host_irq,
                         vcpu=vcpu.vcpu_id, gsi=e.gsi, vector=irq.vector, set=set_)
            ret = irq_set_vcpu_affinity(host, host_irq, info if set_ else None)
            if ret < 0:
                return ret
        return 0
    finally:
        srcu_read_unlock(kvm.irq_srcu, idx)
