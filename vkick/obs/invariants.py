"""The correctness oracle as a consumer of the event stream (spec §17; design.md §7).

Checks, online or on a log:

* §17.1 no lost interrupt: every source is delivered (``vkick_irq`` with
  ``delivered: false`` is a violation) and within ``stall_ns`` of its signal — except a
  signal of an eventfd whose irqfds were all shut down (``irqfd_shutdown``) and that is not
  bound again afterwards: §17.1 asks for delivery only with an irqfd attached;
* §17.2 no spurious delivery: every ``vkick_guest_irq`` satisfies at least one source;
* §17.1 also for an eventfd shared by irqfds of several VMs (research/bugs.md #13): a
  signal is owed to *every* VM with an irqfd attached to the eventfd at that moment, and
  each must take it (``eventfd_signal`` … ``vkick_guest_irq`` of that VM) within
  ``stall_ns`` (or by the end);
* §17.15 nothing is injected through an irqfd (``irqfd_wakeup``, ``irqfd_inject``) after
  its ``KVM_IRQFD`` deassign returned;
* memory safety: no freed object is touched (``vkick_use_after_free``, bug #12), and the
  eventfd counter never wraps below 0 (``vkick_eventfd_underflow``, bug #14);
* §17.17 no stalled receive queue: used RX buffers the device published (``handle_rx``)
  are taken by the guest (``virtnet_poll``) within ``stall_ns``, and none is left untaken
  when the run ends quiescent (the lost-notification hang of spec §16.9).

``vkick_run_start`` sets the latency bound the run was configured with, so a log is
checked offline exactly as it was online.

Each violation carries the causal trace: the records that named its correlation id (kept
while the interrupt is in flight, at most ``TRACE_LEN`` of them, so memory stays bounded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from vkick.obs.tracepoints import EVENTS
from vkick.runtime.events import EventRecord

TRACE_LEN: Final = 32

_Queue = tuple[str, str, str]  # (vm, dev, vq) of a vhost queue

# The events a check below reads (anything else only joins the causal traces).
_CHECKED: Final = frozenset({
    "vkick_irq", "vkick_guest_irq", "eventfd_signal", "irqfd_deassign", "irqfd_assign",
    "irqfd_shutdown", "vkick_use_after_free", "vkick_eventfd_underflow", "handle_rx",
    "virtnet_poll", "vkick_run_start", "vkick_run_end", "irqfd_wakeup", "irqfd_inject"})
# The events whose ``irq`` is one correlation id (not a list of them).
_ONE_IRQ: Final = frozenset(name for name, e in EVENTS.items() if ("irq", "int") in
                            ((f[0], f[1]) for f in e.fields))


@dataclass(slots=True)
class Violation:
    invariant: str
    detail: str
    irq: int = 0
    trace: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "detail": self.detail, "irq": self.irq,
                "trace": self.trace}


class InvariantChecker:
    """A bus sink (or log consumer) collecting :class:`Violation` s."""

    # What it reads: the checked events, and every event that carries a correlation id
    # (the causal traces).  Nothing else needs building for it.
    wants: Final = _CHECKED | {name for name, e in EVENTS.items()
                               if any(f[0] == "irq" for f in e.fields)}

    def __init__(self, stall_ns: int = 10_000_000) -> None:
        self.stall_ns = stall_ns
        self.violations: list[Violation] = []
        self._trace: dict[int, list[dict[str, Any]]] = {}
        self._deassigned: set[tuple[str, int, str]] = set()  # (vm, gsi, efd)
        # Bug #13: the VMs with an irqfd hooked on each eventfd, in assignment order, and
        # the signals of a shared eventfd still owed to a VM: (vm, irq) → (t, efd, the
        # other VMs attached then).
        self._attached: dict[str, list[str]] = {}
        self._owed: dict[tuple[str, int], tuple[int, str, str]] = {}
        self._reported: set[tuple[str, str]] = set()  # use-after-free (what, where) seen
        # Signals of an eventfd seen bound before but with no irqfd attached now: owed only
        # if an irqfd binds it again (then its poll injects them).
        self._unbound: dict[str, list[int]] = {}
        self._unbound_ids: set[int] = set()
        # §17.17: per RX queue ("vm/dev/vq"): used->idx published, the guest's last_used_idx,
        # and since when published buffers wait untaken.
        self._published: dict[_Queue, int] = {}
        self._consumed: dict[_Queue, int] = {}
        self._waiting_since: dict[_Queue, int] = {}

        # Each event's handler (the bus calls it instead of the sink: see
        # vkick.runtime.events): the checked events' own, every other event's only feeds
        # the traces.
        self.handlers: dict[str, Callable[[EventRecord], None]] = {
            name: self._note_one if name in _ONE_IRQ else self._note for name in self.wants}
        self.handlers.update({
            "vkick_irq": self._lifecycle, "vkick_guest_irq": self._guest_irq,
            "eventfd_signal": self._eventfd_signal, "handle_rx": self._handle_rx,
            "virtnet_poll": self._virtnet_poll, "irqfd_deassign": self._irqfd_deassign,
            "irqfd_assign": self._irqfd_assign, "irqfd_shutdown": self._irqfd_shutdown,
            "vkick_use_after_free": self._use_after_free,
            "vkick_eventfd_underflow": self._eventfd_underflow,
            "vkick_run_start": self._run_start, "vkick_run_end": self._run_end,
            "irqfd_wakeup": self._irqfd_injects, "irqfd_inject": self._irqfd_injects})

    def __call__(self, rec: EventRecord) -> None:
        self.handlers.get(rec["ev"], self._note)(rec)

    # NOTE: hot (every record of a run or log): the trace bookkeeping keeps the records
    # themselves — no sink changes a record after it is emitted, and the reader builds a
    # fresh dict per line — and is inlined in the handlers of the commonest events, each
    # knowing whether its ``irq`` is one id or a list (bench/bench_obs.py).
    def _note(self, rec: EventRecord) -> None:
        """Add ``rec`` to the causal trace of every correlation id it names."""
        irq = rec.get("irq")
        if irq:
            traces = self._trace
            for i in (irq if type(irq) is list else (irq,)):
                trace = traces.get(i)
                if trace is None:
                    traces[i] = [rec]
                elif len(trace) < TRACE_LEN:
                    trace.append(rec)

    def _note_one(self, rec: EventRecord) -> None:
        """:meth:`_note` of an event whose ``irq`` is one id (the schema's ``int``)."""
        irq = rec.get("irq")
        if irq:
            if type(irq) is list:
                self._note(rec)
                return
            trace = self._trace.get(irq)
            if trace is None:
                self._trace[irq] = [rec]
            elif len(trace) < TRACE_LEN:
                trace.append(rec)

    def _guest_irq(self, rec: EventRecord) -> None:
        irqs = rec["irq"]
        if not irqs:
            self.violations.append(Violation(
                "17.2 no spurious delivery",
                f"{rec['vm']} vcpu {rec['vcpu']} took {rec['vector']:#x} at t={rec['t']}"
                f" ns with no pending source", 0, [dict(rec)]))
            return
        self._note(rec)
        if self._owed:
            vm = rec["vm"]
            for i in irqs:
                self._owed.pop((vm, i), None)

    def _eventfd_signal(self, rec: EventRecord) -> None:
        self._note_one(rec)
        vms = self._attached.get(rec["efd"])
        if vms is not None:
            if len(vms) > 1:
                self._shared_signal(rec, vms)
            elif not vms and rec["irq"]:
                self._unbound.setdefault(rec["efd"], []).append(rec["irq"])
                self._unbound_ids.add(rec["irq"])

    # The RX-queue records carry no correlation id (the schema), so they note a trace only
    # if one has an ``irq`` anyway.
    def _handle_rx(self, rec: EventRecord) -> None:
        if "irq" in rec:
            self._note(rec)
        key = (rec["vm"], rec["dev"], rec["vq"])
        used = self._published[key] = rec["used_idx"]
        if used != self._consumed.get(key, 0):
            self._waiting_since.setdefault(key, rec["t"])
            self._check_stall(key, rec["t"], rec)
        else:
            # The guest already took them: it can run ahead of this record, which comes
            # at the end of the round, after used->idx was published (and after any
            # W-VQ-notify wait in the round's vhost_signal).
            self._waiting_since.pop(key, None)

    def _virtnet_poll(self, rec: EventRecord) -> None:
        if "irq" in rec:
            self._note(rec)
        key = (rec["vm"], rec["dev"], rec["vq"])
        self._check_stall(key, rec["t"], rec)
        consumed = self._consumed[key] = rec["last_used_idx"]
        if consumed == self._published.get(key, 0):
            self._waiting_since.pop(key, None)

    def _irqfd_deassign(self, rec: EventRecord) -> None:
        self._note(rec)
        self._deassigned.add((rec["vm"], rec["gsi"], rec["efd"]))

    def _irqfd_assign(self, rec: EventRecord) -> None:
        self._note(rec)
        self._deassigned.discard((rec["vm"], rec["gsi"], rec["efd"]))
        vms = self._attached.setdefault(rec["efd"], [])
        if rec["vm"] not in vms:
            vms.append(rec["vm"])
        for i in self._unbound.pop(rec["efd"], ()):  # pending at assignment: owed now
            self._unbound_ids.discard(i)

    def _irqfd_shutdown(self, rec: EventRecord) -> None:
        self._note(rec)
        vms = self._attached.get(rec["efd"])
        if vms is not None and rec["vm"] in vms:
            vms.remove(rec["vm"])

    def _use_after_free(self, rec: EventRecord) -> None:
        self._note(rec)
        site = (rec["what"], rec["where"])
        if site not in self._reported:  # one violation per object and access site
            self._reported.add(site)
            self.violations.append(Violation(
                "memory safety: no use after free",
                f"{rec['where']} touched freed {rec['what']} at t={rec['t']} ns", 0,
                [dict(rec)]))

    def _eventfd_underflow(self, rec: EventRecord) -> None:
        self._note(rec)
        self.violations.append(Violation(
            "eventfd count never underflows",
            f"{rec['efd']}: a semaphore read of {rec['cnt']} at count 0 wrapped the "
            f"counter to {rec['count']:#x} at t={rec['t']} ns", 0, [dict(rec)]))

    def _run_start(self, rec: EventRecord) -> None:
        self._note(rec)
        self.stall_ns = rec["stall_ns"]

    def _run_end(self, rec: EventRecord) -> None:
        self._note(rec)
        for key, since in sorted(self._waiting_since.items()):
            if rec["quiescent"] or rec["t"] - since > self.stall_ns:
                self._stall(key, since, rec["t"], rec, hung=rec["quiescent"])
        self._waiting_since.clear()
        self.finish(rec["t"])

    def _irqfd_injects(self, rec: EventRecord) -> None:
        """``irqfd_wakeup`` / ``irqfd_inject``: §17.15, nothing after the deassign."""
        self._note(rec)
        if self._deassigned and (rec["vm"], rec["gsi"], rec["efd"]) in self._deassigned \
                and rec.get("r", 0) >= 0:
            ids = rec["irq"] or [0]
            self.violations.append(Violation(
                "17.15 no delivery after deassign",
                f"{rec['vm']}'s irqfd for GSI {rec['gsi']} on {rec['efd']} injected "
                f"({rec['ev']}) at t={rec['t']} ns after its deassign",
                ids[0], self._trace.get(ids[0], [dict(rec)])))

    def finish(self, t: int) -> None:
        """The run ended at ``t``: every signal of a shared eventfd still owed to a VM was
        lost for it (called on ``vkick_run_end``; call it directly when no host runs)."""
        self._expire_owed(t, everything=True)

    def _shared_signal(self, rec: EventRecord, vms: list[str]) -> None:
        """A signal on an eventfd with irqfds of several VMs: owed to each (bug #13)."""
        t = rec["t"]
        self._expire_owed(t, everything=False)
        irq = rec["irq"]
        if irq:
            for vm in vms:
                peers = ", ".join(v for v in vms if v != vm)
                self._owed[(vm, irq)] = (t, rec["efd"], peers)

    def _expire_owed(self, t: int, *, everything: bool) -> None:
        """Report (one violation per VM and eventfd) and forget the owed signals older than
        ``stall_ns`` — or all of them at the end."""
        stale: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
        for (vm, irq), (since, efd, peers) in self._owed.items():
            if everything or t - since > self.stall_ns:
                stale.setdefault((vm, efd), []).append((irq, since, peers))
        for (vm, efd), lost in stale.items():
            for irq, _, _ in lost:
                del self._owed[(vm, irq)]
            first_irq, first_t, peers = lost[0]
            self.violations.append(Violation(
                "17.1 no lost interrupt (shared eventfd)",
                f"{len(lost)} signal(s) of {efd} from t={first_t} ns on, while {vm}'s irqfd "
                f"was attached to it (shared with {peers}), never reached {vm}", first_irq,
                list(self._trace.get(first_irq, []))))

    def _check_stall(self, key: _Queue, t: int, rec: EventRecord) -> None:
        since = self._waiting_since.get(key)
        if since is not None and t - since > self.stall_ns:
            self._stall(key, since, t, rec, hung=False)
            self._waiting_since[key] = t  # one violation per stall_ns of waiting

    def _stall(self, key: _Queue, since: int, t: int, rec: EventRecord, *, hung: bool) -> None:
        what = ("still untaken when the run ended quiescent: the guest waits for an "
                "interrupt that will never come" if hung else
                f"untaken for {t - since} ns (bound {self.stall_ns} ns)")
        self.violations.append(Violation(
            "17.17 no stalled queue",
            f"{'/'.join(key)}: used buffers published up to index {self._published.get(key, 0)} at "
            f"t={since} ns, guest at {self._consumed.get(key, 0)}; {what}", 0, [dict(rec)]))

    def _lifecycle(self, rec: EventRecord) -> None:
        irq = rec["irq"]
        if rec["delivered"] and rec["latency_ns"] <= self.stall_ns:
            # The commonest record, and no violation: its trace is dropped.  Every
            # destination's delivery drops it: later records of a multi-destination
            # interrupt (the other vCPUs' deliveries) would otherwise start a new trace
            # that no record ever drops (memory must stay bounded on a long log).  The
            # record still joins a trace it finds: a 17.15 violation holds that list.
            trace = self._trace.pop(irq, None)
            if trace is not None and len(trace) < TRACE_LEN:
                trace.append(rec)
            return
        self._note_one(rec)
        if not rec["delivered"]:
            if irq in self._unbound_ids:  # no irqfd was attached to its eventfd
                self._trace.pop(irq, None)
                return
            self.violations.append(Violation(
                "17.1 no lost interrupt",
                f"{rec['source']} at t={rec['t_signal']} ns was never delivered", irq,
                self._trace.pop(irq, [])))
            return
        self.violations.append(Violation(
            "17.1 no lost interrupt (bound)",
            f"{rec['source']} at t={rec['t_signal']} ns took {rec['latency_ns']} ns "
            f"(bound {self.stall_ns} ns)", irq, list(self._trace.get(irq, []))))
        self._trace.pop(irq, None)  # done with this delivery (see above)


def pi_structural_violations(kvm: Any) -> list[Violation]:
    """The posted-interrupt descriptor invariants of spec §16.4 and research/bugs.md
    ("Oracles beyond §17"), checked on the state of ``kvm`` (a ``Kvm``) at a quiet point —
    no vCPU thread between clearing ON and taking the PIR words (W-PIR-harvest), no posted
    notification in flight:

    * PIR ≠ 0 ⇒ ON or SN.  vmx_sync_pir_to_irr reads PIR only when ON is set, so a posted
      vector with ON clear is stranded (bugs #4, #5).  SN with PIR bits is the preempted
      vCPU's normal state; vmx_vcpu_pi_load sets ON when it clears SN.
    * ON on a vCPU asleep in kvm_vcpu_block with IF = 1 ⇒ nobody owes it anything: its
      runnability check would have harvested the PIR, so the wake-up was lost (bugs #2, #3,
      #6).  (With IF = 0 the check does not look at interrupts: a legitimate wait.)

    Both hold whether or not APICv is active for the vCPU now: only posters write PIR, and
    an assigned device keeps posting to a vCPU whose APICv was inhibited at run time (bug
    #7, and the wakeup vector it no longer gets, 53b7ca1a3593); a VM without APICv never
    touches the descriptor.
    """
    out: list[Violation] = []
    for vcpu in kvm.vcpus:
        pi = vcpu.pi_desc
        where = f"{kvm.name} vcpu {vcpu.vcpu_id}"
        if pi.pir and not pi.on and not pi.sn:
            out.append(Violation(
                "16.4 PIR≠0 ⇒ ON", f"{where}: PIR {pi.pir:#x} with ON and SN clear "
                f"(NV {pi.nv:#x}, NDST {pi.ndst:#x})"))
        task = vcpu.wait_task
        asleep = task is not None and task.sleeping
        if pi.on and asleep and vcpu.arch.rflags_if:
            out.append(Violation(
                "16.4 ON ⇒ a notification or sync is owed",
                f"{where}: asleep in kvm_vcpu_block with ON set (PIR {pi.pir:#x}, NV "
                f"{pi.nv:#x}, NDST {pi.ndst:#x}, pre_pcpu {vcpu.pre_pcpu})"))
    return out
