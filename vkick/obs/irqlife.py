"""Each interrupt's whole life as one record: ``vkick_irq``.

:class:`IrqLife` follows every correlation id from its source (an eventfd signal,
KVM_SIGNAL_MSI, a guest IPI, an assigned device's MSI) through ``kvm_apic_accept_irq`` or
``vkick_iommu_post`` (VT-d posting, path ``vtd``) (path, coalesced) to the
``vkick_guest_irq`` that satisfied it, and emits one ``vkick_irq`` record per (source,
destination vCPU) on the same bus — so it is logged at info level, counted online and read
back offline like any event.  Sources never delivered are emitted by :meth:`finish` with
``delivered: false``.

Subscribe it *last*: it emits from inside the bus's fan-out, and every sink must have seen
the triggering ``vkick_guest_irq`` first for the log to stay in ``seq`` order.
"""

from __future__ import annotations

from typing import Any, Final

from vkick.runtime.events import EventBus, EventRecord

_SOURCES: Final = {"eventfd_signal": "signal", "kvm_msi_set_irq": "msi",
                   "kvm_apic_ipi": "ipi", "vkick_device_msi": "vtd"}


class _Life:
    __slots__ = ("accept", "coalesced", "deliveries", "kind", "origin", "path", "t_accept",
                 "t_source", "vm")

    def __init__(self, kind: str, origin: str, t: int, vm: str) -> None:
        self.kind = kind
        self.origin = origin
        self.t_source = t
        self.vm = vm
        self.path = "unknown"
        self.t_accept = -1
        self.coalesced = False
        self.accept: dict[int, tuple[int, str, bool]] = {}  # vcpu → (t, path, coalesced)
        self.deliveries = 0


class IrqLife:
    """The lifecycle tracker (a bus sink that emits ``vkick_irq``)."""

    wants: Final = frozenset({"kvm_apic_accept_irq", "vkick_iommu_post", "vkick_guest_irq",
                              *_SOURCES})

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.live: dict[int, _Life] = {}

    def __call__(self, rec: EventRecord) -> None:
        ev = rec["ev"]
        if ev == "kvm_apic_accept_irq":
            life = self.live.get(rec["irq"])
            if life is not None and rec["vcpu"] not in life.accept:
                life.accept[rec["vcpu"]] = (rec["t"], rec["path"], rec["coalesced"])
        elif ev == "vkick_iommu_post":
            life = self.live.get(rec["irq"])
            if life is not None and rec["vcpu"] not in life.accept:
                life.accept[rec["vcpu"]] = (rec["t"], "vtd", rec["notify"] == "none")
        elif ev == "vkick_guest_irq":
            for irq in rec["irq"]:
                life = self.live.get(irq)
                if life is not None:
                    self._emit(irq, life, rec)
        elif ev in _SOURCES:
            irq = rec.get("irq")
            if irq and irq not in self.live and rec.get("mode") != "blocked":
                kind = _SOURCES[ev]
                origin = (rec["efd"] if kind == "signal" else
                          f"ipi {rec['vm']}/{rec['vcpu']}" if kind == "ipi" else
                          f"dev {rec['dev']}/{rec['msi']}" if kind == "vtd" else "msi")
                self.live[irq] = _Life(kind, origin, rec["t"], rec.get("vm", ""))

    def _emit(self, irq: int, life: _Life, delivery: EventRecord) -> None:
        vcpu = delivery["vcpu"]
        t_accept, path, coalesced = life.accept.pop(vcpu, (-1, "unknown", False))
        if path == "unknown" and life.accept:
            # merged into another source's injection (workqueue path): take any accept
            t_accept, path, coalesced = next(iter(life.accept.values()))
        life.deliveries += 1
        first = life.deliveries == 1
        if not life.accept:
            del self.live[irq]
        self.bus.emit("vkick_irq", irq=irq, vm=delivery["vm"], vcpu=vcpu,
                      vector=delivery["vector"], source=life.kind, origin=life.origin,
                      path=path,
                      coalesced=coalesced or len(delivery["irq"]) > 1, first=first,
                      delivered=True, t_signal=life.t_source, t_accept=t_accept,
                      t_deliver=delivery["t"], latency_ns=delivery["t"] - life.t_source)

    def finish(self) -> None:
        """Emit the sources that were never delivered (call when the run ends)."""
        for irq, life in sorted(self.live.items()):
            if life.deliveries:
                continue
            self.bus.emit("vkick_irq", irq=irq, vm=life.vm, vcpu=-1, vector=-1,
                          source=life.kind, origin=life.origin, path=life.path,
                          coalesced=False, first=True,
                          delivered=False, t_signal=life.t_source, t_accept=-1,
                          t_deliver=-1, latency_ns=-1)
        self.live.clear()


def attach(bus: EventBus, *sinks: Any) -> IrqLife:
    """Subscribe ``sinks`` and then the lifecycle tracker (in that order, see above)."""
    for sink in sinks:
        bus.subscribe(sink)
    life = IrqLife(bus)
    bus.subscribe(life)
    return life
