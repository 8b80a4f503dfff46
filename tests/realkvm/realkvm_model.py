"""vkick's KVM model driven like the real KVM in test_realkvm_differential.py.

One VM, vCPUs created but never run (no vCPU task is started), APICv off. Userspace ioctls map
onto the model's kernel-named entry points:

- VM / vCPU creation → `kvm_main.kvm_create_vm(rt, name, apicv=False)`,
  `await kvm_main.kvm_vm_ioctl_create_vcpu(kvm, id)`;
- KVM_SET_LAPIC of one register → `lapic.kvm_lapic_reg_write(apic, reg, val)` (the guest's
  write path; the differential test only feeds canonical values, for which both agree);
- KVM_SIGNAL_MSI → `irq_comm.kvm_send_userspace_msi(kvm, address_lo, data)`;
- KVM_SET_GSI_ROUTING → `irqchip.kvm_set_irq_routing_sync(kvm, [MsiRoute, …])` (publish +
  synchronize_srcu_expedited, as the ioctl returns);
- KVM_IRQFD → `eventfd.kvm_irqfd_assign(kvm, ctx, gsi)`;
- write(2) on the eventfd → `kernel.eventfd.eventfd_signal(ctx, 1)`.

After every operation the runtime is driven until quiescent, so the irqfd slow path (kworker)
has run. If the model's modules are missing, importing this module raises ImportError and the
differential test skips with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create, eventfd_signal
from vkick.kvm.eventfd import kvm_irqfd_assign
from vkick.kvm.irq_comm import kvm_send_userspace_msi
from vkick.kvm.irqchip import MsiRoute, kvm_set_irq_routing_sync
from vkick.kvm.kvm_host import APIC_SPIV, Kvm, KvmLapic
from vkick.kvm.kvm_main import kvm_create_vm, kvm_vm_ioctl_create_vcpu
from vkick.kvm.lapic import kvm_lapic_reg_write
from vkick.runtime import Runtime
from vkick.testing import call_settled


class ModelSide:
    """The model VM (see the module docstring)."""

    def __init__(self, nr_vcpus: int, gsis: tuple[int, ...]) -> None:
        self.rt = Runtime(seed=0)
        self.kvm: Kvm = kvm_create_vm(self.rt, "vm0", apicv=False)
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

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a model entry point (awaiting it if it is a coroutine), then let every
        other task (kworkers) run until the runtime is quiescent."""
        return call_settled(self.rt, fn, *args)

    def _apic(self, vcpu_idx: int) -> KvmLapic:
        apic = self.kvm.vcpus[vcpu_idx].arch.apic
        assert apic is not None, "model vCPU has no in-kernel LAPIC"
        return apic

    def msi(self, address: int, data: int) -> int:
        return int(self._run(kvm_send_userspace_msi, self.kvm, address, data))

    def write(self, vcpu: int, off: int, value: int) -> None:
        self._run(kvm_lapic_reg_write, self._apic(vcpu), off, value)

    def route(self, gsi: int, address: int, data: int) -> None:
        self.routes[gsi] = (address, data)
        routes = [MsiRoute(gsi=g, address_lo=lo, data=d)
                  for g, (lo, d) in sorted(self.routes.items())]
        r = self._run(kvm_set_irq_routing_sync, self.kvm, routes)
        assert r == 0, f"kvm_set_irq_routing returned {r}"
        if not self.assigned:
            for g, ctx in self.efds.items():
                r = self._run(kvm_irqfd_assign, self.kvm, ctx, g)
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
