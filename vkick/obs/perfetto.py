"""Chrome Trace Event / Perfetto JSON export of a run's events, and a strict validator.

Layout (pid = process, tid = track):

* one process per VM, a track per vCPU: slices ``guest`` (``kvm_entry`` → ``kvm_exit``),
  ``host`` (the vCPU thread in KVM: exit → entry or halt, wakeup → entry) and ``halted``
  (``vkick_halt`` → ``kvm_vcpu_wakeup``); zero-length ``irq 0x..`` slices where the guest
  takes an interrupt; instants for kicks, posted-interrupt notifications and guest IPIs
  (the IPI's source slice sits on the sender's track); a ``KVM_SIGNAL_MSI`` track for
  MSIs injected by the VMM;
* a ``host`` process with a track per physical CPU (which vCPU is loaded there, as
  slices; host IPIs as instants), per vhost worker (``handle_rx``/``handle_tx`` rounds and
  ``vhost_signal``), per kworker (``workqueue_execute_start`` → ``_end`` slices) and per
  signalled eventfd (``eventfd_signal`` instants);
* a flow arrow from each interrupt's source slice (``vhost_signal``, an eventfd signal
  without one, ``KVM_SIGNAL_MSI``, a guest IPI) to the slice where the guest took it:
  Perfetto's v2 flows, ``bind_id`` with ``flow_out`` on the source slice and ``flow_in``
  on the delivery slice.  A source delivered to several vCPUs, or a delivery satisfying
  several coalesced sources, gets one flow per (source, delivery) pair, each on its own
  zero-length slice; a flow id is never reused.

Timestamps are µs (emulated ns / 1000, so ns-exact); events are sorted by time (stable).
The ``perfetto`` PyPI package's trace processor downloads a native binary on first use,
which this offline machine cannot; :func:`validate_trace` is the structural check instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

Event = dict[str, Any]
HOST_PID: Final = 0
_SLICE_PHASES: Final = ("B", "E", "X", "i", "I")


class _Builder:
    def __init__(self) -> None:
        self.meta: list[Event] = [{"ph": "M", "name": "process_name", "pid": HOST_PID,
                                   "tid": 0, "args": {"name": "host"}}]
        self.events: list[Event] = []
        self.pids: dict[str, int] = {}
        self.tids: dict[tuple[int, str], int] = {}
        self.ntids: dict[int, int] = {}
        self.open: dict[tuple[int, int], list[str]] = {}
        # correlation id → (source slice, whether its bind_id is taken)
        self.sources: dict[int, list[Any]] = {}
        self.next_flow = 1
        self.last_ts = 0.0

    # ------------------------------------------------------------------ tracks

    def pid(self, vm: str) -> int:
        pid = self.pids.get(vm)
        if pid is None:
            pid = self.pids[vm] = len(self.pids) + 1
            self.meta.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                              "args": {"name": vm}})
        return pid

    def tid(self, pid: int, name: str) -> int:
        key = (pid, name)
        tid = self.tids.get(key)
        if tid is None:
            tid = self.tids[key] = self.ntids[pid] = self.ntids.get(pid, 0) + 1
            self.meta.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                              "args": {"name": name}})
        return tid

    def vcpu_track(self, rec: Event) -> tuple[int, int]:
        pid = self.pid(rec["vm"])
        return pid, self.tid(pid, f"vcpu{rec['vcpu']}")

    # ------------------------------------------------------------------ events

    def begin(self, track: tuple[int, int], name: str, ts: float, **args: Any) -> None:
        self.open.setdefault(track, []).append(name)
        self.events.append({"ph": "B", "name": name, "pid": track[0], "tid": track[1],
                            "ts": ts, "args": args})

    def end(self, track: tuple[int, int], name: str, ts: float, **args: Any) -> None:
        stack = self.open.get(track)
        if not stack or stack[-1] != name:
            return  # no matching begin (e.g. the log starts mid-slice)
        stack.pop()
        self.events.append({"ph": "E", "name": name, "pid": track[0], "tid": track[1],
                            "ts": ts, "args": args})

    def switch(self, track: tuple[int, int], old: str, new: str, ts: float,
               **args: Any) -> None:
        """End ``old`` (if it is open) and begin ``new`` on a vCPU track."""
        self.end(track, old, ts, **args)
        self.begin(track, new, ts)

    def instant(self, track: tuple[int, int], name: str, ts: float, **args: Any) -> None:
        self.events.append({"ph": "i", "s": "t", "name": name, "pid": track[0],
                            "tid": track[1], "ts": ts, "args": args})

    def point(self, track: tuple[int, int], name: str, ts: float, **args: Any) -> Event:
        """A zero-length slice (flows bind to slices, not to instants)."""
        e = {"ph": "X", "name": name, "pid": track[0], "tid": track[1], "ts": ts, "dur": 0,
             "args": args}
        self.events.append(e)
        return e

    def source(self, irq: int, track: tuple[int, int], name: str, ts: float,
               **args: Any) -> None:
        if irq and irq not in self.sources:
            self.sources[irq] = [self.point(track, name, ts, irq=irq, **args), False]

    def add(self, rec: Event) -> None:
        ev = rec["ev"]
        ts = rec["t"] / 1000.0
        self.last_ts = max(self.last_ts, ts)
        if ev == "kvm_entry":
            self.switch(self.vcpu_track(rec), "host", "guest", ts)
        elif ev == "kvm_exit":
            self.switch(self.vcpu_track(rec), "guest", "host", ts, reason=rec["reason"])
        elif ev == "vkick_halt":
            self.switch(self.vcpu_track(rec), "host", "halted", ts)
        elif ev == "kvm_vcpu_wakeup":
            self.switch(self.vcpu_track(rec), "halted", "host", ts, waited=rec["waited"])
        elif ev == "vkick_vcpu_load":
            track = self.vcpu_track(rec)
            if not self.open.get(track):
                self.begin(track, "host", ts)  # the vCPU thread's first run
            pcpu = self.tid(HOST_PID, f"pcpu{rec['pcpu']}")
            self.begin((HOST_PID, pcpu), f"{rec['vm']}/vcpu{rec['vcpu']}", ts)
        elif ev == "vkick_vcpu_put":
            pcpu = self.tid(HOST_PID, f"pcpu{rec['pcpu']}")
            self.end((HOST_PID, pcpu), f"{rec['vm']}/vcpu{rec['vcpu']}", ts,
                     preempted=rec["preempted"])
        elif ev == "vkick_guest_irq":
            self.delivery(self.vcpu_track(rec), ts, rec)
        elif ev == "kvm_vcpu_kick":
            self.instant(self.vcpu_track(rec), "kick", ts, ipi=rec["ipi"], woke=rec["woke"])
        elif ev == "vkick_pi_notification":
            self.instant(self.vcpu_track(rec), "PI notification", ts,
                         in_guest=rec["in_guest"])
        elif ev == "kvm_apic_ipi":
            track = self.vcpu_track(rec)
            name = f"guest IPI {rec['vector']:#x}"
            self.instant(track, name, ts, dest_id=rec["dest_id"], irq=rec["irq"])
            self.source(rec["irq"], track, name, ts)
        elif ev == "kvm_msi_set_irq":
            irq = rec["irq"]
            if irq and irq not in self.sources:  # an MSI of its own (KVM_SIGNAL_MSI)
                pid = self.pid(rec["vm"])
                track = (pid, self.tid(pid, "KVM_SIGNAL_MSI"))
                self.instant(track, "MSI", ts, address=rec["address"], data=rec["data"])
                self.source(irq, track, "MSI", ts)
        elif ev == "vhost_signal":
            track = (HOST_PID, self.tid(HOST_PID, _vhost_worker(rec)))
            name = f"vhost_signal {rec['vq']}"
            if rec["signalled"]:
                self.source(rec["irq"], track, name, ts)
            else:
                self.instant(track, f"{name} (suppressed)", ts)
        elif ev in ("handle_rx", "handle_tx"):
            track = (HOST_PID, self.tid(HOST_PID, _vhost_worker(rec)))
            self.point(track, f"{ev} {rec['vq']}", ts, pkts=rec["pkts"], bytes=rec["bytes"])
        elif ev == "eventfd_signal":
            track = (HOST_PID, self.tid(HOST_PID, f"eventfd {rec['efd']}"))
            self.instant(track, "eventfd_signal", ts, n=rec["n"], count=rec["count"],
                         irq=rec["irq"])
            self.source(rec["irq"], track, "signal", ts)
        elif ev == "vkick_host_ipi":
            track = (HOST_PID, self.tid(HOST_PID, f"pcpu{rec['pcpu']}"))
            self.instant(track, f"IPI {rec['hvector']:#x}", ts, vcpu=rec["vcpu"])
        elif ev in ("workqueue_execute_start", "workqueue_execute_end"):
            track = (HOST_PID, self.tid(HOST_PID, f"kworker {rec['wq']}"))
            if ev.endswith("start"):
                self.begin(track, rec["work"], ts)
            else:
                self.end(track, rec["work"], ts)

    def delivery(self, track: tuple[int, int], ts: float, rec: Event) -> None:
        name = f"irq {rec['vector']:#x}"
        target: Event | None = self.point(track, name, ts, irq=rec["irq"])
        for irq in rec["irq"]:
            src = self.sources.get(irq)
            if src is None:
                continue
            slice_out, taken = src
            if taken:  # a further delivery of this source: its own source slice
                slice_out = dict(slice_out, args=dict(slice_out["args"]))
                self.events.append(slice_out)
            src[1] = True
            fid = self.next_flow
            self.next_flow += 1
            slice_out["bind_id"] = fid
            slice_out["flow_out"] = True
            if target is None:  # a further source of this delivery: its own slice
                target = self.point(track, f"{name} (coalesced)", ts, irq=[irq])
            target["bind_id"] = fid
            target["flow_in"] = True
            target = None

    def finish(self) -> dict[str, Any]:
        for (pid, tid), stack in self.open.items():
            while stack:
                self.events.append({"ph": "E", "name": stack.pop(), "pid": pid, "tid": tid,
                                    "ts": self.last_ts, "args": {}})
        self.events.sort(key=lambda e: e["ts"])  # stable: equal times keep stream order
        return {"traceEvents": self.meta + self.events, "displayTimeUnit": "ns"}


def export_trace(records: Iterable[Event]) -> dict[str, Any]:
    """The Trace Event Format document for ``records`` (a debug-level event stream)."""
    builder = _Builder()
    for rec in records:
        builder.add(rec)
    return builder.finish()


_PHASES: Final = frozenset({"B", "E", "X", "i", "I", "s", "t", "f", "M", "C"})


def validate_trace(trace: dict[str, Any]) -> list[str]:
    """Strict structural check of the Trace Event Format: known phases; metadata naming
    every process and track used; B/E matched per track; X durations ≥ 0; timestamps
    non-decreasing per track; v1 flows (``s`` → ``f``) and v2 flows (``bind_id`` with
    ``flow_out`` / ``flow_in`` on slices) each paired exactly once, never ending before
    they start."""
    problems: list[str] = []
    stacks: dict[tuple[int, int], list[str]] = {}
    last_ts: dict[tuple[int, int], float] = {}
    flows: dict[Any, list[Event]] = {}
    bound: dict[Any, dict[str, list[Event]]] = {}
    named_pids: set[int] = set()
    named_tracks: set[tuple[int, int]] = set()
    used: dict[tuple[int, int], int] = {}
    for i, e in enumerate(trace.get("traceEvents", [])):
        ph = e.get("ph")
        if ph not in _PHASES:
            problems.append(f"event {i}: unknown phase {ph!r}")
            continue
        if not isinstance(e.get("pid"), int) or not isinstance(e.get("tid"), int):
            problems.append(f"event {i}: pid and tid must be integers")
            continue
        track = (e["pid"], e["tid"])
        if ph == "M":
            if not isinstance(e.get("args", {}).get("name"), str):
                problems.append(f"event {i}: metadata without args.name")
            elif e.get("name") == "process_name":
                named_pids.add(e["pid"])
            elif e.get("name") == "thread_name":
                named_tracks.add(track)
            continue
        used.setdefault(track, i)
        ts = e.get("ts")
        if not isinstance(ts, int | float):
            problems.append(f"event {i}: no timestamp")
            continue
        if ph in _SLICE_PHASES:
            if ts < last_ts.get(track, float("-inf")):
                problems.append(f"event {i}: time goes backwards on track {track}")
            last_ts[track] = ts
        if ph == "B":
            stacks.setdefault(track, []).append(e["name"])
        elif ph == "E":
            stack = stacks.get(track)
            if not stack or stack[-1] != e["name"]:
                problems.append(f"event {i}: E {e['name']!r} without a matching B on {track}")
            else:
                stack.pop()
        elif ph == "X" and not (isinstance(e.get("dur"), int | float) and e["dur"] >= 0):
            problems.append(f"event {i}: X without a duration ≥ 0")
        elif ph in ("s", "f"):
            flows.setdefault(e["id"], []).append(e)
        if "bind_id" in e:
            if ph not in ("B", "X"):
                problems.append(f"event {i}: bind_id on a {ph!r} event (flows bind to "
                                "slices)")
            directions = [d for d in ("flow_out", "flow_in") if e.get(d) is True]
            if len(directions) != 1:
                problems.append(f"event {i}: bind_id needs exactly one of flow_out/flow_in")
            for d in directions:
                bound.setdefault(e["bind_id"], {}).setdefault(d, []).append(e)
    for track, stack in stacks.items():
        if stack:
            problems.append(f"track {track}: unclosed slices {stack}")
    for track, i in used.items():
        if track[0] not in named_pids:
            problems.append(f"event {i}: process {track[0]} has no process_name")
        if track not in named_tracks:
            problems.append(f"event {i}: track {track} has no thread_name")
    for fid, evs in flows.items():
        phases = [x["ph"] for x in evs]
        if phases != ["s", "f"]:
            problems.append(f"flow {fid}: expected one s then one f, got {phases}")
        elif evs[0]["ts"] > evs[1]["ts"]:
            problems.append(f"flow {fid}: ends before it starts")
    for fid, ends in bound.items():
        outs, ins = ends.get("flow_out", []), ends.get("flow_in", [])
        if len(outs) != 1 or len(ins) != 1:
            problems.append(f"flow {fid}: expected one flow_out and one flow_in slice, got "
                            f"{len(outs)} and {len(ins)} (flow ids are never reused)")
        elif outs[0]["ts"] > ins[0]["ts"]:
            problems.append(f"flow {fid}: ends before it starts")
    return problems


def flow_count(trace: dict[str, Any]) -> int:
    """Flow arrows in ``trace`` (v2: slices with ``flow_in``; v1: ``f`` events)."""
    return sum(1 for e in trace["traceEvents"]
               if e.get("flow_in") is True or e.get("ph") == "f")


def _vhost_worker(rec: dict[str, Any]) -> str:
    """The vhost worker kthread of a queue pair ("vhost-vm0/net0.1" for rx1 / tx1)."""
    return f"vhost-{rec['vm']}/{rec['dev']}.{rec['vq'][2:]}"
