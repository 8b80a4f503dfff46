"""Run statistics: one consumer of the event stream, online or offline (one code path).

``vkick run`` subscribes a :class:`RunStats` to the bus; ``vkick analyze`` feeds it the
records of a debug-level JSON-lines log.  Both produce the same ``to_json()`` (one schema:
``signalled``, ``coalesced``, ``delivered``, per path, per vCPU …).  Latencies go into HDR
histograms (bounded memory whatever the run length); each interrupt is followed by its
correlation id from its source (an eventfd signal, KVM_SIGNAL_MSI, a guest IPI) to the
guest handler that satisfied it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

from hdrh.histogram import HdrHistogram

from vkick.runtime.events import EventRecord

RATE_BUCKET_NS: Final = 100_000  # interrupt rate over time: deliveries per 100 µs
_SOURCES: Final = frozenset({"eventfd_signal", "kvm_msi_set_irq", "kvm_apic_ipi"})


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, 60 * 10**9, 3)  # 1 ns .. 60 s, 3 significant digits


def _latency_json(h: HdrHistogram) -> dict[str, int]:
    if h.get_total_count() == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "count": 0}
    return {"p50": int(h.get_value_at_percentile(50)), "p90": int(h.get_value_at_percentile(90)),
            "p99": int(h.get_value_at_percentile(99)), "max": int(h.get_max_value()),
            "count": int(h.get_total_count())}


class RunStats:
    """Per-interrupt accounting from the event stream (a bus sink)."""

    def __init__(self) -> None:
        self.signalled = 0
        self.accepted = 0
        self.coalesced = 0
        self.delivered = 0
        self.paths: Counter[str] = Counter()
        self.exits: Counter[str] = Counter()
        self.host_ipis: Counter[str] = Counter()
        self.guest_ipis: Counter[str] = Counter()
        self.per_vcpu: Counter[str] = Counter()
        self.rate: Counter[int] = Counter()
        self.latency = _histogram()
        self.latency_by_path: dict[str, HdrHistogram] = {}
        self.latency_by_vcpu: dict[str, HdrHistogram] = {}
        self._t_source: dict[int, int] = {}
        self._path: dict[int, str] = {}

    def __call__(self, rec: EventRecord) -> None:
        ev = rec["ev"]
        if ev == "vkick_guest_irq":
            self._delivery(rec)
        elif ev == "kvm_apic_accept_irq":
            self.accepted += 1
            path = rec["path"]
            self.paths[path] += 1
            if rec["coalesced"]:
                self.coalesced += 1
            irq = rec["irq"]
            if irq and irq not in self._path:
                self._path[irq] = path
        elif ev == "kvm_exit":
            self.exits[rec["reason"]] += 1
        elif ev == "vkick_host_ipi":
            self.host_ipis[f"{rec['hvector']:#x}"] += 1
        elif ev in _SOURCES:
            irq = rec.get("irq")
            if irq and irq not in self._t_source:
                self._t_source[irq] = rec["t"]
                self.signalled += 1
            if ev == "kvm_apic_ipi":
                self.guest_ipis[f"{rec['vector']:#x}"] += 1

    def _delivery(self, rec: EventRecord) -> None:
        self.delivered += 1
        vcpu = f"{rec['vm']}/{rec['vcpu']}"
        self.per_vcpu[vcpu] += 1
        t = rec["t"]
        self.rate[t // RATE_BUCKET_NS] += 1
        ids = rec["irq"]
        path = "unknown"
        for irq in ids:
            if irq in self._path:
                path = self._path.pop(irq)
                break
        for irq in ids:
            self._path.pop(irq, None)
            t0 = self._t_source.pop(irq, None)
            if t0 is None:
                continue
            lat = max(1, t - t0)
            self.latency.record_value(lat)
            by_path = self.latency_by_path.get(path)
            if by_path is None:
                by_path = self.latency_by_path[path] = _histogram()
            by_path.record_value(lat)
            by_vcpu = self.latency_by_vcpu.get(vcpu)
            if by_vcpu is None:
                by_vcpu = self.latency_by_vcpu[vcpu] = _histogram()
            by_vcpu.record_value(lat)

    def to_json(self) -> dict[str, Any]:
        """The summary (the same schema for ``vkick run --json`` and ``vkick analyze``)."""
        return {
            "signalled": self.signalled,
            "accepted": self.accepted,
            "coalesced": self.coalesced,
            "delivered": self.delivered,
            "undelivered": len(self._t_source),
            "paths": dict(sorted(self.paths.items())),
            "exits": dict(sorted(self.exits.items())),
            "host_ipis": dict(sorted(self.host_ipis.items())),
            "guest_ipis": dict(sorted(self.guest_ipis.items())),
            "per_vcpu": {k: {"delivered": n,
                             "latency_ns": _latency_json(self.latency_by_vcpu[k])
                             if k in self.latency_by_vcpu else _latency_json(_histogram())}
                         for k, n in sorted(self.per_vcpu.items())},
            "latency_ns": _latency_json(self.latency),
            "latency_ns_by_path": {k: _latency_json(h)
                                   for k, h in sorted(self.latency_by_path.items())},
            "rate": [{"t_ns": b * RATE_BUCKET_NS, "delivered": n}
                     for b, n in sorted(self.rate.items())],
        }
