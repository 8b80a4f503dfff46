"""Every event vkick emits, defined once — the ``TRACE_EVENT`` analogue
(include/trace/events/kvm.h, arch/x86/kvm/trace.h).

Names are KVM tracepoint names where one exists (``kvm_entry``, ``kvm_exit``,
``kvm_apic_accept_irq`` …), the kernel function's name otherwise (``irqfd_wakeup``,
``eventfd_signal``), and ``vkick_…`` for emulator-only events.  Every record also carries
``t`` (emulated ns), ``ev`` and ``seq`` (global order).  Shared context keys: ``vm`` (VM
name), ``vcpu`` (vCPU id), ``pcpu`` (physical CPU), ``vector``, ``gsi``, ``irq`` (interrupt
correlation id, or the list of ids a step satisfies).  ``docs/events.md`` is generated from
this module (``python -m vkick.obs.tracepoints > docs/events.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

Level = Literal["info", "debug"]

# Field type names: "int", "str", "bool", "int|list[int]", "list[int]".
_PY: Final = {"int": (int,), "str": (str,), "bool": (bool,), "list[int]": (list,),
              "int|list[int]": (int, list)}


@dataclass(frozen=True, slots=True)
class EventDef:
    name: str
    level: Level
    doc: str
    fields: tuple[tuple[str, str, str], ...]  # (name, type, meaning)


def _ev(name: str, level: Level, doc: str, *fields: tuple[str, str, str]) -> EventDef:
    return EventDef(name, level, doc, fields)


VM = ("vm", "str", "VM name")
VCPU = ("vcpu", "int", "vCPU id")
PCPU = ("pcpu", "int", "physical CPU")
VECTOR = ("vector", "int", "interrupt vector")
GSI = ("gsi", "int", "global system interrupt (routing table index)")
IRQ = ("irq", "int", "interrupt correlation id (0 = none)")
IRQS = ("irq", "list[int]", "correlation ids of every signal this step satisfies")
EFD = ("efd", "str", "eventfd name")

EVENTS: Final[dict[str, EventDef]] = {e.name: e for e in (
    _ev("vhost_signal", "info", "drivers/vhost/vhost.c vhost_signal (signalled false: "
        "suppressed by event idx / VRING_AVAIL_F_NO_INTERRUPT)", VM,
        ("dev", "str", "vhost device"), ("vq", "str", "virtqueue"), IRQ,
        ("signalled", "bool", "the call eventfd was signalled")),
    _ev("handle_tx", "info", "drivers/vhost/net.c handle_tx: one vhost-net TX round (guest "
        "→ tap)", VM, ("dev", "str", "vhost-net device (virtio-net name)"),
        ("vq", "str", "virtqueue"), ("pkts", "int", "packets sent"),
        ("bytes", "int", "bytes sent"), ("used_idx", "int", "used->idx after the round")),
    _ev("handle_rx", "info", "drivers/vhost/net.c handle_rx: one vhost-net RX round (tap → "
        "guest)", VM, ("dev", "str", "vhost-net device (virtio-net name)"),
        ("vq", "str", "virtqueue"), ("pkts", "int", "packets received into the guest"),
        ("bytes", "int", "bytes (with the virtio-net header)"),
        ("used_idx", "int", "used->idx after the round")),
    _ev("vkick_tun_drop", "info", "tun_net_xmit dropped a packet: the tap queue was full", VM,
        ("dev", "str", "device"), ("vq", "str", "virtqueue")),
    _ev("virtnet_poll", "info", "drivers/net/virtio_net.c virtnet_poll: one RX NAPI poll in "
        "the guest", VM, ("dev", "str", "device"), ("vq", "str", "virtqueue"),
        ("pkts", "int", "packets received"),
        ("last_used_idx", "int", "the driver's last_used_idx after the poll"),
        ("complete", "bool", "NAPI completed (RX interrupts re-enabled)")),
    _ev("refill_work", "debug", "drivers/net/virtio_net.c refill_work: the guest's refill "
        "work tries to stop one RX queue's NAPI (napi_disable) to refill it", VM,
        ("dev", "str", "device"), ("vq", "str", "virtqueue"),
        ("vcpu", "int", "vCPU running the work (its kworker)"),
        ("busy", "bool", "a poll held NAPI: the work sleeps and tries again")),
    _ev("vkick_used_event_stale", "info", "the guest stores a used_event behind its vq's "
        "last_used_idx: another CPU took buffers since it was loaded (research/bugs.md #15)",
        VM, ("dev", "str", "device"), ("vq", "str", "virtqueue"),
        ("used_event", "int", "the index stored"),
        ("last_used_idx", "int", "the vq's last_used_idx at the store")),
    _ev("vkick_rr", "info", "a request/response exchange completed in the guest", VM, VCPU,
        ("dev", "str", "device"), ("vq", "str", "virtqueue"),
        ("rtt_ns", "int", "request sent → response received")),
    _ev("vkick_run_start", "info", "a run of vkick.Host begins",
        ("seed", "int", "run seed"), ("config", "str", "config source"),
        ("duration_ns", "int", "traffic duration"),
        ("stall_ns", "int", "the oracle's latency bound")),
    _ev("vkick_run_end", "info", "traffic has ended and the host drained",
        ("duration_ns", "int", "emulated time since traffic started"),
        ("quiescent", "bool", "every task blocked, no timer pending: nothing can change")),
    _ev("eventfd_signal", "debug", "fs/eventfd.c eventfd_signal added n to the counter",
        EFD, ("n", "int", "amount added (capped)"),
        ("count", "int", "counter after the add"), IRQ),
    _ev("eventfd_release", "debug", "fs/eventfd.c eventfd_release: the eventfd's last file "
        "reference went (close); its queue is woken with EPOLLHUP", EFD),
    _ev("irqfd_wakeup", "debug", "virt/kvm/eventfd.c irqfd_wakeup ran for EPOLLIN", VM, GSI,
        EFD, IRQS,
        ("r", "int", "kvm_arch_set_irq_inatomic result (-11 = EWOULDBLOCK → slow path)")),
    _ev("irqfd_inject", "debug", "the workqueue slow path injects (merged signals once)", VM,
        GSI, EFD, IRQS),
    _ev("irqfd_assign", "info", "KVM_IRQFD assign", VM, GSI, EFD,
        ("pending", "bool", "the eventfd was already signalled: injected at assignment"),
        ("resample", "bool", "KVM_IRQFD_FLAG_RESAMPLE: a level-triggered irqfd with a "
                             "resamplefd")),
    _ev("irqfd_resampler_ack", "info", "virt/kvm/eventfd.c irqfd_resampler_ack: the guest "
        "EOIed the GSI's pin; the line is de-asserted and every resamplefd of the GSI "
        "signalled", VM, GSI, ("n", "int", "resamplefds signalled")),
    _ev("kvm_notify_irqfd_resampler", "info", "toggle fix-resample-on-unmask (later "
        "kernels): unmasking a pending level pin signals its resamplefds instead of "
        "delivering", VM, GSI, ("n", "int", "resamplefds signalled")),
    _ev("irqfd_deassign", "info", "KVM_IRQFD deassign returned", VM, GSI, EFD),
    _ev("irqfd_shutdown", "info", "virt/kvm/eventfd.c irqfd_shutdown unhooked the irqfd from "
        "its eventfd (deassign, EPOLLHUP or VM teardown); it is freed once its pending "
        "injection is flushed", VM, GSI, EFD),
    _ev("vkick_use_after_free", "info", "KASAN-like report (vkick/kernel/kasan.py): a freed "
        "object was touched — research/bugs.md #12", ("vm", "str", "its VM (\"\": none)"),
        ("what", "str", "the freed object"), ("where", "str", "the function touching it")),
    _ev("vkick_eventfd_underflow", "info", "fs/eventfd.c eventfd_ctx_do_read took 1 from a "
        "semaphore eventfd at count 0: the counter wrapped (the v5.13 underflow, "
        "research/bugs.md #14)", EFD, ("cnt", "int", "amount read (1)"),
        ("count", "int", "the counter afterwards (ULLONG_MAX)")),
    _ev("kvm_set_irq", "debug", "virt/kvm/irqchip.c kvm_set_irq", VM, GSI,
        ("level", "int", "line level"), ("irq_source_id", "int", "source id"), IRQ),
    _ev("kvm_ioapic_set_irq", "debug", "arch/x86/kvm/ioapic.c ioapic_set_irq: a pin's line "
        "changed (KVM tracepoint)", VM, ("e", "int", "the pin's redirection entry (64 bits)"),
        ("pin", "int", "IOAPIC pin"),
        ("coalesced", "bool", "no delivery: an edge pin already high, or the delivery "
                              "reached no CPU"), IRQ),
    _ev("ioapic_service", "debug", "arch/x86/kvm/ioapic.c ioapic_service: an IOAPIC pin is "
        "delivered (r = -1: masked, or a level pin waiting for its EOI)", VM,
        ("pin", "int", "IOAPIC pin"), VECTOR,
        ("r", "int", "kvm_irq_delivery_to_apic result, -1 if not sent"), IRQS),
    _ev("ioapic_write_indirect", "debug", "the guest wrote an IOAPIC redirection entry half "
        "through IOWIN", VM, ("pin", "int", "IOAPIC pin"),
        ("half", "int", "0 low (bits 31:0), 1 high (bits 63:32)"),
        ("val", "int", "the 32-bit value written"), ("e", "int", "the entry afterwards")),
    _ev("kvm_ioapic_update_eoi", "debug", "arch/x86/kvm/ioapic.c kvm_ioapic_update_eoi: an "
        "EOI reaches the IOAPIC", VM, VCPU, VECTOR,
        ("trigger_mode", "int", "1 level (TMR set), 0 edge")),
    _ev("kvm_ack_irq", "debug", "virt/kvm/eventfd.c kvm_notify_acked_irq: an IOAPIC pin's EOI "
        "runs its GSI's ack notifiers (KVM tracepoint)", VM,
        ("irqchip", "int", "KVM_IRQCHIP_* (2 = IOAPIC)"), ("pin", "int", "pin")),
    _ev("kvm_ioapic_delayed_eoi_inj", "info", "an EOI storm on a level pin: the next "
        "re-delivery is deferred by 10 ms (KVM tracepoint)", VM,
        ("e", "int", "the pin's redirection entry")),
    _ev("vcpu_scan_ioapic", "debug", "arch/x86/kvm/x86.c vcpu_scan_ioapic: the vCPU's "
        "IOAPIC-handled vectors were rebuilt", VM, VCPU,
        ("vectors", "list[int]", "ioapic_handled_vectors")),
    _ev("vmx_load_eoi_exitmap", "debug", "the VMCS EOI-exit bitmap was loaded (APICv)", VM,
        VCPU, ("vectors", "list[int]", "vectors whose EOI causes an EOI-induced exit")),
    _ev("kvm_msi_set_irq", "debug", "an MSI route or KVM_SIGNAL_MSI is decoded", VM,
        ("address", "int", "MSI address"), ("data", "int", "MSI data"), IRQ),
    _ev("kvm_apic_accept_irq", "debug", "__apic_accept_irq accepted (or dropped) a vector",
        VM, VCPU, ("dm", "int", "delivery mode (APIC_DM_*)"), ("tm", "int", "trigger mode"),
        VECTOR, IRQ,
        ("path", "str", "posted | posted_kick | wakeup | irr_kick | wq | coalesced | dropped"),
        ("coalesced", "bool", "the vector was already pending")),
    _ev("kvm_pi_post", "debug", "vmx_deliver_posted_interrupt posted a vector", VM, VCPU,
        VECTOR, IRQ, ("notify", "str", "ipi | kick | none | coalesced_pir | coalesced_on")),
    _ev("kvm_apic_ipi", "info", "a guest ICR write sends an IPI", VM, VCPU,
        ("icr_low", "int", "ICR bits 31:0"), ("dest_id", "int", "destination"), VECTOR, IRQ),
    _ev("kvm_apic", "debug", "arch/x86/kvm/trace.h kvm_apic: a LAPIC register access "
        "(kvm_lapic_reg_write)", VM, VCPU, ("rw", "str", "write"),
        ("reg", "int", "register offset (APIC_*)"), ("val", "int", "value written")),
    _ev("kvm_recalculate_apic_map", "debug", "arch/x86/kvm/lapic.c kvm_recalculate_apic_map "
        "published a new APIC map", VM,
        ("max_id", "int", "highest x2APIC ID the map was sized for (>= 255)"),
        ("visited", "int", "vCPUs the fill loop visited (online_vcpus as it last read it)"),
        ("mode", "int", "OR of KVM_APIC_MODE_* of the logical entries"),
        ("skipped", "list[int]", "x2APIC IDs left out: above max_id when filled (bug #11)"),
        ("retries", "int", "rebuilds for an x2APIC ID above max_id (fix-apic-map-retry)"),
        ("dirty", "bool", "left DIRTY: a write came in during the rebuild")),
    _ev("kvm_apic_set_state", "debug", "KVM_SET_LAPIC restored a vCPU's LAPIC "
        "(kvm_apic_set_state)", VM, VCPU, ("id", "int", "APIC_ID register"),
        ("spiv", "int", "SPIV register")),
    _ev("kvm_apicv_update_request", "info", "arch/x86/kvm/trace.h kvm_apicv_update_request: "
        "the VM's APICv went from no inhibit reason to some (deactivate) or back (activate); "
        "KVM_REQ_APICV_UPDATE goes to its vCPUs", VM,
        ("activate", "bool", "true: the last reason was cleared"),
        ("bit", "int", "APICV_INHIBIT_REASON_* (0 DISABLE, 1 HYPERV)")),
    _ev("kvm_vcpu_update_apicv", "debug", "arch/x86/kvm/x86.c kvm_vcpu_update_apicv: a vCPU "
        "took the VM's APICv state (LAPIC bookkeeping and VMCS controls)", VM, VCPU,
        ("active", "bool", "apicv_active now"),
        ("irr_pending", "bool", "the LAPIC's irr_pending after kvm_apic_update_apicv"),
        ("isr_count", "int", "the LAPIC's isr_count after it"),
        ("isr_cache", "int", "highest_isr_cache after it (-1: none)"),
        ("svi", "int", "SVI (GUEST_INTR_STATUS 15:8) after the update")),
    _ev("kvm_hv_activate_synic", "info", "arch/x86/kvm/hyperv.c kvm_hv_activate_synic: "
        "KVM_ENABLE_CAP(KVM_CAP_HYPERV_SYNIC) activated a vCPU's SynIC, inhibiting APICv",
        VM, VCPU, ("inhibits", "int", "apicv_inhibit_reasons afterwards")),
    _ev("kvm_vm_ioctl_create_vcpu", "debug", "KVM_CREATE_VCPU: the vCPU became visible in "
        "kvm->vcpus", VM, VCPU, ("idx", "int", "vcpu_idx (position in kvm->vcpus)")),
    _ev("vkick_host_ipi", "info", "a physical IPI is sent to a pCPU's inbox", PCPU,
        ("hvector", "int", "host vector (0xf2 PI notification, 0xf1 PI wakeup, 0xfd "
                           "reschedule, 0xfc call function)"),
        ("vm", "str", "VM of the vCPU it is meant for (\"\": none)"),
        ("vcpu", "int", "vCPU it is meant for (-1: none)")),
    _ev("vkick_device_msi", "info", "an assigned device raises an MSI (an interrupt source: "
        "vkick/hw/iommu.py)", ("dev", "str", "device"), ("msi", "int", "MSI(-X) vector index"),
        IRQ, ("mode", "str", "posted | remapped (its IRTE's mode) | blocked (no IRTE: "
                             "dropped)")),
    _ev("vkick_iommu_post", "debug", "VT-d posts into a posted-interrupt descriptor (PIR; ON "
        "and the notification unless SN)", VM, VCPU, VECTOR, IRQ,
        ("notify", "str", "ipi | suppressed (SN set) | none (ON already set)"),
        ("pcpu", "int", "NDST: the CPU notified"), ("hvector", "int", "NV")),
    _ev("vkick_iommu_remap", "debug", "VT-d remaps an MSI to a host vector on a host CPU", PCPU,
        ("hvector", "int", "host vector"), IRQ),
    _ev("vfio_msihandler", "debug", "drivers/vfio/pci/vfio_pci_intrs.c vfio_msihandler: the "
        "device IRQ's handler signals its eventfd in hardirq context", PCPU, EFD, IRQ),
    _ev("kvm_pi_irte_update", "info", "KVM posts a host IRQ to a vCPU (set) or takes it back",
        VM, ("host_irq", "int", "host IRQ"), VCPU, GSI, VECTOR,
        ("set", "bool", "posted mode on")),
    _ev("kvm_arch_start_assignment", "info", "an assigned device is counted (irq bypass "
        "connected)", VM, ("count", "int", "assigned devices"),
        ("hook", "bool", "the start_assignment hook ran (KVM_REQ_UNBLOCK to every vCPU)")),
    _ev("vmx_vcpu_pi_load", "debug", "vmx_vcpu_pi_load changed the descriptor (SN, NDST, ON)",
        VM, VCPU, PCPU, ("ndst", "int", "NDST after"), ("on", "bool", "ON after")),
    _ev("vmx_vcpu_pi_put", "debug", "vmx_vcpu_pi_put set SN on a preempted vCPU", VM, VCPU,
        ("sn", "bool", "SN after")),
    _ev("pi_pre_block", "debug", "pi_pre_block switched NV to the wakeup vector (r = 1: undone, "
        "ON was set: do not block)", VM, VCPU, PCPU, ("r", "int", "1 do not block, 0 block")),
    _ev("pi_post_block", "debug", "pi_post_block switched NV back to the notification vector",
        VM, VCPU, PCPU),
    _ev("pi_wakeup_handler", "debug", "POSTED_INTR_WAKEUP_VECTOR on a CPU: kick the listed "
        "vCPUs with ON set", PCPU, ("kicked", "list[int]", "vCPU ids kicked")),
    _ev("vkick_pi_notification", "debug", "posted-interrupt processing in guest mode", VM,
        VCPU, PCPU, ("in_guest", "bool", "processed by the hardware without an exit")),
    _ev("kvm_entry", "debug", "VM entry", VM, VCPU, PCPU),
    _ev("kvm_exit", "info", "VM exit", VM, VCPU, PCPU,
        ("reason", "str", "EXTERNAL_INTERRUPT | HLT | INTERRUPT_WINDOW | EOI_INDUCED | "
                          "APIC_WRITE | MSR_WRITE | IO_INSTRUCTION | PREEMPTION_TIMER")),
    _ev("kvm_inj_virq", "debug", "software injection through the VM-entry field", VM, VCPU,
        VECTOR, IRQS),
    _ev("vkick_guest_irq", "info", "the guest takes the interrupt: its handler starts", VM,
        VCPU, VECTOR, IRQS),
    _ev("kvm_eoi", "debug", "KVM handles an EOI (-1: nothing in service)", VM, VCPU, VECTOR),
    _ev("kvm_vcpu_kick", "debug", "kvm_vcpu_kick", VM, VCPU,
        ("ipi", "bool", "a reschedule IPI was sent"), ("woke", "bool", "a sleeping vCPU woke")),
    _ev("kvm_vcpu_wakeup", "debug", "kvm_vcpu_block returned", VM, VCPU,
        ("ns", "int", "time blocked"), ("waited", "bool", "slept (not only polled)"),
        ("valid", "bool", "woken for a reason")),
    _ev("vkick_halt", "debug", "the vCPU halted (kvm_emulate_halt)", VM, VCPU),
    _ev("vkick_vcpu_load", "debug", "vcpu_load / kvm_sched_in: the vCPU thread runs on a "
        "pCPU", VM, VCPU,
        PCPU, ("preempted", "bool", "always false on load")),
    _ev("vkick_vcpu_put", "debug", "vcpu_put / kvm_sched_out: the vCPU thread leaves its "
        "pCPU (it sleeps, is preempted, or leaves KVM_RUN)", VM, VCPU,
        PCPU, ("preempted", "bool", "involuntarily, still TASK_RUNNING (time slice, "
                                    "migration)")),
    _ev("workqueue_queue_work", "debug", "queue_work (queued false: merged into a pending run)",
        ("wq", "str", "workqueue"), ("work", "str", "work item"),
        ("queued", "bool", "newly queued")),
    _ev("workqueue_execute_start", "debug", "a kworker starts a work item",
        ("wq", "str", "workqueue"), ("work", "str", "work item")),
    _ev("workqueue_execute_end", "debug", "a kworker finished a work item",
        ("wq", "str", "workqueue"), ("work", "str", "work item")),
    _ev("vkick_irq", "info", "one interrupt's whole life, per destination vCPU (emitted by "
        "vkick/obs/irqlife.py when the guest takes it, or at the end if it never did)",
        IRQ, VM, ("vcpu", "int", "destination vCPU (-1: never delivered)"),
        ("vector", "int", "vector taken (-1: never delivered)"),
        ("source", "str", "signal | msi | ipi | vtd"),
        ("origin", "str", "the signalled eventfd (a vhost queue's call eventfd), \"msi\", "
                          "\"ipi VM/vCPU\", or \"dev DEVICE/MSI\""),
        ("path", "str", "posted | posted_kick | wakeup | irr_kick | wq | coalesced | vtd | "
                        "unknown"),
        ("coalesced", "bool", "satisfied by a delivery shared with other sources"),
        ("first", "bool", "the first record of this source (count sources with it)"),
        ("delivered", "bool", "the guest took it"),
        ("t_signal", "int", "source time (ns)"), ("t_accept", "int", "accepted (ns, -1)"),
        ("t_deliver", "int", "handler start (ns, -1)"),
        ("latency_ns", "int", "t_deliver - t_signal (-1 if never)")),
    _ev("vkick_warn", "info", "WARN_ON_ONCE-like: something a kernel would warn about",
        ("what", "str", "what happened")),
    _ev("vkick_log", "info", "a human-facing message from vkick's structlog logger "
        "(vkick/obs/log.py); further fields are the logger's context",
        ("level", "str", "log level"), ("msg", "str", "the message")),
)}

OPTIONAL_CONTEXT: Final = frozenset({"vm", "vcpu"})  # vkick_warn may name where it happened


def validate(record: dict[str, Any]) -> list[str]:
    """Problems of one record against the schema (empty when it conforms)."""
    ev = record.get("ev")
    definition = EVENTS.get(str(ev))
    if definition is None:
        return [f"unknown event {ev!r}"]
    problems = []
    names = {"t", "ev", "seq"}
    for name, type_name, _ in definition.fields:
        names.add(name)
        if name not in record:
            problems.append(f"{ev}: missing field {name!r}")
        elif not isinstance(record[name], _PY[type_name]):
            problems.append(f"{ev}.{name}: expected {type_name}, got {record[name]!r}")
    extra = set(record) - names
    if ev == "vkick_warn":
        extra -= OPTIONAL_CONTEXT
    if ev == "vkick_log":
        extra = set()  # free-form context
    if extra:
        problems.append(f"{ev}: undefined fields {sorted(extra)}")
    return problems


def render_markdown() -> str:
    """docs/events.md."""
    out = ["# vkick events", "",
           "Generated from `vkick/obs/tracepoints.py` (do not edit by hand).  Every record is "
           "one flat JSON object: `t` (emulated ns), `ev`, `seq` (global order), then the "
           "fields below.", ""]
    for e in EVENTS.values():
        out += [f"## `{e.name}` ({e.level})", "", e.doc + ".", "",
                "| field | type | meaning |", "|---|---|---|"]
        out += [f"| `{n}` | {t} | {d} |" for n, t, d in e.fields]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    print(render_markdown(), end="")
