"""Run statistics: one consumer of the event stream, online or offline (one code path).

It reads only info-level records — ``vkick_irq`` (each interrupt's life, from
:mod:`vkick.obs.irqlife`), ``vkick_guest_irq``, ``kvm_exit``, ``vkick_host_ipi``,
``kvm_apic_ipi`` — so ``vkick run`` (subscribed to the bus) and ``vkick analyze`` (reading a
log at the default info level, or at debug level) produce the same ``to_json()``: one
schema (``signalled``, ``coalesced``, ``delivered``, per path, per vCPU …).  Latencies go
into HDR histograms: bounded memory whatever the run length.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

from hdrh.histogram import HdrHistogram

from vkick.runtime.events import EventRecord

RATE_BUCKET_NS: Final = 100_000  # interrupt rate over time: deliveries per 100 µs


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, 60 * 10**9, 3)  # 1 ns .. 60 s, 3 significant digits


def _latency_json(h: HdrHistogram | None) -> dict[str, int]:
    if h is None or h.get_total_count() == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "count": 0}
    return {"p50": int(h.get_value_at_percentile(50)), "p90": int(h.get_value_at_percentile(90)),
            "p99": int(h.get_value_at_percentile(99)), "max": int(h.get_max_value()),
            "count": int(h.get_total_count())}


def _record(table: dict[str, HdrHistogram], key: str, value: int) -> None:
    h = table.get(key)
    if h is None:
        h = table[key] = _histogram()
    h.record_value(value)


class RunStats:
    """Per-interrupt accounting (a bus sink, or fed from a log)."""

    def __init__(self) -> None:
        self.signalled = 0
        self.coalesced = 0
        self.delivered = 0
        self.undelivered = 0
        self.paths: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.exits: Counter[str] = Counter()
        self.host_ipis: Counter[str] = Counter()
        self.guest_ipis: Counter[str] = Counter()
        self.per_vcpu: Counter[str] = Counter()
        self.rate: Counter[int] = Counter()
        self.latency = _histogram()
        self.latency_by_path: dict[str, HdrHistogram] = {}
        self.latency_by_vcpu: dict[str, HdrHistogram] = {}
        self.latency_by_queue: dict[str, HdrHistogram] = {}  # by signalled eventfd

    def __call__(self, rec: EventRecord) -> None:
        ev = rec["ev"]
        if ev == "vkick_irq":
            if rec["first"]:
                self.signalled += 1
                self.sources[rec["source"]] += 1
            if not rec["delivered"]:
                self.undelivered += 1
                return
            if rec["coalesced"]:
                self.coalesced += 1
            path = rec["path"]
            self.paths[path] += 1
            lat = max(1, rec["latency_ns"])
            self.latency.record_value(lat)
            _record(self.latency_by_path, path, lat)
            _record(self.latency_by_vcpu, f"{rec['vm']}/{rec['vcpu']}", lat)
            if rec["source"] == "signal":
                _record(self.latency_by_queue, rec["origin"], lat)
        elif ev == "vkick_guest_irq":
            self.delivered += 1
            self.per_vcpu[f"{rec['vm']}/{rec['vcpu']}"] += 1
            self.rate[rec["t"] // RATE_BUCKET_NS] += 1
        elif ev == "kvm_exit":
            self.exits[rec["reason"]] += 1
        elif ev == "vkick_host_ipi":
            self.host_ipis[f"{rec['hvector']:#x}"] += 1
        elif ev == "kvm_apic_ipi":
            self.guest_ipis[f"{rec['vector']:#x}"] += 1

    def to_json(self) -> dict[str, Any]:
        """The summary (the same schema for ``vkick run --json`` and ``vkick analyze``)."""
        return {
            "signalled": self.signalled,
            "coalesced": self.coalesced,
            "delivered": self.delivered,
            "undelivered": self.undelivered,
            "sources": dict(sorted(self.sources.items())),
            "paths": dict(sorted(self.paths.items())),
            "exits": dict(sorted(self.exits.items())),
            "host_ipis": dict(sorted(self.host_ipis.items())),
            "guest_ipis": dict(sorted(self.guest_ipis.items())),
            "per_vcpu": {k: {"delivered": n,
                             "latency_ns": _latency_json(self.latency_by_vcpu.get(k))}
                         for k, n in sorted(self.per_vcpu.items())},
            "latency_ns": _latency_json(self.latency),
            "coalescing_ratio": round(self.coalesced / self.signalled, 6)
                                if self.signalled else 0.0,
            "latency_ns_by_path": {k: _latency_json(h)
                                   for k, h in sorted(self.latency_by_path.items())},
            "latency_ns_by_queue": {k: _latency_json(h)
                                    for k, h in sorted(self.latency_by_queue.items())},
            "rate": [{"t_ns": b * RATE_BUCKET_NS, "delivered": n}
                     for b, n in sorted(self.rate.items())],
        }
