"""virt/kvm/kvm_main.c and include/linux/kvm_host.h: VM and vCPU creation, requests,
kick / wake / block, vcpu_load / vcpu_put and the preempt notifiers.

Covered: kvm_create_vm, kvm_get_vcpu_by_id, kvm_vm_ioctl_create_vcpu, kvm_make_request,
kvm_check_request, kvm_test_request, kvm_clear_request, kvm_request_pending,
kvm_vcpu_exiting_guest_mode, kvm_arch_vcpu_should_kick, kvm_vcpu_kick, kvm_vcpu_wake_up,
kvm_request_needs_ipi, kvm_kick_many_cpus, kvm_make_vcpus_request_mask,
kvm_make_all_cpus_request_except, kvm_make_all_cpus_request, kvm_vcpu_block,
kvm_vcpu_check_block, kvm_get_running_vcpu, vcpu_load, vcpu_put, kvm_sched_in,
kvm_sched_out.

``kvm_running_vcpu`` is a per-CPU pointer (``PhysicalCpu.running_vcpu``): set when the vCPU
thread is loaded on a CPU (vcpu_load, kvm_sched_in) and cleared only when it leaves it
(kvm_sched_out when the thread really switches away — it sleeps in schedule() or is
preempted — and vcpu_put).  A hardirq handler on that CPU sees it (spec §12.1, §16.12).
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING

import vkick.kvm
from vkick.hw.cpu import (
    HwHost,
    __schedule,
    cpu_acquire,
    cpu_release,
    current_pcpu,
    send_ipi,
    smp_processor_id,
)
from vkick.kernel.mutex import mutex_lock, mutex_unlock
from vkick.kernel.sched import (
    TASK_INTERRUPTIBLE,
    TASK_RUNNING,
    PreemptNotifier,
    PreemptOps,
    TaskStruct,
    preempt_notifier_register,
    preempt_notifier_unregister,
    wake_up_process,
)
from vkick.kernel.sched import set_current_state as _set_state
from vkick.kvm.kvm_host import (
    CALL_FUNCTION_VECTOR,
    EXITING_GUEST_MODE,
    IN_GUEST_MODE,
    KVM_MAX_VCPU_ID,
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

if TYPE_CHECKING:
    import vkick.kvm.x86

# x86.py imports this module, so the hot paths here (kvm_sched_in / kvm_sched_out on every
# context switch, kvm_vcpu_check_block on every block) read its functions from the package
# at call time — vkick.kvm.x86.<name> — instead of running an import statement per call.

EINTR = 4


def kvm_create_vm(rt: Runtime, name: str = "vm0", *, apicv: bool = True,
                  host: HwHost | None = None, max_halt_poll_ns: int = 200_000,
                  toggles: frozenset[str] = frozenset()) -> Kvm:
    """virt/kvm/kvm_main.c: kvm_create_vm (+ kvm_irqfd_init, the APIC map)  [process]

    kvm_arch_init_vm's kvm_apicv_init sets the DISABLE inhibit reason when APICv is off.
    Differs from the kernel: vmx's hardware_setup (module load in the kernel) runs here,
    for the host this VM runs on; ``apicv`` stands for the module's enable_apicv.
    """
    from vkick.kvm.eventfd import kvm_irqfd_init  # noqa: PLC0415
    from vkick.kvm.vmx.vmx import hardware_setup  # noqa: PLC0415
    from vkick.kvm.x86 import kvm_apicv_init  # noqa: PLC0415

    kvm = Kvm(rt=rt, name=name, enable_apicv=apicv, max_halt_poll_ns=max_halt_poll_ns,
              toggles=toggles, host=host)
    kvm_apicv_init(kvm)  # kvm_arch_init_vm
    kvm_irqfd_init(kvm)
    if host is not None:
        hardware_setup(host)
    return kvm


def kvm_get_vcpu_by_id(kvm: Kvm, vcpu_id: int) -> KvmVcpu | None:
    """include/linux/kvm_host.h: kvm_get_vcpu_by_id  [any context] — the visible vCPU, or None.
    """
    for vcpu in kvm.vcpus:
        if vcpu.vcpu_id == vcpu_id:
            return vcpu
    return None


async def kvm_vm_ioctl_create_vcpu(kvm: Kvm, vcpu_id: int, *, cpu: int = -1) -> KvmVcpu:
    """virt/kvm/kvm_main.c: kvm_vm_ioctl_create_vcpu (KVM_CREATE_VCPU)  [process]

    Called from the new vCPU's own thread (as QEMU does), so its TaskStruct is made first.
    kvm_arch_vcpu_create builds the LAPIC and resets it, which marks the APIC map dirty and
    recalculates it *before* the vCPU is visible; then, under kvm->lock, the vCPU is
    stored in kvm->vcpus and online_vcpus incremented.  Nothing recalculates after that:
    the vCPU enters the map with the next recalculation (KVM_SET_LAPIC forces one).  A
    rebuild running concurrently may meet the vCPU in its fill loop (bug #11).  ``cpu`` is
    the physical CPU the thread is pinned to.  As in kvm_vcpu_init and vmx_create_vcpu:
    ``vcpu->cpu`` = -1 (never loaded), ``pre_pcpu`` = -1, PI descriptor NV =
    POSTED_INTR_VECTOR and SN = 1 (the first load points NDST at its CPU).  Raises
    OSError(EINVAL) for an id out of range and OSError(EEXIST) for a duplicate, as the
    ioctl fails.
    Differs from the kernel: no vCPU fd, run page, dirty ring or created_vcpus count.
    """
    from vkick.kvm.kvm_host import POSTED_INTR_VECTOR  # noqa: PLC0415
    from vkick.kvm.x86 import kvm_arch_vcpu_create  # noqa: PLC0415

    if vcpu_id >= KVM_MAX_VCPU_ID:
        raise OSError(errno.EINVAL, f"KVM_CREATE_VCPU: vcpu id {vcpu_id} out of range")
    rt = kvm.rt
    task = TaskStruct(rt, f"{kvm.name}/vcpu{vcpu_id}", cpu)
    vcpu = KvmVcpu(kvm=kvm, vcpu_id=vcpu_id, vcpu_idx=-1, task=task)  # kvm_vcpu_init
    vcpu.cpu = -1
    vcpu.pre_pcpu = -1
    vcpu.home_cpu = cpu
    vcpu.halt_poll_ns = 0
    vcpu.preempt_notifier = PreemptNotifier(PreemptOps(kvm_sched_in, kvm_sched_out), vcpu)
    vcpu.pi_desc.nv = POSTED_INTR_VECTOR  # vmx_create_vcpu
    vcpu.pi_desc.sn = True
    await kvm_arch_vcpu_create(vcpu)
    # W-VCPU-create: kvm_arch_vcpu_create (LAPIC reset, map recalculated without this vCPU)
    # ↔ the vCPU made visible.  Another thread may start a map rebuild here and size it
    # before this vCPU appears (bug #11).
    await rt.preempt("W-VCPU-create")
    await mutex_lock(kvm.lock, task)
    if kvm_get_vcpu_by_id(kvm, vcpu_id) is not None:
        mutex_unlock(kvm.lock, task)
        raise OSError(errno.EEXIST, f"KVM_CREATE_VCPU: vcpu id {vcpu_id} exists")
    vcpu.vcpu_idx = len(kvm.vcpus)  # atomic_read(&kvm->online_vcpus)
    # kvm->vcpus[idx] = vcpu; smp_wmb(); atomic_inc(&kvm->online_vcpus)
    kvm.vcpus.append(vcpu)
    mutex_unlock(kvm.lock, task)
    # kvm_arch_vcpu_postcreate: TSC synchronisation and kvmclock only (not modelled).
    bus = rt.bus
    if bus.on:
        bus.emit("kvm_vm_ioctl_create_vcpu", vm=kvm.name, vcpu=vcpu_id, idx=vcpu.vcpu_idx)
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
            send_ipi(vcpu.kvm.host, cpu, RESCHEDULE_VECTOR, vcpu.vcpu_id, vcpu.kvm.name)
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("kvm_vcpu_kick", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, ipi=ipi, woke=woke)


def kvm_get_running_vcpu() -> KvmVcpu | None:
    """virt/kvm/kvm_main.c: kvm_get_running_vcpu — the vCPU loaded on the caller's CPU.

    The per-CPU ``kvm_running_vcpu`` of the CPU executing the caller: the caller is that
    vCPU's own thread, or an interrupt handler that interrupted it (spec §12.1).  None for
    a thread not on a modelled CPU (vhost worker, kworker, VMM).
    """
    pcpu = current_pcpu.get()
    vcpu: KvmVcpu | None = None if pcpu is None else pcpu.running_vcpu
    return vcpu


def kvm_request_needs_ipi(vcpu: KvmVcpu, req: int) -> bool:
    """virt/kvm/kvm_main.c: kvm_request_needs_ipi  [any context]

    The CAS IN_GUEST → EXITING; a WAIT request needs the IPI in any mode but OUTSIDE
    (spec §15.7).
    """
    mode = kvm_vcpu_exiting_guest_mode(vcpu)
    if req & KVM_REQUEST_WAIT:
        return mode != OUTSIDE_GUEST_MODE
    return mode == IN_GUEST_MODE


def kvm_kick_many_cpus(kvm: Kvm, cpus: list[int], wait: bool) -> bool:
    """virt/kvm/kvm_main.c: kvm_kick_many_cpus → smp_call_function_many  [any context]

    One CALL_FUNCTION_VECTOR IPI per CPU in ``cpus``; the callee does nothing, the point is
    the VM exit.  Returns whether any was sent.
    Differs from the kernel: ``wait`` is not modelled (no acknowledgement is awaited).
    """
    for cpu in cpus:
        send_ipi(kvm.host, cpu, CALL_FUNCTION_VECTOR, -1, kvm.name)
    return bool(cpus)


def kvm_make_vcpus_request_mask(kvm: Kvm, req: int, except_: KvmVcpu | None,
                                vcpu_bitmap: int | None) -> bool:
    """virt/kvm/kvm_main.c: kvm_make_vcpus_request_mask  [any context]

    For each vCPU (in the bitmap, except ``except_``): make the request; unless NO_WAKEUP,
    try to wake it (a woken vCPU needs no IPI); otherwise collect its CPU if it is another
    CPU and kvm_request_needs_ipi.  Then kick those CPUs.  Spec §15.7.
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
    return kvm_kick_many_cpus(kvm, sorted(cpus), bool(req & KVM_REQUEST_WAIT))


def kvm_make_all_cpus_request_except(kvm: Kvm, req: int, except_: KvmVcpu | None) -> bool:
    """virt/kvm/kvm_main.c: kvm_make_all_cpus_request_except  [any context] — every vCPU but
    ``except_`` (the caller's own, which the caller updates directly)."""
    return kvm_make_vcpus_request_mask(kvm, req, except_, None)


def kvm_make_all_cpus_request(kvm: Kvm, req: int) -> bool:
    """virt/kvm/kvm_main.c: kvm_make_all_cpus_request  [any context]"""
    return kvm_make_all_cpus_request_except(kvm, req, None)


# ---------------------------------------------------------------------------- load / put


def _set_running(vcpu: KvmVcpu, cpu: int, running: KvmVcpu | None) -> None:
    """__this_cpu_write(kvm_running_vcpu, …) on ``cpu``."""
    host = vcpu.kvm.host
    if host is not None and 0 <= cpu < len(host.pcpus):
        host.pcpus[cpu].running_vcpu = running


async def vcpu_load(vcpu: KvmVcpu) -> None:
    """virt/kvm/kvm_main.c: vcpu_load  [vCPU thread, at KVM_RUN]

    This CPU's ``kvm_running_vcpu`` := vcpu, register the preempt notifier
    (kvm_sched_in / kvm_sched_out from now on), kvm_arch_vcpu_load (→ vmx_vcpu_pi_load,
    then ``vcpu->cpu``).  Spec §14.1, §15.8.
    Differs from the kernel: the thread first waits to be put on the CPU it is pinned to
    (vkick's vCPU threads start off-CPU).
    """
    from vkick.kvm.x86 import kvm_arch_vcpu_load  # noqa: PLC0415

    host = vcpu.kvm.host
    task = vcpu.task
    assert task is not None and host is not None
    cpu = task.cpus_allowed if task.cpus_allowed >= 0 else vcpu.home_cpu
    pcpu = host.pcpus[cpu]
    await cpu_acquire(pcpu, task)
    task.cpu = cpu
    current_pcpu.set(pcpu)
    _set_running(vcpu, cpu, vcpu)
    preempt_notifier_register(task, vcpu.preempt_notifier)
    await kvm_arch_vcpu_load(vcpu, cpu)
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vkick_vcpu_load", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, pcpu=cpu,
                 preempted=False)


def vcpu_put(vcpu: KvmVcpu) -> None:
    """virt/kvm/kvm_main.c: vcpu_put  [vCPU thread, leaving KVM_RUN]

    kvm_arch_vcpu_put (→ vmx_vcpu_pi_put), unregister the preempt notifier, this CPU's
    ``kvm_running_vcpu`` := NULL.  ``vcpu->cpu`` is kept.
    Differs from the kernel: the thread then leaves its CPU (in vkick it ends).
    """
    from vkick.kvm.x86 import kvm_arch_vcpu_put  # noqa: PLC0415

    host = vcpu.kvm.host
    task = vcpu.task
    assert task is not None and host is not None
    kvm_arch_vcpu_put(vcpu)
    preempt_notifier_unregister(task, vcpu.preempt_notifier)
    cpu = task.cpu
    _set_running(vcpu, cpu, None)
    cpu_release(host.pcpus[cpu], task)
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vkick_vcpu_put", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, pcpu=cpu,
                 preempted=False)


async def kvm_sched_in(pn: PreemptNotifier, cpu: int) -> None:
    """virt/kvm/kvm_main.c: kvm_sched_in  [preempt notifier: the vCPU thread runs again]

    ``preempted`` = ``ready`` = false, this CPU's ``kvm_running_vcpu`` := vcpu,
    kvm_arch_vcpu_load (→ vmx_vcpu_pi_load: SN, NDST, ON; then ``vcpu->cpu``).  Spec §15.8.
    """
    vcpu: KvmVcpu = pn.owner
    vcpu.preempted = False
    vcpu.ready = False
    _set_running(vcpu, cpu, vcpu)
    await vkick.kvm.x86.kvm_arch_vcpu_load(vcpu, cpu)
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vkick_vcpu_load", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, pcpu=cpu,
                 preempted=False)


def kvm_sched_out(pn: PreemptNotifier, nxt: TaskStruct | None) -> None:
    """virt/kvm/kvm_main.c: kvm_sched_out  [preempt notifier: the vCPU thread switches away]

    v5.13 form: if the thread is still TASK_RUNNING (involuntary preemption, not a sleep),
    ``preempted`` = ``ready`` = true; kvm_arch_vcpu_put (→ vmx_vcpu_pi_put: SN when
    preempted); this CPU's ``kvm_running_vcpu`` := NULL.  Spec §15.8.
    """
    vcpu: KvmVcpu = pn.owner
    task = vcpu.task
    assert task is not None
    if task.state == TASK_RUNNING:
        vcpu.preempted = True
        vcpu.ready = True
    vkick.kvm.x86.kvm_arch_vcpu_put(vcpu)
    _set_running(vcpu, task.cpu, None)
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("vkick_vcpu_put", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id, pcpu=task.cpu,
                 preempted=vcpu.preempted)


def kvm_vcpu_must_migrate(vcpu: KvmVcpu) -> bool:
    """vkick: whether the host must preempt the running vCPU thread to move it
    (sched_setaffinity named another CPU); callers then await
    :func:`kvm_vcpu_preemption_point`.  A plain test, so an unaffected point costs no
    coroutine."""
    task = vcpu.task
    return task is not None and task.cpus_allowed >= 0 and task.cpus_allowed != task.cpu


async def kvm_vcpu_preemption_point(vcpu: KvmVcpu) -> None:
    """vkick: the host preempts the running vCPU thread involuntarily to migrate it
    (CONFIG_PREEMPT: an interrupt return with preemption enabled → preempt_schedule_irq;
    the migration stopper does it whatever the task state).  Time-slice preemption is at
    W-HOST-sched in vcpu_run.
    """
    task = vcpu.task
    host = vcpu.kvm.host
    assert task is not None and host is not None
    await __schedule(task, host, True, "migration")


# ---------------------------------------------------------------------------- block


def kvm_vcpu_check_block(vcpu: KvmVcpu) -> int:
    """virt/kvm/kvm_main.c: kvm_vcpu_check_block → -EINTR (stop blocking) or 0.

    Runnable (a deliverable interrupt — PIR harvested first with APICv — or another event)
    → KVM_REQ_UNHALT and stop; KVM_REQ_UNBLOCK stops without making it runnable.
    """
    if vkick.kvm.x86.kvm_arch_vcpu_runnable(vcpu):
        kvm_make_request(KVM_REQ_UNHALT, vcpu)
        return -EINTR
    if kvm_check_request(KVM_REQ_UNBLOCK, vcpu):
        return -EINTR
    return 0


async def kvm_vcpu_block(vcpu: KvmVcpu) -> None:
    """virt/kvm/kvm_main.c: kvm_vcpu_block  [vCPU thread]

    Halt-poll first (no waiter registered: a kick's wake returns False and the loop sees the
    event by itself), then publish the rcuwait waiter and sleep with the lost-wakeup-safe
    state/check/schedule sequence of spec §16.3.  The thread stays on its CPU — and its
    ``kvm_running_vcpu`` — until schedule() really switches away (kvm_sched_out), and is
    back (kvm_sched_in) when schedule() returns.  Adapts ``halt_poll_ns``.
    """
    rt = vcpu.kvm.rt
    kvm = vcpu.kvm
    host = kvm.host
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
            handle = rt.call_at_ns(stop, _resolve, fut)
            try:
                await fut
            finally:
                vcpu.poll_fut = None
                handle.cancel()
    if not done:
        vcpu.wait_task = task  # prepare_to_rcuwait
        while True:
            _set_state(task, TASK_INTERRUPTIBLE)  # full barrier "A"
            # W-BLK-check: state set ↔ condition check.  A waker here finds the waiter,
            # sets RUNNING; schedule() below then returns at once.  Pairs with the full
            # barrier "B" in rcuwait_wake_up.  Spec §16.3.  This thread is still current on
            # its CPU: an interrupt handler there sees it as kvm_running_vcpu.
            await rt.preempt("W-BLK-check")
            if kvm_vcpu_must_migrate(vcpu):
                await kvm_vcpu_preemption_point(vcpu)
            if kvm_vcpu_check_block(vcpu) < 0:
                break
            waited = True
            # W-BLK-sleep: condition checked ↔ schedule(): a wake-up landing here is not
            # lost, because it made the state RUNNING (unless the waker skipped the wake:
            # the running-vCPU shortcut of spec §16.12).
            await rt.preempt("W-BLK-sleep")
            if kvm_vcpu_must_migrate(vcpu):
                await kvm_vcpu_preemption_point(vcpu)
            await __schedule(task, host, False, f"kvm_vcpu_block({vcpu.vcpu_id})")
        vcpu.wait_task = None  # finish_rcuwait
        task.state = TASK_RUNNING
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
