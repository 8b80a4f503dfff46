"""Level-triggered interrupts on the real KVM and on vkick's model, side by side: IRQCHIP
routes, the in-kernel IOAPIC (programmed with KVM_SET_IRQCHIP), KVM_IRQ_LINE_STATUS and
resampling irqfds.

vCPUs are created but never run, so no EOI ever happens: what is compared is what is
observable without one — LAPIC IRR/TMR (KVM_GET_LAPIC), the IOAPIC's irr and remote-IRR
bits (KVM_GET_IRQCHIP), ioctl results and resamplefd counts.  Both sides must agree with
each other and with the values the v5.13 source gives (asserted literally).  The module
skips when /dev/kvm is unusable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import kvmctl as k
import kvmctl_ioapic as kio
import pytest

from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create, eventfd_signal
from vkick.kvm.eventfd import KVM_IRQFD_FLAG_RESAMPLE, kvm_irqfd_assign, kvm_irqfd_deassign
from vkick.kvm.ioapic import kvm_get_ioapic, kvm_set_ioapic
from vkick.kvm.irqchip import IrqchipRoute, MsiRoute, kvm_set_irq_routing_sync
from vkick.kvm.kvm_host import APIC_SPIV, KVM_IRQCHIP_IOAPIC, Kvm, KvmLapic
from vkick.kvm.kvm_main import kvm_create_vm, kvm_vm_ioctl_create_vcpu
from vkick.kvm.lapic import kvm_lapic_reg_write
from vkick.kvm.x86 import kvm_arch_vm_ioctl_create_irqchip, kvm_vm_ioctl_irq_line
from vkick.runtime import Runtime
from vkick.testing import call_settled

_reason = k.probe()
if _reason is not None:
    pytest.skip(f"real KVM unavailable: {_reason}", allow_module_level=True)

LEVEL = 1 << 15
MASKED = 1 << 16
Obs = tuple[list[set[int]], list[set[int]], set[int], set[int], dict[str, int]]


class Model:
    """vkick's VM driven like the real one: no vCPU task runs; after every operation the
    runtime is driven until quiescent (the irqfd kworkers have run)."""

    def __init__(self, nr_vcpus: int, irqchip: str = "kernel") -> None:
        self.rt = Runtime(seed=0)
        self.kvm: Kvm = kvm_create_vm(self.rt, "vm0", apicv=False)
        if irqchip == "kernel":
            assert kvm_arch_vm_ioctl_create_irqchip(self.kvm) == 0
        for i in range(nr_vcpus):
            self.run(kvm_vm_ioctl_create_vcpu, self.kvm, i)
            self.run(kvm_lapic_reg_write, self.apic(i), APIC_SPIV, 0x1FF)
        self.efds: dict[str, EventfdCtx] = {}
        self.seen: dict[str, int] = {}

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return call_settled(self.rt, fn, *args)

    def apic(self, i: int) -> KvmLapic:
        apic = self.kvm.vcpus[i].arch.apic
        assert apic is not None
        return apic

    def efd(self, name: str) -> EventfdCtx:
        if name not in self.efds:
            ctx = eventfd_ctx_create(self.rt, name=name)
            assert isinstance(ctx, EventfdCtx)
            self.efds[name] = ctx
        return self.efds[name]

    def routing(self, routes: list[kio.Route]) -> int:
        table = [IrqchipRoute(r.gsi, KVM_IRQCHIP_IOAPIC, r.pin) if r.pin is not None
                 else MsiRoute(r.gsi, r.address_lo, r.data) for r in routes]
        return int(self.run(kvm_set_irq_routing_sync, self.kvm, table))

    def set_entry(self, pin: int, entry: int) -> None:
        state = kvm_get_ioapic(self.kvm)
        state.redirtbl[pin] = entry
        self.run(kvm_set_ioapic, self.kvm, state)

    def line(self, gsi: int, level: int) -> int:
        return int(self.run(kvm_vm_ioctl_irq_line, self.kvm, gsi, level, True))

    def irqfd(self, name: str, gsi: int, resample: bool) -> int:
        flags = KVM_IRQFD_FLAG_RESAMPLE if resample else 0
        rfd = self.efd(f"{name}.r") if resample else None
        return int(self.run(kvm_irqfd_assign, self.kvm, self.efd(name), gsi, flags, rfd))

    def deassign(self, name: str, gsi: int) -> int:
        return int(self.run(kvm_irqfd_deassign, self.kvm, self.efd(name), gsi))

    def signal(self, name: str) -> None:
        self.run(eventfd_signal, self.efd(name), 1)

    def observe(self) -> Obs:
        irr = [_set(a.irr | v.pi_desc.pir) for v in self.kvm.vcpus
               if (a := v.arch.apic) is not None]
        tmr = [_set(self.apic(i).tmr) for i in range(len(self.kvm.vcpus))]
        state = kvm_get_ioapic(self.kvm) if self.kvm.arch.vioapic is not None else None
        pins = kio.pins(state.irr) if state else set()
        remote = ({p for p, bits in enumerate(state.redirtbl) if bits >> 14 & 1}
                  if state else set())
        counts = {}
        for name, ctx in self.efds.items():
            if name.endswith(".r"):
                counts[name] = ctx.count
        return irr, tmr, pins, remote, counts

    def close(self) -> None:
        self.rt.close()


class Real:
    """The real KVM VM (full in-kernel irqchip unless ``irqchip = "split"``)."""

    def __init__(self, nr_vcpus: int, irqchip: str = "kernel") -> None:
        if irqchip == "kernel":
            self.vm = k.create_vm(nr_vcpus)
        else:
            self.vm = kio.create_split_vm(nr_vcpus)
            for v in self.vm.vcpus:
                v.set_reg(k.APIC_SPIV, 0x1FF)
        self.efds: dict[str, int] = {}
        self.counts: dict[str, int] = {}

    def efd(self, name: str) -> int:
        if name not in self.efds:
            self.efds[name] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return self.efds[name]

    def routing(self, routes: list[kio.Route]) -> int:
        return kio.set_routing(self.vm, routes)

    def set_entry(self, pin: int, entry: int) -> None:
        kio.set_entry(self.vm, pin, entry)

    def line(self, gsi: int, level: int) -> int:
        return kio.irq_line_status(self.vm, gsi, level)

    def irqfd(self, name: str, gsi: int, resample: bool) -> int:
        if resample:
            self.counts[f"{name}.r"] = 0
            return kio.irqfd_resample(self.vm, self.efd(name), gsi, self.efd(f"{name}.r"))
        return self.vm.irqfd_assign(self.efd(name), gsi)

    def deassign(self, name: str, gsi: int) -> int:
        r = self.vm.irqfd_deassign(self.efd(name), gsi)
        self._settle()
        return r

    def signal(self, name: str) -> None:
        os.eventfd_write(self.efd(name), 1)
        self._settle()

    def _settle(self) -> None:
        k.settle(lambda: (k.irr_all(self.vm), kio.get_ioapic(self.vm).irr), quiet_s=0.02,
                 timeout_s=0.2)

    def observe(self) -> Obs:
        irr = k.irr_all(self.vm)
        tmr = [k.tmr(v) for v in self.vm.vcpus]
        state = kio.get_ioapic(self.vm)
        for name in self.counts:
            self.counts[name] += kio.eventfd_count(self.efds[name])
        return irr, tmr, kio.pins(state.irr), kio.remote_irr_pins(state), dict(self.counts)

    def close(self) -> None:
        for fd in self.efds.values():
            os.close(fd)
        self.vm.close()


def _set(bitmap: int) -> set[int]:
    return {v for v in range(256) if bitmap >> v & 1}


class Both:
    """Apply every operation to the real VM and the model; results must agree."""

    def __init__(self, nr_vcpus: int = 2, irqchip: str = "kernel") -> None:
        self.real = Real(nr_vcpus, irqchip)
        self.model = Model(nr_vcpus, irqchip)

    def __getattr__(self, op: str) -> Callable[..., Any]:
        def both(*args: Any) -> Any:
            r = getattr(self.real, op)(*args)
            m = getattr(self.model, op)(*args)
            assert r == m, f"{op}{args}: real KVM {r!r}, vkick {m!r}"
            return r

        return both

    def close(self) -> None:
        self.real.close()
        self.model.close()


@pytest.fixture
def vm() -> Iterator[Both]:
    both = Both()
    yield both
    both.close()


def _level_pin(vm: Both, entry: int = 0x61 | LEVEL) -> None:
    assert vm.routing([kio.Route(5, pin=5)]) == 0
    vm.set_entry(5, entry)


def test_kvm_arch_vm_ioctl_create_irqchip_resets_every_pin_masked(vm: Both) -> None:
    """After KVM_CREATE_IRQCHIP every redirection entry reads 0x10000 (masked)."""
    real = list(kio.get_ioapic(vm.real.vm).redirtbl)
    model = kvm_get_ioapic(vm.model.kvm).redirtbl
    assert real == model == [MASKED] * 24


def test_irqfd_inject_resampling_irqfd_holds_a_level_line(vm: Both) -> None:
    """A resampling irqfd on a level pin: delivered once with TMR set, remote IRR set, the
    line stays up; a second signal changes nothing; no resamplefd signal without an EOI."""
    _level_pin(vm)
    assert vm.irqfd("intx", 5, True) == 0
    vm.signal("intx")
    expect = ([{0x61}, set()], [{0x61}, set()], {5}, {5}, {"intx.r": 0})
    assert vm.observe() == expect
    vm.signal("intx")
    assert vm.observe() == expect


def test_irqfd_inject_plain_irqfd_pulses_a_level_line(vm: Both) -> None:
    """A plain irqfd on a level pin asserts and de-asserts: delivered, remote IRR set, the
    pin's irr bit clear again."""
    _level_pin(vm)
    assert vm.irqfd("edge", 5, False) == 0
    vm.signal("edge")
    assert vm.observe() == ([{0x61}, set()], [{0x61}, set()], set(), {5}, {})


def test_ioapic_set_irq_edge_pin_coalesces_a_raise_of_a_high_line(vm: Both) -> None:
    """KVM_IRQ_LINE_STATUS on an edge pin: 1, then 0 (already high; the raise also clears
    irr_delivered, so KVM_GET_IRQCHIP reports the pin), 1 (lowered), 1 (a new edge)."""
    assert vm.routing([kio.Route(4, pin=4)]) == 0
    vm.set_entry(4, 0x44 | 1 << 56)
    assert vm.line(4, 1) == 1
    assert vm.observe()[2] == set()
    assert vm.line(4, 1) == 0
    assert vm.observe()[2] == {4}
    assert vm.line(4, 0) == 1
    assert vm.line(4, 1) == 1
    assert vm.observe()[:2] == ([set(), {0x44}], [set(), set()])


def test_kvm_set_ioapic_unmasking_delivers_a_pending_level_pin(vm: Both) -> None:
    """Asserted while masked: pending at the IOAPIC only; the unmask (KVM_SET_IRQCHIP,
    which re-raises the saved irr) delivers it and sets remote IRR."""
    _level_pin(vm, 0x61 | LEVEL | MASKED)
    assert vm.irqfd("intx", 5, True) == 0
    vm.signal("intx")
    assert vm.observe() == ([set(), set()], [set(), set()], {5}, set(), {"intx.r": 0})
    vm.set_entry(5, 0x61 | LEVEL)
    assert vm.observe() == ([{0x61}, set()], [{0x61}, set()], {5}, {5}, {"intx.r": 0})


def test_irqfd_resampler_shutdown_lowers_the_line_of_the_last_irqfd(vm: Both) -> None:
    """Deassigning the GSI's last resampling irqfd de-asserts its line."""
    _level_pin(vm, 0x61 | LEVEL | MASKED)
    assert vm.irqfd("intx", 5, True) == 0
    vm.signal("intx")
    assert vm.observe()[2] == {5}
    assert vm.deassign("intx", 5) == 0
    assert vm.observe()[2] == set()


def test_kvm_arch_irqfd_allowed_resample_on_an_msi_gsi_is_accepted(vm: Both) -> None:
    """KVM_IRQFD_FLAG_RESAMPLE on an MSI GSI: accepted, delivered as an edge MSI, and its
    resamplefd is not signalled."""
    assert vm.routing([kio.Route(1, address_lo=k.msi_address(1), data=0x41)]) == 0
    assert vm.irqfd("msi", 1, True) == 0
    vm.signal("msi")
    assert vm.observe() == ([set(), {0x41}], [set(), set()], set(), set(), {"msi.r": 0})


def test_kvm_arch_irqfd_allowed_split_irqchip_refuses_resample_and_irqchip_routes() -> None:
    """With KVM_CAP_SPLIT_IRQCHIP: a resampling irqfd and an IRQCHIP route are -EINVAL, a
    plain irqfd and an MSI route are fine."""
    both = Both(1, irqchip="split")
    try:
        assert both.irqfd("intx", 5, True) == -22
        assert both.irqfd("plain", 6, False) == 0
        assert both.routing([kio.Route(5, pin=5)]) == -22
        assert both.routing([kio.Route(1, address_lo=k.msi_address(0), data=0x41)]) == 0
    finally:
        both.close()
