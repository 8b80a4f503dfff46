"""virt/kvm/eventfd.c: irqfd (an eventfd bound to a GSI) and ioeventfd (a guest doorbell that
signals an eventfd).

Covered: irqfd_inject, irqfd_wakeup, irqfd_ptable_queue_proc, irqfd_update,
kvm_irqfd_assign, irqfd_deactivate, kvm_irqfd_deassign, irqfd_shutdown, kvm_irqfd_release,
kvm_irq_routing_update, kvm_irqfd_init, ioeventfd_write, and the irq bypass consumer each
irqfd registers (VFIO's producer may connect to it: VT-d posting).  Left out: the resampler
(level-triggered irqfds: MSI irqfds, the vhost case, never have one; KVM_IRQFD_FLAG_RESAMPLE is
refused).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from vkick.kernel.eventfd import (
    EventfdCtx,
    eventfd_ctx_do_read,
    eventfd_ctx_remove_wait_queue,
    eventfd_poll,
    eventfd_signal,
)
from vkick.kernel.irqbypass import (
    IrqBypassConsumer,
    IrqBypassProducer,
    irq_bypass_register_consumer,
    irq_bypass_unregister_consumer,
)
from vkick.kernel.seqlock import (
    Seqcount,
    read_seqcount_begin,
    read_seqcount_retry,
    write_seqcount_begin,
    write_seqcount_end,
)
from vkick.kernel.srcu import SrcuStruct, srcu_read_lock, srcu_read_unlock, synchronize_srcu
from vkick.kernel.wait import (
    EPOLLHUP,
    EPOLLIN,
    WaitQueueEntry,
    WaitQueueHead,
    add_wait_queue_priority,
)
from vkick.kernel.workqueue import (
    Workqueue,
    WorkStruct,
    alloc_workqueue,
    flush_work,
    flush_workqueue,
    queue_work,
    schedule_work,
)
from vkick.kvm.irq_comm import kvm_arch_set_irq_inatomic
from vkick.kvm.irqchip import KvmKernelIrqRoutingEntry, kvm_irq_map_gsi, kvm_set_irq
from vkick.kvm.kvm_host import KVM_USERSPACE_IRQ_SOURCE_ID, Kvm

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


@dataclass(slots=True, eq=False)
class KvmKernelIrqfd:
    """include/linux/kvm_irqfd.h: struct kvm_kernel_irqfd

    ``irq_entry`` is a cached copy of the GSI's route (type 0 = none: always the slow path),
    guarded by ``irq_entry_sc``.  An irqfd is *active* while it is on ``kvm.irqfds``.
    ``pending_irqs`` holds the correlation ids merged into a pending ``inject`` work (vkick
    bookkeeping: the deferred injection reports which signals it satisfies).
    """

    kvm: Kvm
    gsi: int
    eventfd: EventfdCtx
    wait: WaitQueueEntry
    inject: WorkStruct
    shutdown: WorkStruct
    irq_entry: KvmKernelIrqRoutingEntry = field(default_factory=KvmKernelIrqRoutingEntry)
    irq_entry_sc: Seqcount = field(default_factory=Seqcount)
    active: bool = False
    pending_irqs: list[int] = field(default_factory=list)
    consumer: IrqBypassConsumer = field(default_factory=IrqBypassConsumer)
    producer: IrqBypassProducer | None = None


def kvm_irqfd_init(kvm: Kvm) -> None:
    """virt/kvm/eventfd.c: kvm_irqfd_init / kvm_eventfd_init — the per-VM irqfd state and the
    ``kvm-irqfd-cleanup`` workqueue; SRCU for routing readers."""
    kvm.irq_srcu = SrcuStruct(kvm.rt, f"{kvm.name}.irq_srcu")
    kvm.irqfd_cleanup_wq = alloc_workqueue(kvm.rt, "kvm-irqfd-cleanup")


def _cleanup_wq(kvm: Kvm) -> Workqueue:
    wq: Workqueue | None = kvm.irqfd_cleanup_wq
    if wq is None:
        raise RuntimeError("kvm_irqfd_init(kvm) was not called for this VM")
    return wq


async def irqfd_inject(work: WorkStruct) -> None:
    """virt/kvm/eventfd.c: irqfd_inject  [process: kworker]

    The slow path: assert then de-assert the GSI through the *current* routing table (not
    the cached entry).  Runs once for however many signals were merged into the pending
    work (spec §16.5); it reports their correlation ids.
    """
    irqfd: KvmKernelIrqfd = work.owner
    kvm = irqfd.kvm
    rt = kvm.rt
    ids = irqfd.pending_irqs
    irqfd.pending_irqs = []
    saved_irq, saved_path = rt.cur_irq, rt.cur_path
    rt.cur_irq = ids[0] if ids else 0
    rt.cur_path = "wq"
    bus = rt.bus
    if bus.on:
        bus.emit("irqfd_inject", vm=kvm.name, gsi=irqfd.gsi, irq=ids)
    rt.cur_merged = ids[1:]  # signals merged into this one execution
    try:
        kvm_set_irq(kvm, KVM_USERSPACE_IRQ_SOURCE_ID, irqfd.gsi, 1, False)
        kvm_set_irq(kvm, KVM_USERSPACE_IRQ_SOURCE_ID, irqfd.gsi, 0, False)
    finally:
        rt.cur_irq, rt.cur_path, rt.cur_merged = saved_irq, saved_path, []


def irqfd_wakeup(wait: WaitQueueEntry, mode: int, sync: int, key: int) -> int:
    """virt/kvm/eventfd.c: irqfd_wakeup  [atomic: wqh.lock held, IRQs off]

    EPOLLIN: consume the count (one callback = one injection, whatever the count), take a
    consistent snapshot of the cached route under the seqcount, and inject through the fast
    path; -EWOULDBLOCK defers to ``irqfd->inject`` (merged if already pending).  Returns 1,
    which ends the exclusive wake-up walk.  EPOLLHUP: deactivate.  Spec §8.2.
    """
    irqfd: KvmKernelIrqfd = wait.private
    kvm = irqfd.kvm
    rt = kvm.rt
    flags = key
    ret = 0
    if flags & EPOLLIN:
        ctx = irqfd.eventfd
        eventfd_ctx_do_read(ctx)
        ids = ctx.irqs  # every signal this read consumes (vkick bookkeeping)
        ctx.irqs = []
        idx = srcu_read_lock(kvm.irq_srcu)
        while True:
            seq = read_seqcount_begin(irqfd.irq_entry_sc)
            irq = irqfd.irq_entry
            snapshot = KvmKernelIrqRoutingEntry(irq.gsi, irq.type, irq.address_lo,
                                                irq.address_hi, irq.data, irq.set)
            if not read_seqcount_retry(irqfd.irq_entry_sc, seq):
                break
        saved_irq, saved_merged = rt.cur_irq, rt.cur_merged
        if ids:
            rt.cur_irq, rt.cur_merged = ids[-1], ids[:-1]
        try:
            r = kvm_arch_set_irq_inatomic(snapshot, kvm, KVM_USERSPACE_IRQ_SOURCE_ID, 1, False)
        finally:
            rt.cur_irq, rt.cur_merged = saved_irq, saved_merged
        bus = rt.bus
        if bus.on:
            bus.emit("irqfd_wakeup", vm=kvm.name, gsi=irqfd.gsi, irq=ids, r=r)
        if r == -errno.EWOULDBLOCK:
            irqfd.pending_irqs.extend(ids)
            schedule_work(irqfd.inject)
        srcu_read_unlock(kvm.irq_srcu, idx)
        ret = 1
    if flags & EPOLLHUP and irqfd.active:
        # irqfds.lock (inside wqh.lock): deactivate if still active.
        irqfd_deactivate(irqfd)
    return ret


def irqfd_update(kvm: Kvm, irqfd: KvmKernelIrqfd) -> None:
    """virt/kvm/eventfd.c: irqfd_update  [atomic: irqfds.lock held]

    Refresh the cached route under the seqcount: exactly one entry → cache it; none (or an
    irqchip GSI on two chips) → type 0, the slow path.  Spec §8.4.
    """
    entries = kvm_irq_map_gsi(kvm, irqfd.gsi)
    write_seqcount_begin(irqfd.irq_entry_sc)
    if len(entries) == 1:
        irqfd.irq_entry = entries[0]
    else:
        irqfd.irq_entry = KvmKernelIrqRoutingEntry(gsi=irqfd.gsi)
    write_seqcount_end(irqfd.irq_entry_sc)


def kvm_irq_routing_update(kvm: Kvm) -> None:
    """virt/kvm/eventfd.c: kvm_irq_routing_update — refresh every active irqfd (irqfds.lock);
    one with a bypass producer re-decides its IRTE (kvm_arch_update_irqfd_routing)."""
    for irqfd in kvm.irqfds:
        irqfd_update(kvm, irqfd)
        if irqfd.producer is not None:
            from vkick.kvm.x86 import kvm_arch_update_irqfd_routing  # noqa: PLC0415

            kvm_arch_update_irqfd_routing(kvm, irqfd.producer.irq, irqfd.gsi, True)


async def kvm_irqfd_assign(kvm: Kvm, eventfd: EventfdCtx, gsi: int, flags: int = 0) -> int:
    """virt/kvm/eventfd.c: kvm_irqfd_assign  [process: VMM ioctl KVM_IRQFD]

    Link the irqfd (active, route cached), then poll the eventfd: the poll adds the
    priority-exclusive wait entry *before* reading the count, so a signal either runs
    irqfd_wakeup or is seen by the poll, which then schedules ``inject`` (an eventfd
    signalled before assignment injects once, at assignment).  -EBUSY for a second irqfd on
    the same eventfd.  Spec §8.5, §16.6.
    """
    if flags & ~(KVM_IRQFD_FLAG_DEASSIGN | KVM_IRQFD_FLAG_RESAMPLE):
        return -errno.EINVAL
    if flags & KVM_IRQFD_FLAG_RESAMPLE:
        return -errno.EINVAL  # resampler not modelled (level-triggered irqfds only)
    rt = kvm.rt
    wait = WaitQueueEntry(irqfd_wakeup)
    irqfd = KvmKernelIrqfd(kvm=kvm, gsi=gsi, eventfd=eventfd, wait=wait,
                           inject=WorkStruct(rt, irqfd_inject, f"irqfd_inject({eventfd.name})"),
                           shutdown=WorkStruct(rt, irqfd_shutdown,
                                               f"irqfd_shutdown({eventfd.name})"))
    wait.private = irqfd
    irqfd.inject.owner = irqfd
    irqfd.shutdown.owner = irqfd
    # irqfds.lock
    if any(other.eventfd is eventfd for other in kvm.irqfds):
        return -errno.EBUSY
    idx = srcu_read_lock(kvm.irq_srcu)
    irqfd_update(kvm, irqfd)
    kvm.irqfds.append(irqfd)
    irqfd.active = True
    # irqfds.lock released.  Window W-IRQFD-assign: the irqfd is active but not yet on the
    # eventfd's wait queue; a signal here is not seen by irqfd_wakeup but is counted, and
    # the poll below sees it (bug #12 reaches a use-after-free through this window).
    await rt.preempt("W-IRQFD-assign")

    def irqfd_ptable_queue_proc(wqh: WaitQueueHead) -> None:
        add_wait_queue_priority(wqh, wait)

    events = eventfd_poll(eventfd, irqfd_ptable_queue_proc)
    bus = rt.bus
    if bus.on:
        bus.emit("irqfd_assign", vm=kvm.name, gsi=gsi, efd=eventfd.name,
                 pending=bool(events & EPOLLIN))
    if events & EPOLLIN:
        # The count is not drained here; the signals' ids move to the injection.
        irqfd.pending_irqs.extend(eventfd.irqs)
        eventfd.irqs = []
        schedule_work(irqfd.inject)
    from vkick.kvm.x86 import (  # noqa: PLC0415
        kvm_arch_has_irq_bypass,
        kvm_arch_irq_bypass_add_producer,
        kvm_arch_irq_bypass_del_producer,
    )

    if kvm_arch_has_irq_bypass():
        irqfd.consumer = IrqBypassConsumer(token=eventfd,
                                           add_producer=kvm_arch_irq_bypass_add_producer,
                                           del_producer=kvm_arch_irq_bypass_del_producer,
                                           owner=irqfd)
        irq_bypass_register_consumer(rt, irqfd.consumer)
    srcu_read_unlock(kvm.irq_srcu, idx)
    return 0


def irqfd_deactivate(irqfd: KvmKernelIrqfd) -> None:
    """virt/kvm/eventfd.c: irqfd_deactivate  [atomic: irqfds.lock held]"""
    assert irqfd.active
    irqfd.kvm.irqfds.remove(irqfd)
    irqfd.active = False
    queue_work(_cleanup_wq(irqfd.kvm), irqfd.shutdown)


async def irqfd_shutdown(work: WorkStruct) -> None:
    """virt/kvm/eventfd.c: irqfd_shutdown  [process: kworker of kvm-irqfd-cleanup]

    SRCU sync (in-flight irqfd_wakeup and assign), unhook atomically w.r.t. signals
    (discarding any count), then flush a slow-path injection queued before the unhook.
    After this nothing can inject through the irqfd (spec §16.8).
    """
    irqfd: KvmKernelIrqfd = work.owner
    await synchronize_srcu(irqfd.kvm.irq_srcu)
    eventfd_ctx_remove_wait_queue(irqfd.eventfd, irqfd.wait)
    await flush_work(irqfd.inject)
    irq_bypass_unregister_consumer(irqfd.kvm.rt, irqfd.consumer)


async def kvm_irqfd_deassign(kvm: Kvm, eventfd: EventfdCtx, gsi: int) -> int:
    """virt/kvm/eventfd.c: kvm_irqfd_deassign  [process: VMM ioctl]

    Clear the cached route (signals in the window take the slow path, which reads the
    current routing) and deactivate, then wait for every queued shutdown: when this
    returns, the irqfd delivers nothing more.  Returns 0 even if nothing matched.
    """
    for irqfd in list(kvm.irqfds):
        if irqfd.eventfd is eventfd and irqfd.gsi == gsi:
            write_seqcount_begin(irqfd.irq_entry_sc)
            irqfd.irq_entry = KvmKernelIrqRoutingEntry(gsi=gsi)
            write_seqcount_end(irqfd.irq_entry_sc)
            irqfd_deactivate(irqfd)
    bus = kvm.rt.bus
    if bus.on:
        bus.emit("irqfd_deassign", vm=kvm.name, gsi=gsi, efd=eventfd.name)
    await flush_workqueue(_cleanup_wq(kvm))
    return 0


async def kvm_irqfd_release(kvm: Kvm) -> None:
    """virt/kvm/eventfd.c: kvm_irqfd_release — VM teardown: deactivate all, flush."""
    for irqfd in list(kvm.irqfds):
        irqfd_deactivate(irqfd)
    await flush_workqueue(_cleanup_wq(kvm))


@dataclass(slots=True, eq=False)
class KvmIoeventfd:
    """virt/kvm/eventfd.c: struct _ioeventfd — an (address, length, datamatch) doorbell."""

    addr: int
    eventfd: EventfdCtx
    length: int = 0  # 0 = any access length
    datamatch: int | None = None  # None = wildcard


def ioeventfd_write(p: KvmIoeventfd, addr: int, length: int, val: int) -> int:
    """virt/kvm/eventfd.c: ioeventfd_write  [vCPU thread]

    A matching guest write signals the eventfd (waking vhost's poll synchronously) and is
    handled in the kernel: 0.  Otherwise -EOPNOTSUPP (the next device, or userspace).
    """
    if addr != p.addr:
        return -errno.EOPNOTSUPP
    if p.length and (length != p.length or (p.datamatch is not None and val != p.datamatch)):
        return -errno.EOPNOTSUPP
    eventfd_signal(p.eventfd, 1)
    return 0
