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

from collections.abc import Callable
from typing import Any, Final

from vkick.obs.tracepoints import EVENTS
from vkick.runtime.events import EventBus, EventRecord

_SOURCES: Final = {"eventfd_signal": "signal", "kvm_msi_set_irq": "msi",
                   "kvm_apic_ipi": "ipi", "vkick_device_msi": "vtd"}


class _Life:
    __slots__ = ("accept", "deliveries", "kind", "origin", "t_source", "vm")

    def __init__(self, kind: str, origin: str, t: int, vm: str) -> None:
        self.kind = kind
        self.origin = origin
        self.t_source = t
        self.vm = vm
        self.accept: dict[int, tuple[int, str, bool]] = {}  # vcpu → (t, path, coalesced)
        self.deliveries = 0


_NO_ACCEPT: Final = (-1, "unknown", False)  # a delivery no accept record was seen for
# The sources that may be blocked (``mode``: no IRTE, the MSI was dropped).
_MODED: Final = frozenset(name for name in _SOURCES
                          if any(f[0] == "mode" for f in EVENTS[name].fields))


class IrqLife:
    """The lifecycle tracker (a bus sink that emits ``vkick_irq``)."""

    wants: Final = frozenset({"kvm_apic_accept_irq", "vkick_iommu_post", "vkick_guest_irq",
                              *_SOURCES})

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.live: dict[int, _Life] = {}
        # Each event's handler (the bus calls it instead of the sink: see
        # vkick.runtime.events).
        self.handlers: dict[str, Callable[[EventRecord], None]] = {
            "kvm_apic_accept_irq": self._accept, "vkick_iommu_post": self._iommu_post,
            "vkick_guest_irq": self._delivered, "eventfd_signal": self._signal,
            "kvm_msi_set_irq": self._msi, "kvm_apic_ipi": self._source,
            "vkick_device_msi": self._source}

    def __call__(self, rec: EventRecord) -> None:
        handler = self.handlers.get(rec["ev"])
        if handler is not None:
            handler(rec)

    def _accept(self, rec: EventRecord) -> None:
        life = self.live.get(rec["irq"])
        if life is not None and rec["vcpu"] not in life.accept:
            life.accept[rec["vcpu"]] = (rec["t"], rec["path"], rec["coalesced"])

    def _iommu_post(self, rec: EventRecord) -> None:
        life = self.live.get(rec["irq"])
        if life is not None and rec["vcpu"] not in life.accept:
            life.accept[rec["vcpu"]] = (rec["t"], "vtd", rec["notify"] == "none")

    # The sources: the commonest two inlined (neither has a ``mode``), the others through
    # _source.
    def _signal(self, rec: EventRecord) -> None:
        irq = rec.get("irq")
        if irq and irq not in self.live:
            self.live[irq] = _Life("signal", rec["efd"], rec["t"], rec.get("vm", ""))

    def _msi(self, rec: EventRecord) -> None:
        irq = rec.get("irq")
        if irq and irq not in self.live:
            self.live[irq] = _Life("msi", "msi", rec["t"], rec.get("vm", ""))

    def _source(self, rec: EventRecord) -> None:
        irq = rec.get("irq")
        ev = rec["ev"]
        if irq and irq not in self.live and (ev not in _MODED or rec.get("mode") != "blocked"):
            kind = _SOURCES[ev]
            origin = (rec["efd"] if kind == "signal" else
                      f"ipi {rec['vm']}/{rec['vcpu']}" if kind == "ipi" else
                      f"dev {rec['dev']}/{rec['msi']}" if kind == "vtd" else "msi")
            self.live[irq] = _Life(kind, origin, rec["t"], rec.get("vm", ""))

    def _delivered(self, delivery: EventRecord) -> None:
        """``vkick_guest_irq``: one ``vkick_irq`` per source it satisfied."""
        irqs = delivery["irq"]
        live = self.live
        for irq in irqs:
            life = live.get(irq)
            if life is None:
                continue
            vcpu = delivery["vcpu"]
            accept = life.accept
            t_accept, path, coalesced = accept.pop(vcpu, _NO_ACCEPT)
            if path == "unknown" and accept:
                # merged into another source's injection (workqueue path): take any accept
                t_accept, path, coalesced = next(iter(accept.values()))
            life.deliveries += 1
            if not accept:
                del live[irq]
            t = delivery["t"]
            # NOTE: hot (one per interrupt): the record is built here in emit's layout,
            # not through emit(**fields), one dict fewer (bench/bench_obs.py).
            self.bus.publish({
                "t": t, "ev": "vkick_irq", "seq": 0, "irq": irq, "vm": delivery["vm"],
                "vcpu": vcpu, "vector": delivery["vector"], "source": life.kind,
                "origin": life.origin, "path": path,
                "coalesced": coalesced or len(irqs) > 1, "first": life.deliveries == 1,
                "delivered": True, "t_signal": life.t_source, "t_accept": t_accept,
                "t_deliver": t, "latency_ns": t - life.t_source})

    def finish(self) -> None:
        """Emit the sources that were never delivered (call when the run ends)."""
        for irq, life in sorted(self.live.items()):
            if life.deliveries:
                continue
            self.bus.emit("vkick_irq", irq=irq, vm=life.vm, vcpu=-1, vector=-1,
                          source=life.kind, origin=life.origin, path="unknown",
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
