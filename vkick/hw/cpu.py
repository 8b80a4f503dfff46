"""Physical CPUs: IPI inboxes, interrupt context (host / IRQs off / guest), host handlers,
and the host scheduler's part that vCPU threads need (one runqueue per CPU, preemption,
migration).

An IPI is a message to the target CPU.  What happens on arrival depends on what that CPU is
doing (spec §12.4): in host mode with IRQs enabled the host handler runs at once; with IRQs
disabled (inside ``vcpu_enter_guest`` around VM entry and exit) the vector stays pending in
the local APIC and is recognised later — after VM entry by the guest-mode hardware, or when
the host enables IRQs again.  In guest mode the hardware model (``hw/apicv.py``) takes it at
the next instruction boundary: the posted-interrupt notification vector is processed without
a VM exit, anything else causes an external-interrupt exit.  A host handler runs *on* its
CPU: while it runs, ``smp_processor_id()`` is that CPU (hardirq context), whichever task or
callback delivered the vector.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from vkick.kernel.sched import (
    TASK_RUNNING,
    TaskStruct,
    fire_sched_in_preempt_notifiers,
    fire_sched_out_preempt_notifiers,
    schedule,
)
from vkick.runtime.tasks import Runtime

POSTED_INTR_WAKEUP_VECTOR: Final = 0xF1  # arch/x86/include/asm/irq_vectors.h

# The physical CPU the calling task (or interrupt handler) runs on; None: a host thread not
# pinned to one of the modelled CPUs (a vhost worker, a kworker, the VMM).
current_pcpu: contextvars.ContextVar[PhysicalCpu | None] = contextvars.ContextVar(
    "vkick_pcpu", default=None)


def smp_processor_id() -> int:
    """arch/x86/include/asm/smp.h: smp_processor_id — the caller's physical CPU (or -1)."""
    pcpu = current_pcpu.get()
    return -1 if pcpu is None else pcpu.id


class CpuContext(enum.IntEnum):
    HOST = 0  # host code, IRQs enabled: IPIs handled at once
    IRQS_OFF = 1  # host code with IRQs disabled: IPIs held pending
    GUEST = 2  # VMX non-root: IPIs taken by the hardware model


@dataclass(slots=True)
class HostCosts:
    """Modelled costs in emulated ns."""

    vmentry_ns: int = 1000
    vmexit_ns: int = 1000
    ipi_latency_ns: int = 500
    wakeup_ns: int = 2000
    timeslice_ns: int = 1_000_000
    halt_poll_quantum_ns: int = 1000


@dataclass(slots=True, eq=False)
class PhysicalCpu:
    """One host CPU: its local APIC's pending vectors and what runs on it."""

    rt: Runtime
    id: int
    context: CpuContext = CpuContext.HOST
    pending: list[int] = field(default_factory=list)  # vectors held while IRQs are off
    # Correlation ids of device interrupts that arrived for a host vector and whose handler
    # has not run yet (vkick bookkeeping: the id travels with the interrupt message).
    irq_ids: dict[int, list[int]] = field(default_factory=dict)
    owner: TaskStruct | None = None  # the thread running on this CPU
    # Runnable threads queued for this CPU (FIFO), each with the future that resumes it.
    waiters: list[tuple[TaskStruct, asyncio.Future[None]]] = field(default_factory=list)
    # Per-CPU variables of the host kernel that live with the CPU:
    running_vcpu: Any = None  # virt/kvm/kvm_main.c kvm_running_vcpu
    blocked_vcpu_on_cpu: list[Any] = field(default_factory=list)  # vmx/posted_intr.c
    wake_fut: asyncio.Future[None] | None = None  # guest-mode wait, resolved on an arrival
    work_deadline: int = -1  # the guest work deadline a timer is already set for
    handlers: dict[int, Callable[[PhysicalCpu], None]] = field(default_factory=dict)
    ipis_received: dict[int, int] = field(default_factory=dict)

    @property
    def apic_id(self) -> int:
        return self.id

    def poke(self) -> None:
        """Wake the guest-mode wait on this CPU (an arrival or new guest work)."""
        fut = self.wake_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def __repr__(self) -> str:
        return f"<pcpu {self.id} {self.context.name} pending={self.pending}>"


def _dummy_handler() -> None:
    """arch/x86/kernel/irq.c: dummy_handler — the wakeup handler before KVM registers one."""


@dataclass(slots=True, eq=False)
class HwHost:
    """The machine: physical CPUs, the modelled costs, the IOMMU (``hw/iommu.py``; None: no
    interrupt remapping) and the host's registered posted-interrupt wakeup handler."""

    rt: Runtime
    pcpus: list[PhysicalCpu]
    costs: HostCosts
    iommu: Any = None
    kvm_posted_intr_wakeup_handler: Callable[[], None] = _dummy_handler


def create_host(rt: Runtime, nr_pcpus: int, costs: HostCosts | None = None) -> HwHost:
    if nr_pcpus < 1:
        raise ValueError(f"pcpus: expected ≥ 1, got {nr_pcpus}")
    host = HwHost(rt, [PhysicalCpu(rt, i) for i in range(nr_pcpus)], costs or HostCosts())
    def wakeup_vector(_pcpu: PhysicalCpu) -> None:
        sysvec_kvm_posted_intr_wakeup_ipi(host)

    for pcpu in host.pcpus:
        pcpu.handlers[POSTED_INTR_WAKEUP_VECTOR] = wakeup_vector
    return host


def kvm_set_posted_intr_wakeup_handler(host: HwHost,
                                       handler: Callable[[], None] | None) -> None:
    """arch/x86/kernel/irq.c: kvm_set_posted_intr_wakeup_handler — KVM (vmx) registers
    pi_wakeup_handler at hardware setup; None restores the dummy."""
    host.kvm_posted_intr_wakeup_handler = handler or _dummy_handler


def sysvec_kvm_posted_intr_wakeup_ipi(host: HwHost) -> None:
    """arch/x86/kernel/irq.c: sysvec_kvm_posted_intr_wakeup_ipi  [hardirq]

    POSTED_INTR_WAKEUP_VECTOR: acknowledge, count, call the registered wakeup handler (on
    the CPU that took the vector).  Spec §2.1.
    """
    host.kvm_posted_intr_wakeup_handler()


def send_ipi(host: HwHost, cpu: int, vector: int, vcpu_id: int = -1, vm: str = "") -> None:
    """apic->send_IPI(cpu, vector): a message to ``cpu``'s inbox after the IPI latency.
    ``vm``/``vcpu_id`` name the vCPU the IPI is meant for (for the event only)."""
    bus = host.rt.bus
    if bus.on:
        bus.emit("vkick_host_ipi", pcpu=cpu, hvector=vector, vm=vm, vcpu=vcpu_id)
    interrupt_message(host, cpu, vector)


def interrupt_message(host: HwHost, cpu: int, vector: int, irq: int = 0) -> None:
    """vkick: an interrupt message (an IPI, or a remapped device interrupt with correlation
    id ``irq``) travels to ``cpu``'s local APIC: :func:`ipi_arrive` after the IPI latency
    (at once with none)."""
    pcpu = host.pcpus[cpu]
    lat = host.costs.ipi_latency_ns
    if lat <= 0:
        ipi_arrive(pcpu, vector, irq)
    else:
        rt = host.rt
        rt.call_at_ns(rt.now_ns() + lat, ipi_arrive, pcpu, vector, irq)


def ipi_arrive(pcpu: PhysicalCpu, vector: int, irq: int = 0) -> None:
    """The IPI (or a remapped device interrupt, ``irq`` its correlation id) reaches the
    target's local APIC."""
    pcpu.ipis_received[vector] = pcpu.ipis_received.get(vector, 0) + 1
    if irq:
        ids = pcpu.irq_ids.get(vector)
        if ids is None:
            pcpu.irq_ids[vector] = [irq]
        else:
            ids.append(irq)
    if pcpu.context == CpuContext.HOST:
        host_interrupt(pcpu, vector)
    else:
        pcpu.pending.append(vector)
        pcpu.poke()


def host_interrupt(pcpu: PhysicalCpu, vector: int) -> None:
    """arch/x86/kernel/irq.c: the host's handler for ``vector`` (sysvec_*, common_interrupt)
    [hardirq on ``pcpu``]

    POSTED_INTR_VECTOR (sysvec_kvm_posted_intr_ipi) only acknowledges: it does nothing to any
    vCPU.  RESCHEDULE_VECTOR has done its job by interrupting.  Registered handlers (the PI
    wakeup handler, device interrupt handlers) run here, on ``pcpu``: smp_processor_id()
    and per-CPU data (kvm_running_vcpu) are ``pcpu``'s while they run.
    """
    handler = pcpu.handlers.get(vector)
    ids = pcpu.irq_ids.get(vector)
    irq = ids.pop(0) if ids else 0
    if handler is None:
        return
    rt = pcpu.rt
    saved = rt.cur_irq
    if irq:
        rt.cur_irq = irq
    token = current_pcpu.set(pcpu)
    try:
        handler(pcpu)
    finally:
        current_pcpu.reset(token)
        rt.cur_irq = saved


def local_irq_disable(pcpu: PhysicalCpu) -> None:
    """local_irq_disable on ``pcpu``: arrivals are held pending from now on."""
    pcpu.context = CpuContext.IRQS_OFF


def local_irq_enable(pcpu: PhysicalCpu) -> None:
    """local_irq_enable on ``pcpu``: take every held vector with the host handlers."""
    pcpu.context = CpuContext.HOST
    if pcpu.pending:
        held = pcpu.pending
        pcpu.pending = []
        for vector in held:
            host_interrupt(pcpu, vector)


async def cpu_acquire(pcpu: PhysicalCpu, task: TaskStruct) -> None:
    """The host scheduler puts ``task`` on ``pcpu`` (FIFO among runnable threads).

    The task stays TASK_RUNNING while it waits: it is runnable, only not running (a wake-up
    meanwhile finds it running and returns False, as try_to_wake_up does).
    """
    if pcpu.owner is None and not pcpu.waiters:
        pcpu.owner = task
        return
    fut: asyncio.Future[None] = pcpu.rt.loop.create_future()
    pcpu.waiters.append((task, fut))
    blocked = pcpu.rt.blocked_on
    blocked[task.comm] = f"runqueue of pcpu {pcpu.id}"
    try:
        await fut
    finally:
        blocked.pop(task.comm, None)


def cpu_release(pcpu: PhysicalCpu, task: TaskStruct) -> None:
    """``task`` leaves ``pcpu``; the next runnable thread gets it."""
    if pcpu.owner is not task:
        return
    pcpu.owner = None
    if pcpu.waiters:
        nxt, fut = pcpu.waiters.pop(0)
        pcpu.owner = nxt
        if not fut.done():
            fut.set_result(None)


async def __schedule(task: TaskStruct, host: HwHost, preempt: bool,
                     why: str = "schedule()") -> None:
    """kernel/sched/core.c: __schedule  [process: ``task`` runs on a modelled CPU]

    ``preempt`` False (schedule()): a task whose state is not TASK_RUNNING leaves the CPU
    and sleeps until wake_up_process; one still TASK_RUNNING (woken after its condition
    check) keeps the CPU and returns at once.  ``preempt`` True (preempt_schedule_irq,
    an interrupt return or a resched point with preemption enabled): the task stays
    runnable whatever its state and yields its CPU to the next thread queued there, or moves
    to the CPU its affinity now names (the migration stopper's work).  On a switch the
    sched-out preempt notifiers run first (they see the task's state as it is: still
    RUNNING means preempted), and the sched-in notifiers run on the CPU it next runs on.
    Differs from the kernel: one FIFO runqueue per CPU, no load balancing; a preempted
    task with nothing else queued on its CPU keeps running (no switch, no notifiers).
    """
    rt = host.rt
    pcpu = host.pcpus[task.cpu]
    target = task.cpus_allowed if task.cpus_allowed >= 0 else task.cpu
    if preempt:
        if not pcpu.waiters and target == task.cpu:
            return
    elif task.state == TASK_RUNNING:
        return
    fire_sched_out_preempt_notifiers(task, None)
    cpu_release(pcpu, task)
    if not preempt:
        await schedule(task, why)
        if host.costs.wakeup_ns:
            await rt.sleep_ns(host.costs.wakeup_ns)  # woken: runnable, not yet running
        target = task.cpus_allowed if task.cpus_allowed >= 0 else task.cpu
    nxt = host.pcpus[target]
    await cpu_acquire(nxt, task)
    task.cpu = target
    current_pcpu.set(nxt)
    await fire_sched_in_preempt_notifiers(task, target)


def sched_setaffinity(task: TaskStruct, cpu: int) -> None:
    """kernel/sched/core.c: sched_setaffinity → __set_cpus_allowed_ptr  [process]

    Pin ``task`` to ``cpu``.  A sleeping or queued task runs there when it next runs; a
    running task is moved at its next preemption point (the kernel's migration stopper
    preempts it, whatever its state).
    Differs from the kernel: the move waits for one of the task's host preemption points
    (in vkick, only vCPU threads have them: W-HOST-sched, W-BLK-check, W-BLK-sleep).
    """
    task.cpus_allowed = cpu
