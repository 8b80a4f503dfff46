"""Unit tests of the KVM I/O bus (virt/kvm/kvm_main.c: kvm_io_bus_register_dev,
kvm_io_bus_write): ranges in kvm_io_bus_cmp order, the in-kernel IOAPIC and ioeventfds
side by side on one VM's bus."""

from __future__ import annotations

import errno
import functools

from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create
from vkick.kvm.eventfd import KvmIoeventfd
from vkick.kvm.ioapic import IOAPIC_DEFAULT_BASE_ADDRESS, IOAPIC_REG_SELECT, KvmIoapic
from vkick.kvm.kvm_host import Kvm
from vkick.kvm.kvm_main_io import kvm_io_bus_register_dev, kvm_io_bus_write
from vkick.runtime.tasks import Runtime
from vkick.scenario.runner import build_vm


def _vm(rt: Runtime, irqchip: str = "kernel") -> Kvm:
    """A one-vCPU VM whose vCPU thread is not running."""
    kvm: Kvm = rt.call(functools.partial(build_vm, rt, nr_vcpus=1, apicv=True, x2apic=False,
                                         eoi_auto=True, irqchip=irqchip))
    return kvm


def _efd(rt: Runtime, name: str) -> EventfdCtx:
    ctx = eventfd_ctx_create(rt, name=name)
    assert isinstance(ctx, EventfdCtx)
    return ctx


def test_kvm_io_bus_write_reaches_the_ioapic_and_an_ioeventfd_on_one_bus(rt: Runtime) -> None:
    """KVM_CREATE_IRQCHIP puts the IOAPIC on the bus (kvm_ioapic_init) and a later ioeventfd
    joins it: each write goes to the device whose range holds it, neither is lost."""
    kvm = _vm(rt)
    ioapic: KvmIoapic = kvm.arch.vioapic
    ctx = _efd(rt, "kick")
    assert kvm_io_bus_register_dev(kvm, 0xFE00_0000, 0, KvmIoeventfd(0xFE00_0000, ctx)) == 0
    vcpu = kvm.vcpus[0]
    assert kvm_io_bus_write(vcpu, IOAPIC_DEFAULT_BASE_ADDRESS + IOAPIC_REG_SELECT, 4, 0x12) == 0
    assert ioapic.ioregsel == 0x12
    assert kvm_io_bus_write(vcpu, 0xFE00_0000, 4, 1) == 0
    assert ctx.count == 1
    assert kvm_io_bus_write(vcpu, 0xFE00_0004, 4, 1) == -errno.EOPNOTSUPP  # no device there
    assert ctx.count == 1


def test_kvm_io_bus_register_dev_keeps_the_ranges_in_kvm_io_bus_cmp_order(rt: Runtime) -> None:
    """Ranges are inserted in address order, so a write is offered to the devices at its
    address in the kernel's order: a datamatch ioeventfd that refuses passes it on."""
    kvm = _vm(rt, irqchip="split")
    a, b = _efd(rt, "a"), _efd(rt, "b")
    kvm_io_bus_register_dev(kvm, 0x2000, 4, KvmIoeventfd(0x2000, b, length=4, datamatch=5))
    kvm_io_bus_register_dev(kvm, 0x1000, 0, KvmIoeventfd(0x1000, a))
    kvm_io_bus_register_dev(kvm, 0x2000, 0, KvmIoeventfd(0x2000, a))
    assert [r.addr for r in kvm.io_bus_range] == [0x1000, 0x2000, 0x2000]
    vcpu = kvm.vcpus[0]
    assert kvm_io_bus_write(vcpu, 0x2000, 4, 5) == 0  # the datamatch one is first and takes it
    assert (a.count, b.count) == (0, 1)
    assert kvm_io_bus_write(vcpu, 0x2000, 4, 6) == 0  # refused there, taken by the next
    assert (a.count, b.count) == (1, 1)
