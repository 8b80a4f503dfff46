"""virt/kvm/kvm_main.c and include/linux/kvm_host.h: VM and vCPU creation, requests,
kick / wake / block, vcpu_load / vcpu_put.

Covered: kvm_create_vm, kvm_vm_ioctl_create_vcpu, kvm_make_request, kvm_check_request,
kvm_test_request, kvm_clear_request, kvm_request_pending, kvm_request_needs_ipi,
kvm_make_vcpus_request_mask, kvm_make_all_cpus_request, kvm_vcpu_exiting_guest_mode,
kvm_arch_vcpu_should_kick, kvm_vcpu_kick, kvm_vcpu_wake_up, kvm_vcpu_block,
kvm_vcpu_check_block, kvm_get_running_vcpu, vcpu_load, vcpu_put (kvm_sched_in/out).
"""

from __future__ import annotations

import asyncio
import contextvars

from vkick.hw.cpu import (
    HwHost,
    cpu_acquire,
    cpu_release,
    current_cpu,
    send_ipi,
    smp_processor_id,
)
from vkick.kernel.sched import (
    TASK_INTERRUPTIBLE,
    TASK_RUNNING,
    TaskStruct,
    schedule,
    wake_up_process,
)
from vkick.kernel.sched import set_current_state as _set_state
from vkick.kvm.kvm_host import (
    CALL_FUNCTION_VECTOR,
    EXITING_GUEST_MODE,
    IN_GUEST_MODE,
    KVM_REQ_UNBLOCK,
    KVM_REQ_UNHALT,
    KVM_REQUEST_MASK,
    KVM_REQUEST_NO_WAKEUP,
    KVM_REQUEST_WAIT,
    OUTSIDE_GUEST_MODE,
    RESCHEDULE_VECTOR,
    Kvm,
    KvmVcpu,
    VcpuMode,
)
from vkick.runtime.tasks import Runtime

EINTR = 4


def kvm_create_vm(rt: Runtime, name: str = "vm0", *, apicv: bool = True,
                  host: HwHost | None = None, max_halt_poll_ns: int = 200_000,
                  toggles: frozenset[str] = frozenset()) -> Kvm:
    """virt/kvm/kvm_main.c: kvm_create_vm (+ kvm_irqfd_init, the APIC map)  [process]"""
    from vkick.kvm.eventfd import kvm_irqfd_init  # noqa: PLC0415

    kvm = Kvm(rt=rt, name=name, enable_apicv=apicv, max_halt_poll_ns=max_halt_poll_ns,
              toggles=toggles, host=host)
    kvm_irqfd_init(kvm)
    return kvm


def kvm_vm_ioctl_create_vcpu(kvm: Kvm, vcpu_id: int, *, x2apic: bool = False,
                             cpu: int = -1) -> KvmVcpu:
    """virt/kvm/kvm_main.c: kvm_vm_ioctl_create_vcpu (KVM_CREATE_VCPU)  [process]

    Creates the vCPU with an in-kernel LAPIC; APICv is active iff the VM enables it.
    ``cpu`` is the physical CPU the vCPU thread is pinned to.
    """
    from vkick.kvm.lapic import kvm_create_lapic  # noqa: PLC0415
    from vkick.kvm.lapic_map import kvm_recalculate_apic_map  # noqa: PLC0415

    vcpu = KvmVcpu(kvm=kvm, vcpu_id=vcpu_id, vcpu_idx=len(kvm.vcpus))
    vcpu.arch.apicv_active = kvm.enable_apicv
    vcpu.halt_poll_ns = 0
    vcpu.cpu = cpu
    vcpu.home_cpu = cpu
    kvm_create_lapic(vcpu, x2apic=x2apic)
    if kvm.enable_apicv:
        vcpu.arch.apic.irr_pending = True  # type: ignore[union-attr]  # set just above
        vcpu.arch.apic.isr_count = 1  # type: ignore[union-attr]
    vcpu.task = TaskStruct(kvm.rt, f"{kvm.name}/vcpu{vcpu_id}", cpu)
    kvm.vcpus.append(vcpu)
    kvm_recalculate_apic_map(kvm)
    return vcpu


# ---------------------------------------------------------------------------- requests


def kvm_make_request(req: int, vcpu: KvmVcpu) -> None:
    """include/linux/kvm_host.h: kvm_make_request — smp_wmb, then set the bit (no kick)."""
    vcpu.requests |= 1 << (req & KVM_REQUEST_MASK)


def kvm_test_request(req: int, vcpu: KvmVcpu) -> bool:
    """include/linux/kvm_host.h: kvm_test_request."""
    return bool(vcpu.requests >> (req & KVM_REQUEST_MASK) & 1)


def kvm_clear_request(req: int, vcpu: KvmVcpu) -> None:
    """include/linux/kvm_host.h: kvm_clear_request."""
    vcpu.requests &= ~(1 << (req & KVM_REQUEST_MASK))


def kvm_check_request(req: int, vcpu: KvmVcpu) -> bool:
    """include/linux/kvm_host.h: kvm_check_request — test and clear (then smp_mb)."""
    bit = 1 << (req & KVM_REQUEST_MASK)
    if vcpu.requests & bit:
        vcpu.requests &= ~bit
        return True
    return False


def kvm_request_pending(vcpu: KvmVcpu) -> bool:
    """include/linux/kvm_host.h: kvm_request_pending."""
    return vcpu.requests != 0


def kvm_request_needs_ipi(vcpu: KvmVcpu, req: int) -> bool:
    """virt/kvm/kvm_main.c: kvm_request_needs_ipi — CAS the mode IN_GUEST → EXITING; a
    KVM_REQUEST_WAIT request needs the IPI unless the vCPU is outside guest mode, others
    only if it was in guest mode."""
    mode = kvm_vcpu_exiting_guest_mode(vcpu)
    if req & KVM_REQUEST_WAIT:
        return mode != OUTSIDE_GUEST_MODE
    return mode == IN_GUEST_MODE


def kvm_make_vcpus_request_mask(kvm: Kvm, req: int, except_: KvmVcpu | None,
                                vcpu_bitmap: int | None) -> bool:
    """virt/kvm/kvm_main.c: kvm_make_vcpus_request_mask  [any context]

    Set ``req`` on every vCPU of ``vcpu_bitmap`` (None: all) but ``except_``; wake it
    unless KVM_REQUEST_NO_WAKEUP; IPI (CALL_FUNCTION_VECTOR) the other CPUs whose vCPU is
    in guest mode (kvm_request_needs_ipi) so it exits and sees the request before its next
    entry.  True if any IPI was sent.
    Differs from the kernel: smp_call_function_many's wait for the targets to run the
    (empty) IPI function with KVM_REQUEST_WAIT is not modelled — the caller goes on at
    once; every target still handles the request before it re-enters the guest.
    """
    me = smp_processor_id()
    cpus: list[int] = []
    for i, vcpu in enumerate(kvm.vcpus):
        if (vcpu_bitmap is not None and not vcpu_bitmap >> i & 1) or vcpu is except_:
            continue
        kvm_make_request(req, vcpu)
        cpu = vcpu.cpu
        if not req & KVM_REQUEST_NO_WAKEUP and kvm_vcpu_wake_up(vcpu):
            continue
        if cpu not in (-1, me) and kvm_request_needs_ipi(vcpu, req) and cpu not in cpus:
            cpus.append(cpu)
    host = kvm.host
    for cpu in cpus:  # kvm_kick_many_cpus → smp_call_function_many(cpus, ack_flush, …)
        send_ipi(host, cpu, CALL_FUNCTION_VECTOR)
    return bool(cpus)


def kvm_make_all_cpus_request(kvm: Kvm, req: int) -> bool:
    """virt/kvm/kvm_main.c: kvm_make_all_cpus_request — the request to every vCPU."""
    return kvm_make_vcpus_request_mask(kvm, req, None, None)


# ---------------------------------------------------------------------------- kick and wake


def kvm_vcpu_exiting_guest_mode(vcpu: KvmVcpu) -> VcpuMode:
    """include/linux/kvm_host.h: kvm_vcpu_exiting_guest_mode — cmpxchg IN_GUEST → EXITING.

    Preceded by smp_mb__before_atomic: the caller's request/IRR store is ordered before the
    read of ``mode`` (pairs with the barrier after the mode store in vcpu_enter_guest).
    """
    old = vcpu.mode
    if old == IN_GUEST_MODE:
        vcpu.mode = EXITING_GUEST_MODE
    return old


def kvm_arch_vcpu_should_kick(vcpu: KvmVcpu) -> bool:
    """arch/x86/kvm/x86.c: kvm_arch_vcpu_should_kick — the CAS found IN_GUEST_MODE."""
    return kvm_vcpu_exiting_guest_mode(vcpu) == IN_GUEST_MODE


def kvm_vcpu_wake_up(vcpu: KvmVcpu) -> bool:
    """virt/kvm/kvm_main.c: kvm_vcpu_wake_up → rcuwait_wake_up  [any context]

    Full barrier, read the registered waiter, wake it; True only if it was sleeping (or
    about to).  During halt polling there is no waiter: False, the poll loop notices by
    itself (vkick pokes it so it re-checks now rather than at its next poll step).
    """
    task = vcpu.wait_task
    if task is None:
        poll = vcpu.poll_fut
        if poll is not None and not poll.done():
            poll.set_result(None)
        return False
    if wake_up_process(task):
        vcpu.ready = True
        vcpu.stat.halt_wakeup += 1
        return True
    return False


def kvm_vcpu_kick(vcpu: KvmVcpu) -> None:
    """virt/kvm/kvm_main.c: kvm_vcpu_kick  [any context]

    Read ``vcpu->cpu`` first; wake a sleeping vCPU thread; otherwise, if the CAS moved it
    from IN_GUEST_MODE to EXITING_GUEST_MODE and it runs on another CPU, send the
    reschedule IPI that forces the VM exit.  In host code (OUTSIDE, or EXITING already) no
    IPI is needed: the published request/IRR is seen before the next entry.  Spec §15.3.
    """
    cpu = vcpu.cpu
    woke = kvm_vcpu_wake_up(vcpu)
    ipi = False
    if not woke:
        me = smp_processor_id()
        if cpu != me and cpu >= 0 and kvm_arch_vcpu_should_kick(vcpu):
            ipi = True
            vcpu.stat.kicks_ipi += 1
            send_ipi(vcpu.kvm.host, cpu, RESCHEDULE_VECTOR, vcpu.vcpu_id)
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("kvm_vcpu_kick", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, ipi=ipi, woke=woke)


def kvm_get_running_vcpu() -> KvmVcpu | None:
    """virt/kvm/kvm_main.c: kvm_get_running_vcpu — the vCPU loaded on the caller's CPU.

    Set by vcpu_load in the vCPU thread, cleared by vcpu_put; a task that stands for an
    interrupt handler on a vCPU's CPU sets it to that CPU's running vCPU.
    """
    return running_vcpu.get()


running_vcpu: contextvars.ContextVar[KvmVcpu | None] = contextvars.ContextVar(
    "kvm_running_vcpu", default=None)


# ---------------------------------------------------------------------------- load / put


async def vcpu_load(vcpu: KvmVcpu) -> None:
    """virt/kvm/kvm_main.c: vcpu_load / kvm_sched_in — get a pCPU, become its running vCPU.

    vmx_vcpu_load → vmx_vcpu_pi_load runs before ``vcpu->cpu`` is updated.
    """
    from vkick.kvm.vmx.posted_intr import vmx_vcpu_pi_load  # noqa: PLC0415

    host = vcpu.kvm.host
    task = vcpu.task
    assert task is not None and host is not None
    cpu = vcpu.home_cpu
    pcpu = host.pcpus[cpu]
    await cpu_acquire(pcpu, task)
    current_cpu.set(cpu)
    task.cpu = cpu
    vcpu.preempted = False
    vcpu.ready = False
    pcpu.running_vcpu = vcpu
    running_vcpu.set(vcpu)
    vmx_vcpu_pi_load(vcpu, cpu)
    vcpu.cpu = cpu
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vkick_vcpu_load", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, pcpu=cpu,
                 preempted=False)


def vcpu_put(vcpu: KvmVcpu, *, preempted: bool = False) -> None:
    """virt/kvm/kvm_main.c: vcpu_put / kvm_sched_out — leave the pCPU (``cpu`` is kept)."""
    from vkick.kvm.vmx.posted_intr import vmx_vcpu_pi_put  # noqa: PLC0415

    host = vcpu.kvm.host
    task = vcpu.task
    assert task is not None and host is not None
    if preempted:
        vcpu.preempted = True
        vcpu.ready = True
    vmx_vcpu_pi_put(vcpu)
    cpu = vcpu.cpu
    pcpu = host.pcpus[cpu]
    if pcpu.running_vcpu is vcpu:
        pcpu.running_vcpu = None
    running_vcpu.set(None)
    cpu_release(pcpu, task)
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vkick_vcpu_put", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, pcpu=cpu,
                 preempted=preempted)


# ---------------------------------------------------------------------------- block


def kvm_vcpu_check_block(vcpu: KvmVcpu) -> int:
    """virt/kvm/kvm_main.c: kvm_vcpu_check_block → -EINTR (stop blocking) or 0.

    Runnable (a deliverable interrupt — PIR harvested first with APICv — or another event)
    → KVM_REQ_UNHALT and stop; KVM_REQ_UNBLOCK stops without making it runnable.
    """
    from vkick.kvm.x86 import kvm_arch_vcpu_runnable  # noqa: PLC0415

    if kvm_arch_vcpu_runnable(vcpu):
        kvm_make_request(KVM_REQ_UNHALT, vcpu)
        return -EINTR
    if kvm_check_request(KVM_REQ_UNBLOCK, vcpu):
        return -EINTR
    return 0


async def kvm_vcpu_block(vcpu: KvmVcpu) -> None:
    """virt/kvm/kvm_main.c: kvm_vcpu_block  [vCPU thread]

    Halt-poll first (no waiter registered: a kick's wake returns False and the loop sees the
    event by itself), then publish the rcuwait waiter and sleep with the lost-wakeup-safe
    state/check/schedule sequence of spec §16.3.  Adapts ``halt_poll_ns``.
    """
    rt = vcpu.kvm.rt
    kvm = vcpu.kvm
    task = vcpu.task
    assert task is not None
    start = rt.now_ns()
    waited = False
    done = False
    if vcpu.halt_poll_ns:
        stop = start + vcpu.halt_poll_ns
        vcpu.stat.halt_attempted_poll += 1
        while True:
            if kvm_vcpu_check_block(vcpu) < 0:
                vcpu.stat.halt_successful_poll += 1
                done = True
                break
            now = rt.now_ns()
            if now >= stop:
                break
            fut: asyncio.Future[None] = rt.loop.create_future()
            vcpu.poll_fut = fut
            handle = rt.loop.call_at(stop / 1e9, _resolve, fut)
            try:
                await fut
            finally:
                vcpu.poll_fut = None
                handle.cancel()
    if not done:
        vcpu.wait_task = task  # prepare_to_rcuwait
        # The thread sleeps: the scheduler takes it off its CPU (kvm_sched_out).
        vcpu_put(vcpu)
        while True:
            _set_state(task, TASK_INTERRUPTIBLE)  # full barrier "A"
            # W-BLK-check: state set ↔ condition check.  A waker here finds the waiter,
            # sets RUNNING; schedule() below then returns at once.  Pairs with the full
            # barrier "B" in rcuwait_wake_up.  Spec §16.3.
            await rt.preempt("W-BLK-check")
            if kvm_vcpu_check_block(vcpu) < 0:
                break
            waited = True
            # W-BLK-sleep: condition checked ↔ schedule(): a wake-up landing here is not
            # lost, because it made the state RUNNING.
            await rt.preempt("W-BLK-sleep")
            await schedule(task, f"kvm_vcpu_block({vcpu.vcpu_id})")
        vcpu.wait_task = None  # finish_rcuwait
        task.state = TASK_RUNNING
        await vcpu_load(vcpu)
        if kvm.host is not None and kvm.host.costs.wakeup_ns and waited:
            await rt.sleep_ns(kvm.host.costs.wakeup_ns)
    cur = rt.now_ns()
    block_ns = cur - start
    max_poll = kvm.max_halt_poll_ns
    if max_poll == 0:
        vcpu.halt_poll_ns = 0
    elif block_ns <= vcpu.halt_poll_ns:
        pass
    elif vcpu.halt_poll_ns and block_ns > max_poll:
        vcpu.halt_poll_ns = 0  # shrink with halt_poll_ns_shrink = 0
    elif vcpu.halt_poll_ns < max_poll and block_ns < max_poll:
        vcpu.halt_poll_ns = min(max(vcpu.halt_poll_ns * 2, 10_000), max_poll)  # grow
    bus = rt.bus
    if bus.on:
        bus.emit("kvm_vcpu_wakeup", vm=kvm.name, vcpu=vcpu.vcpu_id, ns=block_ns,
                 waited=waited, valid=True)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
