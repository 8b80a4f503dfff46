"""virt/kvm/irqchip.c: the GSI routing table, kvm_irq_map_gsi, kvm_irq_map_chip_pin,
kvm_set_irq, setup_routing_entry and kvm_set_irq_routing (KVM_SET_GSI_ROUTING).

MSI routes and IRQCHIP routes to the in-kernel IOAPIC are modelled; PIC pins and the other
route types (Hyper-V SynIC, s390 adapters) are refused with an error that says so.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vkick.kvm.kvm_host import (
    KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
    KVM_IRQCHIP_NUM_PINS,
    KVM_MAX_IRQ_ROUTES,
    KVM_NR_IRQCHIPS,
    Kvm,
)

SetFn = Callable[["KvmKernelIrqRoutingEntry", Kvm, int, int, bool], int]


@dataclass(slots=True)
class KvmKernelIrqRoutingEntry:
    """include/linux/kvm_host.h: struct kvm_kernel_irq_routing_entry (MSI and IRQCHIP).

    ``type`` 0 means "no cached route" in an irqfd's copy (always the slow path).  MSI
    routes use ``address_lo``/``address_hi``/``data``; IRQCHIP routes ``irqchip``/``pin``
    (the union's two arms as plain fields).
    """

    gsi: int = 0
    type: int = 0
    address_lo: int = 0
    address_hi: int = 0
    data: int = 0
    set: SetFn | None = None
    irqchip: int = 0
    pin: int = 0


def copy_routing_entry(e: KvmKernelIrqRoutingEntry) -> KvmKernelIrqRoutingEntry:
    """A by-value copy of ``e`` (a C struct assignment), field by field: the positional
    constructor is the fastest copy of a slotted dataclass (used on the injection path)."""
    return KvmKernelIrqRoutingEntry(e.gsi, e.type, e.address_lo, e.address_hi, e.data, e.set,
                                    e.irqchip, e.pin)


def _chip_map() -> list[list[int]]:
    return [[-1] * KVM_IRQCHIP_NUM_PINS for _ in range(KVM_NR_IRQCHIPS)]


@dataclass(slots=True)
class KvmIrqRoutingTable:
    """include/linux/kvm_host.h: struct kvm_irq_routing_table (per-GSI entry lists, and
    ``chip[irqchip][pin]`` → the GSI routed to that pin, -1 for none)."""

    nr_rt_entries: int = 0
    map: dict[int, list[KvmKernelIrqRoutingEntry]] = field(default_factory=dict)
    chip: list[list[int]] = field(default_factory=_chip_map)


@dataclass(slots=True, frozen=True)
class MsiRoute:
    """One entry of KVM_SET_GSI_ROUTING (struct kvm_irq_routing_entry, type MSI)."""

    gsi: int
    address_lo: int
    data: int
    address_hi: int = 0


@dataclass(slots=True, frozen=True)
class IrqchipRoute:
    """One entry of KVM_SET_GSI_ROUTING (struct kvm_irq_routing_entry, type IRQCHIP):
    GSI → (irqchip, pin); ``irqchip`` is KVM_IRQCHIP_IOAPIC (2) or a PIC (0, 1)."""

    gsi: int
    irqchip: int
    pin: int


@dataclass(slots=True, frozen=True)
class OtherRoute:
    """One entry of KVM_SET_GSI_ROUTING of a type vkick does not model (``type`` is the
    uapi number: KVM_IRQ_ROUTING_S390_ADAPTER 3, KVM_IRQ_ROUTING_HV_SINT 4, …)."""

    gsi: int
    type: int


Route = MsiRoute | IrqchipRoute | OtherRoute


def kvm_irq_map_gsi(kvm: Kvm, gsi: int) -> list[KvmKernelIrqRoutingEntry]:
    """virt/kvm/irqchip.c: kvm_irq_map_gsi — copies (by value) of every entry for ``gsi``."""
    table: KvmIrqRoutingTable | None = kvm.irq_routing
    if table is None or gsi >= table.nr_rt_entries:
        return []
    return [copy_routing_entry(e) for e in table.map.get(gsi, ())]


def kvm_irq_map_chip_pin(kvm: Kvm, irqchip: int, pin: int) -> int:
    """virt/kvm/irqchip.c: kvm_irq_map_chip_pin — the GSI routed to (irqchip, pin), or -1
    (the last route to name the pin wins; ack notifiers are keyed by this GSI)."""
    table: KvmIrqRoutingTable | None = kvm.irq_routing
    if table is None:
        return -1
    return table.chip[irqchip][pin]


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


def setup_routing_entry(kvm: Kvm, rt: KvmIrqRoutingTable, i: int, ue: Route) -> int:
    """virt/kvm/irqchip.c: setup_routing_entry  [process: under KVM_SET_GSI_ROUTING]

    A GSI may carry one entry per irqchip, or exactly one entry of any other type (else
    -EINVAL); the arch setter fills the entry (kvm_set_routing_entry); an IRQCHIP entry
    also records ``chip[irqchip][pin] = gsi``.  The entry goes to the head of the GSI's list
    (hlist_add_head), so kvm_set_irq, walking the copy backwards, sets them in table order.
    Differs from the kernel: ``i`` (the entry's index) is passed for RoutingError messages.
    """
    from vkick.kvm.irq_comm import kvm_set_routing_entry  # noqa: PLC0415

    gsi = ue.gsi
    ue_type = _route_type(ue)
    for ei in rt.map.get(gsi, ()):
        if (ei.type != KVM_IRQ_ROUTING_IRQCHIP or ue_type != KVM_IRQ_ROUTING_IRQCHIP
                or (isinstance(ue, IrqchipRoute) and ue.irqchip == ei.irqchip)):
            return -errno.EINVAL
    e = KvmKernelIrqRoutingEntry(gsi=gsi, type=ue_type)
    r = kvm_set_routing_entry(kvm, e, ue, i)
    if r:
        return r
    if e.type == KVM_IRQ_ROUTING_IRQCHIP:
        rt.chip[e.irqchip][e.pin] = e.gsi
    rt.map.setdefault(gsi, []).insert(0, e)
    return 0


def _route_type(ue: Route) -> int:
    if isinstance(ue, MsiRoute):
        return KVM_IRQ_ROUTING_MSI
    if isinstance(ue, IrqchipRoute):
        return KVM_IRQ_ROUTING_IRQCHIP
    return ue.type


def kvm_set_irq_routing(kvm: Kvm, routes: Iterable[Route], flags: int = 0) -> int:
    """virt/kvm/irqchip.c: kvm_set_irq_routing  [process: VMM ioctl]

    Validate, build and publish a new table, then refresh every active irqfd's cached route
    under the seqcount (kvm_irq_routing_update) and run kvm_arch_post_irq_routing_update
    (split irqchip: rescan the IOAPIC-handled vectors).  Returns 0 or -EINVAL; nothing is
    published on error.  The SRCU wait that makes "no CPU still injects through the old
    route" true is synchronize_srcu in :func:`kvm_set_irq_routing_sync`.
    Differs from the kernel: vector < 16 and ExtINT MSI routes, PIC pins and unmodelled
    route types raise RoutingError with a message naming the field (a config mistake, not a
    guest behaviour).
    """
    from vkick.kvm.eventfd import kvm_irq_routing_update  # noqa: PLC0415
    from vkick.kvm.irq_comm import kvm_arch_post_irq_routing_update  # noqa: PLC0415

    routes = list(routes)
    for i, r in enumerate(routes):
        if not 0 <= r.gsi < KVM_MAX_IRQ_ROUTES:
            raise RoutingError(f"routes[{i}].gsi: expected 0..{KVM_MAX_IRQ_ROUTES - 1}, "
                               f"got {r.gsi}")
    table = KvmIrqRoutingTable()
    for i, r in enumerate(routes):
        ret = setup_routing_entry(kvm, table, i, r)
        if ret:
            return ret
        table.nr_rt_entries = max(table.nr_rt_entries, r.gsi + 1)
    # irq_lock: publish, refresh the irqfds (kvm_arch_irq_routing_update: nothing on VMX).
    kvm.irq_routing = table  # rcu_assign_pointer
    kvm_irq_routing_update(kvm)
    kvm_arch_post_irq_routing_update(kvm)
    return 0


async def kvm_set_irq_routing_sync(kvm: Kvm, routes: Iterable[Route]) -> int:
    """KVM_SET_GSI_ROUTING as the ioctl returns it: publish, then synchronize_srcu_expedited."""
    from vkick.kernel.srcu import synchronize_srcu_expedited  # noqa: PLC0415

    r = kvm_set_irq_routing(kvm, routes)
    if kvm.irq_srcu is not None:
        await synchronize_srcu_expedited(kvm.irq_srcu)
    return r
