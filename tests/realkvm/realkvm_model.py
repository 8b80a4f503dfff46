"""vkick's KVM model driven like the real KVM in test_realkvm_differential.py.

One VM, vCPUs created but never run (no vCPU task is started), APICv off. Userspace ioctls map
onto the model's kernel-named entry points:

- VM / vCPU creation → `kvm_main.kvm_create_vm(rt, name, apicv=False)`,
  `kvm_main.kvm_vm_ioctl_create_vcpu(kvm, id)`;
- KVM_SET_LAPIC of one register → `lapic.kvm_lapic_reg_write(apic, reg, val)` (the guest's
  write path; the differential test only feeds canonical values, for which both agree);
- KVM_SIGNAL_MSI → `kvm_send_userspace_msi(kvm, msi)` (virt/kvm/irqchip.c) with a struct
  kvm_msi;
- KVM_SET_GSI_ROUTING → `kvm_set_irq_routing(kvm, entries, nr, flags)`;
- KVM_IRQFD → `kvm_irqfd_assign(kvm, args)` (virt/kvm/eventfd.c) with a struct kvm_irqfd;
- write(2) on the eventfd → `kernel.eventfd.eventfd_signal(ctx, 1)`.

After every operation the runtime is driven until quiescent, so the irqfd slow path (kworker)
has run. The model's modules are being written concurrently: every entry point is looked up
by its kernel name, and a missing one raises ImportError naming it (the differential test then
skips with that reason).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create, eventfd_signal
from vkick.runtime import Runtime

APIC_SPIV = 0xF0
KVM_IRQ_ROUTING_MSI = 2


def _lookup(name: str, *modules: str) -> Any:
    """`name` from the first of `modules` (under vkick.kvm) that defines it."""
    missing = []
    for mod in modules:
        try:
            m = importlib.import_module(f"vkick.kvm.{mod}")
        except ImportError as e:
            missing.append(f"vkick.kvm.{mod} ({e})")
            continue
        if hasattr(m, name):
            return getattr(m, name)
        missing.append(f"vkick.kvm.{mod} has no {name}")
    raise ImportError(f"model entry point {name!r} not found: " + "; ".join(missing))


kvm_create_vm: Callable[..., Any] = _lookup("kvm_create_vm", "kvm_main")
kvm_vm_ioctl_create_vcpu: Callable[..., Any] = _lookup("kvm_vm_ioctl_create_vcpu", "kvm_main")
kvm_lapic_reg_write: Callable[..., Any] = _lookup("kvm_lapic_reg_write", "lapic")
kvm_send_userspace_msi: Callable[..., Any] = _lookup(
    "kvm_send_userspace_msi", "irqchip", "irq_comm", "kvm_main")
kvm_set_irq_routing: Callable[..., Any] = _lookup("kvm_set_irq_routing", "irqchip")
kvm_irqfd_assign: Callable[..., Any] = _lookup("kvm_irqfd_assign", "eventfd")
KvmMsi: Callable[..., Any] = _lookup("KvmMsi", "kvm_host", "irqchip", "irq_comm")
KvmIrqRoutingEntry: Callable[..., Any] = _lookup(
    "KvmIrqRoutingEntry", "kvm_host", "irqchip", "irq_comm")
KvmIrqfd: Callable[..., Any] = _lookup("KvmIrqfd", "kvm_host", "eventfd")


class ModelSide:
    """The model VM (see the module docstring)."""

    def __init__(self, nr_vcpus: int, gsis: tuple[int, ...]) -> None:
        self.rt = Runtime(seed=0)
        self.kvm: Any = self._run(kvm_create_vm, self.rt, "vm0", apicv=False)
        for i in range(nr_vcpus):
            self._run(kvm_vm_ioctl_create_vcpu, self.kvm, i)
        for i in range(nr_vcpus):
            self._run(kvm_lapic_reg_write, self._apic(i), APIC_SPIV, 0x1FF)
        self.efds: dict[int, EventfdCtx] = {}
        for gsi in gsis:
            ctx = eventfd_ctx_create(self.rt, name=f"irqfd{gsi}")
            assert isinstance(ctx, EventfdCtx), f"eventfd_ctx_create returned {ctx}"
            self.efds[gsi] = ctx
        self.routes: dict[int, tuple[int, int]] = {}
        self.assigned = False

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a model entry point (awaiting it if it is a coroutine), then let every
        other task (kworkers) run until the runtime is quiescent."""
        result = fn(*args, **kwargs)

        async def settle() -> Any:
            value = await result if inspect.isawaitable(result) else result
            await self.rt.wait_quiescent()
            return value

        return self.rt.call(settle)

    def _apic(self, vcpu_idx: int) -> Any:
        apic = self.kvm.vcpus[vcpu_idx].arch.apic
        assert apic is not None, "model vCPU has no in-kernel LAPIC"
        return apic

    def msi(self, address: int, data: int) -> int:
        msi = KvmMsi(address_lo=address, address_hi=0, data=data, flags=0, devid=0)
        return int(self._run(kvm_send_userspace_msi, self.kvm, msi))

    def write(self, vcpu: int, off: int, value: int) -> None:
        self._run(kvm_lapic_reg_write, self._apic(vcpu), off, value)

    def route(self, gsi: int, address: int, data: int) -> None:
        self.routes[gsi] = (address, data)
        entries = [KvmIrqRoutingEntry(gsi=g, type=KVM_IRQ_ROUTING_MSI, address_lo=lo,
                                      address_hi=0, data=d)
                   for g, (lo, d) in sorted(self.routes.items())]
        r = self._run(kvm_set_irq_routing, self.kvm, entries, len(entries), 0)
        assert r == 0, f"kvm_set_irq_routing returned {r}"
        if not self.assigned:
            for g, ctx in self.efds.items():
                r = self._run(kvm_irqfd_assign, self.kvm, KvmIrqfd(fd=ctx, gsi=g, flags=0))
                assert r == 0, f"kvm_irqfd_assign returned {r}"
            self.assigned = True

    def signal(self, gsi: int) -> None:
        self._run(eventfd_signal, self.efds[gsi], 1)

    def state(self) -> list[tuple[int, int, int, int]]:
        out = []
        for i in range(len(self.kvm.vcpus)):
            a = self._apic(i)
            out.append((int(a.irr), int(a.isr), int(a.tmr), int(a.ppr)))
        return out

    def close(self) -> None:
        self.rt.close()
