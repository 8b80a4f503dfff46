"""virt/kvm/kvm_main.c (I/O bus half): the MMIO bus that routes a guest's write to the
in-kernel device whose window holds it (ioeventfds, the IOAPIC) before userspace is asked.

Covered: kvm_io_bus_cmp, kvm_io_bus_register_dev, kvm_io_bus_get_first_dev,
__kvm_io_bus_write, kvm_io_bus_write.  One bus (KVM_MMIO_BUS, KVM_FAST_MMIO_BUS and
KVM_PIO_BUS are not told apart, so no ``bus_idx``); the ranges are kept in the kernel's
kvm_io_bus_cmp order, so devices are offered a write in the kernel's order.  Each device
struct carries its kvm_io_device_ops as the class attribute ``ops``.
"""

from __future__ import annotations

import errno
from typing import Any

from vkick.kvm.kvm_host import Kvm, KvmIoRange


def kvm_io_bus_cmp(addr1: int, len1: int, r2: KvmIoRange) -> int:
    """virt/kvm/kvm_main.c: kvm_io_bus_cmp  [any context]

    -1 / 0 / 1 as the access (``addr1``, ``len1``) lies below, inside or above ``r2``: a
    range of length 0 matches its address exactly, any other one every access it contains.
    Differs from the kernel: the first range is passed as its two fields (no key struct is
    built per access).
    """
    addr2 = r2.addr
    if addr1 < addr2:
        return -1
    if r2.len:
        addr1 += len1
        addr2 += r2.len
    if addr1 > addr2:
        return 1
    return 0


def kvm_io_bus_register_dev(kvm: Kvm, addr: int, length: int, dev: Any) -> int:
    """virt/kvm/kvm_main.c: kvm_io_bus_register_dev  [process: ioctl, slots_lock]

    Put ``dev`` on the bus at [``addr``, ``addr`` + ``length``), before the first range
    that compares above the new one (the kernel's sorted insert).  Returns 0.
    Differs from the kernel: the array is updated in place (no copy published under SRCU,
    no NR_IOBUS_DEVS limit).
    """
    bus = kvm.io_bus_range
    new = KvmIoRange(addr, length, dev)
    i = 0
    while i < len(bus) and kvm_io_bus_cmp(bus[i].addr, bus[i].len, new) <= 0:
        i += 1
    bus.insert(i, new)
    return 0


def kvm_io_bus_get_first_dev(bus: list[KvmIoRange], addr: int, length: int) -> int:
    """virt/kvm/kvm_main.c: kvm_io_bus_get_first_dev → index or -ENOENT  [vCPU thread]

    The first range in bus order that the access falls in.
    Differs from the kernel: a scan in order stands in for bsearch + the walk back to the
    first match (a handful of devices).
    """
    for i, r in enumerate(bus):
        c = kvm_io_bus_cmp(addr, length, r)
        if c == 0:
            return i
        if c < 0:
            break
    return -errno.ENOENT


def __kvm_io_bus_write(vcpu: Any, bus: list[KvmIoRange], addr: int, length: int,
                       val: int) -> int:
    """virt/kvm/kvm_main.c: __kvm_io_bus_write → index of the handling device, or
    -EOPNOTSUPP  [vCPU thread]

    Offer the write to each device whose range holds it, in bus order, until one takes it
    (kvm_iodevice_write: its ops.write returns 0).
    """
    idx = kvm_io_bus_get_first_dev(bus, addr, length)
    if idx < 0:
        return -errno.EOPNOTSUPP
    while idx < len(bus) and kvm_io_bus_cmp(addr, length, bus[idx]) == 0:
        dev = bus[idx].dev
        if not dev.ops.write(vcpu, dev, addr, length, val):  # kvm_iodevice_write
            return idx
        idx += 1
    return -errno.EOPNOTSUPP


def kvm_io_bus_write(vcpu: Any, addr: int, length: int, val: int) -> int:
    """virt/kvm/kvm_main.c: kvm_io_bus_write  [vCPU thread]

    A guest write of ``length`` bytes at ``addr``: 0 once a device on the bus handled it,
    else -EOPNOTSUPP (the exit would go to userspace).
    """
    r = __kvm_io_bus_write(vcpu, vcpu.kvm.io_bus_range, addr, length, val)
    return r if r < 0 else 0
