"""Chrome Trace Event / Perfetto JSON export of a run's events, and a strict validator.

Layout: one process per VM with a track per vCPU ("guest" slices from ``kvm_entry`` to
``kvm_exit``, "host" slices for the vCPU thread in KVM between them, "halted" slices from
``vkick_halt`` to ``kvm_vcpu_wakeup``, short slices for deliveries); a "host" process
with a track per physical CPU (IPIs as instants), per
workqueue (``workqueue_execute_start``/``_end`` slices) and one for interrupt sources
(eventfd signals, KVM_SIGNAL_MSI, guest IPIs).  A flow arrow (``s`` → ``f``, ``bp: e``)
follows every interrupt from its source to the guest handler that took it; a flow id is
never reused.  Timestamps are µs (emulated).

The ``perfetto`` PyPI package's trace processor downloads a native binary on first use,
which an offline machine cannot; :func:`validate_trace` is the structural check instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Event = dict[str, Any]
HOST_PID = 0


class _Builder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.pids: dict[str, int] = {}
        self.tids: dict[tuple[int, str], int] = {}
        self.open: dict[tuple[int, int], list[str]] = {}
        self.sources: dict[int, tuple[int, int, float]] = {}
        self.next_flow = 1
        self.last_ts = 0.0
        self.events.append({"ph": "M", "name": "process_name", "pid": HOST_PID, "tid": 0,
                            "args": {"name": "host"}})

    def pid(self, vm: str) -> int:
        pid = self.pids.get(vm)
        if pid is None:
            pid = self.pids[vm] = len(self.pids) + 1
            self.events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                                "args": {"name": vm}})
        return pid

    def tid(self, pid: int, name: str) -> int:
        key = (pid, name)
        tid = self.tids.get(key)
        if tid is None:
            tid = self.tids[key] = len([k for k in self.tids if k[0] == pid]) + 1
            self.events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                                "args": {"name": name}})
        return tid

    def begin(self, pid: int, tid: int, name: str, ts: float, **args: Any) -> None:
        self.open.setdefault((pid, tid), []).append(name)
        self.events.append({"ph": "B", "name": name, "pid": pid, "tid": tid, "ts": ts,
                            "args": args})

    def end(self, pid: int, tid: int, name: str, ts: float, **args: Any) -> None:
        stack = self.open.get((pid, tid))
        if not stack or stack[-1] != name:
            return  # no matching begin (e.g. the log starts mid-slice)
        stack.pop()
        self.events.append({"ph": "E", "name": name, "pid": pid, "tid": tid, "ts": ts,
                            "args": args})

    def instant(self, pid: int, tid: int, name: str, ts: float, **args: Any) -> None:
        self.events.append({"ph": "i", "s": "t", "name": name, "pid": pid, "tid": tid,
                            "ts": ts, "args": args})

    def add(self, rec: Event) -> None:
        ev = rec["ev"]
        ts = rec["t"] / 1000.0
        self.last_ts = max(self.last_ts, ts)
        if ev in ("kvm_entry", "kvm_exit", "vkick_halt", "kvm_vcpu_wakeup", "vkick_guest_irq"):
            pid = self.pid(rec["vm"])
            tid = self.tid(pid, f"vcpu{rec['vcpu']}")
            # guest → host (exit) → guest (entry) or → halted (HLT) → host (wakeup) → …
            if ev == "kvm_entry":
                self.end(pid, tid, "host", ts)
                self.begin(pid, tid, "guest", ts, pcpu=rec["pcpu"])
            elif ev == "kvm_exit":
                self.end(pid, tid, "guest", ts, reason=rec["reason"])
                self.begin(pid, tid, "host", ts)
            elif ev == "vkick_halt":
                self.end(pid, tid, "host", ts)
                self.begin(pid, tid, "halted", ts)
            elif ev == "kvm_vcpu_wakeup":
                self.end(pid, tid, "halted", ts, waited=rec["waited"])
                self.begin(pid, tid, "host", ts)
            else:
                self.delivery(pid, tid, ts, rec)
        elif ev in ("workqueue_execute_start", "workqueue_execute_end"):
            tid = self.tid(HOST_PID, f"kworker {rec['wq']}")
            if ev.endswith("start"):
                self.begin(HOST_PID, tid, rec["work"], ts)
            else:
                self.end(HOST_PID, tid, rec["work"], ts)
        elif ev == "vkick_host_ipi":
            tid = self.tid(HOST_PID, f"pcpu{rec['pcpu']}")
            self.instant(HOST_PID, tid, f"IPI {rec['hvector']:#x}", ts, vcpu=rec["vcpu"])
        elif ev in ("eventfd_signal", "kvm_msi_set_irq", "kvm_apic_ipi"):
            irq = rec.get("irq")
            if irq and irq not in self.sources:
                tid = self.tid(HOST_PID, "interrupt sources")
                name = {"eventfd_signal": "signal", "kvm_msi_set_irq": "MSI",
                        "kvm_apic_ipi": "guest IPI"}[ev]
                self.events.append({"ph": "X", "name": name, "pid": HOST_PID, "tid": tid,
                                    "ts": ts, "dur": 0.001, "args": {"irq": irq}})
                self.sources[irq] = (HOST_PID, tid, ts)

    def delivery(self, pid: int, tid: int, ts: float, rec: Event) -> None:
        self.events.append({"ph": "X", "name": f"irq {rec['vector']:#x}", "pid": pid,
                            "tid": tid, "ts": ts, "dur": 0.001,
                            "args": {"irq": rec["irq"]}})
        for irq in rec["irq"]:
            src = self.sources.get(irq)
            if src is None:
                continue
            flow = self.next_flow
            self.next_flow += 1
            spid, stid, sts = src
            self.events.append({"ph": "s", "name": "interrupt", "cat": "irq", "id": flow,
                                "pid": spid, "tid": stid, "ts": sts})
            self.events.append({"ph": "f", "bp": "e", "name": "interrupt", "cat": "irq",
                                "id": flow, "pid": pid, "tid": tid, "ts": ts})

    def finish(self) -> dict[str, Any]:
        for (pid, tid), stack in self.open.items():
            while stack:
                name = stack.pop()
                self.events.append({"ph": "E", "name": name, "pid": pid, "tid": tid,
                                    "ts": self.last_ts, "args": {}})
        return {"traceEvents": self.events, "displayTimeUnit": "ns"}


def export_trace(records: Iterable[Event]) -> dict[str, Any]:
    """The Trace Event Format document for ``records`` (a debug-level event stream)."""
    builder = _Builder()
    for rec in records:
        builder.add(rec)
    return builder.finish()


_PHASES = frozenset({"B", "E", "X", "i", "I", "s", "t", "f", "M", "C"})


def validate_trace(trace: dict[str, Any]) -> list[str]:
    """Strict structural check: phases, B/E matched per track, X durations, flows paired
    s → f with non-decreasing time, timestamps monotonic per track."""
    problems: list[str] = []
    stacks: dict[tuple[int, int], list[str]] = {}
    last_ts: dict[tuple[int, int], float] = {}
    flows: dict[int, list[Event]] = {}
    for i, e in enumerate(trace.get("traceEvents", [])):
        ph = e.get("ph")
        if ph not in _PHASES:
            problems.append(f"event {i}: unknown phase {ph!r}")
            continue
        if ph == "M":
            continue
        track = (e["pid"], e["tid"])
        ts = e.get("ts")
        if not isinstance(ts, int | float):
            problems.append(f"event {i}: no timestamp")
            continue
        if ph in ("B", "E", "X", "i", "I") and ts < last_ts.get(track, float("-inf")):
            problems.append(f"event {i}: time goes backwards on track {track}")
        if ph in ("B", "E", "X", "i", "I"):
            last_ts[track] = ts
        if ph == "B":
            stacks.setdefault(track, []).append(e["name"])
        elif ph == "E":
            stack = stacks.get(track)
            if not stack or stack[-1] != e["name"]:
                problems.append(f"event {i}: E {e['name']!r} without a matching B on {track}")
            else:
                stack.pop()
        elif ph == "X" and e.get("dur", -1) < 0:
            problems.append(f"event {i}: X without a duration ≥ 0")
        elif ph in ("s", "f"):
            flows.setdefault(e["id"], []).append(e)
    for track, stack in stacks.items():
        if stack:
            problems.append(f"track {track}: unclosed slices {stack}")
    for fid, evs in flows.items():
        phases = [x["ph"] for x in evs]
        if phases != ["s", "f"]:
            problems.append(f"flow {fid}: expected one s then one f, got {phases}")
        elif evs[0]["ts"] > evs[1]["ts"]:
            problems.append(f"flow {fid}: ends before it starts")
    return problems
