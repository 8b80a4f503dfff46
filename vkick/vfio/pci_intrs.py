"""drivers/vfio/pci/vfio_pci_intrs.c: a VFIO-assigned device's MSI vectors as eventfds.

The VMM binds each MSI(-X) vector to an eventfd (``VFIO_DEVICE_SET_IRQS``), which it also
hands KVM as an irqfd.  The host IRQ's handler, ``vfio_msihandler``, signals that eventfd in
hardirq context on the CPU the IRQ is affine to — the path an MSI takes when its IRTE is in
remapped mode.  Each vector is also an IRQ bypass *producer* with the eventfd as token: when
KVM's irqfd (the consumer) registers with the same token, KVM may switch the IRTE to posted
mode (VT-d posting) and the device then interrupts the vCPU without the host.

Covered: vfio_msi_enable, vfio_msi_set_vector_signal, vfio_msihandler.  Left out: INTx,
MSI (non-X) masking, the vfio_pci_device lifecycle beyond what interrupts need.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from vkick.hw.cpu import HwHost, smp_processor_id
from vkick.hw.iommu import (
    PciDevice,
    free_irq,
    pci_alloc_irq_vectors,
    pci_irq_vector,
    request_irq,
)
from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_fdget, eventfd_ctx_put, eventfd_signal
from vkick.kernel.irqbypass import (
    IrqBypassProducer,
    irq_bypass_register_producer,
    irq_bypass_unregister_producer,
)

IRQ_HANDLED = 1


@dataclass(slots=True, eq=False)
class VfioPciIrqCtx:
    """drivers/vfio/pci/vfio_pci_private.h: struct vfio_pci_irq_ctx"""

    trigger: EventfdCtx | None = None
    name: str = ""
    producer: IrqBypassProducer = field(default_factory=IrqBypassProducer)


@dataclass(slots=True, eq=False)
class VfioPciDevice:
    """drivers/vfio/pci/vfio_pci_private.h: struct vfio_pci_device (the interrupt part)."""

    host: HwHost
    pdev: PciDevice
    ctx: list[VfioPciIrqCtx] = field(default_factory=list)


def vfio_msihandler(irq: int, trigger: EventfdCtx) -> int:
    """drivers/vfio/pci/vfio_pci_intrs.c: vfio_msihandler  [hardirq on the IRQ's CPU]

    Signal the vector's eventfd: with KVM's irqfd on it, irqfd_wakeup and the whole
    injection run right here, inside the interrupt, on this CPU (spec §16.12).
    """
    rt = trigger.rt
    bus = rt.bus
    if bus.on:
        bus.emit("vfio_msihandler", pcpu=smp_processor_id(), efd=trigger.name,
                 irq=rt.cur_irq)
    eventfd_signal(trigger, 1)
    return IRQ_HANDLED


def vfio_msi_enable(host: HwHost, pdev: PciDevice, cpu: int) -> VfioPciDevice:
    """drivers/vfio/pci/vfio_pci_intrs.c: vfio_msi_enable  [process: VFIO_DEVICE_SET_IRQS]

    Allocate the device's MSI-X vectors (host IRQs affine to ``cpu``, IRTEs in remapped
    mode) and one context per vector, none bound to an eventfd yet.
    Differs from the kernel: the IRQ affinity is given here (the kernel's comes from
    irqbalance or /proc/irq/N/smp_affinity).
    """
    pci_alloc_irq_vectors(pdev, cpu)
    return VfioPciDevice(host, pdev, [VfioPciIrqCtx() for _ in range(pdev.nvec)])


def vfio_msi_set_vector_signal(vdev: VfioPciDevice, vector: int,
                               trigger: EventfdCtx | None) -> int:
    """drivers/vfio/pci/vfio_pci_intrs.c: vfio_msi_set_vector_signal  [process]

    Unbind the vector's old eventfd (unregister the bypass producer, free the IRQ, drop the
    reference); with a new one (``trigger``, the kernel's fd): look it up and take a
    reference (eventfd_ctx_fdget: -EBADF if the fd is closed), request the IRQ with
    vfio_msihandler, and register the bypass producer (token = the eventfd, ``irq`` = the
    host IRQ) — which, if KVM's irqfd is already there, connects at once.
    """
    if not 0 <= vector < len(vdev.ctx):
        return -errno.EINVAL
    host = vdev.host
    rt = vdev.pdev.rt
    ctx = vdev.ctx[vector]
    irq = pci_irq_vector(vdev.pdev, vector)
    if ctx.trigger is not None:
        irq_bypass_unregister_producer(rt, ctx.producer)
        free_irq(host, irq, ctx.trigger)
        eventfd_ctx_put(ctx.trigger)
        ctx.trigger = None
    if trigger is None:
        return 0
    ctx.name = f"vfio-msix[{vector}]({vdev.pdev.name})"
    r = eventfd_ctx_fdget(trigger)
    if isinstance(r, int):  # the fd is closed: -EBADF
        return r
    ret = request_irq(host, irq, vfio_msihandler, ctx.name, trigger)
    if ret:
        eventfd_ctx_put(trigger)
        return ret
    ctx.producer = IrqBypassProducer(token=trigger, irq=irq)
    if irq_bypass_register_producer(rt, ctx.producer):
        ctx.producer.token = None
    ctx.trigger = trigger
    return 0
