"""Run one behaviour scenario (shared/scenarios/FORMAT.md) on a fresh runtime.

Topology → one VM (one physical CPU per vCPU; KVM_CREATE_IRQCHIP when the scenario uses the
IOAPIC), routes → KVM_SET_GSI_ROUTING, irqfds → eventfds bound with KVM_IRQFD (resampling
ones with a resamplefd nobody reads, so its count is how often it was signalled); vCPU
threads and kworkers are started, then the steps run in order with the emulation driven to
quiescence between them.  Guest steps are queued on the vCPU's guest
instruction stream; an idle (halted) guest is handed its next step with a PV kick, a guest
halted by a ``halt`` step is not, and a later step on it waits — forever if nothing wakes it,
which ends the scenario.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vkick.guest.cpu import GuestCpu
from vkick.hw.cpu import HostCosts, HwHost, create_host
from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create, eventfd_signal
from vkick.kvm.eventfd import KVM_IRQFD_FLAG_RESAMPLE, kvm_irqfd_assign, kvm_irqfd_deassign
from vkick.kvm.ioapic import (
    IOAPIC_LOWEST_PRIORITY,
    IOAPIC_REG_SELECT,
    IOAPIC_REG_WINDOW,
    kvm_get_ioapic,
)
from vkick.kvm.irq_comm import kvm_send_userspace_msi
from vkick.kvm.irqchip import IrqchipRoute, MsiRoute, Route, kvm_set_irq_routing_sync
from vkick.kvm.kvm_host import (
    APIC_BASE_MSR,
    APIC_DEFAULT_PHYS_BASE,
    APIC_DFR,
    APIC_ICR,
    APIC_ID,
    APIC_LDR,
    APIC_SPIV,
    KVM_HALT_POLL_NS_DEFAULT,
    KVM_IRQCHIP_IOAPIC,
    MSR_IA32_APICBASE_ENABLE,
    X2APIC_ENABLE,
    Kvm,
    KvmVcpu,
    MpState,
)
from vkick.kvm.kvm_main import kvm_create_vm, kvm_vm_ioctl_create_vcpu
from vkick.kvm.lapic import kvm_apic_get_state, kvm_apic_set_state
from vkick.kvm.x86 import (
    kvm_arch_vcpu_ioctl_set_mpstate,
    kvm_arch_vm_ioctl_create_irqchip,
    kvm_pv_kick_cpu_op,
    kvm_set_apic_base,
    kvm_vm_ioctl_irq_line,
    vcpu_run,
)
from vkick.obs.apicmap import apic_map_diffs
from vkick.runtime.events import EventSink
from vkick.runtime.sched import PreemptPolicy
from vkick.runtime.tasks import Runtime
from vkick.scenario.check import (
    IoapicOutcome,
    Outcome,
    VcpuOutcome,
    compare_ioapic,
    compare_resamples,
    compare_vcpu,
)
from vkick.scenario.format import IoapicStep

# Scenario runs keep the modelled costs small: outcomes, not latencies, are compared.
SCENARIO_COSTS = HostCosts(vmentry_ns=100, vmexit_ns=100, ipi_latency_ns=50, wakeup_ns=200,
                           timeslice_ns=1_000_000)


async def build_vm(rt: Runtime, *, nr_vcpus: int, apicv: bool, x2apic: bool,
                   eoi_auto: bool, name: str = "vm0", handler_ns: int = 0,
                   toggles: frozenset[str] = frozenset(), irqchip: str = "split",
                   host: HwHost | None = None, first_cpu: int = 0,
                   cpus: Sequence[int] | None = None,
                   max_halt_poll_ns: int = KVM_HALT_POLL_NS_DEFAULT) -> Kvm:
    """A VM with ``nr_vcpus`` vCPUs, each pinned to its own physical CPU, guests idle.

    ``host``: build on that host (several VMs on one machine), vCPU ``i`` on CPU
    ``first_cpu + i`` (or ``cpus[i]`` when given); by default a new host with one CPU per
    vCPU.  ``max_halt_poll_ns``: the VM's halt-polling bound (0: every halt sleeps).

    The VMM side, as QEMU restores a booted guest: KVM_CREATE_VCPU for each vCPU, then per
    vCPU the APIC base (x2APIC mode: KVM_SET_SREGS), the LAPIC of FORMAT.md "Initial state"
    (KVM_SET_LAPIC: SVR 0x1FF, ID = index, DFR flat, LDR 0) and KVM_SET_MP_STATE RUNNABLE.
    ``irqchip = "kernel"``: KVM_CREATE_IRQCHIP before the vCPUs (kvm_ioapic_init puts the
    IOAPIC's MMIO window on the VM's I/O bus: the guest's ``mmio`` writes there reach
    ioapic_mmio_write).
    """
    if cpus is None:
        cpus = range(first_cpu, first_cpu + nr_vcpus)
    assert len(cpus) == nr_vcpus, (cpus, nr_vcpus)
    if host is None:
        host = create_host(rt, max(cpus) + 1, SCENARIO_COSTS)
    kvm = kvm_create_vm(rt, name, apicv=apicv, host=host, toggles=toggles,
                        max_halt_poll_ns=max_halt_poll_ns)
    if irqchip == "kernel":
        r = kvm_arch_vm_ioctl_create_irqchip(kvm)
        assert r == 0, r
    await create_booted_vcpus(kvm, cpus, x2apic=x2apic, eoi_auto=eoi_auto,
                              handler_ns=handler_ns)
    return kvm


async def create_booted_vcpus(kvm: Kvm, cpus: Sequence[int], *, x2apic: bool,
                              first_id: int = 0, eoi_auto: bool = True, handler_ns: int = 0,
                              eoi_first: bool = False) -> list[KvmVcpu]:
    """KVM_CREATE_VCPU for vCPU ``first_id + i`` pinned to ``cpus[i]`` — every one first, as
    QEMU creates them — then each restored as booted (:func:`restore_booted_vcpu`) and given
    an idle guest (:class:`GuestCpu` with the guest arguments) that a PV kick
    (KVM_HC_KICK_CPU) wakes when it is handed work while halted."""
    vcpus = [await kvm_vm_ioctl_create_vcpu(kvm, first_id + i, cpu=cpu)
             for i, cpu in enumerate(cpus)]
    for vcpu in vcpus:
        await restore_booted_vcpu(vcpu, x2apic=x2apic)
        guest = GuestCpu(kvm.rt, eoi_auto=eoi_auto, handler_ns=handler_ns,
                         eoi_first=eoi_first)
        guest.unhalt = (lambda v=vcpu: kvm_pv_kick_cpu_op(v))
        vcpu.guest = guest
    return vcpus


def vmm_eventfd(rt: Runtime, name: str, toggles: frozenset[str], flags: int = 0) -> EventfdCtx:
    """An eventfd the VMM creates for a VM: the host kernel's fs/eventfd.c is the one the
    VM's toggles describe (``fix-efd-semaphore-underflow``, bug #14)."""
    ctx = eventfd_ctx_create(rt, 0, flags, name, fix_semaphore_underflow=(
        "fix-efd-semaphore-underflow" in toggles))
    assert isinstance(ctx, EventfdCtx), ctx
    return ctx


async def restore_booted_vcpu(vcpu: KvmVcpu, *, x2apic: bool) -> None:
    """The VMM's register restore of one vCPU (QEMU kvm_arch_put_registers): APIC base,
    KVM_SET_LAPIC with the booted state, KVM_SET_MP_STATE RUNNABLE."""
    if x2apic:
        await kvm_set_apic_base(vcpu, APIC_DEFAULT_PHYS_BASE | MSR_IA32_APICBASE_ENABLE
                                | X2APIC_ENABLE, host_initiated=True)
    state = kvm_apic_get_state(vcpu)  # the reset state: ID = index, DFR flat, LDR 0
    state.spiv = 0x1FF
    r = await kvm_apic_set_state(vcpu, state)
    assert r == 0, f"KVM_SET_LAPIC failed: {r}"
    kvm_arch_vcpu_ioctl_set_mpstate(vcpu, MpState.KVM_MP_STATE_RUNNABLE)


def start_vcpus(rt: Runtime, kvm: Kvm) -> None:
    for vcpu in kvm.vcpus:
        rt.spawn(f"{kvm.name}/vcpu{vcpu.vcpu_id}", vcpu_run, vcpu)


def lapic_state(vcpu: KvmVcpu) -> tuple[set[int], set[int]]:
    """IRR and ISR as KVM_GET_LAPIC reports them: posted (PIR) bits count as pending."""
    apic = vcpu.arch.apic
    assert apic is not None
    irr = apic.irr | vcpu.pi_desc.pir
    return _vectors(irr), _vectors(apic.isr)


def _vectors(bitmap: int) -> set[int]:
    out = set()
    v = 0
    while bitmap:
        if bitmap & 1:
            out.add(v)
        bitmap >>= 1
        v += 1
    return out


def _apic_write(guest: GuestCpu, x2apic: bool, reg: int, val: int) -> None:
    if x2apic:
        guest.push("msr", APIC_BASE_MSR + (reg >> 4), val)
    else:
        guest.push("apic", reg, val)


def _outcome_of(vcpu: KvmVcpu) -> VcpuOutcome:
    irr, isr = lapic_state(vcpu)
    apic = vcpu.arch.apic
    assert apic is not None
    return VcpuOutcome(vectors=list(vcpu.guest.vectors), irr=irr, isr=isr,
                       tmr=_vectors(apic.tmr), rflags_if=vcpu.arch.rflags_if, tpr=apic.tpr,
                       sw_enabled=apic.sw_enabled)


def ioapic_state(kvm: Kvm) -> IoapicOutcome | None:
    """The IOAPIC's pending pins (as KVM_GET_IRQCHIP reports irr) and remote-IRR pins."""
    if kvm.arch.vioapic is None:
        return None
    state = kvm_get_ioapic(kvm)
    remote = {pin for pin, bits in enumerate(state.redirtbl) if bits >> 14 & 1}
    return IoapicOutcome(irr=_vectors(state.irr), remote_irr=remote)


def _route(r: Any) -> Route:
    if r.type == "irqchip":
        return IrqchipRoute(r.gsi, KVM_IRQCHIP_IOAPIC, r.pin)
    return MsiRoute(r.gsi, r.address & 0xFFFFFFFF, r.data, r.address >> 32)


def _redirection_entry(step: IoapicStep) -> int:
    """The 64-bit redirection entry an ``ioapic`` step writes."""
    dm = IOAPIC_LOWEST_PRIORITY if step.delivery == "lowest" else 0
    return (step.vector | dm << 8 | int(step.dest_mode == "logical") << 11
            | int(step.trigger == "level") << 15 | int(step.mask) << 16 | step.dest << 56)


def _ioapic_write(guest: GuestCpu, base: int, pin: int, entry: int) -> None:
    """The guest's ioapic_write_entry: the high half, then the low half (which carries
    the mask bit), each as an IOREGSEL write and an IOWIN write."""
    for reg, val in ((0x11 + 2 * pin, entry >> 32), (0x10 + 2 * pin, entry & 0xFFFFFFFF)):
        guest.push("mmio", base + IOAPIC_REG_SELECT, reg)
        guest.push("mmio", base + IOAPIC_REG_WINDOW, val)


async def _run(rt: Runtime, sc: Any, apicv: bool) -> Outcome:
    topo = sc.topology
    x2apic = topo.apic_mode == "x2apic"
    kvm = await build_vm(rt, nr_vcpus=topo.vcpus, apicv=apicv, x2apic=x2apic,
                         eoi_auto=topo.eoi == "auto", toggles=frozenset(sc.toggles),
                         irqchip=sc.irqchip_mode())
    routes = {r.gsi: _route(r) for r in sc.routes}
    await kvm_set_irq_routing_sync(kvm, list(routes.values()))
    efds: dict[str, tuple[EventfdCtx, int]] = {}
    resamplefds: dict[str, EventfdCtx] = {}
    irqfd_flags: dict[str, int] = {}
    for fd in sc.irqfds:
        ctx = vmm_eventfd(rt, fd.name, kvm.toggles)
        efds[fd.name] = (ctx, fd.gsi)
        irqfd_flags[fd.name] = 0
        if fd.resample:
            rctx = eventfd_ctx_create(rt, name=f"{fd.name}.resample")
            assert isinstance(rctx, EventfdCtx)
            resamplefds[fd.name] = rctx
            irqfd_flags[fd.name] = KVM_IRQFD_FLAG_RESAMPLE
        if fd.assign:
            await kvm_irqfd_assign(kvm, ctx, fd.gsi, irqfd_flags[fd.name],
                                   resamplefds.get(fd.name))
    start_vcpus(rt, kvm)
    await rt.wait_quiescent()
    # The APIC-map oracle runs at every quiescent point (bugs #10, #11).
    checkpoint_diffs: list[str] = [f"setup: {d}" for d in apic_map_diffs(kvm)]
    for i, step in enumerate(sc.steps):
        do = step.do
        guest: GuestCpu | None = None
        if hasattr(step, "vcpu") and do != "expect":
            guest = kvm.vcpus[step.vcpu].guest
        if do == "signal":
            ctx, _ = efds[step.irqfd]
            for _ in range(step.count):
                saved = rt.cur_irq
                rt.cur_irq = rt.next_irq_id()
                eventfd_signal(ctx, 1)
                rt.cur_irq = saved
        elif do == "msi":
            kvm_send_userspace_msi(kvm, step.address & 0xFFFFFFFF, step.data,
                                   step.address >> 32)
        elif do == "assign":
            ctx, gsi = efds[step.irqfd]
            await kvm_irqfd_assign(kvm, ctx, gsi, irqfd_flags[step.irqfd],
                                   resamplefds.get(step.irqfd))
        elif do == "deassign":
            ctx, gsi = efds[step.irqfd]
            await kvm_irqfd_deassign(kvm, ctx, gsi)
        elif do == "route":
            routes[step.gsi] = _route(step)
            await kvm_set_irq_routing_sync(kvm, list(routes.values()))
        elif do == "line":
            kvm_vm_ioctl_irq_line(kvm, step.gsi, step.level)
        elif do == "wait":
            await rt.sleep_ns(step.ns)
        elif do == "expect":
            vcpu = kvm.vcpus[step.vcpu]
            where = f"steps[{i}] (expect)"
            checkpoint_diffs += compare_vcpu(f"{where} vcpu {step.vcpu}",
                                             _outcome_of(vcpu), step.vectors,
                                             irr=step.irr, isr=step.isr, tmr=step.tmr)
            if step.resamples is not None:
                checkpoint_diffs += compare_resamples(where, _resamples(resamplefds),
                                                      dict(step.resamples))
            checkpoint_diffs += compare_ioapic(where, ioapic_state(kvm), step.ioapic_irr,
                                               step.remote_irr)
        else:
            assert guest is not None
            if do == "cli":
                guest.push("cli")
            elif do == "sti":
                guest.push("sti")
            elif do == "eoi":
                guest.push("eoi")
            elif do == "halt":
                guest.push("hlt")
            elif do == "tpr":
                guest.push("tpr", step.value)
            elif do == "ipi":
                if x2apic:
                    guest.push("msr", APIC_BASE_MSR + (APIC_ICR >> 4), step.icr)
                else:
                    guest.push("apic", APIC_ICR, step.icr)
            elif do == "ioapic":
                _ioapic_write(guest, kvm.arch.vioapic.base_address, step.pin,
                              _redirection_entry(step))
            elif do == "apic":
                for reg, val in ((APIC_ID, step.id), (APIC_DFR, step.dfr),
                                 (APIC_LDR, step.ldr), (APIC_SPIV, step.svr)):
                    if val is not None:
                        _apic_write(guest, x2apic, reg, val)
            else:  # pragma: no cover - the format rejects unknown steps
                raise ValueError(f"steps[{i}].do: unknown step {do!r}")
        await rt.wait_quiescent()
        checkpoint_diffs += [f"steps[{i}] ({do}): {d}" for d in apic_map_diffs(kvm)]
        if guest is not None and guest.actions and not guest.idle_halted:
            # The vCPU is halted (or spinning) with this step not yet run and nothing left
            # to wake it: the scenario ends here (FORMAT.md "waits on a vCPU that stays
            # halted").
            break
    return Outcome([_outcome_of(v) for v in kvm.vcpus], checkpoint_diffs,
                   _resamples(resamplefds), ioapic_state(kvm))


def _resamples(resamplefds: dict[str, EventfdCtx]) -> dict[str, int]:
    """How often each resamplefd was signalled (nobody reads them: their counts)."""
    return {name: ctx.count for name, ctx in resamplefds.items()}


def run_scenario(sc: Any, *, apicv: bool, seed: int = 0,
                 policy: PreemptPolicy | None = None,
                 sinks: tuple[EventSink, ...] = ()) -> Outcome:
    """Run ``sc`` once (APICv on or off) and return the guest-visible outcome; ``sinks``
    receive every event of the run."""
    rt = Runtime(seed=seed, policy=policy)
    for sink in sinks:
        rt.bus.subscribe(sink)
    return rt.run(_run, rt, sc, apicv)
