"""arch/x86/kvm/x86.c: the vCPU run loop, event injection, halting and blocking.

Covered: vcpu_run (with kvm_arch_vcpu_ioctl_run), vcpu_enter_guest, kvm_vcpu_exit_request,
inject_pending_event (interrupt part), kvm_cpu_has_injectable_intr, kvm_cpu_has_interrupt,
kvm_vcpu_running, kvm_vcpu_has_events, kvm_arch_vcpu_runnable, vcpu_block,
kvm_emulate_halt, vmx_handle_exit (the exit reasons on this path), handle_interrupt_window,
kvm_pv_kick_cpu_op, handle_fastpath_set_x2apic_icr_irqoff, kvm_arch_vcpu_create,
kvm_vcpu_reset, kvm_set_apic_base, kvm_arch_vcpu_ioctl_set_mpstate, kvm_arch_vcpu_load,
kvm_arch_vcpu_put, kvm_arch_start_assignment, kvm_arch_end_assignment,
kvm_arch_has_assigned_device, kvm_arch_has_irq_bypass, kvm_arch_irq_bypass_add_producer,
kvm_arch_irq_bypass_del_producer, kvm_arch_update_irqfd_routing; the IOAPIC-EOI plumbing:
kvm_make_scan_ioapic_request(_mask), vcpu_scan_ioapic, vcpu_load_eoi_exitmap,
vmx_load_eoi_exitmap (vmx.c); the VM ioctls KVM_CREATE_IRQCHIP
(kvm_arch_vm_ioctl_create_irqchip) and KVM_IRQ_LINE (kvm_vm_ioctl_irq_line); APICv
inhibit and re-activation at run time: kvm_apicv_activated, kvm_apicv_init,
kvm_vcpu_update_apicv, kvm_request_apicv_update, kvm_vcpu_ioctl_enable_cap (SynIC) and
its KVM_ENABLE_CAP ioctl.
Bug toggles (kvm.toggles): ``no-barrier-after-guest-mode`` (spec §16.1a),
``irqs-on-across-entry`` (§16.1b), ``check-requests-before-guest-mode`` (§16.2),
``bug-no-unblock-on-assignment`` (bug #3); ``fix-eoi-exitmap-uninitialized``
(vcpu_load_eoi_exitmap: v5.13 loads an uninitialised EOI-exit bitmap, see there);
``fix-no-pir-sync-when-apicv-inhibited`` (bug #7: vcpu_enter_guest, vcpu_scan_ioapic),
``fix-apicv-disable-req-event`` and ``fix-svi-on-apicv-activation``
(kvm_vcpu_update_apicv).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Final

from vkick.hw.apicv import (
    EXIT_APIC_WRITE,
    EXIT_EOI_INDUCED,
    EXIT_EXTERNAL_INTERRUPT,
    EXIT_HLT,
    EXIT_INTERRUPT_WINDOW,
    EXIT_IO_INSTRUCTION,
    EXIT_MSR_WRITE,
    Exit,
    vmx_vcpu_run,
)
from vkick.hw.cpu import (
    CpuContext,
    __schedule,
    host_interrupt,
    local_irq_disable,
    local_irq_enable,
)
from vkick.kernel.irqbypass import IrqBypassConsumer, IrqBypassProducer
from vkick.kvm.kvm_host import (
    APIC_DEST_MASK,
    APIC_DEST_NOSHORT,
    APIC_DEST_PHYSICAL,
    APIC_DM_FIXED,
    APIC_DM_REMRD,
    APIC_ICR,
    APIC_ICR2,
    APIC_ICR_BUSY,
    APIC_MODE_MASK,
    APIC_SHORT_MASK,
    APICV_INHIBIT_REASON_DISABLE,
    EXITING_GUEST_MODE,
    IN_GUEST_MODE,
    KVM_APIC_SIPI,
    KVM_CAP_HYPERV_SYNIC,
    KVM_CAP_HYPERV_SYNIC2,
    KVM_ENABLE_CAP,
    KVM_IRQCHIP_KERNEL,
    KVM_REQ_APICV_UPDATE,
    KVM_REQ_EVENT,
    KVM_REQ_IOAPIC_EOI_EXIT,
    KVM_REQ_LOAD_EOI_EXITMAP,
    KVM_REQ_NMI,
    KVM_REQ_SCAN_IOAPIC,
    KVM_REQ_UNBLOCK,
    KVM_REQ_UNHALT,
    MSR_IA32_APICBASE,
    MSR_IA32_APICBASE_ENABLE,
    OUTSIDE_GUEST_MODE,
    X2APIC_BROADCAST,
    X2APIC_ENABLE,
    Kvm,
    KvmVcpu,
    MpState,
)
from vkick.kvm.kvm_main import (
    kvm_check_request,
    kvm_clear_request,
    kvm_get_running_vcpu,
    kvm_make_all_cpus_request,
    kvm_make_all_cpus_request_except,
    kvm_make_request,
    kvm_make_vcpus_request_mask,
    kvm_request_pending,
    kvm_test_request,
    kvm_vcpu_block,
    kvm_vcpu_must_migrate,
    kvm_vcpu_preemption_point,
    vcpu_load,
    vcpu_put,
)
from vkick.kvm.kvm_main_io import kvm_io_bus_write
from vkick.kvm.lapic import (
    __apic_accept_irq,
    apic_find_highest_isr,
    kvm_apic_accept_events,
    kvm_apic_has_interrupt,
    kvm_apic_present,
    kvm_apic_send_ipi,
    kvm_apic_set_eoi_accelerated,
    kvm_apic_update_apicv,
    kvm_create_lapic,
    kvm_get_apic_interrupt,
    kvm_lapic_enabled,
    kvm_lapic_get_base,
    kvm_lapic_reg_write,
    kvm_lapic_reset,
    kvm_lapic_set_base,
    kvm_x2apic_msr_write,
)
from vkick.kvm.lapic_map import kvm_recalculate_apic_map
from vkick.kvm.vmx.posted_intr import pi_update_irte, vmx_pi_start_assignment
from vkick.kvm.vmx.vmx import (
    pir_sync_allowed,
    vmx_cancel_injection,
    vmx_check_apicv_inhibit_reasons,
    vmx_create_vcpu,
    vmx_enable_irq_window,
    vmx_hwapic_isr_update,
    vmx_inject_irq,
    vmx_interrupt_allowed,
    vmx_post_block,
    vmx_pre_block,
    vmx_refresh_apicv_exec_ctrl,
    vmx_sync_pir_to_irr,
    vmx_sync_pir_to_irr_entry,
    vmx_vcpu_load,
    vmx_vcpu_put,
)

_accept_irq = __apic_accept_irq  # module-level alias: safe to call from any scope


def kvm_vcpu_running(vcpu: KvmVcpu) -> bool:
    """arch/x86/kvm/x86.c: kvm_vcpu_running — mp_state RUNNABLE."""
    return vcpu.arch.mp_state == MpState.KVM_MP_STATE_RUNNABLE


def kvm_cpu_has_interrupt(vcpu: KvmVcpu) -> bool:
    """arch/x86/kvm/irq.c: kvm_cpu_has_interrupt (no PIC on this path)."""
    return kvm_apic_has_interrupt(vcpu) != -1


def kvm_cpu_has_injectable_intr(vcpu: KvmVcpu) -> bool:
    """arch/x86/kvm/irq.c: kvm_cpu_has_injectable_intr — False with APICv (the hardware
    injects from RVI), else a deliverable LAPIC vector."""
    if vcpu.arch.apicv_active:
        return False
    return kvm_apic_has_interrupt(vcpu) != -1


def kvm_guest_apic_has_interrupt(vcpu: KvmVcpu) -> bool:
    """arch/x86/kvm/x86.c: kvm_guest_apic_has_interrupt — only for a vCPU running a nested
    guest (is_guest_mode): vmx_guest_apic_has_interrupt then checks L2's virtual APIC.
    vkick models no nested guests, so it is always false; for an L1 vCPU the halt check
    relies on kvm_cpu_has_interrupt, which harvests PIR and compares IRR with PPR."""
    return False


def kvm_arch_interrupt_allowed(vcpu: KvmVcpu) -> bool:
    """arch/x86/kvm/x86.c: kvm_arch_interrupt_allowed — IF = 1 and no interrupt shadow."""
    return vmx_interrupt_allowed(vcpu, False) > 0


def kvm_vcpu_has_events(vcpu: KvmVcpu) -> bool:
    """arch/x86/kvm/x86.c: kvm_vcpu_has_events

    A halted vCPU resumes for INIT/SIPI, a PV unhalt, an NMI, or a *deliverable* interrupt
    (IF = 1 and a vector above PPR — with APICv the PIR is harvested first).  Spec §14.6.
    """
    apic = vcpu.arch.apic
    if apic is not None and apic.pending_events:
        return True
    if vcpu.arch.pv_unhalted:
        return True
    if kvm_test_request(KVM_REQ_NMI, vcpu) or vcpu.arch.nmi_pending:
        return True
    return kvm_arch_interrupt_allowed(vcpu) and (
        kvm_cpu_has_interrupt(vcpu) or kvm_guest_apic_has_interrupt(vcpu))


def kvm_arch_vcpu_runnable(vcpu: KvmVcpu) -> bool:
    """arch/x86/kvm/x86.c: kvm_arch_vcpu_runnable."""
    return kvm_vcpu_running(vcpu) or kvm_vcpu_has_events(vcpu)


def kvm_vcpu_exit_request(vcpu: KvmVcpu) -> bool:
    """arch/x86/kvm/x86.c: kvm_vcpu_exit_request — kicked (EXITING), or a request pending."""
    return vcpu.mode == EXITING_GUEST_MODE or kvm_request_pending(vcpu)


def inject_pending_event(vcpu: KvmVcpu) -> bool:
    """arch/x86/kvm/x86.c: inject_pending_event (interrupt part) → req_immediate_exit.

    Re-inject an event still in flight first; otherwise, if a vector is injectable and the
    guest can take it, acknowledge it now (IRR → ISR, PPR) and write the VM-entry field;
    if one remains (or could not be injected), open the interrupt window.  Spec §14.4.
    """
    arch = vcpu.arch
    can_inject = True
    if arch.interrupt_injected:
        vmx_inject_irq(vcpu)
        can_inject = False
    if arch.nmi_queued:
        arch.nmi_pending += arch.nmi_queued  # process_nmi (NMIs recorded, not delivered)
        arch.nmi_queued = 0
    if kvm_cpu_has_injectable_intr(vcpu):
        r = vmx_interrupt_allowed(vcpu, True) if can_inject else -errno.EBUSY
        if r < 0:
            return True
        if r:
            vector = kvm_get_apic_interrupt(vcpu)
            arch.interrupt_injected = True  # kvm_queue_interrupt
            arch.interrupt_nr = vector
            # The acknowledge consumed this pending instance: its sources go with it (a
            # signal arriving from now on makes the vector pending anew).
            arch.injected_irq_ids = arch.irq_ids.pop(vector, [])
            vmx_inject_irq(vcpu)
        if kvm_cpu_has_injectable_intr(vcpu):
            vmx_enable_irq_window(vcpu)
    return False


def kvm_emulate_halt(vcpu: KvmVcpu) -> int:
    """arch/x86/kvm/x86.c: kvm_emulate_halt → kvm_vcpu_halt: mp_state HALTED, stay in KVM."""
    vcpu.stat.halt_exits += 1
    vcpu.arch.mp_state = MpState.KVM_MP_STATE_HALTED
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vkick_halt", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id)
    return 1


def handle_interrupt_window(vcpu: KvmVcpu) -> int:
    """arch/x86/kvm/vmx/vmx.c: handle_interrupt_window — close the window, re-evaluate."""
    vcpu.arch.irq_window_exiting = False
    vcpu.stat.irq_window_exits += 1
    kvm_make_request(KVM_REQ_EVENT, vcpu)
    return 1


def kvm_pv_kick_cpu_op(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/x86.c: kvm_pv_kick_cpu_op — KVM_HC_KICK_CPU: an APIC_DM_REMRD "interrupt"
    that unhalts ``vcpu`` without delivering anything (pv_unhalted).  vkick's scenario
    driver uses it to hand the next guest step to an idle (halted) vCPU."""
    apic = vcpu.arch.apic
    assert apic is not None
    _accept_irq(apic, APIC_DM_REMRD, 0, True, 0)


MSR_X2APIC_ICR = 0x830


def handle_fastpath_set_x2apic_icr_irqoff(vcpu: KvmVcpu, data: int) -> bool:
    """arch/x86/kvm/x86.c: handle_fastpath_set_x2apic_icr_irqoff  [vCPU, IRQs off]

    A physical, fixed, non-broadcast x2APIC ICR write without shorthand is sent right in
    the exit path, with ``vcpu->mode`` still IN_GUEST_MODE (which is why the running-vCPU
    shortcut of vmx_deliver_posted_interrupt exists: a self-IPI needs no notification).
    Returns True when handled (EXIT_FASTPATH_EXIT_HANDLED).
    """
    apic = vcpu.arch.apic
    if apic is None or not apic.x2apic_mode:
        return False
    if ((data & APIC_SHORT_MASK) == APIC_DEST_NOSHORT
            and (data & APIC_DEST_MASK) == APIC_DEST_PHYSICAL
            and (data & APIC_MODE_MASK) == APIC_DM_FIXED
            and (data >> 32) != X2APIC_BROADCAST):
        data &= ~APIC_ICR_BUSY
        kvm_apic_send_ipi(apic, data & 0xFFFFFFFF, data >> 32)
        apic.icr2 = data >> 32
        apic.icr = data & 0xFFFFFFFF
        return True
    return False


# ---------------------------------------------------------------------------- IOAPIC EOIs


def kvm_make_scan_ioapic_request_mask(kvm: Kvm, vcpu_bitmap: int) -> None:
    """arch/x86/kvm/x86.c: kvm_make_scan_ioapic_request_mask — KVM_REQ_SCAN_IOAPIC to the
    vCPUs of ``vcpu_bitmap`` (by index), IPIs to those in guest mode."""
    kvm_make_vcpus_request_mask(kvm, KVM_REQ_SCAN_IOAPIC, None, vcpu_bitmap)


def kvm_make_scan_ioapic_request(kvm: Kvm) -> None:
    """arch/x86/kvm/x86.c: kvm_make_scan_ioapic_request — KVM_REQ_SCAN_IOAPIC to every vCPU
    (an IOAPIC entry, ack-notifier or APIC-map change may change which EOIs the IOAPIC
    must see)."""
    kvm_make_all_cpus_request(kvm, KVM_REQ_SCAN_IOAPIC)


def vcpu_scan_ioapic(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/x86.c: vcpu_scan_ioapic  [vCPU thread: KVM_REQ_SCAN_IOAPIC]

    Rebuild ``ioapic_handled_vectors``: from the level-triggered MSI routes of the
    reserved pins on a split irqchip (kvm_scan_ioapic_routes), else — after harvesting the
    PIR with APICv, so that "pending here" is current — from the in-kernel IOAPIC's
    entries (kvm_ioapic_scan_entry); then ask for the EOI-exit bitmap to be reloaded
    (KVM_REQ_LOAD_EOI_EXITMAP).  Spec §13.4.
    """
    from vkick.kvm.ioapic import ioapic_in_kernel, kvm_ioapic_scan_entry  # noqa: PLC0415
    from vkick.kvm.irq import irqchip_split  # noqa: PLC0415
    from vkick.kvm.irq_comm import kvm_scan_ioapic_routes  # noqa: PLC0415

    if not kvm_apic_present(vcpu):
        return
    kvm = vcpu.kvm
    arch = vcpu.arch
    handled = 0
    if irqchip_split(kvm):
        handled = kvm_scan_ioapic_routes(vcpu, handled)
    else:
        if pir_sync_allowed(vcpu):
            vmx_sync_pir_to_irr(vcpu)
        if ioapic_in_kernel(kvm):
            handled = kvm_ioapic_scan_entry(vcpu, handled)
    arch.ioapic_handled_vectors = handled
    bus = kvm.rt.bus
    if bus.on:
        bus.emit("vcpu_scan_ioapic", vm=kvm.name, vcpu=vcpu.vcpu_id, vectors=_vectors(handled))
    kvm_make_request(KVM_REQ_LOAD_EOI_EXITMAP, vcpu)  # not in guest (nested) mode


def _vectors(bitmap: int) -> list[int]:
    return [v for v in range(bitmap.bit_length()) if bitmap >> v & 1]


def vcpu_load_eoi_exitmap(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/x86.c: vcpu_load_eoi_exitmap  [vCPU thread: KVM_REQ_LOAD_EOI_EXITMAP]

    Load the IOAPIC-handled vectors as the VMCS EOI-exit bitmap (vmx_load_eoi_exitmap), so
    that with APICv their EOIs cause EOI-induced exits (spec §13.4).
    v5.13 bug (code read in 5.12.9 and 5.14-rc5, identical): the on-stack bitmap is
    filled (ioapic_handled_vectors | SynIC vectors) only when the vCPU has a Hyper-V
    context and is passed to the VMCS uninitialised otherwise — since "KVM: x86: hyper-v:
    Prepare to meet unallocated Hyper-V context" (v5.12; id recalled as f2bc14b69c38).  The
    fix, "KVM: x86: Fix uninitialized eoi_exit_bitmap usage in vcpu_load_eoi_exitmap()"
    (recalled, message not read here: mid-2021, with a stable backport), passes
    ioapic_handled_vectors directly, the form later trees have.  Toggle
    ``fix-eoi-exitmap-uninitialized`` (off = v5.13) applies it.
    Differs from the kernel: vkick vCPUs have no Hyper-V context, and the uninitialised
    stack contents are modelled as all zero — no vector exits on EOI, the case where every
    level-triggered EOI under APICv is lost to the IOAPIC (its remote IRR stays set, the
    pin never delivers again, the resampler never fires); on a real v5.13 host the bits are
    whatever the stack held, so which vectors exit varies from load to load.
    """
    apic = vcpu.arch.apic
    if apic is None or not apic.hw_enabled:
        return
    if "fix-eoi-exitmap-uninitialized" in vcpu.kvm.toggles:
        eoi_exit_bitmap = vcpu.arch.ioapic_handled_vectors
    else:
        eoi_exit_bitmap = 0  # u64 eoi_exit_bitmap[4], never written (see above)
    vmx_load_eoi_exitmap(vcpu, eoi_exit_bitmap)


def vmx_load_eoi_exitmap(vcpu: KvmVcpu, eoi_exit_bitmap: int) -> None:
    """arch/x86/kvm/vmx/vmx.c: vmx_load_eoi_exitmap — write EOI_EXIT_BITMAP0..3 (APICv
    only)."""
    if not vcpu.arch.apicv_active:
        return
    vcpu.arch.eoi_exit_bitmap = eoi_exit_bitmap
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vmx_load_eoi_exitmap", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id,
                 vectors=_vectors(eoi_exit_bitmap))


def kvm_arch_vm_ioctl_create_irqchip(kvm: Kvm) -> int:
    """arch/x86/kvm/x86.c: kvm_arch_vm_ioctl, case KVM_CREATE_IRQCHIP  [process: VMM ioctl]

    The full in-kernel irqchip: -EEXIST if it exists, -EINVAL once a vCPU was created;
    create the IOAPIC, install the default routing (GSI n → IOAPIC pin n), then (after the
    routing is visible) switch the VM to KVM_IRQCHIP_KERNEL.
    Differs from the kernel: no PIC (kvm_pic_init); and a vkick VM starts in split mode
    (in-kernel LAPICs, kvm_host.KvmArch), which the kernel would refuse here with -EEXIST.
    """
    from vkick.kvm.ioapic import kvm_ioapic_init  # noqa: PLC0415
    from vkick.kvm.irq_comm import kvm_setup_default_irq_routing  # noqa: PLC0415

    if kvm.arch.irqchip_mode == KVM_IRQCHIP_KERNEL:
        return -errno.EEXIST
    if kvm.vcpus:
        return -errno.EINVAL
    r = kvm_ioapic_init(kvm)
    if r:
        return r
    kvm.arch.irqchip_mode = KVM_IRQCHIP_KERNEL  # before the routing: IRQCHIP needs it
    r = kvm_setup_default_irq_routing(kvm)
    if r:
        kvm.arch.vioapic = None
        return r
    return 0


def kvm_vm_ioctl_irq_line(kvm: Kvm, irq: int, level: int, line_status: bool = False) -> int:
    """arch/x86/kvm/x86.c: kvm_vm_ioctl_irq_line (KVM_IRQ_LINE)  [process: VMM ioctl]

    The VMM drives GSI ``irq`` to ``level`` as KVM_USERSPACE_IRQ_SOURCE_ID (kvm_set_irq);
    returns the status KVM_IRQ_LINE_STATUS would report.  Raising a line is an interrupt
    source of its own: it takes a new correlation id.
    """
    from vkick.kvm.irqchip import kvm_set_irq  # noqa: PLC0415
    from vkick.kvm.kvm_host import KVM_USERSPACE_IRQ_SOURCE_ID  # noqa: PLC0415

    rt = kvm.rt
    saved = rt.cur_irq
    rt.cur_irq = rt.next_irq_id() if level else 0
    try:
        return kvm_set_irq(kvm, KVM_USERSPACE_IRQ_SOURCE_ID, irq, level, line_status)
    finally:
        rt.cur_irq = saved


# The size of a guest "mmio" write: vkick's exits carry none, and the guest model's
# device writes are 32-bit stores (the IOAPIC window; the virtio doorbells' ioeventfds
# have length 0 and match any size).
MMIO_WRITE_LEN: Final = 4


async def vmx_handle_exit(vcpu: KvmVcpu, ex: Exit) -> int:
    """arch/x86/kvm/vmx/vmx.c: vmx_handle_exit — dispatch on the exit reason."""
    reason, qual, val = ex
    apic = vcpu.arch.apic
    assert apic is not None
    if reason == EXIT_HLT:
        return kvm_emulate_halt(vcpu)
    if reason == EXIT_INTERRUPT_WINDOW:
        return handle_interrupt_window(vcpu)
    if reason == EXIT_EOI_INDUCED:
        kvm_apic_set_eoi_accelerated(vcpu, qual)
        return 1
    if reason == EXIT_APIC_WRITE:
        if qual == APIC_ICR:
            hi, lo = val >> 32, val & 0xFFFFFFFF
            await kvm_lapic_reg_write(apic, APIC_ICR2, hi)
            await kvm_lapic_reg_write(apic, APIC_ICR, lo)
        else:
            await kvm_lapic_reg_write(apic, qual, val)
        return 1
    if reason == EXIT_MSR_WRITE:
        if qual == MSR_IA32_APICBASE:
            await kvm_set_apic_base(vcpu, val, host_initiated=False)
        else:
            await kvm_x2apic_msr_write(vcpu, qual, val)
        return 1
    if reason == EXIT_IO_INSTRUCTION:
        # vcpu_mmio_write → kvm_io_bus_write(KVM_MMIO_BUS); a write no device takes would
        # exit to userspace (not modelled: it is dropped).
        kvm_io_bus_write(vcpu, qual, MMIO_WRITE_LEN, val)
        return 1
    if reason == EXIT_EXTERNAL_INTERRUPT:
        vcpu.stat.irq_exits += 1
        return 1
    return 1


async def vcpu_enter_guest(vcpu: KvmVcpu) -> int:
    """arch/x86/kvm/x86.c: vcpu_enter_guest → 1 (keep looping)  [vCPU thread]

    Service the requests on this path (IOAPIC EOI exit, SCAN_IOAPIC, LOAD_EOI_EXITMAP,
    APICV_UPDATE, in the kernel's order), then KVM_REQ_EVENT (inject), disable IRQs,
    publish IN_GUEST_MODE, full barrier, sync PIR (APICv; bug #7: v5.13 not while it is
    inhibited), re-check for kicks/requests, enter; after the exit: OUTSIDE_GUEST_MODE,
    handle the exit's interrupt with IRQs still off, enable IRQs (held IPIs are taken by the
    host here), dispatch the exit.  Spec §14.3 and the handshakes of §16.1–§16.2.
    """
    kvm = vcpu.kvm
    rt = kvm.rt
    host = kvm.host
    pcpu = host.pcpus[vcpu.cpu]
    arch = vcpu.arch
    toggles = kvm.toggles
    bus = rt.bus
    req_immediate_exit = False
    if kvm_request_pending(vcpu):
        # The part of the request block this path uses, in the kernel's order.
        if kvm_check_request(KVM_REQ_IOAPIC_EOI_EXIT, vcpu):
            vector = arch.pending_ioapic_eoi
            if arch.ioapic_handled_vectors >> vector & 1 and bus.on:
                # KVM_EXIT_IOAPIC_EOI: the exit to a userspace IOAPIC is not modelled.
                bus.emit("vkick_warn", vm=kvm.name, vcpu=vcpu.vcpu_id,
                         what=f"KVM_EXIT_IOAPIC_EOI for vector {vector:#x} (split irqchip) "
                              f"is not modelled: the EOI is dropped")
        if kvm_check_request(KVM_REQ_SCAN_IOAPIC, vcpu):
            vcpu_scan_ioapic(vcpu)
        if kvm_check_request(KVM_REQ_LOAD_EOI_EXITMAP, vcpu):
            vcpu_load_eoi_exitmap(vcpu)
        if kvm_check_request(KVM_REQ_APICV_UPDATE, vcpu):
            await kvm_vcpu_update_apicv(vcpu)
    if kvm_check_request(KVM_REQ_EVENT, vcpu):
        await kvm_apic_accept_events(vcpu)
        if arch.mp_state == MpState.KVM_MP_STATE_INIT_RECEIVED:
            return 1
        req_immediate_exit = inject_pending_event(vcpu)
    # Bug toggle §16.2: requests checked before IN_GUEST_MODE is published.
    early_check = "check-requests-before-guest-mode" in toggles
    if early_check and kvm_vcpu_exit_request(vcpu):
        vmx_cancel_injection(vcpu)
        return 1
    irqs_on = "irqs-on-across-entry" in toggles
    if not irqs_on:
        local_irq_disable(pcpu)
    # Bug toggle §16.1a reads ON here: the load hoisted above the mode store and window.
    stale_on = vcpu.pi_desc.on
    # W-PI-entry0: IRQs off ↔ mode = IN_GUEST_MODE.  A notification arriving here is held
    # pending by the disabled IRQs and recognised in the guest (spec §12.4).
    await rt.preempt("W-PI-entry0")
    vcpu.mode = IN_GUEST_MODE
    # smp_mb__after_srcu_read_unlock: the mode store is visible before the loads of
    # requests and PID.ON below (store-buffering pair with vmx_deliver_posted_interrupt's
    # LOCK'd ON and kvm_vcpu_kick's CAS; spec §16.1, §16.2).
    # W-PI-entry1: posts landing here are caught by the sync below or by their IPI.
    await rt.preempt("W-PI-entry1")
    # "This handles the case where a posted interrupt was notified with kvm_vcpu_kick":
    # v5.13 only with APICv active — PIR posted to a vCPU whose APICv is inhibited stays
    # there until APICv is re-activated (bug #7); the fix syncs whenever the LAPIC is on.
    if kvm_lapic_enabled(vcpu) and pir_sync_allowed(vcpu):
        if "no-barrier-after-guest-mode" in toggles and not stale_on:
            # Bug toggle §16.1a: without the barrier the ON load may be satisfied before
            # the mode store is visible — it returns ON as of before the entry.
            pass
        else:
            await vmx_sync_pir_to_irr_entry(vcpu)
    # W-REQ-entry: barrier ↔ kvm_vcpu_exit_request; a kick here CASes the mode to EXITING.
    await rt.preempt("W-REQ-entry")
    if not early_check and kvm_vcpu_exit_request(vcpu):
        vcpu.mode = OUTSIDE_GUEST_MODE
        local_irq_enable(pcpu)
        vmx_cancel_injection(vcpu)
        if req_immediate_exit:
            kvm_make_request(KVM_REQ_EVENT, vcpu)
        return 1
    if req_immediate_exit:
        kvm_make_request(KVM_REQ_EVENT, vcpu)
    # W-PI-entry2: exit-request check ↔ VM entry; IPIs and kicks are held pending.
    await rt.preempt("W-PI-entry2")
    costs = host.costs
    if costs.vmentry_ns:
        await rt.sleep_ns(costs.vmentry_ns)
    if bus.on:
        bus.emit("kvm_entry", vm=kvm.name, vcpu=vcpu.vcpu_id, pcpu=pcpu.id)
    ex = await vmx_vcpu_run(vcpu, pcpu, req_immediate_exit)
    # VM exit: IRQs are off in the host sense; fastpaths run with the mode still
    # IN_GUEST_MODE (vmx_exit_handlers_fastpath).
    pcpu.context = CpuContext.IRQS_OFF
    fastpath_handled = (ex[0] == EXIT_MSR_WRITE and ex[1] == MSR_X2APIC_ICR
                        and handle_fastpath_set_x2apic_icr_irqoff(vcpu, ex[2]))
    vcpu.mode = OUTSIDE_GUEST_MODE
    vcpu.stat.exits += 1
    if bus.on:
        bus.emit("kvm_exit", vm=kvm.name, vcpu=vcpu.vcpu_id, pcpu=pcpu.id, reason=ex[0])
    if costs.vmexit_ns:
        await rt.sleep_ns(costs.vmexit_ns)
    if ex[0] == EXIT_EXTERNAL_INTERRUPT:
        host_interrupt(pcpu, ex[1])  # handle_exit_irqoff
    local_irq_enable(pcpu)
    if fastpath_handled:
        return 1
    return await vmx_handle_exit(vcpu, ex)


async def vcpu_block(kvm: Kvm, vcpu: KvmVcpu) -> int:
    """arch/x86/kvm/x86.c: vcpu_block  [vCPU thread]

    Sleep in kvm_vcpu_block unless already runnable or vmx_pre_block refuses (an
    interrupt was posted during the wakeup-vector switch); then vmx_post_block.  Woken
    without KVM_REQ_UNHALT (a KVM_REQ_UNBLOCK) → return to the loop; else accept INIT/SIPI
    and leave HALTED.  Spec §14.5.
    """
    if not kvm_arch_vcpu_runnable(vcpu) and await vmx_pre_block(vcpu) == 0:
        await kvm_vcpu_block(vcpu)
        await vmx_post_block(vcpu)
        if not kvm_check_request(KVM_REQ_UNHALT, vcpu):
            return 1
    await kvm_apic_accept_events(vcpu)
    if vcpu.arch.mp_state == MpState.KVM_MP_STATE_HALTED:
        vcpu.arch.pv_unhalted = False
        vcpu.arch.mp_state = MpState.KVM_MP_STATE_RUNNABLE
    return 1


async def vcpu_run(vcpu: KvmVcpu) -> int:
    """arch/x86/kvm/x86.c: kvm_arch_vcpu_ioctl_run → vcpu_run  [vCPU thread]

    Enter the guest while runnable, block while halted; host preemption happens between
    iterations (xfer_to_guest_mode_handle_work) when the time slice is used up and another
    vCPU thread waits for this CPU.
    """
    kvm = vcpu.kvm
    rt = kvm.rt
    host = kvm.host
    task = vcpu.task
    assert task is not None
    await vcpu_load(vcpu)
    slice_start = rt.now_ns()
    while True:
        if kvm_vcpu_running(vcpu):
            r = await vcpu_enter_guest(vcpu)
        else:
            r = await vcpu_block(kvm, vcpu)
            slice_start = rt.now_ns()
        if r <= 0:
            break
        kvm_clear_request(KVM_REQ_UNBLOCK, vcpu)
        # W-HOST-sched: xfer_to_guest_mode_handle_work — the host may preempt the thread
        # here (need_resched): another runnable thread waits for this CPU and the time
        # slice is used up, or the thread must migrate (sched_setaffinity).
        await rt.preempt("W-HOST-sched")
        pcpu = host.pcpus[task.cpu]
        if pcpu.waiters and rt.now_ns() - slice_start >= host.costs.timeslice_ns:
            await __schedule(task, host, True, "time slice")
            slice_start = rt.now_ns()
        elif kvm_vcpu_must_migrate(vcpu):
            await kvm_vcpu_preemption_point(vcpu)
    vcpu_put(vcpu)
    return r



# ---------------------------------------------------------------------------- vCPU setup


async def kvm_arch_vcpu_create(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/x86.c: kvm_arch_vcpu_create  [process: KVM_CREATE_VCPU]

    mp_state RUNNABLE for the reset BSP (vCPU id 0), UNINITIALIZED (waiting for INIT/SIPI)
    for the others; the in-kernel LAPIC; APICv active iff no inhibit reason is set (a vCPU
    created while the VM's APICv is inhibited starts with it off); the VMCS controls
    (vmx_create_vcpu); then the RESET (kvm_vcpu_reset), whose map recalculation runs
    before the vCPU is visible.
    Differs from the kernel: no MMU, FPU, MSR or PMU state; no vcpu_load around the reset.
    """
    kvm = vcpu.kvm
    vcpu.arch.mp_state = (MpState.KVM_MP_STATE_RUNNABLE if vcpu.vcpu_id == 0
                          else MpState.KVM_MP_STATE_UNINITIALIZED)
    kvm_create_lapic(vcpu)
    if kvm_apicv_activated(kvm):
        vcpu.arch.apicv_active = True
    vmx_create_vcpu(vcpu)  # kvm_x86_ops.vcpu_create
    await kvm_vcpu_reset(vcpu, False)


async def kvm_vcpu_reset(vcpu: KvmVcpu, init_event: bool) -> None:
    """arch/x86/kvm/x86.c: kvm_vcpu_reset (the interrupt state)  [vCPU thread or ioctl]

    LAPIC reset (which recalculates the APIC map), NMIs and the event queue cleared,
    KVM_REQ_EVENT.  ``init_event``: an INIT (kvm_apic_accept_events), which keeps the
    LAPIC base MSR and APIC ID; else the RESET of vCPU creation.
    Differs from the kernel: registers, debug state, MMU, FPU and PMU are not modelled.
    """
    await kvm_lapic_reset(vcpu, init_event)
    arch = vcpu.arch
    arch.nmi_queued = 0
    arch.nmi_pending = 0
    arch.interrupt_injected = False  # kvm_clear_interrupt_queue
    kvm_make_request(KVM_REQ_EVENT, vcpu)


async def kvm_set_apic_base(vcpu: KvmVcpu, value: int, *, host_initiated: bool) -> int:
    """arch/x86/kvm/x86.c: kvm_set_apic_base  [vCPU thread: WRMSR, KVM_SET_SREGS]

    Rejects x2APIC without the global enable, and from the guest the architecturally
    illegal transitions x2APIC → xAPIC and disabled → x2APIC; else kvm_lapic_set_base and
    a map recalculation in this thread.  Returns 0, or 1 (the WRMSR faults).
    Differs from the kernel: reserved-bit checks against CPUID are not modelled.
    """
    mode_mask = MSR_IA32_APICBASE_ENABLE | X2APIC_ENABLE
    old_mode = kvm_lapic_get_base(vcpu) & mode_mask
    new_mode = value & mode_mask
    if new_mode == X2APIC_ENABLE:  # LAPIC_MODE_INVALID
        return 1
    if not host_initiated:
        if old_mode == mode_mask and new_mode == MSR_IA32_APICBASE_ENABLE:
            return 1
        if old_mode == 0 and new_mode == mode_mask:
            return 1
    kvm_lapic_set_base(vcpu, value)
    task = vcpu.task
    assert task is not None
    await kvm_recalculate_apic_map(vcpu.kvm, task)
    return 0


def kvm_arch_vcpu_ioctl_set_mpstate(vcpu: KvmVcpu, mp_state: MpState) -> int:
    """arch/x86/kvm/x86.c: kvm_arch_vcpu_ioctl_set_mpstate  [vCPU ioctl: KVM_SET_MP_STATE]

    SIPI_RECEIVED becomes INIT_RECEIVED with a SIPI latched; any other state is stored;
    KVM_REQ_EVENT.  The VMM uses it to start a restored (already booted) vCPU RUNNABLE.
    """
    apic = vcpu.arch.apic
    if mp_state == MpState.KVM_MP_STATE_SIPI_RECEIVED:
        if apic is None:
            return -errno.EINVAL
        vcpu.arch.mp_state = MpState.KVM_MP_STATE_INIT_RECEIVED
        apic.pending_events |= 1 << KVM_APIC_SIPI
    else:
        vcpu.arch.mp_state = mp_state
    kvm_make_request(KVM_REQ_EVENT, vcpu)
    return 0
# ---------------------------------------------------------------------------- load / put


async def kvm_arch_vcpu_load(vcpu: KvmVcpu, cpu: int) -> None:
    """arch/x86/kvm/x86.c: kvm_arch_vcpu_load  [vcpu_load / kvm_sched_in]

    vmx_vcpu_load (→ vmx_vcpu_pi_load, which still sees the old ``vcpu->cpu``), then
    ``vcpu->cpu`` := ``cpu`` if it changed (with clock and timer-migration requests, not
    modelled).
    """
    await vmx_vcpu_load(vcpu, cpu)
    if vcpu.cpu != cpu:
        vcpu.cpu = cpu


def kvm_arch_vcpu_put(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/x86.c: kvm_arch_vcpu_put  [vcpu_put / kvm_sched_out]

    (Steal time, not modelled), vmx_vcpu_put.
    """
    vmx_vcpu_put(vcpu)


# ---------------------------------------------------------------------------- assignment


def kvm_arch_start_assignment(kvm: Kvm) -> None:
    """arch/x86/kvm/x86.c: kvm_arch_start_assignment  [process]

    Count an assigned device; on the first one, the start_assignment hook
    (vmx_pi_start_assignment: KVM_REQ_UNBLOCK to every vCPU).  Bug toggle
    ``bug-no-unblock-on-assignment`` re-creates bug #3: no hook (the kernel before
    57ab87947abf / a2486020a82e, v5.13-rc4), only the count.
    """
    kvm.arch.assigned_device_count += 1
    first = kvm.arch.assigned_device_count == 1
    hook = first and "bug-no-unblock-on-assignment" not in kvm.toggles
    if hook:
        vmx_pi_start_assignment(kvm)
    bus = kvm.rt.bus
    if bus.on:
        bus.emit("kvm_arch_start_assignment", vm=kvm.name,
                 count=kvm.arch.assigned_device_count, hook=hook)


def kvm_arch_end_assignment(kvm: Kvm) -> None:
    """arch/x86/kvm/x86.c: kvm_arch_end_assignment  [process] — one assigned device less."""
    kvm.arch.assigned_device_count -= 1


def kvm_arch_has_assigned_device(kvm: Kvm) -> bool:
    """arch/x86/kvm/x86.c: kvm_arch_has_assigned_device  [any context] — the count."""
    return kvm.arch.assigned_device_count != 0


def kvm_arch_has_irq_bypass() -> bool:
    """arch/x86/kvm/x86.c: kvm_arch_has_irq_bypass  [any context] — always on x86."""
    return True


def kvm_arch_irq_bypass_add_producer(cons: IrqBypassConsumer,
                                     prod: IrqBypassProducer) -> int:
    """arch/x86/kvm/x86.c: kvm_arch_irq_bypass_add_producer  [process, irq bypass connect]

    A VFIO vector and this irqfd share the eventfd: remember the producer, count the
    assigned device (kvm_arch_start_assignment), and let pi_update_irte post the host IRQ
    to the route's vCPU if it can (undoing the count on failure).
    """
    irqfd = cons.owner
    kvm = irqfd.kvm
    irqfd.producer = prod
    kvm_arch_start_assignment(kvm)
    ret = pi_update_irte(kvm, prod.irq, irqfd.gsi, True)
    if ret:
        kvm_arch_end_assignment(kvm)
    return ret


def kvm_arch_irq_bypass_del_producer(cons: IrqBypassConsumer,
                                     prod: IrqBypassProducer) -> None:
    """arch/x86/kvm/x86.c: kvm_arch_irq_bypass_del_producer  [process]

    Back to remapped mode (pi_update_irte with set = 0), one assigned device less.
    """
    irqfd = cons.owner
    kvm = irqfd.kvm
    irqfd.producer = None
    ret = pi_update_irte(kvm, prod.irq, irqfd.gsi, False)
    if ret:
        bus = kvm.rt.bus
        if bus.on:
            bus.emit("vkick_warn", what=f"irq bypass consumer unregistration fails: {ret}")
    kvm_arch_end_assignment(kvm)


def kvm_arch_update_irqfd_routing(kvm: Kvm, host_irq: int, guest_irq: int,
                                  set_: bool) -> int:
    """arch/x86/kvm/x86.c: kvm_arch_update_irqfd_routing — a route change re-decides the
    IRTE (posted to which vCPU, or remapped): pi_update_irte."""
    return pi_update_irte(kvm, host_irq, guest_irq, set_)



# ---------------------------------------------------------------------------- APICv state


def kvm_apicv_activated(kvm: Kvm) -> bool:
    """arch/x86/kvm/x86.c: kvm_apicv_activated  [any context] — no inhibit reason is set
    (READ_ONCE of kvm->arch.apicv_inhibit_reasons)."""
    return kvm.arch.apicv_inhibit_reasons == 0


def kvm_apicv_init(kvm: Kvm) -> None:
    """arch/x86/kvm/x86.c: kvm_apicv_init  [process: KVM_CREATE_VM]

    APICV_INHIBIT_REASON_DISABLE is set iff enable_apicv is off (vkick: the VM's
    ``enable_apicv``).  v5.12 calls it from vmx_vm_init with enable_apicv, 5.14 from
    kvm_arch_init_vm; both at VM creation, with the same effect.
    """
    bit = 1 << APICV_INHIBIT_REASON_DISABLE
    if kvm.enable_apicv:
        kvm.arch.apicv_inhibit_reasons &= ~bit
    else:
        kvm.arch.apicv_inhibit_reasons |= bit


async def kvm_vcpu_update_apicv(vcpu: KvmVcpu) -> None:
    """arch/x86/kvm/x86.c: kvm_vcpu_update_apicv  [vCPU thread: KVM_REQ_APICV_UPDATE, or
    the vCPU ioctl that changed the inhibit]

    ``apicv_active`` := kvm_apicv_activated, then the LAPIC bookkeeping
    (kvm_apic_update_apicv, whose W-APICV-update window races senders that already see
    APICv off) and the VMCS controls (vmx_refresh_apicv_exec_ctrl).  Spec §2.3, §14.3.
    v5.13 stops there, which leaves two later-fixed holes: a vector the hardware put in
    VIRR (or the PIR harvest put in IRR) while APICv was active was accepted without
    KVM_REQ_EVENT, so after a deactivation nothing injects it until the next event —
    ``fix-apicv-disable-req-event`` raises KVM_REQ_EVENT on deactivation ("KVM: x86: Check
    for pending interrupts when APICv is getting disabled", Vitaly Kuznetsov, June 2021,
    patch read; in 5.14-rc5, absent from 5.12.9 and the v5.13-era tree; id not seen); and
    SVI is not refreshed on activation, so the hardware's next EOI virtualization retires
    the stale SVI and the vector in service stays in VISR — ``fix-svi-on-apicv-activation``
    sets SVI from the highest in-service vector on activation, as "KVM: VMX: configure SVI
    during runtime APICv activation" (Dongli Zhang, Nov 2025, patch read; merged for
    6.19-rc1; id not seen) does.
    Differs from the kernel: no lapic_in_kernel check (every vkick vCPU has one).
    """
    kvm = vcpu.kvm
    toggles = kvm.toggles
    vcpu.arch.apicv_active = kvm_apicv_activated(kvm)
    await kvm_apic_update_apicv(vcpu)
    vmx_refresh_apicv_exec_ctrl(vcpu)
    apic = vcpu.arch.apic
    assert apic is not None
    if vcpu.arch.apicv_active and "fix-svi-on-apicv-activation" in toggles:
        vmx_hwapic_isr_update(vcpu, apic_find_highest_isr(apic))
    if not vcpu.arch.apicv_active and "fix-apicv-disable-req-event" in toggles:
        kvm_make_request(KVM_REQ_EVENT, vcpu)
    bus = kvm.rt.bus
    if bus.on:
        bus.emit("kvm_vcpu_update_apicv", vm=kvm.name, vcpu=vcpu.vcpu_id,
                 active=vcpu.arch.apicv_active, irr_pending=apic.irr_pending,
                 isr_count=apic.isr_count, isr_cache=apic.highest_isr_cache,
                 svi=vcpu.arch.svi)


async def kvm_request_apicv_update(kvm: Kvm, activate: bool, bit: int) -> None:
    """arch/x86/kvm/x86.c: kvm_request_apicv_update  [process: no lock held]

    Set (``activate`` false) or clear inhibit reason ``bit`` (a cmpxchg loop on
    ``apicv_inhibit_reasons``); reasons VMX does not act on are ignored.  Only when the VM
    goes from no reason to some, or back, trace kvm_apicv_update_request, send
    KVM_REQ_APICV_UPDATE (WAIT, NO_WAKEUP: vCPUs in guest mode are IPI'd out, blocked ones
    see it when they next run) to every vCPU but the caller's own, and update the caller's
    vCPU at once.  Spec §2.3.
    On VMX v5.13 only kvm_hv_activate_synic calls it (APICV_INHIBIT_REASON_HYPERV, to
    deactivate, for good); vkick's tests and VMM-side actors may also call it directly,
    as an ioctl-like driver, to activate again.
    Differs from the kernel: nothing on VMX v5.13 clears an inhibit at run time (later
    kernels toggle HYPERV with the SynIC's AutoEOI use, and SVM toggles IRQWIN and
    PIT_REINJ); the re-activation path itself is the v5.13 code.
    """
    if not vmx_check_apicv_inhibit_reasons(bit):
        return
    old = kvm.arch.apicv_inhibit_reasons
    new = old & ~(1 << bit) if activate else old | (1 << bit)
    if new == old:
        return
    kvm.arch.apicv_inhibit_reasons = new  # cmpxchg (atomic: one step here)
    if bool(old) == bool(new):
        return
    bus = kvm.rt.bus
    if bus.on:
        bus.emit("kvm_apicv_update_request", vm=kvm.name, activate=activate, bit=bit)
    # (kvm_x86_ops.pre_update_apicv_exec_ctrl: SVM only.)
    except_ = kvm_get_running_vcpu()
    kvm_make_all_cpus_request_except(kvm, KVM_REQ_APICV_UPDATE, except_)
    if except_ is not None:
        await kvm_vcpu_update_apicv(except_)


@dataclass(slots=True)
class KvmEnableCap:
    """include/uapi/linux/kvm.h: struct kvm_enable_cap."""

    cap: int
    flags: int = 0
    args: tuple[int, int, int, int] = (0, 0, 0, 0)


async def kvm_vcpu_ioctl_enable_cap(vcpu: KvmVcpu, cap: KvmEnableCap) -> int:
    """arch/x86/kvm/x86.c: kvm_vcpu_ioctl_enable_cap  [vCPU ioctl: the vCPU's thread, loaded]

    The capabilities on this path: KVM_CAP_HYPERV_SYNIC and KVM_CAP_HYPERV_SYNIC2
    (``args[0]`` must be 0), which need an in-kernel irqchip and activate the vCPU's SynIC
    (kvm_hv_activate_synic — inhibiting APICv for the whole VM).  0 or -EINVAL.
    Differs from the kernel: other capabilities are -EINVAL here.
    """
    from vkick.kvm.hyperv import kvm_hv_activate_synic  # noqa: PLC0415
    from vkick.kvm.irq import irqchip_in_kernel  # noqa: PLC0415

    if cap.flags:
        return -errno.EINVAL
    if cap.cap == KVM_CAP_HYPERV_SYNIC2 and cap.args[0]:
        return -errno.EINVAL
    if cap.cap in (KVM_CAP_HYPERV_SYNIC, KVM_CAP_HYPERV_SYNIC2):
        if not irqchip_in_kernel(vcpu.kvm):
            return -errno.EINVAL
        return await kvm_hv_activate_synic(vcpu, cap.cap == KVM_CAP_HYPERV_SYNIC2)
    return -errno.EINVAL


async def kvm_arch_vcpu_ioctl(vcpu: KvmVcpu, ioctl: int, arg: KvmEnableCap) -> int:
    """arch/x86/kvm/x86.c: kvm_arch_vcpu_ioctl  [vCPU ioctl: the vCPU's thread, between
    KVM_RUNs]

    vcpu_load (the thread's CPU now has this vCPU as kvm_running_vcpu), the ioctl, then
    vcpu_put.
    Differs from the kernel: only KVM_ENABLE_CAP (kvm_vcpu_ioctl_enable_cap), with the
    argument already copied in; any other ioctl is -EINVAL.
    """
    if ioctl != KVM_ENABLE_CAP:
        return -errno.EINVAL
    await vcpu_load(vcpu)
    try:
        return await kvm_vcpu_ioctl_enable_cap(vcpu, arg)
    finally:
        vcpu_put(vcpu)
