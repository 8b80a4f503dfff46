"""Run statistics: a consumer of the event stream, online or offline (one code path)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vkick.runtime.events import EventRecord


@dataclass(slots=True)
class RunStats:
    """Per-interrupt accounting from the event stream.

    The same consumer runs online (subscribed to the bus) and offline (fed from a debug-level
    JSON-lines log by ``vkick analyze``), so both give the same summary.
    """

    signalled: int = 0
    accepted: int = 0
    coalesced: int = 0
    delivered: int = 0
    paths: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)
    host_ipis: Counter[str] = field(default_factory=Counter)
    per_vcpu: Counter[int] = field(default_factory=Counter)
    latencies: list[int] = field(default_factory=list)
    _t_signal: dict[int, int] = field(default_factory=dict)

    def __call__(self, rec: EventRecord) -> None:
        ev = rec["ev"]
        if ev == "vkick_guest_irq":
            ids = rec["irq"]
            self.delivered += 1
            self.per_vcpu[rec["vcpu"]] += 1
            t = rec["t"]
            for irq in ids:
                t0 = self._t_signal.pop(irq, None)
                if t0 is not None:
                    self.latencies.append(t - t0)
        elif ev == "kvm_apic_accept_irq":
            self.accepted += 1
            self.paths[rec["path"]] += 1
            if rec["coalesced"]:
                self.coalesced += 1
        elif ev == "kvm_exit":
            self.exits[rec["reason"]] += 1
        elif ev == "vkick_host_ipi":
            self.host_ipis[f"{rec['hvector']:#x}"] += 1
        elif ev == "eventfd_signal" and rec.get("irq"):
            self.signalled += 1
            self._t_signal[rec["irq"]] = rec["t"]

    def percentile(self, q: float) -> int:
        if not self.latencies:
            return 0
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))]

    def to_json(self) -> dict[str, Any]:
        return {
            "signalled": self.signalled,
            "accepted": self.accepted,
            "coalesced": self.coalesced,
            "delivered": self.delivered,
            "undelivered": len(self._t_signal),
            "paths": dict(sorted(self.paths.items())),
            "exits": dict(sorted(self.exits.items())),
            "host_ipis": dict(sorted(self.host_ipis.items())),
            "per_vcpu": {str(k): v for k, v in sorted(self.per_vcpu.items())},
            "latency_ns": {"p50": self.percentile(0.50), "p90": self.percentile(0.90),
                           "p99": self.percentile(0.99),
                           "max": max(self.latencies, default=0),
                           "count": len(self.latencies)},
        }
