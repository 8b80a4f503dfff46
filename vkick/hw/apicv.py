"""VMX non-root execution: what the processor does between VM entry and VM exit (Intel SDM
Vol. 3, "APIC Virtualization and Virtual Interrupts"; spec §13).

``vmx_vcpu_run`` runs the guest's instruction stream (a queue of guest actions supplied by
the guest model, :mod:`vkick.guest.cpu`) until something causes a VM exit.  At every
instruction boundary it takes the physical interrupts pending at this CPU — the posted-
interrupt notification vector is processed without an exit (PIR → VIRR, RVI), any other
vector exits — then evaluates virtual interrupts (APICv) or interrupt-window exiting, then
executes one guest instruction.  TPR and EOI writes are virtualized with APICv (no exit,
unless the EOI-exit bitmap asks for one); without APICv they exit to KVM.  "With APICv"
means the VMCS controls KVM last wrote (``pin_posted_intr``, ``virtual_intr_delivery``:
vmx_refresh_apicv_exec_ctrl), which follow KVM's ``apicv_active`` only when KVM
refreshes them — APICv can be inhibited and re-activated while the VM runs.

The guest model is duck-typed (``GuestModel``): an ``actions`` deque of tuples, an
``on_interrupt(vcpu, vector)`` hook that queues the handler, an ``idle_halt`` flag.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Final, Protocol

from vkick.hw.cpu import CpuContext, PhysicalCpu

EXIT_EXTERNAL_INTERRUPT: Final = "EXTERNAL_INTERRUPT"
EXIT_HLT: Final = "HLT"
EXIT_INTERRUPT_WINDOW: Final = "INTERRUPT_WINDOW"
EXIT_EOI_INDUCED: Final = "EOI_INDUCED"
EXIT_APIC_WRITE: Final = "APIC_WRITE"
EXIT_MSR_WRITE: Final = "MSR_WRITE"
EXIT_IO_INSTRUCTION: Final = "IO_INSTRUCTION"
EXIT_PREEMPTION_TIMER: Final = "PREEMPTION_TIMER"

POSTED_INTR_VECTOR: Final = 0xF2

Exit = tuple[str, int, int]  # (reason, qualification / register or vector, value)


class GuestModel(Protocol):
    actions: deque[tuple[Any, ...]]
    idle_halted: bool
    poke: Any
    charged_ns: int  # CPU time a "call" action's code used; spent right after it
    pending_io: list[tuple[Any, ...]]  # device writes a "call" made; executed after that time

    def on_interrupt(self, vcpu: Any, vector: int) -> None: ...


def merge_pir_ids(arch: Any, taken: int) -> None:
    """Correlation ids follow the PIR bits ``taken`` into IRR (vkick bookkeeping): a posted
    vector joins the IRR instance, coalescing with one already pending there."""
    pir_ids = arch.pir_ids
    if not pir_ids:
        return
    irq_ids = arch.irq_ids
    for vector in list(pir_ids):
        if taken >> vector & 1:
            moved = pir_ids.pop(vector)
            ids = irq_ids.get(vector)
            if ids is None:
                irq_ids[vector] = moved
            else:
                ids.extend(moved)


def posted_interrupt_processing(vcpu: Any, pcpu: PhysicalCpu) -> None:
    """SDM: posted-interrupt processing (spec §13.2): clear ON, OR PIR into VIRR and clear
    it, RVI := max(RVI, highest PIR vector).  No VM exit."""
    pi = vcpu.pi_desc
    apic = vcpu.arch.apic
    pi.on = False
    pir = pi.pir
    pi.pir = 0
    if pir:
        apic.irr |= pir
        merge_pir_ids(vcpu.arch, pir)
        vcpu.arch.rvi = max(vcpu.arch.rvi, pir.bit_length() - 1)
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vkick_pi_notification", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, pcpu=pcpu.id,
                 in_guest=True)


def _ppr_virtualization(vcpu: Any) -> None:
    """SDM: PPR virtualization — VPPR from VTPR and SVI (spec §13.4)."""
    apic = vcpu.arch.apic
    svi = vcpu.arch.svi
    tpr = apic.tpr
    apic.ppr = tpr & 0xFF if (tpr & 0xF0) >= (svi & 0xF0) else svi & 0xF0


def take_interrupt(vcpu: Any, vector: int, ids: list[int]) -> None:
    """The guest takes ``vector`` through its IDT: IF cleared (interrupt gate), the handler
    is queued.  Emits the delivery event with every correlation id it satisfies (``ids``:
    those of the pending instance that was acknowledged)."""
    arch = vcpu.arch
    arch.rflags_if = False
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vkick_guest_irq", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, vector=vector,
                 irq=ids)
    vcpu.guest.on_interrupt(vcpu, vector)


def _virtual_interrupt_delivery(vcpu: Any) -> bool:
    """SDM: evaluation and delivery of pending virtual interrupts (spec §13.3)."""
    arch = vcpu.arch
    rvi = arch.rvi
    apic = arch.apic
    if not rvi or (rvi >> 4) <= (apic.ppr >> 4):
        return False
    if not arch.rflags_if or arch.interrupt_shadow:
        return False
    bit = 1 << rvi
    apic.isr |= bit
    apic.irr &= ~bit
    arch.rvi = max(apic.irr.bit_length() - 1, 0)
    arch.svi = rvi
    apic.ppr = rvi & 0xF0
    take_interrupt(vcpu, rvi, arch.irq_ids.pop(rvi, []))
    return True


def _eoi_virtualization(vcpu: Any) -> int:
    """SDM: EOI virtualization — retire the vector SVI names: VISR[SVI] := 0, SVI := the
    highest remaining VISR bit (or 0), PPR virtualization; returns the vector if its
    EOI-exit bitmap bit asks for an EOI-induced exit, else -1 (spec §13.4).

    The hardware trusts SVI: a stale SVI (not refreshed when APICv was activated with a
    vector in service) retires the wrong vector — the in-service one stays in VISR and SVI
    only now points at it.
    """
    arch = vcpu.arch
    apic = arch.apic
    v: int = arch.svi
    apic.isr &= ~(1 << v)
    arch.svi = max(apic.isr.bit_length() - 1, 0)
    _ppr_virtualization(vcpu)
    if arch.eoi_exit_bitmap >> v & 1:
        return v
    return -1


async def _guest_wait(vcpu: Any, pcpu: PhysicalCpu, until_ns: int | None) -> None:
    """The guest spins (``until_ns`` None: IF = 0 or nothing to do) or works until
    ``until_ns``; returns early on an arrival at this CPU or new guest work.

    NOTE: one timer per work deadline (its callback only pokes the CPU).  ``work_deadline``
    names the deadline a timer is still pending for: a wake-up that leaves the deadline as
    it was (an arrival that runs no handler, new work queued behind) keeps that timer, and
    the timer clears it when it fires, so a deadline met again later gets a new one.  An
    interrupt whose handler runs inside the work moves the deadline (the rest resumes as
    ``("work", deadline - now)`` after the handler), so it arms a new timer; the old one
    still fires at the old deadline, a spurious poke after which the work waits again.
    """
    rt = vcpu.kvm.rt
    loop = rt.loop
    fut: asyncio.Future[None] = loop.create_future()
    pcpu.wake_fut = fut
    if until_ns is not None and pcpu.work_deadline != until_ns:
        pcpu.work_deadline = until_ns
        rt.call_at_ns(until_ns, _work_deadline, pcpu, until_ns)
    try:
        await fut
    finally:
        pcpu.wake_fut = None


def _work_deadline(pcpu: PhysicalCpu, until_ns: int) -> None:
    if pcpu.work_deadline == until_ns:
        pcpu.work_deadline = -1
    pcpu.poke()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def vmx_vcpu_run(vcpu: Any, pcpu: PhysicalCpu, immediate_exit: bool = False) -> Exit:
    """VM entry … VM exit.  Returns the exit (reason, qualification, value).

    The hardware obeys the VMCS controls as KVM last wrote them
    (vmx_refresh_apicv_exec_ctrl), not KVM's ``apicv_active``: the notification vector is
    processed as a posted interrupt only with "process posted interrupts" set (else it is
    an external-interrupt exit like any other vector); virtual-interrupt delivery and the
    TPR/EOI virtualization only with "virtual-interrupt delivery" set.
    """
    arch = vcpu.arch
    guest = vcpu.guest
    posted = arch.pin_posted_intr
    apicv = arch.virtual_intr_delivery
    actions = guest.actions
    pcpu.context = CpuContext.GUEST
    guest.idle_halted = False
    guest.poke = pcpu.poke
    # VM entry: the VM-entry interruption field (software injection, spec §13.5).
    if arch.interrupt_injected:
        arch.interrupt_injected = False
        ids = arch.injected_irq_ids
        arch.injected_irq_ids = []
        take_interrupt(vcpu, arch.interrupt_nr, ids)
        if immediate_exit:
            return (EXIT_PREEMPTION_TIMER, 0, 0)
    elif immediate_exit:
        return (EXIT_PREEMPTION_TIMER, 0, 0)
    while True:
        # ---- instruction boundary: physical interrupts recognised at this CPU
        if pcpu.pending:
            held = pcpu.pending
            while held:
                vector = held.pop(0)
                if posted and vector == vcpu.pi_desc.nv == POSTED_INTR_VECTOR:
                    posted_interrupt_processing(vcpu, pcpu)
                    continue
                # Acknowledge-on-exit: this vector is taken by the exit; the rest stay.
                return (EXIT_EXTERNAL_INTERRUPT, vector, 0)
        if apicv:
            if arch.rvi:  # nothing requested: skip the evaluation (it would find none)
                _virtual_interrupt_delivery(vcpu)
        elif arch.irq_window_exiting and arch.rflags_if and not arch.interrupt_shadow:
            return (EXIT_INTERRUPT_WINDOW, 0, 0)
        # ---- one guest instruction
        if not actions:
            if arch.rflags_if and guest.idle_halt:
                guest.idle_halted = True
                arch.interrupt_shadow = False
                return (EXIT_HLT, 1, 0)
            await _guest_wait(vcpu, pcpu, None)
            continue
        action = actions.popleft()
        shadow = arch.interrupt_shadow
        arch.interrupt_shadow = False
        op = action[0]
        # NOTE: the branches are in the order of how often a host run takes them.
        if op == "call":
            action[1](vcpu)
            pending_io = guest.pending_io
            if pending_io:  # doorbell writes the driver code made (GuestCpu.io_write)
                actions.extendleft(reversed(pending_io))
                pending_io.clear()
            charged = guest.charged_ns
            if charged:  # CPU time the driver code used (GuestCpu.charge), spent first
                guest.charged_ns = 0
                actions.appendleft(("work", charged))
        elif op in {"work", "work_until"}:
            # "work" for action[1] ns becomes a deadline.  After an STI its wait starts
            # at the next instruction boundary (the shadow has just ended: an interrupt
            # it held back is taken first); otherwise this boundary is the one just
            # evaluated and nothing can have changed since, so the wait starts here.
            if op == "work":
                deadline = vcpu.kvm.rt.now_ns() + action[1]
                if shadow:
                    actions.appendleft(("work_until", deadline))
                    continue
            else:
                deadline = action[1]
            if vcpu.kvm.rt.now_ns() < deadline:
                await _guest_wait(vcpu, pcpu, deadline)
                now = vcpu.kvm.rt.now_ns()
                if now < deadline:
                    # Interrupted: the rest of the work resumes after whatever interrupted
                    # it (an interrupt handler's time is not taken out of it).
                    actions.appendleft(("work", deadline - now))
        elif op == "eoi":
            if apicv:
                v = _eoi_virtualization(vcpu)
                if v >= 0:
                    return (EXIT_EOI_INDUCED, v, 0)
            else:
                return (EXIT_APIC_WRITE, 0xB0, 0)
        elif op == "iret":
            arch.rflags_if = True
        elif op == "mmio":
            return (EXIT_IO_INSTRUCTION, action[1], action[2])
        elif op == "cli":
            arch.rflags_if = False
        elif op == "sti":
            if not arch.rflags_if:
                arch.interrupt_shadow = True  # blocking by STI for one instruction
            arch.rflags_if = True
        elif op == "hlt":
            return (EXIT_HLT, 0, 0)
        elif op == "tpr":
            if apicv:
                arch.apic.tpr = action[1] & 0xFF  # TPR virtualization
                _ppr_virtualization(vcpu)
            else:
                return (EXIT_APIC_WRITE, 0x80, action[1])
        elif op == "apic":
            return (EXIT_APIC_WRITE, action[1], action[2])
        elif op == "msr":
            return (EXIT_MSR_WRITE, action[1], action[2])
        elif op == "preempt":
            # A preemption window inside guest code (GuestCpu.preempt_then): the guest
            # function that queued it is between two of its steps, its rest is the next
            # action.  Other CPUs run here; an interrupt arriving meanwhile is taken at the
            # instruction boundary after it (the guest has IF as it had).
            await vcpu.kvm.rt.preempt(action[1])
        else:
            raise ValueError(f"unknown guest action {action!r}")
