"""Run statistics: one consumer of the event stream, online or offline (one code path).

It reads only info-level records — ``vkick_irq`` (each interrupt's life, from
:mod:`vkick.obs.irqlife`), ``vkick_guest_irq``, ``kvm_exit``, ``vkick_host_ipi``,
``kvm_apic_ipi``, ``vhost_signal``, ``handle_rx`` / ``handle_tx``, ``vkick_tun_drop``,
``vkick_rr`` — so ``vkick run`` (subscribed to the bus) and ``vkick analyze`` (reading a
log at the default info level, or at debug level) produce the same ``to_json()``: one
schema (``signalled``, ``coalesced``, ``delivered``, per path, per VM, per vCPU, per queue
…).  The same counters are kept for the whole host, per VM, per vCPU and per queue
(:class:`Tally`); a queue's ``delivered`` counts its signals that reached the guest (the
others count handler runs, which know no queue).
Latencies go into HDR histograms: bounded memory whatever the run length.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Final

from hdrh.histogram import HdrHistogram

from vkick.runtime.events import EventRecord

RATE_BUCKET_NS: Final = 100_000  # interrupt rate over time: deliveries per 100 µs …
RATE_MAX_BUCKETS: Final = 10_000  # … widened (doubled) whenever the run outgrows this many


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, 60 * 10**9, 3)  # 1 ns .. 60 s, 3 significant digits


def _latency_json(h: HdrHistogram | None) -> dict[str, int]:
    """Percentiles of an HDR histogram (zeros when empty)."""
    if h is None or h.get_total_count() == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "count": 0}
    return {"p50": int(h.get_value_at_percentile(50)), "p90": int(h.get_value_at_percentile(90)),
            "p99": int(h.get_value_at_percentile(99)), "max": int(h.get_max_value()),
            "count": int(h.get_total_count())}


_FOLD_AT: Final = 4096  # distinct values kept exactly before they are folded into HDR


class Latencies:
    """A latency distribution: exact counts per value, folded into an HDR histogram when
    they grow many (memory stays bounded).

    NOTE: ``HdrHistogram.record_value`` costs ≈1.3 µs in pure Python and every interrupt
    lands in four scopes; counting first and recording ``value × n`` at the end is what
    keeps ``vkick analyze`` fast (bench/bench_obs.py).
    """

    __slots__ = ("_counts", "_h")

    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()
        self._h: HdrHistogram | None = None

    def record(self, ns: int, n: int = 1) -> None:
        counts = self._counts
        counts[ns] += n
        if len(counts) > _FOLD_AT:
            self._fold()

    def record_counts(self, counts: dict[int, int]) -> None:
        """Record each value of ``counts`` as many times as it counts."""
        self._counts.update(counts)
        if len(self._counts) > _FOLD_AT:
            self._fold()

    def _fold(self) -> HdrHistogram:
        h = self._h
        if h is None:
            h = self._h = _histogram()
        for value, n in self._counts.items():
            h.record_value(value, n)
        self._counts.clear()
        return h

    def to_json(self) -> dict[str, int]:
        return _latency_json(self._fold() if self._counts or self._h is not None else None)


class Tally:
    """The counters of one scope (the host, a VM, a vCPU or a queue)."""

    __slots__ = ("coalesced", "delivered", "drops", "exits", "guest_ipis", "host_ipis",
                 "latency", "paths", "rr", "rx_bytes", "rx_packets", "signalled",
                 "suppressed", "tx_bytes", "tx_packets", "undelivered")

    def __init__(self) -> None:
        self.signalled = 0
        self.coalesced = 0
        self.delivered = 0
        self.undelivered = 0
        self.suppressed = 0  # vhost_signal decided no interrupt was needed
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = self.drops = 0
        self.paths: Counter[str] = Counter()
        self.exits: Counter[str] = Counter()
        self.host_ipis: Counter[str] = Counter()
        self.guest_ipis: Counter[str] = Counter()
        self.latency = Latencies()
        self.rr: Latencies | None = None

    def record_rtt(self, ns: int) -> None:
        rr = self.rr
        if rr is None:
            rr = self.rr = Latencies()
        rr.record(ns)

    def to_json(self) -> dict[str, Any]:
        packets = self.rx_packets + self.tx_packets
        out: dict[str, Any] = {
            "packets": {"rx": self.rx_packets, "tx": self.tx_packets, "rx_bytes": self.rx_bytes,
                        "tx_bytes": self.tx_bytes, "dropped": self.drops},
            "signalled": self.signalled,
            "coalesced": self.coalesced,
            "delivered": self.delivered,
            "undelivered": self.undelivered,
            "suppressed": self.suppressed,
            "interrupts_per_packet": round(self.signalled / packets, 6) if packets else 0.0,
            "paths": dict(sorted(self.paths.items())),
            "latency_ns": self.latency.to_json(),
            "exits": dict(sorted(self.exits.items())),
            "host_ipis": dict(sorted(self.host_ipis.items())),
            "guest_ipis": dict(sorted(self.guest_ipis.items())),
        }
        if self.rr is not None:
            out["rr_rtt_ns"] = self.rr.to_json()
        return out


# The deliveries of one kind (path) not yet added to their scopes: count by latency, how
# many were coalesced, how many were their source's first.
_Batch = list[Any]  # [dict[int, int], int, int]
# An interrupt's scopes (host, VM, vCPU, queue), whether the last is its queue, its source
# kind, and its deliveries not yet added to them, by path.
_IrqEntry = tuple[tuple[Tally, ...], bool, str, dict[str, _Batch]]


class RunStats:
    """Per-interrupt accounting (a bus sink, or fed from a log)."""

    def __init__(self) -> None:
        self.total = Tally()
        self.vms: dict[str, Tally] = {}
        self.queues: dict[str, Tally] = {}  # "vm/dev/vq": a vhost queue (its call eventfd)
        self.sources: Counter[str] = Counter()
        self.rate: Counter[int] = Counter()  # bucket index → deliveries
        self.rate_bucket_ns = RATE_BUCKET_NS
        self._rate_until = RATE_BUCKET_NS * RATE_MAX_BUCKETS  # widen at this t
        self.latency_by_path: dict[str, Latencies] = {}

        # NOTE: hot (every info-level record, online and in analyze): one dict lookup picks
        # the handler, and the (host, VM, vCPU) / (host, VM, queue) scope tuples are built
        # once per key (bench/bench_obs.py).
        self._by_vcpu: dict[tuple[str, int], tuple[Tally, Tally, Tally]] = {}
        self._by_queue: dict[tuple[str, str, str], tuple[Tally, Tally, Tally]] = {}
        # By (source kind, VM, vCPU, queue or None), and the scopes of (VM, vCPU, queue).
        self._by_irq: dict[tuple[str, str, int, str | None], _IrqEntry] = {}
        self._irq_scopes_of: dict[tuple[str, int, str | None], tuple[Tally, ...]] = {}
        self._handled: Counter[tuple[str, int]] = Counter()  # vkick_guest_irq by vCPU
        self._exits: Counter[tuple[str, int, str]] = Counter()  # kvm_exit by vCPU, reason
        self._host_ipis: Counter[tuple[str, int, int]] = Counter()  # by (VM, vCPU, vector)
        # By vhost queue: RX packets, RX bytes, TX packets, TX bytes, suppressed signals.
        self._by_vq: dict[tuple[str, str, str], list[int]] = {}
        # Each counted event's handler (public for a reader that dispatches itself).
        self.handlers: dict[str, Callable[[EventRecord], None]] = {
            "vkick_irq": self._irq, "vkick_guest_irq": self._guest_irq,
            "kvm_exit": self._exit, "vkick_host_ipi": self._host_ipi,
            "kvm_apic_ipi": self._guest_ipi, "vhost_signal": self._vhost_signal,
            "handle_rx": self._handle_rx, "handle_tx": self._handle_tx,
            "vkick_tun_drop": self._drop, "vkick_rr": self._rr}
        self.wants = frozenset(self.handlers)  # the bus builds no other record for it

    def _vm(self, vm: str) -> Tally:
        t = self.vms.get(vm)
        if t is None:
            t = self.vms[vm] = Tally()
        return t

    def _vcpu_scopes(self, vm: str, vcpu: int) -> tuple[Tally, Tally, Tally]:
        scopes = self._by_vcpu.get((vm, vcpu))
        if scopes is None:
            scopes = self._by_vcpu[(vm, vcpu)] = (self.total, self._vm(vm), Tally())
        return scopes

    def _queue_scopes(self, vm: str, dev: str, vq: str) -> tuple[Tally, Tally, Tally]:
        scopes = self._by_queue.get((vm, dev, vq))
        if scopes is None:
            scopes = self._by_queue[(vm, dev, vq)] = (self.total, self._vm(vm),
                                                      self._queue(f"{vm}/{dev}/{vq}"))
        return scopes

    def _queue(self, key: str) -> Tally:
        t = self.queues.get(key)
        if t is None:
            t = self.queues[key] = Tally()
        return t

    def __call__(self, rec: EventRecord) -> None:
        handler = self.handlers.get(rec["ev"])
        if handler is not None:
            handler(rec)

    # The commonest records are counted per vCPU or queue and added to its scopes at the
    # end (to_json): one counter update per record, not one per scope.
    def _guest_irq(self, rec: EventRecord) -> None:
        self._handled[(rec["vm"], rec["vcpu"])] += 1
        t = rec["t"]
        if t >= self._rate_until:
            self._widen_rate(t)
        self.rate[t // self.rate_bucket_ns] += 1

    def _widen_rate(self, t: int) -> None:
        """Double the rate buckets until ``t`` fits in RATE_MAX_BUCKETS of them: a soak's
        summary (and memory) stays the same size however long it runs."""
        while t >= self._rate_until:
            merged: Counter[int] = Counter()
            for b, n in self.rate.items():
                merged[b // 2] += n
            self.rate = merged
            self.rate_bucket_ns *= 2
            self._rate_until *= 2

    def _exit(self, rec: EventRecord) -> None:
        self._exits[(rec["vm"], rec["vcpu"], rec["reason"])] += 1

    def _host_ipi(self, rec: EventRecord) -> None:
        vm = rec.get("vm") or ""
        self._host_ipis[(vm, rec["vcpu"] if vm else -1, rec["hvector"])] += 1

    def _guest_ipi(self, rec: EventRecord) -> None:
        vec = f"{rec['vector']:#x}"
        for t in self._vcpu_scopes(rec["vm"], rec["vcpu"]):
            t.guest_ipis[vec] += 1

    def _vq(self, rec: EventRecord) -> list[int]:
        key = (rec["vm"], rec["dev"], rec["vq"])
        acc = self._by_vq.get(key)
        if acc is None:
            acc = self._by_vq[key] = [0, 0, 0, 0, 0]
        return acc

    def _vhost_signal(self, rec: EventRecord) -> None:
        if not rec["signalled"]:
            self._vq(rec)[4] += 1

    def _handle_rx(self, rec: EventRecord) -> None:
        acc = self._by_vq.get((rec["vm"], rec["dev"], rec["vq"]))  # _vq, inlined: hot
        if acc is None:
            acc = self._vq(rec)
        acc[0] += rec["pkts"]
        acc[1] += rec["bytes"]

    def _handle_tx(self, rec: EventRecord) -> None:
        acc = self._by_vq.get((rec["vm"], rec["dev"], rec["vq"]))
        if acc is None:
            acc = self._vq(rec)
        acc[2] += rec["pkts"]
        acc[3] += rec["bytes"]

    def _drop(self, rec: EventRecord) -> None:
        for t in self._queue_scopes(rec["vm"], rec["dev"], rec["vq"]):
            t.drops += 1

    def _rr(self, rec: EventRecord) -> None:
        rtt = max(1, rec["rtt_ns"])
        vm = rec["vm"]
        for t in (*self._vcpu_scopes(vm, rec["vcpu"]),
                  self._queue_scopes(vm, rec["dev"], rec["vq"])[2]):
            t.record_rtt(rtt)

    def _irq_scopes(self, vm: str, vcpu: int, queue: str | None) -> tuple[Tally, ...]:
        key = (vm, vcpu, queue)
        scopes = self._irq_scopes_of.get(key)
        if scopes is None:
            base: tuple[Tally, ...] = (self._vcpu_scopes(vm, vcpu) if vcpu >= 0 and vm else
                                       (self.total, self._vm(vm)) if vm else (self.total,))
            scopes = (*base, self._queue(queue)) if queue is not None else base
            self._irq_scopes_of[key] = scopes
        return scopes

    def _irq_entry(self, key: tuple[str, str, int, str | None]) -> _IrqEntry:
        source, vm, vcpu, queue = key
        entry = self._by_irq[key] = (self._irq_scopes(vm, vcpu, queue), queue is not None,
                                     source, {})
        return entry

    def _irq(self, rec: EventRecord) -> None:
        source = rec["source"]
        key = (source, rec["vm"], rec["vcpu"], rec["origin"] if source == "signal" else None)
        entry = self._by_irq.get(key)
        if entry is None:
            entry = self._irq_entry(key)
        first = rec["first"]
        if not rec["delivered"]:
            if first:
                self.sources[source] += 1
            for t in entry[0]:
                t.signalled += first
                t.undelivered += 1
            return
        # NOTE: a delivery lands in four or five scopes (and its source's count); counting
        # it once here, by path and latency, and adding the counts to every scope at the
        # end (or when the latencies grow many) is what keeps vkick analyze fast
        # (bench/bench_obs.py).  No tuple is built per record, and no Counter misses (a
        # Python __missing__ call): most latencies are new.
        path = rec["path"]
        batch = entry[3].get(path)
        if batch is None:
            batch = entry[3][path] = [{}, 0, 0]
        lats = batch[0]
        lat = max(1, rec["latency_ns"])
        lats[lat] = lats.get(lat, 0) + 1
        if rec["coalesced"]:
            batch[1] += 1
        if first:
            batch[2] += 1
        if len(lats) > _FOLD_AT:
            self._flush(entry)

    def _flush(self, entry: _IrqEntry) -> None:
        scopes, queue, source, batches = entry
        by_path = self.latency_by_path
        for path, (lats, coalesced, first) in batches.items():
            n = sum(lats.values())
            for t in scopes:
                t.paths[path] += n
                t.latency.record_counts(lats)
                t.coalesced += coalesced
                t.signalled += first
            if queue:
                # A queue's "delivered": its signals that reached the guest (the guest-side
                # count of handler runs, vkick_guest_irq, knows no queue).
                scopes[-1].delivered += n
            h = by_path.get(path)
            if h is None:
                h = by_path[path] = Latencies()
            h.record_counts(lats)
            if first:
                self.sources[source] += first
        batches.clear()

    def to_json(self) -> dict[str, Any]:
        """The summary (the same schema for ``vkick run --json`` and ``vkick analyze``)."""
        for entry in self._by_irq.values():
            self._flush(entry)
        for (vm, vcpu), n in self._handled.items():
            for t in self._vcpu_scopes(vm, vcpu):
                t.delivered += n
        for (vm, vcpu, reason), n in self._exits.items():
            for t in self._vcpu_scopes(vm, vcpu):
                t.exits[reason] += n
        for (vm, vcpu, vector), n in self._host_ipis.items():
            vec = f"{vector:#x}"
            for t in self._irq_scopes(vm, vcpu, None):
                t.host_ipis[vec] += n
        for (vm, dev, vq), (rx_p, rx_b, tx_p, tx_b, suppressed) in self._by_vq.items():
            for t in self._queue_scopes(vm, dev, vq):
                t.rx_packets += rx_p
                t.rx_bytes += rx_b
                t.tx_packets += tx_p
                t.tx_bytes += tx_b
                t.suppressed += suppressed
        self._handled.clear()
        self._exits.clear()
        self._host_ipis.clear()
        self._by_vq.clear()
        vcpus: dict[str, dict[str, Any]] = {}  # VM → vCPU index → its tally
        for (vm, vcpu), scopes in sorted(self._by_vcpu.items()):
            vcpus.setdefault(vm, {})[str(vcpu)] = scopes[2].to_json()
        total = self.total
        out = total.to_json()
        out.update({
            "sources": dict(sorted(self.sources.items())),
            "coalescing_ratio": round(total.coalesced / total.signalled, 6)
                                if total.signalled else 0.0,
            "latency_ns_by_path": {k: h.to_json()
                                   for k, h in sorted(self.latency_by_path.items())},
            "vms": {name: {**t.to_json(), "vcpus": vcpus.get(name, {})}
                    for name, t in sorted(self.vms.items())},
            "queues": {k: t.to_json() for k, t in sorted(self.queues.items())},
            "rate_bucket_ns": self.rate_bucket_ns,
            "rate": [{"t_ns": b * self.rate_bucket_ns, "delivered": n}
                     for b, n in sorted(self.rate.items())],
        })
        return out
