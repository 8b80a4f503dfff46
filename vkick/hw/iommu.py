"""An Intel VT-d interrupt-remapping unit with posted interrupts, and an assigned PCI device
that raises MSIs through it (Intel Virtualization Technology for Directed I/O,
Architecture Specification, chapter 5 "Interrupt Remapping": §5.1 remapping, §5.2
"Interrupt Posting", §5.2.3 "Interrupt-Posting Hardware Operation"; chapter 9 for the
IRTE formats and the posted-interrupt descriptor).

A device's MSI in *remappable* format names an Interrupt Remapping Table Entry (IRTE).  A
*remapped* IRTE turns it into an ordinary interrupt message: a host vector to a host CPU.  A
*posted* IRTE names a posted-interrupt descriptor (PID: KVM's ``pi_desc``) and a virtual
vector: the hardware sets the vector's PIR bit and — unless notifications are suppressed —
sets ON and, if ON was clear, sends the descriptor's notification vector NV to the CPU whose
APIC ID is NDST.  That is how an assigned device interrupts a vCPU without the host.

The last section is the Linux side that owns the hardware (kernel/irq, drivers/iommu/intel,
drivers/pci/msi): host IRQ numbers and handlers, and ``irq_set_vcpu_affinity``, through
which KVM switches an IRTE between remapped and posted mode.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from vkick.hw.cpu import HwHost, PhysicalCpu, interrupt_message, send_ipi
from vkick.runtime.tasks import Runtime

IRQ_POSTING_CAP: Final = 0  # arch/x86/include/asm/irq_remapping.h: enum irq_remap_cap
FIRST_DEVICE_VECTOR: Final = 0x30  # host vectors handed to device interrupts (vkick's choice)


@dataclass(slots=True)
class Irte:
    """VT-d chapter 9: an Interrupt Remapping Table Entry, remapped (IM = 0) or posted
    (IM = 1).

    Remapped: ``dst`` (destination APIC ID) and ``vector`` (host vector).  Posted: ``pda``
    (the posted-interrupt descriptor), ``vector`` (the virtual vector to post) and
    ``urgent`` (URG: notify even when SN is set).  ``pir_ids`` and ``owner`` are vkick
    bookkeeping with no hardware meaning: where the correlation ids of posted vectors go
    (the vCPU's ``arch.pir_ids``) and which (VM, vCPU) the descriptor belongs to, for events.
    """

    present: bool = False
    posted: bool = False
    dst: int = 0
    vector: int = 0
    pda: Any = None
    urgent: bool = False
    pir_ids: dict[int, list[int]] | None = None
    owner: tuple[str, int] = ("", -1)


@dataclass(slots=True, eq=False)
class IrqDesc:
    """include/linux/irqdesc.h: struct irq_desc — one host IRQ of a device's MSI vector, as
    this path needs it: its host vector and CPU (the affinity), its IRTE, the handler
    registered with request_irq (``action``, ``dev_id``)."""

    irq: int
    vector: int
    cpu: int
    irte: int
    name: str = ""
    action: Callable[[int, Any], int] | None = None
    dev_id: Any = None


@dataclass(slots=True, eq=False)
class Iommu:
    """One VT-d remapping unit: its capability (posted interrupts supported or not), the
    interrupt remapping table, and the host IRQs allocated through it."""

    host: HwHost
    posting: bool = True  # Capability Register PI: posted interrupts supported
    irte: list[Irte] = field(default_factory=list)
    irqs: dict[int, IrqDesc] = field(default_factory=dict)
    next_vector: int = FIRST_DEVICE_VECTOR


@dataclass(slots=True, eq=False)
class PciDevice:
    """An assigned PCI function with ``nvec`` MSI(-X) vectors.  ``msi_handle[n]`` is the IRTE
    the vector's remappable-format message names (-1: not set up: the write is dropped)."""

    rt: Runtime
    name: str
    iommu: Iommu
    nvec: int = 1
    msi_handle: list[int] = field(default_factory=list)
    irqs: list[int] = field(default_factory=list)  # host IRQ per vector (pci_irq_vector)


def iommu_create(host: HwHost, *, posting: bool = True, nr_irte: int = 64) -> Iommu:
    """Fit the host with an interrupt-remapping unit (``posting``: the PI capability)."""
    iommu = Iommu(host, posting, [Irte() for _ in range(nr_irte)])
    host.iommu = iommu
    return iommu


def pci_device_create(rt: Runtime, iommu: Iommu, name: str, nvec: int = 1) -> PciDevice:
    """An assigned device behind ``iommu`` with ``nvec`` MSI vectors, none set up yet."""
    return PciDevice(rt, name, iommu, nvec, [-1] * nvec, [-1] * nvec)


# ---------------------------------------------------------------------------- the hardware


def pci_msi_raise(dev: PciDevice, n: int) -> int:
    """The device signals MSI vector ``n``: its message reaches the remapping hardware.

    Each MSI is an interrupt source with its own correlation id (the returned value),
    current while the synchronous part of its way runs (the posting, or the sending of the
    remapped message, which carries the id to the CPU that handles it).
    """
    rt = dev.rt
    irq = rt.next_irq_id()
    handle = dev.msi_handle[n] if 0 <= n < dev.nvec else -1
    entry = dev.iommu.irte[handle] if 0 <= handle < len(dev.iommu.irte) else None
    mode = ("blocked" if entry is None or not entry.present else
            "posted" if entry.posted else "remapped")
    bus = rt.bus
    saved = rt.cur_irq
    rt.cur_irq = irq
    try:
        if bus.on:
            bus.emit("vkick_device_msi", dev=dev.name, msi=n, irq=irq, mode=mode)
        if entry is not None and entry.present:
            vtd_interrupt_request(dev.iommu, entry, irq)
    finally:
        rt.cur_irq = saved
    return irq


def vtd_interrupt_request(iommu: Iommu, irte: Irte, irq: int) -> None:
    """VT-d §5.1.4 (remapped) / §5.2.3 (posted): process one remappable interrupt request.

    Remapped: an interrupt message with the IRTE's vector to the CPU whose APIC ID is its
    destination.  Posted: :func:`vtd_post_interrupt`.
    """
    if irte.posted:
        vtd_post_interrupt(iommu, irte, irq)
        return
    host = iommu.host
    cpu = irte.dst  # the modelled CPUs' APIC IDs are their numbers
    bus = host.rt.bus
    if bus.on:
        bus.emit("vkick_iommu_remap", pcpu=cpu, hvector=irte.vector, irq=irq)
    interrupt_message(host, cpu, irte.vector, irq)


def vtd_post_interrupt(iommu: Iommu, irte: Irte, irq: int) -> None:
    """VT-d §5.2.3 "Interrupt-Posting Hardware Operation"  [hardware: atomic on the PID]

    In one atomic read-modify-write of the descriptor: set PIR[vector]; X := ON clear and
    (URG set or SN clear); if X, set ON.  Then, if X, send the notification vector NV to
    the CPU NDST names (xAPIC format: APIC ID in bits 15:8).  With SN set (a preempted
    vCPU) only PIR is written: no ON, no notification — software must notice PIR itself
    (vmx_vcpu_pi_load's ON recompute, bug #5).  Unlike KVM's software posting, an already
    set PIR bit does not stop the notification.
    """
    pi = irte.pda
    vector = irte.vector
    pi.pir |= 1 << vector
    if irte.pir_ids is not None:
        ids = irte.pir_ids.get(vector)
        if ids is None:
            irte.pir_ids[vector] = [irq]
        else:
            ids.append(irq)
    notify = not pi.on and (irte.urgent or not pi.sn)
    if notify:
        pi.on = True
    host = iommu.host
    dest = (pi.ndst >> 8) & 0xFF
    bus = host.rt.bus
    if bus.on:
        bus.emit("vkick_iommu_post", vm=irte.owner[0], vcpu=irte.owner[1], vector=vector,
                 irq=irq, notify="ipi" if notify else "suppressed" if pi.sn else "none",
                 pcpu=dest, hvector=pi.nv)
    if notify and 0 <= dest < len(host.pcpus):
        send_ipi(host, dest, pi.nv, irte.owner[1], irte.owner[0])


async def pci_device_actor(dev: PciDevice, n: int, times_ns: list[int]) -> None:
    """The device raises MSI vector ``n`` at each of the emulated times ``times_ns``."""
    rt = dev.rt
    for t in sorted(times_ns):
        delay = t - rt.now_ns()
        if delay > 0:
            await rt.sleep_ns(delay)
        pci_msi_raise(dev, n)


# ---------------------------------------------------------------------------- the host side


@dataclass(slots=True)
class VcpuData:
    """arch/x86/include/asm/irq_remapping.h: struct vcpu_data — what KVM hands the IOMMU
    driver to post an IRQ to a vCPU: the descriptor and the guest vector (+ vkick's
    bookkeeping for the IRTE, see :class:`Irte`)."""

    pi_desc: Any
    vector: int
    pir_ids: dict[int, list[int]] | None = None
    owner: tuple[str, int] = ("", -1)


def irq_remapping_cap(host: HwHost, cap: int) -> bool:
    """drivers/iommu/irq_remapping.c: irq_remapping_cap  [any context]

    IRQ_POSTING_CAP: interrupt remapping is on and the hardware can post.
    """
    iommu: Iommu | None = host.iommu
    return cap == IRQ_POSTING_CAP and iommu is not None and iommu.posting


def pci_alloc_irq_vectors(dev: PciDevice, cpu: int) -> int:
    """drivers/pci/msi.c: pci_alloc_irq_vectors (MSI-X, through the remapping irq domain)
    [process]

    For each vector: a host IRQ number, a host vector on ``cpu`` (the IRQ's affinity), an
    IRTE in remapped mode pointing there, and the device's message naming that IRTE.
    Returns the number of vectors.
    Differs from the kernel: one call does what the MSI and intel-IR irq domains do at
    allocation and activation; vectors come from a simple counter.
    """
    iommu = dev.iommu
    for n in range(dev.nvec):
        index = next(i for i, e in enumerate(iommu.irte) if not e.present)
        vector = iommu.next_vector
        iommu.next_vector += 1
        iommu.irte[index] = Irte(present=True, posted=False, dst=cpu, vector=vector)
        irq = 100 + len(iommu.irqs)
        iommu.irqs[irq] = IrqDesc(irq, vector, cpu, index, f"{dev.name}-msix{n}")
        dev.msi_handle[n] = index
        dev.irqs[n] = irq
    return dev.nvec


def pci_irq_vector(dev: PciDevice, nr: int) -> int:
    """drivers/pci/msi.c: pci_irq_vector  [process] — the host IRQ of vector ``nr``."""
    return dev.irqs[nr]


def request_irq(host: HwHost, irq: int, handler: Callable[[int, Any], int], name: str,
                dev_id: Any) -> int:
    """kernel/irq/manage.c: request_irq  [process]

    Install ``handler`` for ``irq``: it runs in hardirq context on the IRQ's CPU when its
    host vector arrives there.  -EINVAL for an unknown IRQ, -EBUSY if already requested.
    """
    desc = host.iommu.irqs.get(irq) if host.iommu is not None else None
    if desc is None:
        return -errno.EINVAL
    if desc.action is not None:
        return -errno.EBUSY
    desc.action = handler
    desc.dev_id = dev_id
    desc.name = name

    def handle_irq(_pcpu: PhysicalCpu, d: IrqDesc = desc) -> None:
        if d.action is not None:
            d.action(d.irq, d.dev_id)

    host.pcpus[desc.cpu].handlers[desc.vector] = handle_irq
    return 0


def free_irq(host: HwHost, irq: int, dev_id: Any) -> None:
    """kernel/irq/manage.c: free_irq  [process] — remove what ``request_irq`` installed."""
    desc = host.iommu.irqs.get(irq) if host.iommu is not None else None
    if desc is None or desc.dev_id is not dev_id:
        return
    desc.action = None
    desc.dev_id = None
    host.pcpus[desc.cpu].handlers.pop(desc.vector, None)


def irq_set_vcpu_affinity(host: HwHost, irq: int, vcpu_info: VcpuData | None) -> int:
    """kernel/irq/manage.c: irq_set_vcpu_affinity → drivers/iommu/intel/irq_remapping.c:
    intel_ir_set_vcpu_affinity  [process]

    ``vcpu_info`` None: back to remapped mode (the IRQ's own vector and CPU).  Otherwise
    rewrite the IRTE in posted mode: descriptor and guest vector from ``vcpu_info``, URG
    clear.  -EINVAL for an unknown IRQ.
    """
    iommu: Iommu | None = host.iommu
    desc = iommu.irqs.get(irq) if iommu is not None else None
    if iommu is None or desc is None:
        return -errno.EINVAL
    if vcpu_info is None:
        iommu.irte[desc.irte] = Irte(present=True, posted=False, dst=desc.cpu,
                                     vector=desc.vector)
    else:
        iommu.irte[desc.irte] = Irte(present=True, posted=True, vector=vcpu_info.vector,
                                     pda=vcpu_info.pi_desc, urgent=False,
                                     pir_ids=vcpu_info.pir_ids, owner=vcpu_info.owner)
    return 0
