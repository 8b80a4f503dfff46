"""A VM with an assigned (VFIO) device: the set-up a VMM does, and a run that raises the
device's MSIs at chosen times and checks every one against the oracle.

Set-up order is the VMM's: vCPUs may already run (and halt) when the device is assigned.
``assign_device`` creates the MSI route to one vCPU, the eventfd, the KVM irqfd on it and
then binds the eventfd to the device's MSI vector (VFIO_DEVICE_SET_IRQS).  With an IOMMU
that can post and APICv on, the irq bypass then connects: the device counts as assigned
(kvm_arch_start_assignment) and its IRTE is posted to the vCPU (pi_update_irte); otherwise
the IRTE stays remapped and each MSI interrupts the host CPU the IRQ is affine to, whose
handler signals the eventfd in hardirq context.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vkick.hw.cpu import HostCosts, create_host
from vkick.hw.iommu import PciDevice, iommu_create, pci_device_actor, pci_device_create
from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create
from vkick.kvm.eventfd import kvm_irqfd_assign
from vkick.kvm.irqchip import MsiRoute, kvm_set_irq_routing_sync
from vkick.kvm.kvm_host import Kvm
from vkick.obs.invariants import InvariantChecker, Violation, pi_structural_violations
from vkick.obs.irqlife import attach
from vkick.runtime.sched import PreemptPolicy
from vkick.runtime.tasks import Runtime
from vkick.scenario.runner import build_vm, start_vcpus
from vkick.vfio.pci_intrs import VfioPciDevice, vfio_msi_enable, vfio_msi_set_vector_signal

__all__ = ["AssignedDevice", "VtdRun", "assign_device", "build_assigned_vm",
           "run_assigned_device", "start_vcpus"]

VTD_COSTS = HostCosts(vmentry_ns=100, vmexit_ns=100, ipi_latency_ns=50, wakeup_ns=200,
                      timeslice_ns=20_000)


async def build_assigned_vm(rt: Runtime, *, vcpu_cpus: Sequence[int], nr_pcpus: int,
                      apicv: bool = True, posting: bool = True,
                      toggles: frozenset[str] = frozenset(),
                      costs: HostCosts = VTD_COSTS, halt_poll_ns: int = 0) -> Kvm:
    """A host of ``nr_pcpus`` CPUs with an IOMMU (``posting``: it can post) and one VM whose
    vCPU ``i`` is pinned to ``vcpu_cpus[i]``; guests idle in HLT, EOI automatically.
    ``halt_poll_ns`` is the VM's max_halt_poll_ns (0: no halt polling, every halt sleeps)."""
    host = create_host(rt, nr_pcpus, costs)
    iommu_create(host, posting=posting)
    return await build_vm(rt, nr_vcpus=len(vcpu_cpus), apicv=apicv, x2apic=False,
                          eoi_auto=True, toggles=toggles, host=host, cpus=vcpu_cpus,
                          max_halt_poll_ns=halt_poll_ns)


@dataclass(slots=True)
class AssignedDevice:
    """What ``assign_device`` set up."""

    pdev: PciDevice
    vdev: VfioPciDevice
    eventfd: EventfdCtx
    gsi: int


async def assign_device(kvm: Kvm, *, dest_vcpu: int, vector: int, irq_cpu: int,
                        gsi: int = 1, name: str = "nic0") -> AssignedDevice:
    """Assign a one-vector device: MSI route GSI → ``dest_vcpu``/``vector`` (physical,
    fixed), eventfd, KVM_IRQFD, VFIO_DEVICE_SET_IRQS (host IRQ affine to ``irq_cpu``)."""
    rt = kvm.rt
    host = kvm.host
    pdev = pci_device_create(rt, host.iommu, name)
    vdev = vfio_msi_enable(host, pdev, irq_cpu)
    await kvm_set_irq_routing_sync(kvm, [MsiRoute(gsi, 0xFEE00000 | (dest_vcpu << 12),
                                                  vector)])
    ctx = eventfd_ctx_create(rt, name=f"{name}-msix0")
    assert isinstance(ctx, EventfdCtx)
    r = await kvm_irqfd_assign(kvm, ctx, gsi)
    assert r == 0, r
    r = vfio_msi_set_vector_signal(vdev, 0, ctx)
    assert r == 0, r
    return AssignedDevice(pdev, vdev, ctx, gsi)


@dataclass(slots=True)
class VtdRun:
    """The outcome of :func:`run_assigned_device`."""

    violations: list[Violation] = field(default_factory=list)
    structural: list[Violation] = field(default_factory=list)
    delivered: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.violations or self.structural)


def run_assigned_device(*, seed: int, msi_times: Sequence[int], vcpu_cpus: Sequence[int],
                        nr_pcpus: int, irq_cpu: int, dest_vcpu: int = 0,
                        vector: int = 0x51, posting: bool = True,
                        toggles: frozenset[str] = frozenset(),
                        policy: PreemptPolicy | None = None, stall_ns: int = 200_000,
                        settle_ns: int = 400_000, assign_at_ns: int = 0,
                        setup: Callable[[Runtime, Kvm], Awaitable[None]] | None = None,
                        record: bool = False) -> VtdRun:
    """Run one VM with an assigned device raising MSIs at ``msi_times`` (ns after the
    assignment).  ``setup`` (optional) runs once the vCPUs are started and may spawn more
    actors.  Every MSI must reach the guest within ``stall_ns`` (the §17.1 oracle); at the
    end the descriptors are checked for the structural invariants of spec §16.4."""
    rt = Runtime(seed=seed, policy=policy)
    checker = InvariantChecker(stall_ns=stall_ns)
    out = VtdRun()

    def sink(rec: dict[str, Any]) -> None:
        if rec["ev"] == "vkick_guest_irq":
            out.delivered += 1
        if record:
            out.events.append(dict(rec))

    life = attach(rt.bus, checker, sink)

    async def main() -> None:
        kvm = await build_assigned_vm(rt, vcpu_cpus=vcpu_cpus, nr_pcpus=nr_pcpus, posting=posting,
                                toggles=toggles)
        start_vcpus(rt, kvm)
        if setup is not None:
            await setup(rt, kvm)
        if assign_at_ns:
            await rt.sleep_ns(assign_at_ns)
        dev = await assign_device(kvm, dest_vcpu=dest_vcpu, vector=vector, irq_cpu=irq_cpu)
        t0 = rt.now_ns()
        await pci_device_actor(dev.pdev, 0, [t0 + t for t in msi_times])
        await rt.sleep_ns(settle_ns)
        out.structural = pi_structural_violations(kvm)

    rt.run(main)
    life.finish()
    out.violations = list(checker.violations)
    return out
