"""arch/x86/kvm/vmx/vmx.c: delivering posted interrupts, harvesting PIR into IRR, and the
software event-injection helpers.

Covered: vmx_deliver_posted_interrupt, kvm_vcpu_trigger_posted_interrupt,
vmx_sync_pir_to_irr, vmx_set_rvi, vmx_hwapic_isr_update, vmx_interrupt_allowed, vmx_inject_irq,
vmx_enable_irq_window, vmx_cancel_injection, vmx_vcpu_load, vmx_vcpu_put, vmx_pre_block,
vmx_post_block, hardware_setup (the posted-interrupt wakeup handler), and the APICv
controls: vmx_check_apicv_inhibit_reasons, vmx_create_vcpu (its APICv part),
vmx_refresh_apicv_exec_ctrl, vmx_apicv_post_state_restore.  Bug toggles (kvm.toggles,
research/bugs.md): ``fix-running-vcpu-shortcut`` (bug #2's 5.16 fix),
``clear-on-after-harvest`` (spec §16.4), ``fix-no-pir-sync-when-apicv-inhibited`` (bug #7,
vmx_sync_pir_to_irr's part).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import vkick.kvm
from vkick.hw.cpu import HwHost, kvm_set_posted_intr_wakeup_handler, send_ipi
from vkick.kvm.kvm_host import (
    APICV_INHIBIT_REASON_DISABLE,
    APICV_INHIBIT_REASON_HYPERV,
    IN_GUEST_MODE,
    KVM_REQ_EVENT,
    POSTED_INTR_VECTOR,
    KvmVcpu,
    MpState,
)
from vkick.kvm.kvm_main import kvm_get_running_vcpu, kvm_make_request, kvm_vcpu_kick
from vkick.kvm.vmx.posted_intr import (
    pi_clear_on,
    pi_post_block,
    pi_pre_block,
    pi_test_and_clear_on,
    pi_test_and_set_on,
    pi_test_and_set_pir,
    pi_wakeup_handler,
    vmx_vcpu_pi_load,
    vmx_vcpu_pi_put,
)

if TYPE_CHECKING:
    import vkick.kvm.lapic

# lapic.py imports this module: the PIR harvest (every entry, every runnability check)
# reads kvm_apic_update_irr / kvm_lapic_find_highest_irr on the package at call time.


def hardware_setup(host: HwHost) -> None:
    """arch/x86/kvm/vmx/vmx.c: hardware_setup (the part on this path)  [module init]

    Register pi_wakeup_handler as the host's POSTED_INTR_WAKEUP_VECTOR handler.
    """
    kvm_set_posted_intr_wakeup_handler(host, pi_wakeup_handler)


async def vmx_vcpu_load(vcpu: KvmVcpu, cpu: int) -> None:
    """arch/x86/kvm/vmx/vmx.c: vmx_vcpu_load  [vcpu_load / kvm_sched_in]

    (The VMCS load, not modelled), then vmx_vcpu_pi_load.
    """
    await vmx_vcpu_pi_load(vcpu, cpu)


def vmx_check_apicv_inhibit_reasons(bit: int) -> bool:
    """arch/x86/kvm/vmx/vmx.c: vmx_check_apicv_inhibit_reasons  [any context]

    The inhibit reasons VMX acts on: APICV_INHIBIT_REASON_DISABLE and
    APICV_INHIBIT_REASON_HYPERV; kvm_request_apicv_update ignores any other (SVM's).
    """
    supported = (1 << APICV_INHIBIT_REASON_DISABLE) | (1 << APICV_INHIBIT_REASON_HYPERV)
    return bool(supported >> bit & 1)


def vmx_create_vcpu(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/vmx/vmx.c: vmx_create_vcpu → init_vmcs (the APICv execution controls)
    [process: KVM_CREATE_VCPU]

    The pin-based and secondary controls start as kvm_vcpu_apicv_active says (the
    kvm_x86_ops.vcpu_create step of kvm_arch_vcpu_create).
    Differs from the kernel: only these controls; the VMCS, MSR bitmap and the PI
    descriptor's NV/SN (set in kvm_vm_ioctl_create_vcpu) are not modelled here.
    """
    vmx_refresh_apicv_exec_ctrl(vcpu)  # the same controls, from the same state


def vmx_refresh_apicv_exec_ctrl(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/vmx/vmx.c: vmx_refresh_apicv_exec_ctrl  [vCPU thread]

    Rewrite the VMCS controls from ``apicv_active``: pin-based "process posted interrupts"
    (vmx_pin_based_exec_ctrl), secondary "APIC-register virtualization" and
    "virtual-interrupt delivery", and the MSR bitmap (vmx_update_msr_bitmap).  Nothing
    else: RVI, SVI and the EOI-exit bitmap keep whatever they held (spec §13).  With the
    pin-based control clear, a POSTED_INTR_VECTOR arriving in guest mode is an ordinary
    external interrupt (a VM exit), whoever posted it.
    """
    active = vcpu.arch.apicv_active
    vcpu.arch.pin_posted_intr = active
    vcpu.arch.virtual_intr_delivery = active


def vmx_vcpu_put(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/vmx/vmx.c: vmx_vcpu_put  [vcpu_put / kvm_sched_out]

    vmx_vcpu_pi_put, (then the host state, not modelled).
    """
    vmx_vcpu_pi_put(vcpu)


async def vmx_pre_block(vcpu: KvmVcpu) -> int:
    """arch/x86/kvm/vmx/vmx.c: vmx_pre_block → 1 "do not block", 0 "block"  [vCPU thread]

    pi_pre_block; (the switch from the VMX preemption timer to an hrtimer is not
    modelled).  Spec §12.7.
    """
    if await pi_pre_block(vcpu):
        return 1
    return 0


async def vmx_post_block(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/vmx/vmx.c: vmx_post_block  [vCPU thread]

    (Back to the preemption timer, not modelled), then pi_post_block.
    """
    await pi_post_block(vcpu)


def kvm_vcpu_trigger_posted_interrupt(vcpu: KvmVcpu, nested: bool) -> bool:
    """arch/x86/kvm/vmx/vmx.c: kvm_vcpu_trigger_posted_interrupt

    If the target is IN_GUEST_MODE, send the notification vector to its CPU and return True.
    The source's three cases: (1) it stays in the guest → the hardware merges PIR into vIRR
    without an exit; (2) it exits before the IPI lands and stays runnable → the host handler
    ignores the IPI, ON is still set, the next entry's sync picks the vector up; (3) it exits
    and blocks → vcpu_block's runnability check harvests PIR and refuses to block.
    """
    if vcpu.mode == IN_GUEST_MODE:
        send_ipi(vcpu.kvm.host, vcpu.cpu, POSTED_INTR_VECTOR, vcpu.vcpu_id,
                 vcpu.kvm.name)
        vcpu.stat.pi_notifications += 1
        return True
    return False


def vmx_deliver_posted_interrupt(vcpu: KvmVcpu, vector: int) -> int:
    """arch/x86/kvm/vmx/vmx.c: vmx_deliver_posted_interrupt  [any context; atomic here]

    0 when posted (or coalesced into an already posted vector / outstanding notification),
    -1 when APICv is inactive and the caller must use IRR + KVM_REQ_EVENT + kick.  The LOCK
    on ON is the full barrier ordering PIR/ON before the read of ``vcpu->mode`` (spec §16.1).
    v5.13: no notification and no kick when the target is this CPU's running vCPU (bug #2;
    ``fix-running-vcpu-shortcut`` applies the 5.16 fix).
    The W-PI-send window (ON set ↔ mode read) has no await here — the caller is atomic; the
    vCPU side's preemption points (W-PI-entry0/1/2) open it from the other side.
    """
    if not vcpu.arch.apicv_active:
        return -1
    pi = vcpu.pi_desc
    rt = vcpu.kvm.rt
    bus = rt.bus
    if pi_test_and_set_pir(vector, pi):
        vcpu.arch.path_hint = "coalesced"
        if bus.on:
            bus.emit("kvm_pi_post", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, vector=vector,
                     irq=rt.cur_irq, notify="coalesced_pir")
        return 0
    if pi_test_and_set_on(pi):
        vcpu.arch.path_hint = "posted" if vcpu.mode == IN_GUEST_MODE else "posted_kick"
        if bus.on:
            bus.emit("kvm_pi_post", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, vector=vector,
                     irq=rt.cur_irq, notify="coalesced_on")
        return 0
    notify = "none"
    shortcut = (vcpu is kvm_get_running_vcpu()
                and "fix-running-vcpu-shortcut" not in vcpu.kvm.toggles)
    if shortcut:
        vcpu.arch.path_hint = "posted_kick"
    elif kvm_vcpu_trigger_posted_interrupt(vcpu, False):
        notify = "ipi"
        vcpu.arch.path_hint = "posted"
    else:
        notify = "kick"
        halted = vcpu.arch.mp_state == MpState.KVM_MP_STATE_HALTED
        vcpu.arch.path_hint = "wakeup" if halted else "posted_kick"
        kvm_vcpu_kick(vcpu)
    if bus.on:
        bus.emit("kvm_pi_post", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, vector=vector,
                 irq=rt.cur_irq, notify=notify)
    return 0


def vmx_apicv_post_state_restore(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/vmx/vmx.c: vmx_apicv_post_state_restore  [vCPU ioctl / reset]

    After KVM_SET_LAPIC or a LAPIC reset with APICv active the PI descriptor starts empty:
    ON cleared, every PIR word zeroed (what was posted before is superseded by the restored
    or reset IRR).  vkick also drops the PIR vectors' source ids (``pir_ids``).
    """
    pi = vcpu.pi_desc
    pi_clear_on(pi)
    pi.pir = 0  # memset(pi_desc.pir, 0)
    vcpu.arch.pir_ids.clear()


def vmx_set_rvi(vcpu: KvmVcpu, vector: int) -> None:
    """arch/x86/kvm/vmx/vmx.c: vmx_set_rvi — low byte of GUEST_INTR_STATUS."""
    vcpu.arch.rvi = vector if vector > 0 else 0


def vmx_hwapic_isr_update(vcpu: KvmVcpu, max_isr: int) -> None:
    """arch/x86/kvm/vmx/vmx.c: vmx_hwapic_isr_update  [vCPU thread]

    SVI := ``max_isr`` (0 for -1): the high byte of GUEST_INTR_STATUS, the vector the
    hardware's EOI virtualization retires next (spec §12.5, §13.4).
    """
    vcpu.arch.svi = max_isr if max_isr > 0 else 0


def pir_sync_allowed(vcpu: KvmVcpu) -> bool:
    """Whether a PIR → IRR sync runs (the guard around static_call(sync_pir_to_irr) in
    vcpu_enter_guest, vcpu_scan_ioapic and apic_has_interrupt_for_ppr): v5.13 only while
    APICv is active for the vCPU; with ``fix-no-pir-sync-when-apicv-inhibited`` (bug #7,
    37c4dbf337c5) whenever kvm_x86_ops.sync_pir_to_irr exists (static_call_cond:
    enable_apicv), because assigned devices keep posting to a vCPU whose APICv is
    inhibited."""
    if "fix-no-pir-sync-when-apicv-inhibited" in vcpu.kvm.toggles:
        return vcpu.kvm.enable_apicv
    return vcpu.arch.apicv_active


def _sync_pir_tail(vcpu: KvmVcpu, max_irr: int, max_irr_updated: bool) -> None:
    """The end of vmx_sync_pir_to_irr: RVI, or (7e1901f6c86c) KVM_REQ_EVENT."""
    if "fix-no-pir-sync-when-apicv-inhibited" in vcpu.kvm.toggles:
        # 7e1901f6c86c "KVM: VMX: prepare sync_pir_to_irr for running with APICv
        # disabled": without virtual-interrupt delivery a newly harvested vector is
        # injected through KVM_REQ_EVENT (the entry is cancelled and retried).
        if vcpu.arch.apicv_active:
            vmx_set_rvi(vcpu, max_irr)
        elif max_irr_updated:
            kvm_make_request(KVM_REQ_EVENT, vcpu)
        return
    vmx_set_rvi(vcpu, max_irr)  # vmx_hwapic_irr_update (not nested)


def _warn_inactive(vcpu: KvmVcpu) -> None:
    """v5.13's WARN_ON(!vcpu->arch.apicv_active) at the top of vmx_sync_pir_to_irr."""
    if vcpu.arch.apicv_active or "fix-no-pir-sync-when-apicv-inhibited" in vcpu.kvm.toggles:
        return
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vkick_warn", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id,
                 what="vmx_sync_pir_to_irr with APICv inactive (WARN_ON)")


def vmx_sync_pir_to_irr(vcpu: KvmVcpu) -> int:
    """arch/x86/kvm/vmx/vmx.c: vmx_sync_pir_to_irr → max_irr  [vCPU thread, IRQs off]

    Only when ON is set: clear ON, *then* take the PIR words into IRR (the ON protocol of
    spec §16.4: a vector posted after its word was taken finds ON clear and notifies anew).
    With ON clear PIR is not read at all.  RVI := max_irr.
    Bug toggle ``clear-on-after-harvest`` swaps the two steps.  v5.13 runs it only with
    APICv active (it WARNs otherwise); ``fix-no-pir-sync-when-apicv-inhibited`` (bug #7,
    7e1901f6c86c) lets it run with APICv inhibited: then RVI is left alone and a newly
    harvested vector raises KVM_REQ_EVENT instead.
    """
    _warn_inactive(vcpu)
    pi = vcpu.pi_desc
    updated = False
    if "clear-on-after-harvest" in vcpu.kvm.toggles:
        if pi.on:
            box = [pi.pir]
            updated, max_irr = vkick.kvm.lapic.kvm_apic_update_irr(vcpu, box)
            pi.pir = box[0]
            pi_test_and_clear_on(pi)
        else:
            max_irr = vkick.kvm.lapic.kvm_lapic_find_highest_irr(vcpu)
    elif pi.on:
        pi_test_and_clear_on(pi)
        box = [pi.pir]
        updated, max_irr = vkick.kvm.lapic.kvm_apic_update_irr(vcpu, box)
        pi.pir = box[0]
    else:
        max_irr = vkick.kvm.lapic.kvm_lapic_find_highest_irr(vcpu)
    _sync_pir_tail(vcpu, max_irr, updated)
    return max_irr


async def vmx_sync_pir_to_irr_entry(vcpu: KvmVcpu) -> int:
    """vmx_sync_pir_to_irr as called from vcpu_enter_guest, with the ``W-PIR-harvest`` window
    between clearing ON and taking the PIR words (other CPUs keep posting meanwhile).

    Same steps as :func:`vmx_sync_pir_to_irr`; the await is legal here because the vCPU
    thread, not an atomic caller, runs it.  With ``clear-on-after-harvest`` the window sits
    between the harvest and the clear: a vector posted there finds ON set (no
    notification), then ON is cleared — stuck in PIR with ON = 0 (spec §16.4).
    """
    _warn_inactive(vcpu)
    pi = vcpu.pi_desc
    rt = vcpu.kvm.rt
    updated = False
    if not pi.on:
        max_irr = vkick.kvm.lapic.kvm_lapic_find_highest_irr(vcpu)
    elif "clear-on-after-harvest" in vcpu.kvm.toggles:
        box = [pi.pir]
        updated, _ = vkick.kvm.lapic.kvm_apic_update_irr(vcpu, box)
        pi.pir = 0  # the words were exchanged with 0
        await rt.preempt("W-PIR-harvest")
        pi_test_and_clear_on(pi)
        max_irr = vkick.kvm.lapic.kvm_lapic_find_highest_irr(vcpu)
    else:
        pi_test_and_clear_on(pi)
        # W-PIR-harvest: ON cleared ↔ PIR words taken.  A vector posted here is either
        # taken below or finds ON clear and notifies anew (pairs with the LOCK'd
        # test-and-set of ON in vmx_deliver_posted_interrupt).
        await rt.preempt("W-PIR-harvest")
        box = [pi.pir]
        updated, max_irr = vkick.kvm.lapic.kvm_apic_update_irr(vcpu, box)
        pi.pir = 0
    _sync_pir_tail(vcpu, max_irr, updated)
    return max_irr


def vmx_interrupt_allowed(vcpu: KvmVcpu, for_injection: bool) -> int:
    """arch/x86/kvm/vmx/vmx.c: vmx_interrupt_allowed — RFLAGS.IF and no STI/MOV-SS shadow."""
    return int(vcpu.arch.rflags_if and not vcpu.arch.interrupt_shadow)


def vmx_inject_irq(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/vmx/vmx.c: vmx_inject_irq — write the VM-entry interruption field."""
    vcpu.stat.irq_injections += 1
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("kvm_inj_virq", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id,
                 vector=vcpu.arch.interrupt_nr, irq=vcpu.arch.injected_irq_ids)


def vmx_enable_irq_window(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/vmx/vmx.c: vmx_enable_irq_window — interrupt-window exiting on."""
    vcpu.arch.irq_window_exiting = True


def vmx_cancel_injection(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/vmx/vmx.c: vmx_cancel_injection — the event written into the entry field
    stays queued in ``vcpu->arch.interrupt`` for the next attempt (not lost, not doubled)."""
    return
