"""Helpers shared by the unit tests (importable as ``helpers``: tests/conftest.py puts this
folder on ``sys.path``)."""

from __future__ import annotations

from typing import Any

from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create
from vkick.kvm.ioapic import IOAPIC_REG_SELECT, IOAPIC_REG_WINDOW, KvmIoapic, ioapic_mmio_write
from vkick.kvm.kvm_host import Kvm, KvmLapic, KvmVcpu
from vkick.runtime.tasks import Runtime
from vkick.scenario.runner import build_vm


def vm_between_ioctls(rt: Runtime, n: int = 2, apicv: bool = False, *,
                      irqchip: str = "split", toggles: frozenset[str] = frozenset(),
                      eoi_auto: bool = True) -> Kvm:
    """A VM whose vCPU threads are not running (as between ioctls): built, each vCPU's
    ``cpu`` its home physical CPU."""
    kvm: Kvm = rt.call(lambda: build_vm(rt, nr_vcpus=n, apicv=apicv, x2apic=False,
                                        eoi_auto=eoi_auto, irqchip=irqchip,
                                        toggles=toggles))
    for v in kvm.vcpus:
        v.cpu = v.home_cpu
    return kvm


def lapic(vcpu: KvmVcpu) -> KvmLapic:
    """``vcpu``'s in-kernel LAPIC (every vCPU here has one)."""
    assert vcpu.arch.apic is not None
    return vcpu.arch.apic


def ioapic(kvm: Kvm) -> KvmIoapic:
    """The VM's in-kernel IOAPIC (``KVM_CREATE_IRQCHIP``)."""
    vioapic: KvmIoapic = kvm.arch.vioapic
    return vioapic


def new_eventfd(rt: Runtime, name: str = "efd") -> EventfdCtx:
    """An eventfd (``eventfd_ctx_create`` succeeded)."""
    ctx = eventfd_ctx_create(rt, name=name)
    assert isinstance(ctx, EventfdCtx)
    return ctx


def program_rte(kvm: Kvm, pin: int, entry: int) -> None:
    """The guest's write of a whole IOAPIC redirection entry through the MMIO window: high
    half, then low half, each write accepted."""
    vioapic = ioapic(kvm)
    base = vioapic.base_address
    for reg, val in ((0x11 + 2 * pin, entry >> 32), (0x10 + 2 * pin, entry & 0xFFFFFFFF)):
        assert ioapic_mmio_write(None, vioapic, base + IOAPIC_REG_SELECT, 4, reg) == 0
        assert ioapic_mmio_write(None, vioapic, base + IOAPIC_REG_WINDOW, 4, val) == 0


def notify_race_config(toggles: list[str], seed: int) -> dict[str, Any]:
    """The §16.9 W-VQ-notify race (tests/vhost/test_notify_races.py): one vCPU, one
    queue, event idx, RX traffic that stops after 2 ms; only W-VQ-notify preempts, half
    the time, sometimes for up to 20 µs — long enough for the guest's NAPI poll to
    complete and re-enable callbacks inside the window."""
    return {
        "run": {"duration": "2ms", "seed": seed, "policy": "random", "preempt": {"p": 0.0},
                "sites": {"W-VQ-notify": {"p": 0.5, "max_turns": 3, "max_delay_ns": 20000}},
                "drain": "20ms"},
        "host": {"pcpus": 2},
        "vm": [{"name": "vm0", "vcpus": 1, "toggles": toggles,
                "net": [{"name": "net0", "queues": 1, "event_idx": True}],
                "workload": [{"net": "net0", "direction": "rx", "pattern": "poisson",
                              "rate_pps": 100000, "size": 1500}]}],
    }
