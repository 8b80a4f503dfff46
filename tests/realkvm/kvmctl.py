"""A tiny stdlib-only /dev/kvm ioctl harness for differential tests against the real KVM.

Mirrors the userspace side of the KVM API (include/uapi/linux/kvm.h): a VM with the full
in-kernel irqchip, vCPUs that are created but never run, the LAPIC register page
(KVM_GET_LAPIC / KVM_SET_LAPIC), KVM_SIGNAL_MSI, KVM_SET_GSI_ROUTING (MSI routes) and
KVM_IRQFD. A vCPU that never runs never acknowledges anything, so after a sequence of
MSIs its IRR/ISR/TMR are a deterministic, observable result of routing, destination decode,
APIC enable state and coalescing.

Only `fcntl.ioctl`, `ctypes` and `os` are used. `open_kvm()` raises `KvmUnavailable` when
/dev/kvm is missing or unusable, so test modules can skip cleanly.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# --- ioctl number encoding (include/uapi/asm-generic/ioctl.h) -------------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    return ((direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)
            | (size << _IOC_SIZESHIFT))


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, typ, nr, size)


def _IOW(typ: int, nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, typ, nr, size)


def _IOWR(typ: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, size)


# --- uapi structs (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h) ----------------

KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_uint8 * KVM_APIC_REG_SIZE)]


class kvm_msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", ctypes.c_uint32),
        ("address_hi", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("devid", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 12),
    ]


class kvm_irq_routing_msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", ctypes.c_uint32),
        ("address_hi", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("devid", ctypes.c_uint32),
    ]


class _kvm_irq_routing_entry_u(ctypes.Union):
    _fields_ = [("msi", kvm_irq_routing_msi), ("pad", ctypes.c_uint32 * 8)]


class kvm_irq_routing_entry(ctypes.Structure):
    _fields_ = [
        ("gsi", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("u", _kvm_irq_routing_entry_u),
    ]


class kvm_irq_routing_header(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("gsi", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resamplefd", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 16),
    ]


assert ctypes.sizeof(kvm_lapic_state) == 1024
assert ctypes.sizeof(kvm_msi) == 32
assert ctypes.sizeof(kvm_irq_routing_entry) == 48
assert ctypes.sizeof(kvm_irq_routing_header) == 8
assert ctypes.sizeof(kvm_irqfd) == 32

KVMIO = 0xAE
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, ctypes.sizeof(kvm_irq_routing_header))
KVM_IRQFD = _IOW(KVMIO, 0x76, ctypes.sizeof(kvm_irqfd))
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, ctypes.sizeof(kvm_lapic_state))
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, ctypes.sizeof(kvm_lapic_state))
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, ctypes.sizeof(kvm_msi))

KVM_API_VERSION = 12
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0

# --- APIC register page offsets (arch/x86/include/asm/apicdef.h) -----------------------------

APIC_ID = 0x20
APIC_LVR = 0x30
APIC_TASKPRI = 0x80
APIC_PROCPRI = 0xA0
APIC_LDR = 0xD0
APIC_DFR = 0xE0
APIC_SPIV = 0xF0
APIC_ISR = 0x100
APIC_TMR = 0x180
APIC_IRR = 0x200
APIC_SPIV_APIC_ENABLED = 1 << 8
APIC_DFR_FLAT = 0xFFFFFFFF
APIC_DFR_CLUSTER = 0x0FFFFFFF

MSI_ADDR_BASE = 0xFEE00000
MSI_ADDR_DEST_MODE_LOGICAL = 1 << 2
MSI_ADDR_REDIR_HINT = 1 << 3
MSI_DATA_DM_FIXED = 0 << 8
MSI_DATA_DM_LOWEST = 1 << 8
MSI_DATA_LEVEL_ASSERT = 1 << 14
MSI_DATA_TRIGGER_LEVEL = 1 << 15


class KvmUnavailable(RuntimeError):
    """/dev/kvm is absent, not openable, or refuses the ioctls this harness needs."""


def msi_address(dest_id: int, logical: bool = False, redir_hint: bool = False) -> int:
    """The x86 MSI address_lo for an 8-bit destination ID (arch/x86/include/asm/msi.h)."""
    addr = MSI_ADDR_BASE | ((dest_id & 0xFF) << 12)
    if logical:
        addr |= MSI_ADDR_DEST_MODE_LOGICAL
    if redir_hint:
        addr |= MSI_ADDR_REDIR_HINT
    return addr


def msi_data(vector: int, lowest: bool = False, level: bool = False,
             assert_bit: bool = False) -> int:
    """The x86 MSI data word: vector, delivery mode (Fixed/Lowest), trigger, level bit."""
    data = vector & 0xFF
    if lowest:
        data |= MSI_DATA_DM_LOWEST
    if assert_bit:
        data |= MSI_DATA_LEVEL_ASSERT
    if level:
        data |= MSI_DATA_TRIGGER_LEVEL
    return data


def _ioctl(fd: int, req: int, arg: int | ctypes.Structure | ctypes.Array[ctypes.c_char]
           = 0) -> int:
    return fcntl.ioctl(fd, req, arg)


def _bitmap(regs: bytes | bytearray, base: int) -> int:
    """Eight 32-bit registers 16 bytes apart → one 256-bit int (bit v = vector v)."""
    value = 0
    for i in range(8):
        word = int.from_bytes(regs[base + 16 * i: base + 16 * i + 4], "little")
        value |= word << (32 * i)
    return value


def vectors(bitmap: int) -> set[int]:
    """The set bits of a 256-bit vector bitmap."""
    return {v for v in range(256) if bitmap >> v & 1}


@dataclass
class Vcpu:
    """A created, never-run vCPU and its fd."""

    vm: Vm
    vcpu_id: int
    fd: int

    def get_lapic(self) -> bytearray:
        """KVM_GET_LAPIC: the 1024-byte register page."""
        state = kvm_lapic_state()
        _ioctl(self.fd, KVM_GET_LAPIC, state)
        return bytearray(bytes(state.regs))

    def set_lapic(self, regs: bytes | bytearray) -> None:
        """KVM_SET_LAPIC with a full register page."""
        if len(regs) != KVM_APIC_REG_SIZE:
            raise ValueError(f"LAPIC page must be {KVM_APIC_REG_SIZE} bytes, got {len(regs)}")
        state = kvm_lapic_state()
        ctypes.memmove(state.regs, bytes(regs), KVM_APIC_REG_SIZE)
        _ioctl(self.fd, KVM_SET_LAPIC, state)

    def reg(self, off: int) -> int:
        """Read the 32-bit LAPIC register at page offset `off`."""
        return int.from_bytes(self.get_lapic()[off: off + 4], "little")

    def set_reg(self, off: int, val: int) -> None:
        """Read-modify-write one 32-bit register through KVM_GET_LAPIC / KVM_SET_LAPIC."""
        regs = self.get_lapic()
        regs[off: off + 4] = (val & 0xFFFFFFFF).to_bytes(4, "little")
        self.set_lapic(regs)

    def irr(self) -> int:
        return _bitmap(self.get_lapic(), APIC_IRR)

    def isr(self) -> int:
        return _bitmap(self.get_lapic(), APIC_ISR)

    def tmr(self) -> int:
        return _bitmap(self.get_lapic(), APIC_TMR)


@dataclass
class Vm:
    """A VM with the full in-kernel irqchip and `nr_vcpus` never-run vCPUs."""

    kvm_fd: int
    fd: int
    vcpus: list[Vcpu] = field(default_factory=list)
    routes: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    _closed: bool = False

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = _ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id)
        vcpu = Vcpu(self, vcpu_id, fd)
        self.vcpus.append(vcpu)
        return vcpu

    def signal_msi(self, address_lo: int, data: int, address_hi: int = 0) -> int:
        """KVM_SIGNAL_MSI: returns the ioctl's result (>0 delivered count, 0, or -errno)."""
        m = kvm_msi(address_lo=address_lo, address_hi=address_hi, data=data)
        try:
            return _ioctl(self.fd, KVM_SIGNAL_MSI, m)
        except OSError as e:
            return -(e.errno or errno.EIO)

    def set_gsi_routing(self, routes: dict[int, tuple[int, int, int]]) -> None:
        """KVM_SET_GSI_ROUTING with MSI entries {gsi: (address_lo, address_hi, data)}.

        Replaces the whole table (including the irqchip's default routes).
        """
        n = len(routes)
        size = ctypes.sizeof(kvm_irq_routing_header) + n * ctypes.sizeof(kvm_irq_routing_entry)
        buf = ctypes.create_string_buffer(size)
        header = kvm_irq_routing_header.from_buffer(buf)
        header.nr = n
        header.flags = 0
        off = ctypes.sizeof(kvm_irq_routing_header)
        for gsi in sorted(routes):
            lo, hi, data = routes[gsi]
            e = kvm_irq_routing_entry.from_buffer(buf, off)
            e.gsi = gsi
            e.type = KVM_IRQ_ROUTING_MSI
            e.u.msi.address_lo = lo
            e.u.msi.address_hi = hi
            e.u.msi.data = data
            off += ctypes.sizeof(kvm_irq_routing_entry)
        del header, e  # release buffer exports before the ioctl
        _ioctl(self.fd, KVM_SET_GSI_ROUTING, buf)
        self.routes = dict(routes)

    def route_msi(self, gsi: int, address_lo: int, data: int, address_hi: int = 0) -> None:
        """Add or replace the MSI route of `gsi`, keeping the other routes set so far."""
        routes = dict(self.routes)
        routes[gsi] = (address_lo, address_hi, data)
        self.set_gsi_routing(routes)

    def irqfd(self, efd: int, gsi: int, flags: int = 0) -> int:
        """KVM_IRQFD: 0 or -errno."""
        arg = kvm_irqfd(fd=efd, gsi=gsi, flags=flags)
        try:
            return _ioctl(self.fd, KVM_IRQFD, arg)
        except OSError as e:
            return -(e.errno or errno.EIO)

    def irqfd_assign(self, efd: int, gsi: int) -> int:
        return self.irqfd(efd, gsi)

    def irqfd_deassign(self, efd: int, gsi: int) -> int:
        return self.irqfd(efd, gsi, KVM_IRQFD_FLAG_DEASSIGN)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for v in self.vcpus:
            os.close(v.fd)
        os.close(self.fd)
        os.close(self.kvm_fd)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_kvm() -> int:
    """Open /dev/kvm and check KVM_GET_API_VERSION; `KvmUnavailable` if that fails."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise KvmUnavailable(f"cannot open /dev/kvm: {e}") from e
    try:
        version = _ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        os.close(fd)
        raise KvmUnavailable(f"KVM_GET_API_VERSION failed: {e}") from e
    if version != KVM_API_VERSION:
        os.close(fd)
        raise KvmUnavailable(f"KVM API version {version}, expected {KVM_API_VERSION}")
    return fd


def create_vm(nr_vcpus: int, enable: bool = True) -> Vm:
    """A VM with KVM_CREATE_IRQCHIP and vCPUs 0..nr_vcpus-1 (APIC ID = vCPU id).

    After creation the LAPIC is hardware-enabled but software-disabled (SVR 0xFF); with
    `enable` every vCPU gets SVR = 0x1FF, as a guest would write.
    Raises `KvmUnavailable` if any of these ioctls fails.
    """
    kvm_fd = open_kvm()
    try:
        vm_fd = _ioctl(kvm_fd, KVM_CREATE_VM, 0)
    except OSError as e:
        os.close(kvm_fd)
        raise KvmUnavailable(f"KVM_CREATE_VM failed: {e}") from e
    vm = Vm(kvm_fd, vm_fd)
    try:
        _ioctl(vm_fd, KVM_CREATE_IRQCHIP)
        for i in range(nr_vcpus):
            vm.create_vcpu(i)
        if enable:
            for v in vm.vcpus:
                v.set_reg(APIC_SPIV, 0x1FF)
    except OSError as e:
        vm.close()
        raise KvmUnavailable(f"KVM setup ioctl failed: {e}") from e
    return vm


def probe() -> str | None:
    """None if the harness works on this machine, else the reason it does not."""
    try:
        vm = create_vm(1)
    except KvmUnavailable as e:
        return str(e)
    try:
        vm.vcpus[0].get_lapic()
        vm.signal_msi(msi_address(0), msi_data(0x40))
    except OSError as e:
        return f"KVM LAPIC/MSI ioctls failed: {errno.errorcode.get(e.errno or 0, e.errno)}"
    finally:
        vm.close()
    return None


def kernel_version() -> tuple[int, int]:
    """The running kernel's (major, minor) from uname, (0, 0) if its release says none."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def poll_until(pred: Callable[[], bool], timeout_s: float = 0.1) -> bool:
    """Re-evaluate `pred` until it holds or `timeout_s` passes (for workqueue injections)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


def settle(read: Callable[[], object], quiet_s: float = 0.02, timeout_s: float = 0.1) -> None:
    """Wait until `read()` has not changed for `quiet_s` (bounded by `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    last = read()
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.002)
        cur = read()
        if cur != last:
            last = cur
            stable_since = time.monotonic()
        elif time.monotonic() - stable_since >= quiet_s:
            return


def irr(vcpu: Vcpu) -> set[int]:
    return vectors(vcpu.irr())


def isr(vcpu: Vcpu) -> set[int]:
    return vectors(vcpu.isr())


def tmr(vcpu: Vcpu) -> set[int]:
    return vectors(vcpu.tmr())


def set_reg(vcpu: Vcpu, off: int, val: int) -> None:
    vcpu.set_reg(off, val)


def msi(vm: Vm, address: int, data: int) -> int:
    return vm.signal_msi(address, data)


def route_msi(vm: Vm, gsi: int, addr: int, data: int) -> None:
    vm.route_msi(gsi, addr, data)


def irqfd_assign(vm: Vm, efd: int, gsi: int) -> int:
    return vm.irqfd_assign(efd, gsi)


def irqfd_deassign(vm: Vm, efd: int, gsi: int) -> int:
    return vm.irqfd_deassign(efd, gsi)


def irr_all(vm: Vm) -> list[set[int]]:
    return [irr(v) for v in vm.vcpus]


def snapshot(vm: Vm, vcpus: Iterable[Vcpu] | None = None) -> list[tuple[int, int, int]]:
    """(IRR, ISR, TMR) bitmaps per vCPU."""
    out = []
    for v in vm.vcpus if vcpus is None else vcpus:
        regs = bytes(v.get_lapic())
        out.append((_bitmap(regs, APIC_IRR), _bitmap(regs, APIC_ISR), _bitmap(regs, APIC_TMR)))
    return out
