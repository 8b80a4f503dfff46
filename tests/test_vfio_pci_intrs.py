"""VFIO MSI-X vectors bound to eventfds (vkick/vfio/pci_intrs.py)."""

from __future__ import annotations

import errno

from vkick.hw.cpu import create_host
from vkick.hw.iommu import iommu_create, pci_device_create, pci_irq_vector
from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create
from vkick.kernel.file import close_fd
from vkick.runtime.tasks import Runtime
from vkick.vfio.pci_intrs import vfio_msi_enable, vfio_msi_set_vector_signal


def test_vfio_msi_set_vector_signal_refuses_a_closed_eventfd_with_ebadf(rt: Runtime) -> None:
    """The trigger is looked up as an fd (eventfd_ctx_fdget): a closed one is -EBADF and
    binds nothing; an open one takes a context reference and requests the IRQ."""
    host = create_host(rt, 2)
    iommu = iommu_create(host)
    vdev = vfio_msi_enable(host, pci_device_create(rt, iommu, "nic0", nvec=2), 1)
    closed, live = (eventfd_ctx_create(rt, name=n) for n in ("closed", "live"))
    assert isinstance(closed, EventfdCtx) and isinstance(live, EventfdCtx)
    close_fd(closed.file)
    assert closed.kref == 0
    assert vfio_msi_set_vector_signal(vdev, 0, closed) == -errno.EBADF
    assert closed.kref == 0 and vdev.ctx[0].trigger is None
    assert iommu.irqs[pci_irq_vector(vdev.pdev, 0)].action is None
    assert vfio_msi_set_vector_signal(vdev, 1, live) == 0
    assert live.kref == 2 and vdev.ctx[1].trigger is live
    assert iommu.irqs[pci_irq_vector(vdev.pdev, 1)].dev_id is live
