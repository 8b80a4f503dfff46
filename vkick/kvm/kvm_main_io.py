"""virt/kvm/kvm_main.c (I/O bus half): the MMIO/PIO bus that routes a guest's doorbell write
to the in-kernel device that claims it (here: ioeventfds) before userspace is asked.

Covered: kvm_io_bus_register_dev, kvm_io_bus_write.  One bus
(KVM_MMIO_BUS / KVM_PIO_BUS are not told apart); devices are kept sorted by address, as
the kernel's bsearch'd array is, so the lookup order is the kernel's.
"""

from __future__ import annotations

import bisect
import errno
from typing import Any

from vkick.kvm.eventfd import KvmIoeventfd, ioeventfd_write
from vkick.kvm.kvm_host import Kvm


def kvm_io_bus_register_dev(kvm: Kvm, dev: KvmIoeventfd) -> int:
    """virt/kvm/kvm_main.c: kvm_io_bus_register_dev — add a device at its address."""
    bus = kvm.io_bus_devs
    keys = [(d.addr, d.length) for d in bus]
    bus.insert(bisect.bisect_right(keys, (dev.addr, dev.length)), dev)
    kvm.io_bus = _write_through_bus
    return 0


def kvm_io_bus_write(vcpu: Any, addr: int, length: int, val: int) -> int:
    """virt/kvm/kvm_main.c: kvm_io_bus_write → __kvm_io_bus_write  [vCPU thread]

    Offer the write to each device registered at ``addr`` in order; 0 once one handles it,
    else -EOPNOTSUPP (the exit would go to userspace).
    """
    for dev in vcpu.kvm.io_bus_devs:  # sorted by address: the kernel's bsearch order
        if dev.addr == addr and ioeventfd_write(dev, addr, length, val) == 0:
            return 0
    return -errno.EOPNOTSUPP


def _write_through_bus(vcpu: Any, addr: int, val: int) -> None:
    kvm_io_bus_write(vcpu, addr, 2, val)
