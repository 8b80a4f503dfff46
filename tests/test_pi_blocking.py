"""Unit tests of VT-d posting and the posted-interrupt blocking path, step by step against
spec §12.1, §12.6, §12.7, §15.7, §15.8 and the VT-d posting hardware (vkick/hw/iommu.py)."""

from __future__ import annotations

import contextvars
from typing import Any

import pytest

from vkick.hw.cpu import (
    POSTED_INTR_WAKEUP_VECTOR,
    current_pcpu,
    host_interrupt,
    sched_setaffinity,
    smp_processor_id,
)
from vkick.hw.iommu import (
    Irte,
    pci_device_create,
    pci_msi_raise,
    vtd_post_interrupt,
)
from vkick.kernel.irqbypass import (
    IrqBypassConsumer,
    IrqBypassProducer,
    irq_bypass_register_consumer,
    irq_bypass_register_producer,
    irq_bypass_unregister_producer,
)
from vkick.kernel.sched import TASK_INTERRUPTIBLE, TASK_RUNNING
from vkick.kvm.irqchip import MsiRoute, kvm_set_irq_routing_sync
from vkick.kvm.kvm_host import (
    KVM_REQ_UNBLOCK,
    POSTED_INTR_VECTOR,
    Kvm,
    KvmVcpu,
)
from vkick.kvm.kvm_main import kvm_get_running_vcpu, kvm_sched_out, kvm_test_request
from vkick.kvm.vmx.posted_intr import (
    pi_has_pending_interrupt,
    pi_ndst,
    pi_post_block,
    pi_pre_block,
    pi_update_irte,
    pi_wakeup_handler,
    vmx_pi_start_assignment,
    vmx_vcpu_pi_load,
    vmx_vcpu_pi_put,
)
from vkick.kvm.x86 import kvm_arch_start_assignment
from vkick.obs.invariants import pi_structural_violations
from vkick.runtime.sched import PreemptPolicy, SitePolicy
from vkick.runtime.tasks import Runtime
from vkick.scenario.assigned_device import (
    assign_device,
    build_assigned_vm,
    run_assigned_device,
    start_vcpus,
)
from vkick.testing import capture_events


def _vm(rt: Runtime, *, posting: bool = True, assigned: bool = True, n: int = 2) -> Kvm:
    """A VM with an IOMMU whose vCPU threads are not running; vCPU i was last on CPU i."""
    kvm = rt.call(lambda: build_assigned_vm(rt, vcpu_cpus=list(range(n)), nr_pcpus=n,
                                            posting=posting))
    for v in kvm.vcpus:
        v.cpu = v.home_cpu
        v.pi_desc.sn = False
        v.pi_desc.ndst = pi_ndst(v.cpu)
    if assigned:
        kvm.arch.assigned_device_count = 1
    return kvm


# ---------------------------------------------------------------------------- vmx_vcpu_pi_load


def test_vmx_vcpu_pi_load_does_nothing_when_sn_is_clear_and_the_cpu_is_unchanged(
        rt: Runtime) -> None:
    """§12.6 step 1: SN clear and the same CPU: the descriptor is left alone (even PIR/ON)."""
    vcpu = _vm(rt).vcpus[0]
    vcpu.pi_desc.pir = 1 << 0x51
    rt.call(vmx_vcpu_pi_load, vcpu, 0)
    assert (vcpu.pi_desc.on, vcpu.pi_desc.ndst) == (False, pi_ndst(0))


def test_vmx_vcpu_pi_load_rewrites_ndst_and_clears_sn_on_migration(rt: Runtime) -> None:
    """§12.6 step 3: a migrated vCPU's NDST names its new CPU (xAPIC format), SN cleared."""
    vcpu = _vm(rt).vcpus[0]
    vcpu.pi_desc.sn = True
    rt.call(vmx_vcpu_pi_load, vcpu, 1)
    assert (vcpu.pi_desc.ndst, vcpu.pi_desc.sn, vcpu.pi_desc.on) == (0x100, False, False)


def test_vmx_vcpu_pi_load_only_clears_sn_when_nv_is_the_wakeup_vector(rt: Runtime) -> None:
    """§12.6 step 2: a blocked vCPU (NV = wakeup) keeps NDST = its list's CPU; SN cleared."""
    vcpu = _vm(rt).vcpus[0]
    vcpu.pi_desc.nv = POSTED_INTR_WAKEUP_VECTOR
    vcpu.pi_desc.sn = True
    rt.call(vmx_vcpu_pi_load, vcpu, 1)
    assert (vcpu.pi_desc.ndst, vcpu.pi_desc.sn) == (pi_ndst(0), False)


def test_vmx_vcpu_pi_load_ndst_rewrite_toggle_moves_a_blocked_vcpus_ndst(rt: Runtime) -> None:
    """Bug #6 toggle: without the wakeup-vector shortcut NDST follows the new CPU."""
    kvm = _vm(rt)
    kvm.toggles = frozenset({"pi-ndst-rewrite-when-blocked"})
    vcpu = kvm.vcpus[0]
    vcpu.pi_desc.nv = POSTED_INTR_WAKEUP_VECTOR
    rt.call(vmx_vcpu_pi_load, vcpu, 1)
    assert vcpu.pi_desc.ndst == pi_ndst(1)


@pytest.mark.parametrize("toggles", [frozenset(), frozenset({"pi-sn-no-on-recompute"})])
def test_vmx_vcpu_pi_load_sets_on_when_pir_collected_bits_under_sn(
        rt: Runtime, toggles: frozenset[str]) -> None:
    """§12.6 step 4: clearing SN with PIR bits sets ON — not with bug #5's toggle."""
    kvm = _vm(rt)
    kvm.toggles = toggles
    vcpu = kvm.vcpus[0]
    vcpu.pi_desc.sn = True
    vcpu.pi_desc.pir = 1 << 0x51
    rt.call(vmx_vcpu_pi_load, vcpu, 0)
    assert vcpu.pi_desc.sn is False
    assert vcpu.pi_desc.on is (not toggles)


def test_vmx_vcpu_pi_load_first_load_points_ndst_at_the_cpu() -> None:
    """A new vCPU (cpu = -1, SN = 1 as vmx_create_vcpu leaves it) gets NDST at first load."""
    rt = Runtime(seed=0)
    kvm = rt.call(lambda: build_assigned_vm(rt, vcpu_cpus=[1], nr_pcpus=2))
    vcpu = kvm.vcpus[0]
    assert (vcpu.cpu, vcpu.pi_desc.sn, vcpu.pi_desc.nv) == (-1, True, POSTED_INTR_VECTOR)

    async def main() -> None:
        start_vcpus(rt, kvm)
        await rt.sleep_ns(10_000)

    rt.run(main)
    assert (vcpu.cpu, vcpu.pi_desc.ndst, vcpu.pi_desc.sn) == (1, pi_ndst(1), False)


# ---------------------------------------------------------------------------- vmx_vcpu_pi_put


@pytest.mark.parametrize(("posting", "assigned", "preempted", "sn"), [
    (True, True, True, True), (True, True, False, False),
    (False, True, True, False), (True, False, True, False)])
def test_vmx_vcpu_pi_put_sets_sn_only_for_a_preempted_vcpu_with_vtd_posting(
        rt: Runtime, posting: bool, assigned: bool, preempted: bool, sn: bool) -> None:
    """§12.6: SN only when preempted, with an assigned device and IOMMU posting."""
    vcpu = _vm(rt, posting=posting, assigned=assigned).vcpus[0]
    vcpu.preempted = preempted
    vmx_vcpu_pi_put(vcpu)
    assert vcpu.pi_desc.sn is sn


def test_kvm_sched_out_marks_preempted_only_when_the_task_is_still_running(
        rt: Runtime) -> None:
    """§15.8 (v5.13 form): a task switched away in TASK_RUNNING was preempted; one that
    sleeps (TASK_INTERRUPTIBLE) was not — and only the preempted one gets SN."""
    kvm = _vm(rt)
    vcpu = kvm.vcpus[0]
    assert vcpu.task is not None
    kvm.host.pcpus[0].running_vcpu = vcpu
    vcpu.task.state = TASK_INTERRUPTIBLE
    kvm_sched_out(vcpu.preempt_notifier, None)
    assert (vcpu.preempted, vcpu.pi_desc.sn, kvm.host.pcpus[0].running_vcpu) == (
        False, False, None)
    vcpu.task.state = TASK_RUNNING
    kvm_sched_out(vcpu.preempt_notifier, None)
    assert (vcpu.preempted, vcpu.ready, vcpu.pi_desc.sn) == (True, True, True)


# ---------------------------------------------------------------------------- pi_pre_block


def test_pi_pre_block_returns_0_and_changes_nothing_without_an_assigned_device(
        rt: Runtime) -> None:
    """§12.7 step 1: no assigned device → 0, NV stays POSTED_INTR_VECTOR, no list."""
    kvm = _vm(rt, assigned=False)
    vcpu = kvm.vcpus[0]
    assert rt.call(pi_pre_block, vcpu) == 0
    assert (vcpu.pi_desc.nv, vcpu.pre_pcpu, kvm.host.pcpus[0].blocked_vcpu_on_cpu) == (
        POSTED_INTR_VECTOR, -1, [])


def test_pi_pre_block_switches_to_the_wakeup_vector_and_lists_the_vcpu(rt: Runtime) -> None:
    """§12.7 steps 2–3: pre_pcpu = this CPU, on its list, NDST there, NV = wakeup, 0."""
    kvm = _vm(rt)
    vcpu = kvm.vcpus[1]
    vcpu.pi_desc.ndst = pi_ndst(0)
    assert rt.call(pi_pre_block, vcpu) == 0
    assert (vcpu.pre_pcpu, vcpu.pi_desc.nv, vcpu.pi_desc.ndst) == (
        1, POSTED_INTR_WAKEUP_VECTOR, pi_ndst(1))
    assert kvm.host.pcpus[1].blocked_vcpu_on_cpu == [vcpu]


def test_pi_pre_block_undoes_and_returns_1_when_on_is_set(rt: Runtime) -> None:
    """§12.7 step 4, §16.13: ON already set → undo (NV back, off the list) and return 1."""
    kvm = _vm(rt)
    vcpu = kvm.vcpus[0]
    vcpu.pi_desc.on = True
    assert rt.call(pi_pre_block, vcpu) == 1
    assert (vcpu.pre_pcpu, vcpu.pi_desc.nv) == (-1, POSTED_INTR_VECTOR)
    assert kvm.host.pcpus[0].blocked_vcpu_on_cpu == []


@pytest.mark.parametrize("torn", [False, True])
def test_pi_pre_block_cmpxchg_retries_when_a_post_lands_in_w_pi_cas(torn: bool) -> None:
    """A post landing between the load of control and the cmpxchg makes the cmpxchg fail
    and retry: ON survives and pi_pre_block returns 1.  With ``pi-control-torn-read`` the
    second load sees the post, the cmpxchg succeeds with the stale ON = 0: ON is lost, the
    vCPU would block with PIR set (bug #4)."""
    rt = Runtime(seed=1, policy=PreemptPolicy.random(
        p=0.0, sites={"W-PI-cas": SitePolicy(p=1.0, max_delay_ns=1_000, delay_share=1.0)}))
    kvm = _vm(rt)
    if torn:
        kvm.toggles = frozenset({"pi-control-torn-read"})
    vcpu = kvm.vcpus[0]
    irte = Irte(present=True, posted=True, vector=0x51, pda=vcpu.pi_desc,
                pir_ids=vcpu.arch.pir_ids, owner=("vm0", 0))

    async def main() -> int:
        rt.call_at_ns(rt.now_ns() + 1, vtd_post_interrupt, kvm.host.iommu, irte, 7)
        return await pi_pre_block(vcpu)

    r = rt.run(main)
    pi = vcpu.pi_desc
    if torn:
        assert (r, pi.on, pi.pir, pi.nv) == (0, False, 1 << 0x51, POSTED_INTR_WAKEUP_VECTOR)
    else:
        assert (r, pi.on, pi.nv) == (1, True, POSTED_INTR_VECTOR)


# ---------------------------------------------------------------------------- post / wakeup


def test_pi_post_block_restores_the_notification_vector_on_the_current_cpu(
        rt: Runtime) -> None:
    """§12.7: NDST := the CPU the vCPU now runs on, NV := POSTED_INTR_VECTOR, unlisted."""
    kvm = _vm(rt)
    vcpu = kvm.vcpus[0]
    rt.call(pi_pre_block, vcpu)
    vcpu.cpu = 1  # woken on another CPU
    rt.call(pi_post_block, vcpu)
    assert (vcpu.pre_pcpu, vcpu.pi_desc.nv, vcpu.pi_desc.ndst) == (
        -1, POSTED_INTR_VECTOR, pi_ndst(1))
    assert kvm.host.pcpus[0].blocked_vcpu_on_cpu == []


def test_pi_wakeup_handler_kicks_only_listed_vcpus_with_on_set(rt: Runtime) -> None:
    """§12.7: the handler on CPU c kicks the vCPUs on c's list whose ON is set."""
    kvm = _vm(rt)
    a, b = kvm.vcpus
    pcpu0 = kvm.host.pcpus[0]
    pcpu0.blocked_vcpu_on_cpu.extend([a, b])
    b.pi_desc.on = True
    with capture_events(rt.bus, "pi_wakeup_handler") as seen:
        token = current_pcpu.set(pcpu0)
        try:
            pi_wakeup_handler()
        finally:
            current_pcpu.reset(token)
    assert seen[0]["kicked"] == [1]


def test_host_interrupt_runs_the_wakeup_vector_handler_on_its_cpu(rt: Runtime) -> None:
    """A POSTED_INTR_WAKEUP_VECTOR reaching CPU 1 runs pi_wakeup_handler *on* CPU 1
    (hardirq: smp_processor_id is 1 whoever delivered it)."""
    kvm = _vm(rt)
    kvm.host.pcpus[1].blocked_vcpu_on_cpu.append(kvm.vcpus[1])
    kvm.vcpus[1].pi_desc.on = True
    with capture_events(rt.bus, "pi_wakeup_handler") as seen:
        host_interrupt(kvm.host.pcpus[1], POSTED_INTR_WAKEUP_VECTOR)
    assert [(r["pcpu"], r["kicked"]) for r in seen] == [(1, [1])]
    assert smp_processor_id() == -1


def test_pi_has_pending_interrupt_is_on_or_sn_with_pir(rt: Runtime) -> None:
    """posted_intr.c: ON, or SN with PIR bits (the directed-yield hint)."""
    pi = _vm(rt).vcpus[0]
    d = pi.pi_desc
    assert not pi_has_pending_interrupt(pi)
    d.pir = 1 << 0x40
    assert not pi_has_pending_interrupt(pi)
    d.sn = True
    assert pi_has_pending_interrupt(pi)
    d.sn, d.pir, d.on = False, 0, True
    assert pi_has_pending_interrupt(pi)


# ---------------------------------------------------------------------------- assignment


def test_vmx_pi_start_assignment_sends_unblock_to_every_vcpu_only_with_posting(
        rt: Runtime) -> None:
    """§12.7: KVM_REQ_UNBLOCK to all vCPUs if the IOMMU can post, none otherwise."""
    for posting in (True, False):
        kvm = _vm(rt, posting=posting)
        vmx_pi_start_assignment(kvm)
        assert [kvm_test_request(KVM_REQ_UNBLOCK, v) for v in kvm.vcpus] == [posting] * 2


@pytest.mark.parametrize("toggles", [frozenset(), frozenset({"bug-no-unblock-on-assignment"})])
def test_kvm_arch_start_assignment_runs_the_hook_on_the_first_device_only(
        rt: Runtime, toggles: frozenset[str]) -> None:
    """x86.c: the count goes up each time; the hook (UNBLOCK) runs on the first — never with
    bug #3's toggle."""
    kvm = _vm(rt, assigned=False)
    kvm.toggles = toggles
    with capture_events(rt.bus, "kvm_arch_start_assignment") as seen:
        kvm_arch_start_assignment(kvm)
        kvm_arch_start_assignment(kvm)
    assert [(r["count"], r["hook"]) for r in seen] == [(1, not toggles), (2, False)]
    assert kvm_test_request(KVM_REQ_UNBLOCK, kvm.vcpus[0]) is (not toggles)


def test_a_blocked_vcpu_leaves_kvm_vcpu_block_on_unblock_and_rearms_the_wakeup_vector() -> None:
    """§12.7: a vCPU that blocked before the assignment re-runs pi_pre_block after the
    start_assignment hook's KVM_REQ_UNBLOCK: it ends up on its CPU's list with NV = wakeup."""
    rt = Runtime(seed=0)
    kvm = rt.call(lambda: build_assigned_vm(rt, vcpu_cpus=[0], nr_pcpus=2))
    vcpu = kvm.vcpus[0]
    states: list[tuple[int, int]] = []

    async def main() -> None:
        start_vcpus(rt, kvm)
        await rt.sleep_ns(5_000)
        states.append((vcpu.pi_desc.nv, vcpu.pre_pcpu))
        await assign_device(kvm, dest_vcpu=0, vector=0x51, irq_cpu=1)
        await rt.sleep_ns(5_000)
        states.append((vcpu.pi_desc.nv, vcpu.pre_pcpu))

    rt.run(main)
    assert states == [(POSTED_INTR_VECTOR, -1), (POSTED_INTR_WAKEUP_VECTOR, 0)]
    assert kvm.host.pcpus[0].blocked_vcpu_on_cpu == [vcpu]


def test_pi_update_irte_posts_a_single_vcpu_route_and_keeps_a_broadcast_remapped() -> None:
    """pi_update_irte: a fixed MSI to one vCPU → posted IRTE (its descriptor and vector);
    a broadcast route → remapped (the IRQ's own vector and CPU)."""
    rt = Runtime(seed=0)
    kvm = rt.call(lambda: build_assigned_vm(rt, vcpu_cpus=[0, 1], nr_pcpus=2))
    out: list[tuple[bool, int]] = []

    async def main() -> None:
        dev = await assign_device(kvm, dest_vcpu=1, vector=0x52, irq_cpu=0)
        irte = kvm.host.iommu.irte[dev.pdev.msi_handle[0]]
        out.append((irte.posted, irte.vector))
        assert irte.pda is kvm.vcpus[1].pi_desc
        await kvm_set_irq_routing_sync(kvm, [MsiRoute(dev.gsi, 0xFEEFF000, 0x52)])
        irte = kvm.host.iommu.irte[dev.pdev.msi_handle[0]]
        out.append((irte.posted, irte.dst))
        assert pi_update_irte(kvm, dev.pdev.irqs[0], dev.gsi, False) == 0

    rt.run(main)
    assert out == [(True, 0x52), (False, 0)]


# ---------------------------------------------------------------------------- hardware


def test_vtd_post_interrupt_sets_pir_and_on_and_notifies_ndst_once(rt: Runtime) -> None:
    """VT-d §5.2.3: PIR and ON set, NV sent to NDST; with ON already set no second IPI."""
    host_vm = _vm(rt)
    host = host_vm.host
    vcpu = host_vm.vcpus[0]
    vcpu.pi_desc.ndst = pi_ndst(1)
    irte = Irte(present=True, posted=True, vector=0x51, pda=vcpu.pi_desc)
    with capture_events(rt.bus, "vkick_host_ipi", "vkick_iommu_post") as seen:
        vtd_post_interrupt(host.iommu, irte, 1)
        vtd_post_interrupt(host.iommu, irte, 2)
    assert (vcpu.pi_desc.pir, vcpu.pi_desc.on) == (1 << 0x51, True)
    assert [(r["ev"], r.get("notify"), r["pcpu"]) for r in seen] == [
        ("vkick_iommu_post", "ipi", 1), ("vkick_host_ipi", None, 1),
        ("vkick_iommu_post", "none", 1)]


def test_vtd_post_interrupt_with_sn_writes_pir_only(rt: Runtime) -> None:
    """VT-d §5.2.3: SN set (and URG clear) → PIR only: no ON, no notification (bug #5)."""
    kvm = _vm(rt)
    vcpu = kvm.vcpus[0]
    vcpu.pi_desc.sn = True
    irte = Irte(present=True, posted=True, vector=0x51, pda=vcpu.pi_desc)
    with capture_events(rt.bus, "vkick_host_ipi") as seen:
        vtd_post_interrupt(kvm.host.iommu, irte, 1)
    assert (vcpu.pi_desc.pir, vcpu.pi_desc.on, seen) == (1 << 0x51, False, [])
    assert [v.invariant for v in pi_structural_violations(kvm)] == []
    vcpu.pi_desc.sn = False  # cleared without the ON recompute: the stranded state
    assert [v.invariant for v in pi_structural_violations(kvm)] == ["16.4 PIR≠0 ⇒ ON"]


def test_pci_msi_raise_without_an_irte_is_dropped_and_not_a_source(rt: Runtime) -> None:
    """An MSI of a vector never set up is blocked by the IOMMU (mode "blocked")."""
    host = _vm(rt).host
    dev = pci_device_create(rt, host.iommu, "nic9")
    with capture_events(rt.bus, "vkick_device_msi") as seen:
        pci_msi_raise(dev, 0)
    assert seen[0]["mode"] == "blocked"


def test_vfio_msihandler_runs_in_hardirq_on_the_affine_cpu_and_sees_its_running_vcpu() -> None:
    """A remapped MSI runs vfio_msihandler on the IRQ's CPU; the injection it drives sees
    that CPU's kvm_running_vcpu (the v5.13 shortcut: no kick for the running vCPU)."""
    rt = Runtime(seed=0)
    kvm = rt.call(lambda: build_assigned_vm(rt, vcpu_cpus=[0], nr_pcpus=1, posting=False))
    with capture_events(rt.bus, "vfio_msihandler", "kvm_pi_post") as seen:
        async def main() -> None:
            dev = await assign_device(kvm, dest_vcpu=0, vector=0x51, irq_cpu=0)
            pcpu = kvm.host.pcpus[0]
            pcpu.running_vcpu = kvm.vcpus[0]  # as if its thread were loaded there
            kvm.vcpus[0].cpu = 0
            pci_msi_raise(dev.pdev, 0)
            await rt.sleep_ns(1_000)

        rt.run(main)
    assert [(r["ev"], r.get("pcpu"), r.get("notify")) for r in seen] == [
        ("vfio_msihandler", 0, None), ("kvm_pi_post", None, "none")]


# ---------------------------------------------------------------------------- irq bypass


def test_irq_bypass_register_connects_a_producer_and_consumer_with_the_same_token(
        rt: Runtime) -> None:
    """irqbypass.c: whichever registers second connects (add_producer), unregistering
    disconnects (del_producer); a different token never connects."""
    calls: list[str] = []
    token = object()

    def add(cons: IrqBypassConsumer, prod: IrqBypassProducer) -> int:
        calls.append(f"add {prod.irq}")
        return 0

    def delete(cons: IrqBypassConsumer, prod: IrqBypassProducer) -> None:
        calls.append(f"del {prod.irq}")

    cons = IrqBypassConsumer(token=token, add_producer=add, del_producer=delete)
    assert irq_bypass_register_producer(rt, IrqBypassProducer(token=object(), irq=1)) == 0
    prod = IrqBypassProducer(token=token, irq=2)
    assert irq_bypass_register_producer(rt, prod) == 0
    assert irq_bypass_register_consumer(rt, cons) == 0
    assert irq_bypass_register_producer(rt, IrqBypassProducer(token=token, irq=3)) < 0
    irq_bypass_unregister_producer(rt, prod)
    assert calls == ["add 2", "del 2"]


# ---------------------------------------------------------------------------- running vCPU


def test_kvm_get_running_vcpu_stays_set_across_the_blk_windows_and_clears_at_sleep() -> None:
    """§12.1, §16.12: kvm_running_vcpu is per CPU: still the halting vCPU at W-BLK-check and
    W-BLK-sleep (a hardirq there sees it), NULL once schedule() switched away."""
    rt = Runtime(seed=3)
    kvm = rt.call(lambda: build_assigned_vm(rt, vcpu_cpus=[0], nr_pcpus=1))
    vcpu = kvm.vcpus[0]
    pcpu = kvm.host.pcpus[0]
    at_windows: list[tuple[str, bool]] = []
    at_put: list[bool] = []
    preempt = rt.preempt

    def spy(window: Any) -> Any:
        if window in ("W-BLK-check", "W-BLK-sleep"):
            at_windows.append((window, _running_on(pcpu) is vcpu))
        return preempt(window)

    rt.preempt = spy
    rt.bus.subscribe(lambda rec: at_put.append(pcpu.running_vcpu is None)
                     if rec["ev"] == "vkick_vcpu_put" else None)

    async def main() -> bool:
        start_vcpus(rt, kvm)
        await rt.sleep_ns(5_000)
        return vcpu.task is not None and vcpu.task.sleeping

    assert rt.run(main)
    assert at_windows == [("W-BLK-check", True), ("W-BLK-sleep", True)]
    assert at_put == [True]
    assert pcpu.running_vcpu is None


def _running_on(pcpu: Any) -> KvmVcpu | None:
    """kvm_get_running_vcpu as code running on ``pcpu`` (an interrupt handler) sees it."""
    ctx = contextvars.copy_context()
    return ctx.run(_get_running_on, pcpu)


def _get_running_on(pcpu: Any) -> KvmVcpu | None:
    current_pcpu.set(pcpu)
    return kvm_get_running_vcpu()


def test_sched_setaffinity_moves_a_vcpu_thread_at_its_next_preemption_point() -> None:
    """kernel/sched: a re-pinned vCPU thread runs on its new CPU from its next preemption
    point: sched-out on the old CPU, sched-in (vmx_vcpu_pi_load) on the new one."""
    rt = Runtime(seed=0)
    kvm = rt.call(lambda: build_assigned_vm(rt, vcpu_cpus=[0], nr_pcpus=2))
    vcpu = kvm.vcpus[0]
    assert vcpu.task is not None

    async def main() -> None:
        start_vcpus(rt, kvm)
        await rt.sleep_ns(2_000)
        sched_setaffinity(vcpu.task, 1)
        vcpu.guest.push("work", 100)  # wake it: it moves when it next runs
        await rt.sleep_ns(5_000)

    rt.run(main)
    assert (vcpu.cpu, vcpu.task.cpu, vcpu.pi_desc.ndst) == (1, 1, pi_ndst(1))
    assert kvm.host.pcpus[0].owner is None


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("posting", [True, False])
def test_vfio_msi_reaches_a_halting_guest_posted_or_remapped_with_no_violation(
        posting: bool) -> None:
    """End to end: every device MSI wakes the halted vCPU and is delivered, through VT-d
    posting (wakeup vector, path vtd) or the remapped host IRQ (eventfd → irqfd)."""
    r = run_assigned_device(seed=0, msi_times=[3_000 * i for i in range(1, 21)],
                            vcpu_cpus=[0], nr_pcpus=2, irq_cpu=1, posting=posting,
                            record=True)
    assert (r.violations, r.structural, r.delivered) == ([], [], 20)
    paths = {e["path"] for e in r.events if e["ev"] == "vkick_irq"}
    assert paths == ({"vtd"} if posting else {"wakeup"})
