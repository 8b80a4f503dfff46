"""The in-kernel IOAPIC half of the /dev/kvm harness (stdlib only, beside kvmctl.py):
IRQCHIP routes, KVM_GET_IRQCHIP / KVM_SET_IRQCHIP of the IOAPIC, KVM_IRQ_LINE_STATUS,
resampling irqfds and a split-irqchip VM (KVM_CAP_SPLIT_IRQCHIP).

Structures from include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

import kvmctl as k

KVM_IOAPIC_NUM_PINS = 24
KVM_IRQCHIP_IOAPIC = 2
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_CAP_SPLIT_IRQCHIP = 121


class kvm_ioapic_state(ctypes.Structure):
    _fields_ = [
        ("base_address", ctypes.c_uint64),
        ("ioregsel", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("irr", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("redirtbl", ctypes.c_uint64 * KVM_IOAPIC_NUM_PINS),
    ]


class _kvm_irqchip_u(ctypes.Union):
    _fields_ = [("dummy", ctypes.c_uint8 * 512), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("chip", _kvm_irqchip_u)]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", ctypes.c_int32), ("level", ctypes.c_uint32)]  # irq / status union


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", ctypes.c_uint32), ("pin", ctypes.c_uint32)]


class _kvm_irq_routing_entry_u(ctypes.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", k.kvm_irq_routing_msi),
                ("pad", ctypes.c_uint32 * 8)]


class kvm_irq_routing_entry(ctypes.Structure):
    _fields_ = [("gsi", ctypes.c_uint32), ("type", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("u", _kvm_irq_routing_entry_u)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("args", ctypes.c_uint64 * 4), ("pad", ctypes.c_uint8 * 64)]


assert ctypes.sizeof(kvm_irqchip) == 520
assert ctypes.sizeof(kvm_irq_routing_entry) == 48
assert ctypes.sizeof(kvm_enable_cap) == 104

KVM_GET_IRQCHIP = k._IOWR(k.KVMIO, 0x62, ctypes.sizeof(kvm_irqchip))
KVM_SET_IRQCHIP = k._IOR(k.KVMIO, 0x63, ctypes.sizeof(kvm_irqchip))
KVM_IRQ_LINE_STATUS = k._IOWR(k.KVMIO, 0x67, ctypes.sizeof(kvm_irq_level))
KVM_ENABLE_CAP = k._IOW(k.KVMIO, 0xA3, ctypes.sizeof(kvm_enable_cap))


@dataclass(frozen=True)
class Route:
    """One routing entry: an IOAPIC pin, or an MSI (address_lo, data)."""

    gsi: int
    pin: int | None = None
    address_lo: int = 0
    data: int = 0


def set_routing(vm: k.Vm, routes: list[Route]) -> int:
    """KVM_SET_GSI_ROUTING with IRQCHIP (IOAPIC) and MSI entries: 0 or -errno."""
    n = len(routes)
    size = ctypes.sizeof(k.kvm_irq_routing_header) + n * ctypes.sizeof(kvm_irq_routing_entry)
    buf = ctypes.create_string_buffer(size)
    header = k.kvm_irq_routing_header.from_buffer(buf)
    header.nr = n
    off = ctypes.sizeof(k.kvm_irq_routing_header)
    for r in routes:
        e = kvm_irq_routing_entry.from_buffer(buf, off)
        e.gsi = r.gsi
        if r.pin is not None:
            e.type = KVM_IRQ_ROUTING_IRQCHIP
            e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC
            e.u.irqchip.pin = r.pin
        else:
            e.type = k.KVM_IRQ_ROUTING_MSI
            e.u.msi.address_lo = r.address_lo
            e.u.msi.data = r.data
        del e
        off += ctypes.sizeof(kvm_irq_routing_entry)
    del header
    try:
        k._ioctl(vm.fd, k.KVM_SET_GSI_ROUTING, buf)
    except OSError as ex:
        return -(ex.errno or errno.EIO)
    return 0


def get_ioapic(vm: k.Vm) -> kvm_ioapic_state:
    """KVM_GET_IRQCHIP of the IOAPIC (irr hides delivered edge pins)."""
    chip = kvm_irqchip(chip_id=KVM_IRQCHIP_IOAPIC)
    k._ioctl(vm.fd, KVM_GET_IRQCHIP, chip)
    state = kvm_ioapic_state()
    ctypes.memmove(ctypes.byref(state), ctypes.byref(chip.chip.ioapic),
                   ctypes.sizeof(state))
    return state


def set_ioapic(vm: k.Vm, state: kvm_ioapic_state) -> None:
    """KVM_SET_IRQCHIP of the IOAPIC (raises the pins ``state.irr`` names)."""
    chip = kvm_irqchip(chip_id=KVM_IRQCHIP_IOAPIC)
    ctypes.memmove(ctypes.byref(chip.chip.ioapic), ctypes.byref(state), ctypes.sizeof(state))
    k._ioctl(vm.fd, KVM_SET_IRQCHIP, chip)


def set_entry(vm: k.Vm, pin: int, entry: int) -> None:
    """Read-modify-write one redirection entry (remote IRR and irr as KVM keeps them)."""
    state = get_ioapic(vm)
    state.redirtbl[pin] = entry
    set_ioapic(vm, state)


def irq_line_status(vm: k.Vm, gsi: int, level: int) -> int:
    """KVM_IRQ_LINE_STATUS: kvm_set_irq's result (>0 delivered, 0 coalesced, <0 ignored)."""
    arg = kvm_irq_level(irq=gsi, level=level)
    k._ioctl(vm.fd, KVM_IRQ_LINE_STATUS, arg)
    return int(arg.irq)


def irqfd_resample(vm: k.Vm, efd: int, gsi: int, resamplefd: int) -> int:
    """KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE: 0 or -errno."""
    arg = k.kvm_irqfd(fd=efd, gsi=gsi, flags=KVM_IRQFD_FLAG_RESAMPLE, resamplefd=resamplefd)
    try:
        return k._ioctl(vm.fd, k.KVM_IRQFD, arg)
    except OSError as ex:
        return -(ex.errno or errno.EIO)


def eventfd_count(efd: int) -> int:
    """Read (and so reset) a non-blocking eventfd's counter; 0 when it is zero."""
    try:
        return os.eventfd_read(efd)
    except BlockingIOError:
        return 0


def create_split_vm(nr_vcpus: int) -> k.Vm:
    """A VM with KVM_CAP_SPLIT_IRQCHIP (24 reserved pins) instead of KVM_CREATE_IRQCHIP."""
    kvm_fd = k.open_kvm()
    try:
        vm_fd = k._ioctl(kvm_fd, k.KVM_CREATE_VM, 0)
    except OSError as ex:
        os.close(kvm_fd)
        raise k.KvmUnavailable(f"KVM_CREATE_VM failed: {ex}") from ex
    vm = k.Vm(kvm_fd, vm_fd)
    try:
        cap = kvm_enable_cap(cap=KVM_CAP_SPLIT_IRQCHIP)
        cap.args[0] = KVM_IOAPIC_NUM_PINS
        k._ioctl(vm_fd, KVM_ENABLE_CAP, cap)
        for i in range(nr_vcpus):
            vm.create_vcpu(i)
    except OSError as ex:
        vm.close()
        raise k.KvmUnavailable(f"split-irqchip setup failed: {ex}") from ex
    return vm


def pins(bitmap: int) -> set[int]:
    return {p for p in range(KVM_IOAPIC_NUM_PINS) if bitmap >> p & 1}


def remote_irr_pins(state: kvm_ioapic_state) -> set[int]:
    return {p for p in range(KVM_IOAPIC_NUM_PINS) if state.redirtbl[p] >> 14 & 1}
