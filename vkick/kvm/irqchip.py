"""virt/kvm/irqchip.c: the GSI routing table, kvm_irq_map_gsi, kvm_set_irq and
kvm_set_irq_routing (KVM_SET_GSI_ROUTING).

Only MSI routes are modelled; other route types are refused with an error that says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vkick.kvm.kvm_host import KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES, Kvm

SetFn = Callable[["KvmKernelIrqRoutingEntry", Kvm, int, int, bool], int]


@dataclass(slots=True)
class KvmKernelIrqRoutingEntry:
    """include/linux/kvm_host.h: struct kvm_kernel_irq_routing_entry (MSI routes).

    ``type`` 0 means "no cached route" in an irqfd's copy (always the slow path).
    """

    gsi: int = 0
    type: int = 0
    address_lo: int = 0
    address_hi: int = 0
    data: int = 0
    set: SetFn | None = None


@dataclass(slots=True)
class KvmIrqRoutingTable:
    """include/linux/kvm_host.h: struct kvm_irq_routing_table (per-GSI entry lists)."""

    nr_rt_entries: int = 0
    map: dict[int, list[KvmKernelIrqRoutingEntry]] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class MsiRoute:
    """One entry of KVM_SET_GSI_ROUTING (struct kvm_irq_routing_entry, type MSI)."""

    gsi: int
    address_lo: int
    data: int
    address_hi: int = 0


def kvm_irq_map_gsi(kvm: Kvm, gsi: int) -> list[KvmKernelIrqRoutingEntry]:
    """virt/kvm/irqchip.c: kvm_irq_map_gsi — copies (by value) of every entry for ``gsi``."""
    table: KvmIrqRoutingTable | None = kvm.irq_routing
    if table is None or gsi >= table.nr_rt_entries:
        return []
    return [KvmKernelIrqRoutingEntry(e.gsi, e.type, e.address_lo, e.address_hi, e.data, e.set)
            for e in table.map.get(gsi, ())]


def kvm_set_irq(kvm: Kvm, irq_source_id: int, gsi: int, level: int, line_status: bool) -> int:
    """virt/kvm/irqchip.c: kvm_set_irq  [process]

    < 0 ignored, 0 coalesced, > 0 number of CPUs delivered to.  Looks the route up afresh
    (not the irqfd's cached copy).  Spec §9.2.
    """
    bus = kvm.rt.bus
    if bus.on:
        bus.emit("kvm_set_irq", vm=kvm.name, gsi=gsi, level=level, irq_source_id=irq_source_id,
                 irq=kvm.rt.cur_irq)
    entries = kvm_irq_map_gsi(kvm, gsi)
    ret = -1
    for e in reversed(entries):
        assert e.set is not None
        r = e.set(e, kvm, irq_source_id, level, line_status)
        if r < 0:
            continue
        ret = r + (0 if ret < 0 else ret)
    return ret


class RoutingError(ValueError):
    """A KVM_SET_GSI_ROUTING entry vkick refuses (the message names the entry and field)."""


def kvm_set_irq_routing(kvm: Kvm, routes: Iterable[MsiRoute], flags: int = 0) -> int:
    """virt/kvm/irqchip.c: kvm_set_irq_routing  [process: VMM ioctl]

    Validate, build and publish a new table, then refresh every active irqfd's cached route
    under the seqcount (kvm_irq_routing_update).  Returns 0 or -EINVAL.  The SRCU wait that
    makes "no CPU still injects through the old route" true is synchronize_srcu in
    :func:`kvm_set_irq_routing_sync`.
    Differs from the kernel: vector < 16 and ExtINT MSI routes raise RoutingError with a
    message naming the field (a config mistake, not a guest behaviour).
    """
    from vkick.kvm.eventfd import kvm_irq_routing_update  # noqa: PLC0415
    from vkick.kvm.irq_comm import kvm_set_msi  # noqa: PLC0415

    table = KvmIrqRoutingTable()
    for i, r in enumerate(routes):
        if not 0 <= r.gsi < KVM_MAX_IRQ_ROUTES:
            raise RoutingError(f"routes[{i}].gsi: expected 0..{KVM_MAX_IRQ_ROUTES - 1}, "
                               f"got {r.gsi}")
        vector = r.data & 0xFF
        if vector < 16:
            raise RoutingError(f"routes[{i}].data: expected an MSI vector ≥ 16 (bits 7:0), "
                               f"got {vector:#x}")
        dm = (r.data >> 8) & 7
        if dm in (3, 7):
            raise RoutingError(f"routes[{i}].data: delivery mode {dm} (bits 10:8) is not "
                               f"supported for MSI routes (reserved/ExtINT)")
        if r.gsi in table.map:
            return -22  # -EINVAL: an MSI GSI may have only one entry
        e = KvmKernelIrqRoutingEntry(r.gsi, KVM_IRQ_ROUTING_MSI, r.address_lo, r.address_hi,
                                     r.data, kvm_set_msi)
        table.map[r.gsi] = [e]
        table.nr_rt_entries = max(table.nr_rt_entries, r.gsi + 1)
    kvm.irq_routing = table  # rcu_assign_pointer
    kvm_irq_routing_update(kvm)
    return 0


async def kvm_set_irq_routing_sync(kvm: Kvm, routes: Iterable[MsiRoute]) -> int:
    """KVM_SET_GSI_ROUTING as the ioctl returns it: publish, then synchronize_srcu_expedited."""
    from vkick.kernel.srcu import synchronize_srcu_expedited  # noqa: PLC0415

    r = kvm_set_irq_routing(kvm, routes)
    if kvm.irq_srcu is not None:
        await synchronize_srcu_expedited(kvm.irq_srcu)
    return r
