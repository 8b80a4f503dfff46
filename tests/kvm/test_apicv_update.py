"""Unit tests of APICv inhibit / re-activation at run time: kvm_request_apicv_update,
kvm_vcpu_update_apicv, kvm_apic_update_apicv and the helpers around them (spec §2.3, §11,
§12, §13; research/bugs.md #7-#9)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from helpers import lapic as _apic
from helpers import vm_between_ioctls

from vkick.kvm.kvm_host import (
    APICV_INHIBIT_REASON_DISABLE,
    APICV_INHIBIT_REASON_HYPERV,
    APICV_INHIBIT_REASON_IRQWIN,
    APICV_INHIBIT_REASON_NESTED,
    KVM_CAP_HYPERV_SYNIC,
    KVM_CAP_HYPERV_SYNIC2,
    KVM_ENABLE_CAP,
    KVM_IRQCHIP_NONE,
    KVM_REQ_APICV_UPDATE,
    KVM_REQ_EVENT,
)
from vkick.kvm.kvm_main import (
    kvm_clear_request,
    kvm_create_vm,
    kvm_make_all_cpus_request_except,
    kvm_test_request,
)
from vkick.kvm.lapic import (
    apic_find_highest_irr,
    apic_find_highest_isr,
    apic_has_interrupt_for_ppr,
    kvm_apic_update_apicv,
    kvm_lapic_set_irr,
)
from vkick.kvm.vmx.posted_intr import _has_vtd_posting, vmx_can_use_vtd_pi
from vkick.kvm.vmx.vmx import (
    vmx_check_apicv_inhibit_reasons,
    vmx_hwapic_isr_update,
    vmx_refresh_apicv_exec_ctrl,
    vmx_sync_pir_to_irr,
)
from vkick.kvm.x86 import (
    KvmEnableCap,
    kvm_apicv_activated,
    kvm_arch_vcpu_ioctl,
    kvm_request_apicv_update,
    kvm_vcpu_ioctl_enable_cap,
    kvm_vcpu_update_apicv,
    vcpu_scan_ioapic,
)
from vkick.obs.invariants import pi_structural_violations
from vkick.runtime.sched import DONE
from vkick.runtime.tasks import Runtime
from vkick.scenario.assigned_device import run_assigned_device
from vkick.testing import capture_events

V = 0x51



_vm = functools.partial(vm_between_ioctls, apicv=True)


# ---------------------------------------------------------------------------- VM state


def test_kvm_apicv_init_sets_the_disable_reason_only_without_apicv(rt: Runtime) -> None:
    """kvm_apicv_init: enable_apicv off → APICV_INHIBIT_REASON_DISABLE, and the vCPUs are
    created with APICv and its VMCS controls off; on → no reason, controls on."""
    off = kvm_create_vm(rt, "off", apicv=False)
    on = kvm_create_vm(rt, "on", apicv=True)
    assert off.arch.apicv_inhibit_reasons == 1 << APICV_INHIBIT_REASON_DISABLE
    assert on.arch.apicv_inhibit_reasons == 0
    assert not kvm_apicv_activated(off) and kvm_apicv_activated(on)
    for apicv in (False, True):
        vcpu = _vm(rt, 1, apicv=apicv).vcpus[0]
        arch = vcpu.arch
        assert (arch.apicv_active, arch.pin_posted_intr, arch.virtual_intr_delivery) == (
            apicv, apicv, apicv)


def test_vmx_check_apicv_inhibit_reasons_accepts_only_disable_and_hyperv() -> None:
    """vmx_check_apicv_inhibit_reasons: VMX acts on DISABLE and HYPERV, not SVM's reasons."""
    assert vmx_check_apicv_inhibit_reasons(APICV_INHIBIT_REASON_DISABLE)
    assert vmx_check_apicv_inhibit_reasons(APICV_INHIBIT_REASON_HYPERV)
    for bit in (APICV_INHIBIT_REASON_NESTED, APICV_INHIBIT_REASON_IRQWIN, 4, 5):
        assert not vmx_check_apicv_inhibit_reasons(bit)


def test_kvm_request_apicv_update_ignores_a_reason_vmx_does_not_use(rt: Runtime) -> None:
    """kvm_request_apicv_update: an SVM-only reason changes nothing and requests nothing."""
    kvm = _vm(rt)
    with capture_events(rt.bus, "kvm_apicv_update_request") as evs:
        rt.call(kvm_request_apicv_update, kvm, False, APICV_INHIBIT_REASON_IRQWIN)
    assert kvm.arch.apicv_inhibit_reasons == 0 and evs == []
    assert not any(kvm_test_request(KVM_REQ_APICV_UPDATE, v) for v in kvm.vcpus)


def test_kvm_request_apicv_update_requests_every_vcpu_only_on_a_transition(
        rt: Runtime) -> None:
    """kvm_request_apicv_update: the first reason and the last one cleared trace and send
    KVM_REQ_APICV_UPDATE to every vCPU (no vCPU is the caller's here); adding or clearing
    a reason while another is set only changes the bits."""
    kvm = _vm(rt)
    hv, dis = APICV_INHIBIT_REASON_HYPERV, APICV_INHIBIT_REASON_DISABLE

    def step(activate: bool, bit: int) -> tuple[int, list[bool], list[bool]]:
        for v in kvm.vcpus:
            kvm_clear_request(KVM_REQ_APICV_UPDATE, v)
        with capture_events(rt.bus, "kvm_apicv_update_request") as evs:
            rt.call(kvm_request_apicv_update, kvm, activate, bit)
        return (kvm.arch.apicv_inhibit_reasons, [e["activate"] for e in evs],
                [kvm_test_request(KVM_REQ_APICV_UPDATE, v) for v in kvm.vcpus])

    assert step(False, hv) == (1 << hv, [False], [True, True])
    assert step(False, hv) == (1 << hv, [], [False, False])  # already set
    assert step(False, dis) == ((1 << hv) | (1 << dis), [], [False, False])
    assert step(True, hv) == (1 << dis, [], [False, False])  # DISABLE still inhibits
    assert step(True, dis) == (0, [True], [True, True])
    # The request alone changes no vCPU: each takes the new state in its run loop.
    assert all(v.arch.apicv_active for v in kvm.vcpus)


def test_kvm_make_all_cpus_request_except_skips_the_named_vcpu(rt: Runtime) -> None:
    """kvm_make_all_cpus_request_except: every vCPU but ``except`` gets the request."""
    kvm = _vm(rt, 3)
    kvm_make_all_cpus_request_except(kvm, KVM_REQ_APICV_UPDATE, kvm.vcpus[1])
    assert [kvm_test_request(KVM_REQ_APICV_UPDATE, v) for v in kvm.vcpus] == [
        True, False, True]


# ---------------------------------------------------------------------------- per vCPU


def test_kvm_vcpu_update_apicv_takes_the_vm_state_and_rewrites_the_vmcs_controls(
        rt: Runtime) -> None:
    """kvm_vcpu_update_apicv: apicv_active and the pin-based / secondary controls follow the
    VM; v5.13 raises no KVM_REQ_EVENT on deactivation, the 5.14 fix does."""
    for toggles, req_event in ((frozenset(), False),
                               (frozenset({"fix-apicv-disable-req-event"}), True)):
        kvm = _vm(rt, 1, toggles=toggles)
        vcpu = kvm.vcpus[0]
        kvm_clear_request(KVM_REQ_EVENT, vcpu)
        kvm.arch.apicv_inhibit_reasons = 1 << APICV_INHIBIT_REASON_HYPERV
        with capture_events(rt.bus, "kvm_vcpu_update_apicv") as evs:
            rt.call(kvm_vcpu_update_apicv, vcpu)
        arch = vcpu.arch
        assert (arch.apicv_active, arch.pin_posted_intr, arch.virtual_intr_delivery) == (
            False, False, False)
        assert kvm_test_request(KVM_REQ_EVENT, vcpu) is req_event
        assert [e["active"] for e in evs] == [False]
        kvm.arch.apicv_inhibit_reasons = 0
        rt.call(kvm_vcpu_update_apicv, vcpu)
        assert (arch.apicv_active, arch.pin_posted_intr, arch.virtual_intr_delivery) == (
            True, True, True)


def test_vmx_refresh_apicv_exec_ctrl_follows_apicv_active(rt: Runtime) -> None:
    """vmx_refresh_apicv_exec_ctrl: the controls are rewritten from apicv_active, nothing
    else (RVI and SVI keep their values)."""
    vcpu = _vm(rt, 1).vcpus[0]
    arch = vcpu.arch
    arch.rvi, arch.svi = 0x41, 0x61
    arch.apicv_active = False
    vmx_refresh_apicv_exec_ctrl(vcpu)
    assert (arch.pin_posted_intr, arch.virtual_intr_delivery, arch.rvi, arch.svi) == (
        False, False, 0x41, 0x61)
    arch.apicv_active = True
    vmx_refresh_apicv_exec_ctrl(vcpu)
    assert (arch.pin_posted_intr, arch.virtual_intr_delivery) == (True, True)


def test_kvm_vcpu_update_apicv_leaves_svi_stale_on_activation_until_the_fix(
        rt: Runtime) -> None:
    """kvm_vcpu_update_apicv: a vector taken in service while APICv was off is not told to
    the hardware on activation (SVI stays 0, v5.13); fix-svi-on-apicv-activation sets SVI
    from the highest in-service vector."""
    for toggles, svi in ((frozenset(), 0), (frozenset({"fix-svi-on-apicv-activation"}), V)):
        kvm = _vm(rt, 1, toggles=toggles)
        vcpu = kvm.vcpus[0]
        kvm.arch.apicv_inhibit_reasons = 1 << APICV_INHIBIT_REASON_HYPERV
        rt.call(kvm_vcpu_update_apicv, vcpu)
        apic = _apic(vcpu)
        apic.isr |= 1 << V  # kvm_get_apic_interrupt with APICv off: apic_set_isr
        apic.isr_count, apic.highest_isr_cache = 1, V
        kvm.arch.apicv_inhibit_reasons = 0
        rt.call(kvm_vcpu_update_apicv, vcpu)
        assert vcpu.arch.svi == svi


def test_vmx_hwapic_isr_update_sets_svi(rt: Runtime) -> None:
    """vmx_hwapic_isr_update: SVI := the vector, 0 for -1."""
    vcpu = _vm(rt, 1).vcpus[0]
    vmx_hwapic_isr_update(vcpu, 0x61)
    assert vcpu.arch.svi == 0x61
    vmx_hwapic_isr_update(vcpu, -1)
    assert vcpu.arch.svi == 0


# ---------------------------------------------------------------------------- lapic.c


def test_kvm_apic_update_apicv_pins_the_counters_with_apicv_and_rescans_without(
        rt: Runtime) -> None:
    """kvm_apic_update_apicv (v5.13): active → irr_pending true, isr_count 1; inactive →
    irr_pending from a scan of IRR, isr_count from ISR."""
    vcpu = _vm(rt, 1).vcpus[0]
    apic = _apic(vcpu)
    vcpu.arch.apicv_active = False
    apic.irr, apic.isr = 0, (1 << 0x61) | (1 << 0x71)
    rt.call(kvm_apic_update_apicv, vcpu)
    assert (apic.irr_pending, apic.isr_count) == (False, 2)
    apic.irr = 1 << V
    rt.call(kvm_apic_update_apicv, vcpu)
    assert apic.irr_pending
    vcpu.arch.apicv_active = True
    apic.irr = 0
    rt.call(kvm_apic_update_apicv, vcpu)
    assert (apic.irr_pending, apic.isr_count) == (True, 1)


@pytest.mark.parametrize(("toggles", "hidden"), [
    (frozenset(), True), (frozenset({"fix-irr-pending-scan-on-deactivate"}), False)])
def test_kvm_apic_update_apicv_stores_a_stale_scan_over_a_concurrent_set_irr(
        rt: Runtime, toggles: frozenset[str], hidden: bool) -> None:
    """kvm_apic_update_apicv, bug #8a: a sender that sees APICv off sets its IRR bit and
    irr_pending inside W-APICV-update; v5.13 then stores the stale "IRR empty" and
    apic_find_highest_irr no longer sees the vector.  755c2bf87860 leaves irr_pending
    alone (true from the active period): the vector stays visible."""
    vcpu = _vm(rt, 1, toggles=toggles).vcpus[0]
    apic = _apic(vcpu)
    assert apic.irr == 0 and apic.irr_pending  # APICv was active
    windows: list[str] = []
    preempt = rt.preempt

    def spy(window: Any) -> Any:
        if window == "W-APICV-update":
            windows.append(window)
            kvm_lapic_set_irr(V, apic)  # the other CPU's __apic_accept_irq
            return DONE
        return preempt(window)

    rt.preempt = spy
    vcpu.arch.apicv_active = False
    rt.call(kvm_apic_update_apicv, vcpu)
    assert windows == ([] if not hidden else ["W-APICV-update"])
    if not hidden:
        kvm_lapic_set_irr(V, apic)  # the same sender, now after the update
    assert apic.irr == 1 << V
    assert (apic_find_highest_irr(apic) == -1) is hidden
    assert apic.irr_pending is not hidden


@pytest.mark.parametrize(("toggles", "cache"), [
    (frozenset(), 0x61), (frozenset({"fix-isr-cache-not-purged"}), -1)])
def test_kvm_apic_update_apicv_keeps_highest_isr_cache_across_activation_until_the_fix(
        rt: Runtime, toggles: frozenset[str], cache: int) -> None:
    """kvm_apic_update_apicv, bug #9: v5.13 keeps the cache of a vector taken in service
    with APICv off; once the hardware's EOI virtualization retired it, KVM still finds it
    "in service" (apic_find_highest_isr believes isr_count 1 and the cache).  97a71c444a14
    purges the cache."""
    vcpu = _vm(rt, 1, toggles=toggles).vcpus[0]
    apic = _apic(vcpu)
    vcpu.arch.apicv_active = False
    rt.call(kvm_apic_update_apicv, vcpu)
    apic.isr |= 1 << 0x61
    apic.isr_count, apic.highest_isr_cache = 1, 0x61
    vcpu.arch.apicv_active = True
    rt.call(kvm_apic_update_apicv, vcpu)
    assert apic.highest_isr_cache == cache
    apic.isr = 0  # the guest's EOI, virtualized: no exit, KVM is not told
    assert apic_find_highest_isr(apic) == (0x61 if cache != -1 else -1)


def test_apic_find_highest_isr_believes_the_counters_whatever_the_apicv_state(
        rt: Runtime) -> None:
    """apic_find_highest_isr: -1 for isr_count 0, else the cache, else a scan — APICv is not
    consulted (it relies on the counters kvm_apic_update_apicv pins)."""
    vcpu = _vm(rt, 1).vcpus[0]
    apic = _apic(vcpu)
    apic.isr = 1 << 0x71
    for active in (True, False):
        vcpu.arch.apicv_active = active
        apic.isr_count, apic.highest_isr_cache = 0, -1
        assert apic_find_highest_isr(apic) == -1
        apic.isr_count = 1
        assert apic_find_highest_isr(apic) == 0x71
        apic.highest_isr_cache = 0x41
        assert apic_find_highest_isr(apic) == 0x41


@pytest.mark.parametrize(("toggles", "found"), [
    (frozenset(), -1), (frozenset({"fix-no-pir-sync-when-apicv-inhibited"}), V)])
def test_apic_has_interrupt_for_ppr_harvests_pir_with_apicv_inhibited_only_with_the_fix(
        rt: Runtime, toggles: frozenset[str], found: int) -> None:
    """apic_has_interrupt_for_ppr, bug #7: with APICv inhibited v5.13 looks at IRR only, so
    a vector an assigned device posted stays unseen; 37c4dbf337c5 syncs PIR whenever the VM
    has APICv at all."""
    kvm = _vm(rt, 1, toggles=toggles)
    vcpu = kvm.vcpus[0]
    kvm.arch.apicv_inhibit_reasons = 1 << APICV_INHIBIT_REASON_HYPERV
    rt.call(kvm_vcpu_update_apicv, vcpu)
    vcpu.pi_desc.pir, vcpu.pi_desc.on = 1 << V, True  # the IOMMU posted
    assert apic_has_interrupt_for_ppr(_apic(vcpu), 0) == found
    assert vcpu.pi_desc.on is (found == -1)


def test_vmx_sync_pir_to_irr_with_apicv_inhibited_requests_an_event_instead_of_rvi(
        rt: Runtime) -> None:
    """vmx_sync_pir_to_irr, 7e1901f6c86c: with APICv inhibited a newly harvested vector
    raises KVM_REQ_EVENT and RVI is left alone; v5.13 never runs it so (it WARNs)."""
    kvm = _vm(rt, 1, toggles=frozenset({"fix-no-pir-sync-when-apicv-inhibited"}))
    vcpu = kvm.vcpus[0]
    vcpu.arch.apicv_active = False
    kvm_clear_request(KVM_REQ_EVENT, vcpu)
    vcpu.pi_desc.pir, vcpu.pi_desc.on = 1 << V, True
    assert vmx_sync_pir_to_irr(vcpu) == V
    assert (vcpu.arch.rvi, kvm_test_request(KVM_REQ_EVENT, vcpu)) == (0, True)
    kvm_clear_request(KVM_REQ_EVENT, vcpu)
    assert vmx_sync_pir_to_irr(vcpu) == V  # ON clear: nothing new, no request
    assert not kvm_test_request(KVM_REQ_EVENT, vcpu)
    old = _vm(rt, 1).vcpus[0]
    old.arch.apicv_active = False
    with capture_events(rt.bus, "vkick_warn") as warns:
        vmx_sync_pir_to_irr(old)
    assert len(warns) == 1


def test_vcpu_scan_ioapic_harvests_pir_with_apicv_inhibited_only_with_the_fix(
        rt: Runtime) -> None:
    """vcpu_scan_ioapic (in-kernel IOAPIC), bug #7: the PIR is harvested first — v5.13 only
    with APICv active for the vCPU, 37c4dbf337c5 always."""
    for toggles, left in ((frozenset(), 1 << V),
                          (frozenset({"fix-no-pir-sync-when-apicv-inhibited"}), 0)):
        kvm = _vm(rt, 1, toggles=toggles, irqchip="kernel")
        vcpu = kvm.vcpus[0]
        vcpu.arch.apicv_active = False
        vcpu.pi_desc.pir, vcpu.pi_desc.on = 1 << V, True
        vcpu_scan_ioapic(vcpu)
        assert vcpu.pi_desc.pir == left


# ---------------------------------------------------------------------------- SynIC


def test_kvm_vcpu_ioctl_enable_cap_synic_inhibits_apicv_for_the_vm(rt: Runtime) -> None:
    """KVM_ENABLE_CAP(KVM_CAP_HYPERV_SYNIC) on vCPU 0 (its thread, loaded): SynIC active,
    HYPERV inhibit set, vCPU 0 updated at once (it is the running vCPU), vCPU 1 only sent
    KVM_REQ_APICV_UPDATE."""
    kvm = _vm(rt)
    v0, v1 = kvm.vcpus
    with capture_events(rt.bus, "kvm_hv_activate_synic", "kvm_vcpu_update_apicv") as evs:
        r = rt.call(kvm_arch_vcpu_ioctl, v0, KVM_ENABLE_CAP,
                 KvmEnableCap(KVM_CAP_HYPERV_SYNIC))
    assert r == 0
    assert kvm.arch.apicv_inhibit_reasons == 1 << APICV_INHIBIT_REASON_HYPERV
    assert v0.arch.hv_synic_active and not v0.arch.apicv_active
    assert not kvm_test_request(KVM_REQ_APICV_UPDATE, v0)
    assert v1.arch.apicv_active and kvm_test_request(KVM_REQ_APICV_UPDATE, v1)
    assert [(e["ev"], e["vcpu"]) for e in evs] == [("kvm_vcpu_update_apicv", 0),
                                                   ("kvm_hv_activate_synic", 0)]
    assert kvm.host.pcpus[0].running_vcpu is None  # vcpu_put


def test_kvm_vcpu_ioctl_enable_cap_rejects_bad_arguments(rt: Runtime) -> None:
    """kvm_vcpu_ioctl_enable_cap: flags, SYNIC2 with args[0], other capabilities, and SynIC
    without an in-kernel irqchip are -EINVAL; kvm_arch_vcpu_ioctl knows only
    KVM_ENABLE_CAP."""
    kvm = _vm(rt, 1)
    vcpu = kvm.vcpus[0]
    for cap in (KvmEnableCap(KVM_CAP_HYPERV_SYNIC, flags=1),
                KvmEnableCap(KVM_CAP_HYPERV_SYNIC2, args=(1, 0, 0, 0)),
                KvmEnableCap(7)):
        assert rt.call(kvm_vcpu_ioctl_enable_cap, vcpu, cap) == -22
    assert rt.call(kvm_arch_vcpu_ioctl, vcpu, 0xAE80, KvmEnableCap(0)) == -22
    kvm.arch.irqchip_mode = KVM_IRQCHIP_NONE
    assert rt.call(kvm_vcpu_ioctl_enable_cap, vcpu,
                KvmEnableCap(KVM_CAP_HYPERV_SYNIC2)) == -22
    assert kvm.arch.apicv_inhibit_reasons == 0 and not vcpu.arch.hv_synic_active


# ---------------------------------------------------------------------------- VT-d PI


def test_vmx_can_use_vtd_pi_ignores_the_vcpu_apicv_state() -> None:
    """vmx_can_use_vtd_pi (53b7ca1a3593) holds for a VM with an assigned device whatever a
    vCPU's APICv state; v5.13's pi_pre_block / vmx_vcpu_pi_put guard drops with it."""
    rt = Runtime(seed=0)
    from vkick.scenario.assigned_device import build_assigned_vm  # noqa: PLC0415

    try:
        for toggles, guarded in ((frozenset(), False),
                                 (frozenset({"fix-vtd-pi-stable-condition"}), True)):
            kvm = rt.call(lambda t=toggles: build_assigned_vm(rt, vcpu_cpus=[0], nr_pcpus=1,
                                                              toggles=t))
            kvm.arch.assigned_device_count = 1
            vcpu = kvm.vcpus[0]
            assert vmx_can_use_vtd_pi(kvm) and _has_vtd_posting(vcpu)
            vcpu.arch.apicv_active = False
            assert vmx_can_use_vtd_pi(kvm)
            assert _has_vtd_posting(vcpu) is guarded
    finally:
        rt.close()


# ---------------------------------------------------------------------------- hardware


def test_vmx_vcpu_run_takes_the_notification_vector_as_an_exit_without_posting_control() -> None:
    """Hardware: with "process posted interrupts" cleared (APICv inhibited) the IOMMU's
    POSTED_INTR_VECTOR is an external-interrupt exit, not posted-interrupt processing; the
    host handler ignores it and v5.13 leaves the vector in PIR (bug #7)."""
    async def setup(rt: Any, kvm: Any) -> None:
        kvm.vcpus[0].guest.idle_halt = False  # busy in the guest

        async def inhibit() -> None:
            await rt.sleep_ns(10_000)
            await kvm_request_apicv_update(kvm, False, APICV_INHIBIT_REASON_HYPERV)

        rt.spawn("inhibit", inhibit)

    run = run_assigned_device(seed=0, msi_times=[5_000, 30_000], vcpu_cpus=[0], nr_pcpus=2,
                              irq_cpu=1, setup=setup, record=True, settle_ns=50_000)
    after = [e for e in run.events if e["t"] >= 30_000]
    notif = [e for e in after if e["ev"] == "vkick_pi_notification"]
    exits = [e["reason"] for e in after if e["ev"] == "kvm_exit"]
    assert notif == [] and "EXTERNAL_INTERRUPT" in exits
    assert run.delivered == 1 and len(run.violations) == 1


def test_eoi_virtualization_retires_svi_not_the_highest_visr() -> None:
    """Hardware EOI virtualization (SDM): the vector SVI names is retired; with a stale
    SVI (0) the in-service vector stays in VISR and SVI only now points at it."""
    from vkick.hw.apicv import _eoi_virtualization  # noqa: PLC0415

    rt = Runtime(seed=0)
    try:
        vcpu = _vm(rt, 1).vcpus[0]
        apic = _apic(vcpu)
        apic.isr = 1 << 0x61
        vcpu.arch.svi = 0
        assert _eoi_virtualization(vcpu) == -1
        assert (apic.isr, vcpu.arch.svi, apic.ppr) == (1 << 0x61, 0x61, 0x60)
        assert _eoi_virtualization(vcpu) == -1
        assert (apic.isr, vcpu.arch.svi, apic.ppr) == (0, 0, 0)
    finally:
        rt.close()


def test_pi_structural_violations_checks_a_vcpu_whose_apicv_is_inhibited(rt: Runtime) -> None:
    """pi_structural_violations: the PIR/ON invariants hold with APICv inhibited too (an
    assigned device keeps posting)."""
    kvm = _vm(rt, 1)
    vcpu = kvm.vcpus[0]
    vcpu.arch.apicv_active = False
    vcpu.pi_desc.pir, vcpu.pi_desc.on, vcpu.pi_desc.sn = 1 << V, False, False
    assert [v.invariant for v in pi_structural_violations(kvm)] == ["16.4 PIR≠0 ⇒ ON"]


@pytest.mark.parametrize(("toggles", "visible"), [
    (frozenset(), True),
    (frozenset({"fix-irr-pending-scan-on-deactivate"}), False),
    (frozenset({"fix-irr-pending-scan-on-deactivate", "fix-irr-pending-not-set-on-restore"}),
     True)])
def test_kvm_apic_set_state_with_apicv_off_restores_an_irr_the_8a_fix_hides(
        rt: Runtime, toggles: frozenset[str], visible: bool) -> None:
    """kvm_apic_set_state → kvm_apic_update_apicv, bug #8b: with APICv off, v5.13's IRR scan
    makes a restored IRR bit visible; 755c2bf87860 alone leaves irr_pending as it was
    (false), hiding it; d3ddef46f22e sets irr_pending unconditionally."""
    from vkick.kvm.lapic import kvm_apic_get_state, kvm_apic_set_state  # noqa: PLC0415

    vcpu = _vm(rt, 1, apicv=False, toggles=toggles).vcpus[0]
    apic = _apic(vcpu)
    apic.irr_pending = False  # nothing was pending before the restore
    state = kvm_apic_get_state(vcpu)
    state.irr = 1 << V
    assert rt.call(kvm_apic_set_state, vcpu, state) == 0
    assert (apic_find_highest_irr(apic) == V) is visible
