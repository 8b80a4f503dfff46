"""Physical CPUs: IPI inboxes, interrupt context (host / IRQs off / guest), host handlers.

An IPI is a message to the target CPU.  What happens on arrival depends on what that CPU is
doing (spec §12.4): in host mode with IRQs enabled the host handler runs at once; with IRQs
disabled (inside ``vcpu_enter_guest`` around VM entry and exit) the vector stays pending in
the local APIC and is recognised later — after VM entry by the guest-mode hardware, or when
the host enables IRQs again.  In guest mode the hardware model (``hw/apicv.py``) takes it at
the next instruction boundary: the posted-interrupt notification vector is processed without
a VM exit, anything else causes an external-interrupt exit.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vkick.kernel.sched import TaskStruct, wake_up_process
from vkick.runtime.tasks import Runtime

# The physical CPU the calling task runs on (-1: a host thread not pinned to one of the
# modelled CPUs, e.g. a vhost worker or the VMM).  smp_processor_id().
current_cpu: contextvars.ContextVar[int] = contextvars.ContextVar("vkick_cpu", default=-1)


def smp_processor_id() -> int:
    """arch/x86/include/asm/smp.h: smp_processor_id — the caller's physical CPU (or -1)."""
    return current_cpu.get()


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
    running_vcpu: Any = None  # kvm_running_vcpu: the vCPU loaded here
    owner: TaskStruct | None = None  # the vCPU thread holding this CPU
    waiters: list[TaskStruct] = field(default_factory=list)  # runnable threads queued for it
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


@dataclass(slots=True, eq=False)
class HwHost:
    """The machine: physical CPUs and the modelled costs."""

    rt: Runtime
    pcpus: list[PhysicalCpu]
    costs: HostCosts


def create_host(rt: Runtime, nr_pcpus: int, costs: HostCosts | None = None) -> HwHost:
    if nr_pcpus < 1:
        raise ValueError(f"pcpus: expected ≥ 1, got {nr_pcpus}")
    return HwHost(rt, [PhysicalCpu(rt, i) for i in range(nr_pcpus)], costs or HostCosts())


def send_ipi(host: HwHost, cpu: int, vector: int, vcpu_id: int = -1, vm: str = "") -> None:
    """apic->send_IPI(cpu, vector): a message to ``cpu``'s inbox after the IPI latency.
    ``vm``/``vcpu_id`` name the vCPU the IPI is meant for (for the event only)."""
    rt = host.rt
    bus = rt.bus
    if bus.on:
        bus.emit("vkick_host_ipi", pcpu=cpu, hvector=vector, vm=vm, vcpu=vcpu_id)
    pcpu = host.pcpus[cpu]
    lat = host.costs.ipi_latency_ns
    if lat <= 0:
        ipi_arrive(pcpu, vector)
    else:
        rt.loop.call_at((rt.now_ns() + lat) / 1e9, ipi_arrive, pcpu, vector)


def ipi_arrive(pcpu: PhysicalCpu, vector: int) -> None:
    """The IPI reaches the target's local APIC."""
    pcpu.ipis_received[vector] = pcpu.ipis_received.get(vector, 0) + 1
    if pcpu.context == CpuContext.HOST:
        host_interrupt(pcpu, vector)
    else:
        pcpu.pending.append(vector)
        pcpu.poke()


def host_interrupt(pcpu: PhysicalCpu, vector: int) -> None:
    """arch/x86/kernel/irq.c: the host's handler for ``vector`` (sysvec_*).

    POSTED_INTR_VECTOR (sysvec_kvm_posted_intr_ipi) only acknowledges: it does nothing to any
    vCPU.  RESCHEDULE_VECTOR has done its job by interrupting.  Registered handlers (the PI
    wakeup handler) run here.
    """
    handler = pcpu.handlers.get(vector)
    if handler is not None:
        handler(pcpu)


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
    """The host scheduler puts ``task`` on ``pcpu`` (FIFO among runnable threads)."""
    from vkick.kernel.sched import TASK_RUNNING, schedule, set_current_state  # noqa: PLC0415

    if pcpu.owner is None and not pcpu.waiters:
        pcpu.owner = task
        return
    pcpu.waiters.append(task)
    while pcpu.owner is not task:
        set_current_state(task, 1)
        if pcpu.owner is task:
            task.state = TASK_RUNNING
            break
        await schedule(task, f"runqueue of pcpu {pcpu.id}")


def cpu_release(pcpu: PhysicalCpu, task: TaskStruct) -> None:
    """``task`` leaves ``pcpu``; the next runnable thread gets it."""
    if pcpu.owner is not task:
        return
    pcpu.owner = None
    if pcpu.waiters:
        nxt = pcpu.waiters.pop(0)
        pcpu.owner = nxt
        wake_up_process(nxt)
