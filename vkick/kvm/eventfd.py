"""virt/kvm/eventfd.c: irqfd (an eventfd bound to a GSI) and ioeventfd (a guest doorbell that
signals an eventfd).

Covered: irqfd_inject, irqfd_resampler_ack, irqfd_resampler_shutdown, irqfd_wakeup,
irqfd_ptable_queue_proc, irqfd_update, kvm_irqfd_assign (with KVM_IRQFD_FLAG_RESAMPLE),
irqfd_deactivate, kvm_irqfd_deassign, irqfd_shutdown, kvm_irqfd_release,
kvm_irq_routing_update, kvm_irqfd_init, kvm_irq_has_notifier, kvm_notify_acked_gsi,
kvm_notify_acked_irq, kvm_register_irq_ack_notifier, kvm_unregister_irq_ack_notifier,
ioeventfd_write, and the irq bypass consumer each irqfd registers (VFIO's producer may
connect to it: VT-d posting).

Resampling irqfds emulate a level-triggered line (spec §8.9): a signal asserts the GSI with
the shared KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID and leaves it asserted; when the guest EOIs the
pin's vector the GSI's ack notifier (the resampler, one per GSI, shared by every resampling
irqfd on it) de-asserts the line and signals each irqfd's resamplefd, so that the VMM can
re-check the device and signal again.  MSI irqfds (the vhost case) never need one.

Lifetime (spec §8.5, §8.8, §16.8; research/bugs.md #12): ``irqfd_shutdown`` frees the irqfd
(``kfree``: a KASAN tombstone, vkick/kernel/kasan.py), and every place that can reach a
freed irqfd — the wait-queue callback, the inject work, the assign ioctl after its
preemption windows, the irq bypass consumer — checks the tombstone and reports a use after
free.  v5.13 never gets there: ``kvm_irqfd_assign`` holds ``kvm->irq_srcu`` from before the
irqfd is linked until it is fully set up, ``irqfd_shutdown`` starts with
``synchronize_srcu``, and the eventfd's file stays pinned until the end of the assignment
(so its EPOLLHUP cannot come early).

Bug toggles (``kvm.toggles`` of the irqfd's VM; research/bugs.md):

* ``bug-irqfd-assign-no-srcu`` (#12a, fixed by Lan Tianyu's "KVM/Eventfd: Avoid crash when
  assign and deassign specific eventfd in parallel", ≈v4.15): the SRCU read section in
  ``kvm_irqfd_assign`` covers only the route copy, and ``irqfd_shutdown`` does not
  ``synchronize_srcu`` — a deassign in ``W-IRQFD-assign`` or ``W-IRQFD-bypass`` frees the
  irqfd under the assignment.
* ``bug-irqfd-early-fdput`` (#12b, fixed by "KVM: irqfd: fix race between EPOLLHUP and
  irq_bypass_register_consumer", 2018, stable 2b3661d86038): the file reference is dropped
  right after the poll, so a ``close()`` in ``W-IRQFD-bypass`` releases the eventfd and its
  EPOLLHUP shuts the irqfd down before the bypass consumer is registered.  Needs
  ``bug-irqfd-assign-no-srcu`` too: with v5.13's SRCU section, shutdown waits for the
  assignment, so the early ``fdput`` alone frees nothing early.
* ``fix-irqfd-exclusive-binding`` (#13, v6.17: 5f8ca05ea991, 86e00cd162a7, 2cdd64cbf990):
  the assignment registers through ``kvm_irqfd_register`` — route, wait-queue entry and
  list under ``irqfds.lock``, the entry added with ``add_wait_queue_priority_exclusive`` —
  so a second irqfd on an eventfd that already has one (in any VM) fails with -EBUSY.
  Off (v5.13): the second VM's irqfd binds, sits behind the first exclusive priority entry
  and is never called.  The toggle is read from the *assigning* VM (the ioctl that would
  fail is its).
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vkick.kernel.eventfd import (
    EventfdCtx,
    eventfd_ctx_do_read,
    eventfd_ctx_fdget,
    eventfd_ctx_fileget,
    eventfd_ctx_put,
    eventfd_ctx_remove_wait_queue,
    eventfd_poll,
    eventfd_signal,
)
from vkick.kernel.file import File, fdget, fdput
from vkick.kernel.irqbypass import (
    IrqBypassConsumer,
    IrqBypassProducer,
    irq_bypass_register_consumer,
    irq_bypass_unregister_consumer,
)
from vkick.kernel.kasan import kasan_report, kfree
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
    add_wait_queue_priority_exclusive,
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
from vkick.kvm.irq import kvm_arch_irqfd_allowed
from vkick.kvm.irq_comm import kvm_arch_set_irq_inatomic
from vkick.kvm.irqchip import (
    KvmKernelIrqRoutingEntry,
    copy_routing_entry,
    kvm_irq_map_chip_pin,
    kvm_irq_map_gsi,
    kvm_set_irq,
)

# KVM_IRQFD's flags, re-exported (the ioctl's callers import them from here).
from vkick.kvm.kvm_host import KVM_IRQFD_FLAG_DEASSIGN as KVM_IRQFD_FLAG_DEASSIGN  # noqa: PLC0414
from vkick.kvm.kvm_host import KVM_IRQFD_FLAG_RESAMPLE as KVM_IRQFD_FLAG_RESAMPLE  # noqa: PLC0414
from vkick.kvm.kvm_host import (
    KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID,
    KVM_USERSPACE_IRQ_SOURCE_ID,
    Kvm,
    KvmIoDeviceOps,
)


@dataclass(slots=True, eq=False)
class KvmKernelIrqfd:
    """include/linux/kvm_irqfd.h: struct kvm_kernel_irqfd

    ``irq_entry`` is a cached copy of the GSI's route (type 0 = none: always the slow path),
    guarded by ``irq_entry_sc``.  An irqfd is *active* while it is on ``kvm.irqfds``.
    ``pending_irqs`` holds the correlation ids merged into a pending ``inject`` work (vkick
    bookkeeping: the deferred injection reports which signals it satisfies).
    ``kasan_freed``: ``irqfd_shutdown`` freed it (a tombstone, vkick/kernel/kasan.py).
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
    resampler: KvmKernelIrqfdResampler | None = None  # resampling irqfds only
    resamplefd: EventfdCtx | None = None  # signalled on the guest's EOI (resampling only)
    kasan_freed: bool = False


@dataclass(slots=True, eq=False)
class KvmIrqAckNotifier:
    """include/linux/kvm_host.h: struct kvm_irq_ack_notifier — ``irq_acked`` runs when the
    guest EOIs the vector of the IOAPIC pin that ``gsi`` is routed to.  ``owner`` is the
    containing struct (container_of)."""

    gsi: int
    irq_acked: Callable[[KvmIrqAckNotifier], None]
    owner: Any = None


@dataclass(slots=True, eq=False)
class KvmKernelIrqfdResampler:
    """include/linux/kvm_irqfd.h: struct kvm_kernel_irqfd_resampler

    One per GSI with resampling irqfds: ``list`` holds them (an RCU list, newest first,
    changed under ``kvm.resampler_lock``), ``notifier`` is the GSI's ack notifier; the
    resampler itself is on ``kvm.resampler_list`` (its ``link``).
    """

    kvm: Kvm
    notifier: KvmIrqAckNotifier
    list: list[KvmKernelIrqfd] = field(default_factory=list)


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


def _irqfd_use_after_free(irqfd: KvmKernelIrqfd, where: str) -> None:
    """KASAN's report for an access to a freed irqfd (callers test ``kasan_freed``)."""
    kasan_report(irqfd.kvm.rt, f"irqfd {irqfd.kvm.name}/gsi{irqfd.gsi}/{irqfd.eventfd.name}",
                 where, irqfd.kvm.name)


async def irqfd_inject(work: WorkStruct) -> None:
    """virt/kvm/eventfd.c: irqfd_inject  [process: kworker]

    The slow path: assert then de-assert the GSI through the *current* routing table (not
    the cached entry) — an edge; a resampling irqfd only asserts, with the resampler's
    source id, and the line stays up until the guest's EOI (irqfd_resampler_ack).  Runs
    once for however many signals were merged into the pending work (spec §8.3, §16.5); it
    reports their correlation ids.
    """
    irqfd: KvmKernelIrqfd = work.owner
    if irqfd.kasan_freed:
        _irqfd_use_after_free(irqfd, "irqfd_inject")
    kvm = irqfd.kvm
    rt = kvm.rt
    ids = irqfd.pending_irqs
    irqfd.pending_irqs = []
    saved_irq, saved_path = rt.cur_irq, rt.cur_path
    rt.cur_irq = ids[0] if ids else 0
    rt.cur_path = "wq"
    bus = rt.bus
    if bus.on:
        bus.emit("irqfd_inject", vm=kvm.name, gsi=irqfd.gsi, efd=irqfd.eventfd.name, irq=ids)
    rt.cur_merged = ids[1:]  # signals merged into this one execution
    try:
        if irqfd.resampler is None:
            kvm_set_irq(kvm, KVM_USERSPACE_IRQ_SOURCE_ID, irqfd.gsi, 1, False)
            kvm_set_irq(kvm, KVM_USERSPACE_IRQ_SOURCE_ID, irqfd.gsi, 0, False)
        else:
            kvm_set_irq(kvm, KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID, irqfd.gsi, 1, False)
    finally:
        rt.cur_irq, rt.cur_path, rt.cur_merged = saved_irq, saved_path, []


def irqfd_resampler_ack(kian: KvmIrqAckNotifier) -> None:
    """virt/kvm/eventfd.c: irqfd_resampler_ack  [vCPU thread: the guest's EOI]

    The ack notifier of a resampled GSI: de-assert the line once (every resampling irqfd
    of the GSI shares KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID, and de-asserting once per irqfd
    could race with a re-assert), then, under irq_srcu, signal every irqfd's resamplefd.
    Spec §8.9.
    """
    resampler: KvmKernelIrqfdResampler = kian.owner
    kvm = resampler.kvm
    rt = kvm.rt
    saved = rt.cur_irq
    rt.cur_irq = 0  # the notification to the VMM is not an interrupt source
    try:
        kvm_set_irq(kvm, KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID, kian.gsi, 0, False)
        idx = srcu_read_lock(kvm.irq_srcu)
        bus = rt.bus
        if bus.on:
            bus.emit("irqfd_resampler_ack", vm=kvm.name, gsi=kian.gsi,
                     n=len(resampler.list))
        # v5.13 open-codes this loop (list_for_each_entry_rcu); later kernels call
        # irqfd_resampler_notify, which is the same loop.
        irqfd_resampler_notify(resampler)
        srcu_read_unlock(kvm.irq_srcu, idx)
    finally:
        rt.cur_irq = saved


def irqfd_resampler_notify(resampler: KvmKernelIrqfdResampler) -> None:
    """virt/kvm/eventfd.c (later kernels, not v5.13): irqfd_resampler_notify — signal every
    resamplefd of the resampler (caller holds irq_srcu), without de-asserting the line.
    Used only by the ``fix-resample-on-unmask`` toggle (ioapic_write_indirect)."""
    for irqfd in tuple(resampler.list):
        assert irqfd.resamplefd is not None
        eventfd_signal(irqfd.resamplefd, 1)


def kvm_notify_irqfd_resampler(kvm: Kvm, irqchip: int, pin: int) -> bool:
    """virt/kvm/eventfd.c (later kernels, not v5.13): kvm_notify_irqfd_resampler — if a
    resampler watches the GSI routed to (irqchip, pin), notify it and return True.  Used
    only by the ``fix-resample-on-unmask`` toggle."""
    rt = kvm.rt
    saved = rt.cur_irq
    rt.cur_irq = 0
    idx = srcu_read_lock(kvm.irq_srcu)
    try:
        gsi = kvm_irq_map_chip_pin(kvm, irqchip, pin)
        if gsi != -1:
            for resampler in kvm.resampler_list:
                if resampler.notifier.gsi == gsi:
                    bus = rt.bus
                    if bus.on:
                        bus.emit("kvm_notify_irqfd_resampler", vm=kvm.name, gsi=gsi,
                                 n=len(resampler.list))
                    irqfd_resampler_notify(resampler)
                    return True
        return False
    finally:
        srcu_read_unlock(kvm.irq_srcu, idx)
        rt.cur_irq = saved


async def irqfd_resampler_shutdown(irqfd: KvmKernelIrqfd) -> None:
    """virt/kvm/eventfd.c: irqfd_resampler_shutdown  [process; sleeps]

    Under resampler_lock: unlink the irqfd from its resampler and wait for SRCU readers
    (an irqfd_resampler_ack in flight), so its resamplefd is never signalled again; the
    last irqfd of the GSI also takes the resampler off the VM's list, unregisters the ack
    notifier and de-asserts the line.  Spec §8.9.
    """
    resampler = irqfd.resampler
    assert resampler is not None
    kvm = resampler.kvm
    async with kvm.resampler_lock:
        resampler.list.remove(irqfd)  # list_del_rcu
        await synchronize_srcu(kvm.irq_srcu)
        if not resampler.list:
            kvm.resampler_list.remove(resampler)  # list_del(&resampler->link)
            await kvm_unregister_irq_ack_notifier(kvm, resampler.notifier)
            kvm_set_irq(kvm, KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID, resampler.notifier.gsi, 0,
                        False)


def irqfd_wakeup(wait: WaitQueueEntry, mode: int, sync: int, key: int) -> int:
    """virt/kvm/eventfd.c: irqfd_wakeup  [atomic: wqh.lock held, IRQs off]

    EPOLLIN: consume the count (one callback = one injection, whatever the count), take a
    consistent snapshot of the cached route under the seqcount, and inject through the fast
    path; -EWOULDBLOCK defers to ``irqfd->inject`` (merged if already pending).  Returns 1,
    which ends the exclusive wake-up walk: a second irqfd behind it on the same eventfd (in
    another VM) is never called (bug #13).  EPOLLHUP: deactivate.  Spec §8.2, §6.4.
    """
    irqfd: KvmKernelIrqfd = wait.private
    if irqfd.kasan_freed:
        _irqfd_use_after_free(irqfd, "irqfd_wakeup")
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
            snapshot = copy_routing_entry(irq)
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
            bus.emit("irqfd_wakeup", vm=kvm.name, gsi=irqfd.gsi, efd=ctx.name, irq=ids, r=r)
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


def irqfd_ptable_queue_proc(irqfd: KvmKernelIrqfd, wqh: WaitQueueHead) -> None:
    """virt/kvm/eventfd.c: irqfd_ptable_queue_proc  [process: eventfd_poll's poll_wait]

    The poll table's queueing procedure (container_of the poll table: the irqfd): add the
    irqfd's entry to the eventfd's queue with priority — EXCLUSIVE | PRIORITY in v5.13, in
    front of every other waiter but behind older priority entries.  Spec §8.5 step 7.
    Differs from the kernel: the irqfd is bound in (functools.partial) instead of found
    from the poll table.
    """
    if irqfd.kasan_freed:  # the assignment was preempted and the irqfd freed (bug #12)
        _irqfd_use_after_free(irqfd, "irqfd_ptable_queue_proc")
    add_wait_queue_priority(wqh, irqfd.wait)


@dataclass(slots=True, eq=False)
class KvmIrqfdPt:
    """virt/kvm/eventfd.c: struct kvm_irqfd_pt (v6.17, not v5.13) — the poll table of one
    assignment: the irqfd, its VM, and the registration's result."""

    irqfd: KvmKernelIrqfd
    kvm: Kvm
    ret: int = 0


def kvm_irqfd_register(p: KvmIrqfdPt, wqh: WaitQueueHead) -> None:
    """virt/kvm/eventfd.c: kvm_irqfd_register  [process: poll_wait; takes irqfds.lock]

    Not in v5.13: the ``fix-irqfd-exclusive-binding`` form (v6.17, 5f8ca05ea991,
    86e00cd162a7, 2cdd64cbf990).  Under ``irqfds.lock``: cache the route, add the entry
    with ``add_wait_queue_priority_exclusive`` (-EBUSY if the eventfd already has a
    priority waiter: an irqfd of any VM), then — only if that worked — link the irqfd.
    The old per-VM duplicate check stays behind a WARN (it cannot fire: a same-VM irqfd on
    the eventfd is a priority waiter).  So the irqfd is on the wait queue exactly when it is
    on the list, and a second binding fails instead of losing every signal.  Spec §8.5.
    """
    irqfd = p.irqfd
    kvm = p.kvm
    if irqfd.kasan_freed:
        _irqfd_use_after_free(irqfd, "kvm_irqfd_register")
    irqfd_update(kvm, irqfd)
    p.ret = add_wait_queue_priority_exclusive(wqh, irqfd.wait)
    if p.ret:
        return
    if any(tmp.eventfd is irqfd.eventfd for tmp in kvm.irqfds):
        bus = kvm.rt.bus
        if bus.on:  # WARN_ON_ONCE(1)
            bus.emit("vkick_warn", what=f"kvm_irqfd_register({irqfd.eventfd.name}): a "
                     "same-VM irqfd without a priority wait entry", vm=kvm.name)
        p.ret = -errno.EBUSY  # (the kernel leaves the entry queued here, as vkick does)
        return
    kvm.irqfds.append(irqfd)  # list_add_tail
    irqfd.active = True


async def kvm_irqfd_assign(kvm: Kvm, eventfd: EventfdCtx, gsi: int, flags: int = 0,
                           resamplefd: EventfdCtx | None = None) -> int:
    """virt/kvm/eventfd.c: kvm_irqfd_assign  [process: VMM ioctl KVM_IRQFD]

    Look the eventfd up (-EBADF if its fd is closed) and take a context reference.  With
    KVM_IRQFD_FLAG_RESAMPLE (needs the full in-kernel irqchip, else -EINVAL; no
    ``resamplefd`` is -EBADF): join the GSI's resampler, creating it and registering its
    ack notifier if it is the first, then wait for SRCU readers.  Under ``irqfds.lock``:
    -EBUSY for a second irqfd on the eventfd *in this VM*; enter ``irq_srcu``, cache the
    route, link the irqfd (active).  Then poll the eventfd: the poll adds the
    priority-exclusive wait entry *before* reading the count, so a signal either runs
    irqfd_wakeup or is seen by the poll, which then schedules ``inject`` (an eventfd
    signalled before assignment injects once, at assignment).  Register the irq bypass
    consumer, leave ``irq_srcu``, and only then drop the file (so the eventfd's EPOLLHUP
    cannot shut down a half-initialised irqfd).  Failures undo the resampler step and drop
    the references.  Spec §8.5, §8.9, §16.6.
    Toggles: see the module docstring (``bug-irqfd-assign-no-srcu``,
    ``bug-irqfd-early-fdput``, ``fix-irqfd-exclusive-binding``).
    Differs from the kernel: the eventfds are passed as contexts (each stands for its fd).
    """
    if flags & ~(KVM_IRQFD_FLAG_DEASSIGN | KVM_IRQFD_FLAG_RESAMPLE):
        return -errno.EINVAL
    if not kvm_arch_irqfd_allowed(kvm, flags):
        return -errno.EINVAL
    rt = kvm.rt
    toggles = kvm.toggles
    no_srcu = "bug-irqfd-assign-no-srcu" in toggles
    early_fdput = "bug-irqfd-early-fdput" in toggles
    wait = WaitQueueEntry(irqfd_wakeup)  # init_waitqueue_func_entry
    irqfd = KvmKernelIrqfd(kvm=kvm, gsi=gsi, eventfd=eventfd, wait=wait,
                           inject=WorkStruct(rt, irqfd_inject, f"irqfd_inject({eventfd.name})"),
                           shutdown=WorkStruct(rt, irqfd_shutdown,
                                               f"irqfd_shutdown({eventfd.name})"))
    wait.private = irqfd
    irqfd.inject.owner = irqfd
    irqfd.shutdown.owner = irqfd
    f = fdget(eventfd.file)
    if f is None:
        return -errno.EBADF  # (out: kfree of an irqfd nothing refers to)
    eventfd_ctx_fileget(eventfd)
    if flags & KVM_IRQFD_FLAG_RESAMPLE:
        r = -errno.EBADF if resamplefd is None else eventfd_ctx_fdget(resamplefd)
        if isinstance(r, int):
            return await _irqfd_assign_fail(irqfd, f, r)
        irqfd.resamplefd = r
        async with kvm.resampler_lock:
            for resampler in kvm.resampler_list:
                if resampler.notifier.gsi == irqfd.gsi:
                    irqfd.resampler = resampler
                    break
            if irqfd.resampler is None:
                notifier = KvmIrqAckNotifier(gsi=irqfd.gsi, irq_acked=irqfd_resampler_ack)
                resampler = KvmKernelIrqfdResampler(kvm=kvm, notifier=notifier)
                notifier.owner = resampler
                kvm.resampler_list.insert(0, resampler)  # list_add
                kvm_register_irq_ack_notifier(kvm, notifier)
                irqfd.resampler = resampler
            irqfd.resampler.list.insert(0, irqfd)  # list_add_rcu
            await synchronize_srcu(kvm.irq_srcu)
    if "fix-irqfd-exclusive-binding" in toggles:
        # v6.17: enter irq_srcu, then register through the poll callback — route, wait
        # entry and list under irqfds.lock, -EBUSY if the eventfd has a priority waiter.
        idx = srcu_read_lock(kvm.irq_srcu)
        pt = KvmIrqfdPt(irqfd, kvm)
        events = eventfd_poll(eventfd, functools.partial(kvm_irqfd_register, pt))
        if no_srcu:  # bug #12a's form: the read section ends with the route copy
            srcu_read_unlock(kvm.irq_srcu, idx)
        if pt.ret:
            if not no_srcu:
                srcu_read_unlock(kvm.irq_srcu, idx)  # fail_poll
            return await _irqfd_assign_fail(irqfd, f, pt.ret)
    else:
        # irqfds.lock
        if any(other.eventfd is eventfd for other in kvm.irqfds):
            return await _irqfd_assign_fail(irqfd, f, -errno.EBUSY)
        idx = srcu_read_lock(kvm.irq_srcu)
        irqfd_update(kvm, irqfd)
        if no_srcu:
            # Bug #12a (before Lan Tianyu's fix): SRCU covers only the route copy, so
            # irqfd_shutdown has nothing to wait for.
            srcu_read_unlock(kvm.irq_srcu, idx)
        kvm.irqfds.append(irqfd)  # list_add_tail
        irqfd.active = True
        # irqfds.lock released.  Window W-IRQFD-assign: between linking the irqfd (active)
        # and the poll that adds its wait entry.  Another thread's KVM_IRQFD(DEASSIGN) may
        # find it here and queue its shutdown; a signal is counted but not seen by
        # irqfd_wakeup, and the poll below sees it.  v5.13's irq_srcu read section makes
        # the shutdown wait for this assignment; bug #12a frees the irqfd here.
        await rt.preempt("W-IRQFD-assign")
        events = eventfd_poll(eventfd, functools.partial(irqfd_ptable_queue_proc, irqfd))
    bus = rt.bus
    if bus.on:
        bus.emit("irqfd_assign", vm=kvm.name, gsi=gsi, efd=eventfd.name,
                 pending=bool(events & EPOLLIN), resample=irqfd.resampler is not None)
    if events & EPOLLIN:
        # The count is not drained here; the signals' ids move to the injection.
        if irqfd.kasan_freed:
            _irqfd_use_after_free(irqfd, "kvm_irqfd_assign")
        irqfd.pending_irqs.extend(eventfd.irqs)
        eventfd.irqs = []
        schedule_work(irqfd.inject)
    if early_fdput:
        # Bug #12b's position (before the 2018 fix): the file is dropped once polled.
        fdput(f)
    # Window W-IRQFD-bypass: between the poll (the irqfd now receives signals) and the
    # irq bypass consumer's registration.  Another thread may close the eventfd here (with
    # the file still pinned by this ioctl, nothing happens until the fdput below) or
    # deassign the irqfd (its shutdown waits for irq_srcu).  With bugs #12a/#12b the irqfd
    # is freed here and the registration below writes to freed memory.
    await rt.preempt("W-IRQFD-bypass")
    from vkick.kvm.x86 import (  # noqa: PLC0415
        kvm_arch_has_irq_bypass,
        kvm_arch_irq_bypass_add_producer,
        kvm_arch_irq_bypass_del_producer,
    )

    if kvm_arch_has_irq_bypass():
        if irqfd.kasan_freed:
            _irqfd_use_after_free(irqfd, "kvm_irqfd_assign")
        irqfd.consumer = IrqBypassConsumer(token=eventfd,
                                           add_producer=kvm_arch_irq_bypass_add_producer,
                                           del_producer=kvm_arch_irq_bypass_del_producer,
                                           owner=irqfd, kasan_freed=irqfd.kasan_freed)
        irq_bypass_register_consumer(rt, irqfd.consumer)  # a failure is only pr_info'd
    if not no_srcu:
        srcu_read_unlock(kvm.irq_srcu, idx)
    if not early_fdput:
        # "do not drop the file until the irqfd is fully initialized, otherwise we might
        # race against the EPOLLHUP": the last reference (a concurrent close) releases the
        # eventfd here, after the irqfd is complete.
        fdput(f)
    return 0


async def _irqfd_assign_fail(irqfd: KvmKernelIrqfd, f: File, ret: int) -> int:
    """kvm_irqfd_assign's ``fail:`` path: leave the resampler, drop the resamplefd, the
    eventfd and the file references, free the irqfd."""
    if irqfd.resampler is not None:
        await irqfd_resampler_shutdown(irqfd)
    if irqfd.resamplefd is not None:
        eventfd_ctx_put(irqfd.resamplefd)
    eventfd_ctx_put(irqfd.eventfd)
    fdput(f)
    kfree(irqfd, irqfd.consumer)
    return ret


def irqfd_deactivate(irqfd: KvmKernelIrqfd) -> None:
    """virt/kvm/eventfd.c: irqfd_deactivate  [atomic: irqfds.lock held]"""
    assert irqfd.active
    irqfd.kvm.irqfds.remove(irqfd)
    irqfd.active = False
    queue_work(_cleanup_wq(irqfd.kvm), irqfd.shutdown)


async def irqfd_shutdown(work: WorkStruct) -> None:
    """virt/kvm/eventfd.c: irqfd_shutdown  [process: kworker of kvm-irqfd-cleanup]

    SRCU sync (an assignment still setting the irqfd up, in-flight irqfd_wakeup), unhook
    atomically w.r.t. signals (discarding any count), then flush a slow-path injection
    queued before the unhook, and only then leave the resampler (so that injection cannot
    re-assert a line the last resampler has de-asserted) and drop the resamplefd;
    unregister the bypass consumer, drop the eventfd, free the irqfd.  After this nothing
    can inject through the irqfd and its resamplefd is never signalled (spec §8.8, §16.8).
    On a semaphore eventfd the unhook's read underflows the count in v5.13 (bug #14).
    Toggle ``bug-irqfd-assign-no-srcu``: no ``synchronize_srcu`` (bug #12a).
    """
    irqfd: KvmKernelIrqfd = work.owner
    kvm = irqfd.kvm
    if "bug-irqfd-assign-no-srcu" not in kvm.toggles:
        # "Make sure irqfd has been initialized in assign path."
        await synchronize_srcu(kvm.irq_srcu)
    eventfd_ctx_remove_wait_queue(irqfd.eventfd, irqfd.wait)
    bus = kvm.rt.bus
    if bus.on:
        bus.emit("irqfd_shutdown", vm=kvm.name, gsi=irqfd.gsi, efd=irqfd.eventfd.name)
    await flush_work(irqfd.inject)
    if irqfd.resampler is not None:
        await irqfd_resampler_shutdown(irqfd)
        assert irqfd.resamplefd is not None
        eventfd_ctx_put(irqfd.resamplefd)
    irq_bypass_unregister_consumer(kvm.rt, irqfd.consumer)
    eventfd_ctx_put(irqfd.eventfd)
    kfree(irqfd, irqfd.consumer)  # the consumer is embedded in the irqfd


async def kvm_irqfd_deassign(kvm: Kvm, eventfd: EventfdCtx, gsi: int) -> int:
    """virt/kvm/eventfd.c: kvm_irqfd_deassign  [process: VMM ioctl]

    Look the eventfd up (-EBADF if its fd is closed).  For each irqfd on it with this GSI:
    clear the cached route (signals in the window take the slow path, which reads the
    current routing) and deactivate; then drop the reference and wait for every queued
    shutdown: when this returns, the irqfd delivers nothing more.  Returns 0 even if
    nothing matched.  Spec §8.8.
    Differs from the kernel: the context stands for its fd.
    """
    r = eventfd_ctx_fdget(eventfd)
    if isinstance(r, int):
        return r
    # irqfds.lock
    for irqfd in list(kvm.irqfds):
        if irqfd.eventfd is eventfd and irqfd.gsi == gsi:
            write_seqcount_begin(irqfd.irq_entry_sc)
            irqfd.irq_entry = KvmKernelIrqRoutingEntry(gsi=gsi)
            write_seqcount_end(irqfd.irq_entry_sc)
            irqfd_deactivate(irqfd)
    eventfd_ctx_put(eventfd)
    await flush_workqueue(_cleanup_wq(kvm))
    bus = kvm.rt.bus
    if bus.on:
        bus.emit("irqfd_deassign", vm=kvm.name, gsi=gsi, efd=eventfd.name)
    return 0


async def kvm_irqfd_release(kvm: Kvm) -> None:
    """virt/kvm/eventfd.c: kvm_irqfd_release — VM teardown: deactivate all, flush."""
    for irqfd in list(kvm.irqfds):
        irqfd_deactivate(irqfd)
    await flush_workqueue(_cleanup_wq(kvm))


def kvm_irq_has_notifier(kvm: Kvm, irqchip: int, pin: int) -> bool:
    """virt/kvm/eventfd.c: kvm_irq_has_notifier — some ack notifier watches the GSI routed
    to (irqchip, pin) (under irq_srcu)."""
    idx = srcu_read_lock(kvm.irq_srcu)
    gsi = kvm_irq_map_chip_pin(kvm, irqchip, pin)
    found = gsi != -1 and any(kian.gsi == gsi for kian in kvm.irq_ack_notifier_list)
    srcu_read_unlock(kvm.irq_srcu, idx)
    return found


def kvm_notify_acked_gsi(kvm: Kvm, gsi: int) -> None:
    """virt/kvm/eventfd.c: kvm_notify_acked_gsi — run every ack notifier of ``gsi``, newest
    registration first (caller holds irq_srcu)."""
    for kian in tuple(kvm.irq_ack_notifier_list):
        if kian.gsi == gsi:
            kian.irq_acked(kian)


def kvm_notify_acked_irq(kvm: Kvm, irqchip: int, pin: int) -> None:
    """virt/kvm/eventfd.c: kvm_notify_acked_irq  [vCPU thread: the guest's EOI]

    Trace ``kvm_ack_irq``; map (irqchip, pin) to its GSI and run that GSI's ack notifiers
    under irq_srcu.  Spec §8.9.
    """
    bus = kvm.rt.bus
    if bus.on:
        bus.emit("kvm_ack_irq", vm=kvm.name, irqchip=irqchip, pin=pin)
    idx = srcu_read_lock(kvm.irq_srcu)
    gsi = kvm_irq_map_chip_pin(kvm, irqchip, pin)
    if gsi != -1:
        kvm_notify_acked_gsi(kvm, gsi)
    srcu_read_unlock(kvm.irq_srcu, idx)


def kvm_register_irq_ack_notifier(kvm: Kvm, kian: KvmIrqAckNotifier) -> None:
    """virt/kvm/eventfd.c: kvm_register_irq_ack_notifier  [process: takes irq_lock]

    Add at the head of the VM's notifier list, then let every vCPU rescan its
    IOAPIC-handled vectors (the pin's EOI must now reach the IOAPIC even if edge).
    """
    from vkick.kvm.ioapic import kvm_arch_post_irq_ack_notifier_list_update  # noqa: PLC0415

    kvm.irq_ack_notifier_list.insert(0, kian)  # hlist_add_head_rcu
    kvm_arch_post_irq_ack_notifier_list_update(kvm)


async def kvm_unregister_irq_ack_notifier(kvm: Kvm, kian: KvmIrqAckNotifier) -> None:
    """virt/kvm/eventfd.c: kvm_unregister_irq_ack_notifier  [process; sleeps]

    Unlink, wait for SRCU readers (a notification in flight finishes first), rescan.
    """
    from vkick.kvm.ioapic import kvm_arch_post_irq_ack_notifier_list_update  # noqa: PLC0415

    kvm.irq_ack_notifier_list.remove(kian)  # hlist_del_init_rcu
    await synchronize_srcu(kvm.irq_srcu)
    kvm_arch_post_irq_ack_notifier_list_update(kvm)


@dataclass(slots=True, eq=False)
class KvmIoeventfd:
    """virt/kvm/eventfd.c: struct _ioeventfd — an (address, length, datamatch) doorbell."""

    ops: ClassVar[KvmIoDeviceOps]  # its struct kvm_io_device: ioeventfd_ops
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


# ioeventfd_ops (kvm_iodevice_init in kvm_assign_ioeventfd_idx); ioeventfd_write takes no vCPU.
KvmIoeventfd.ops = KvmIoDeviceOps(
    write=lambda vcpu, this, addr, length, val: ioeventfd_write(this, addr, length, val))
