"""kernel/workqueue.c (guest kernel): delayed work on the per-CPU system workqueue.

``schedule_delayed_work`` queues the work on the CPU that calls it (system_wq is per-CPU
and WORK_CPU_UNBOUND picks the local one); that CPU's kworker runs it in process context —
here, a guest call queued behind what the vCPU already has to do.  A work item that is
already pending is not queued again; PENDING is cleared just before the function runs, so
scheduling it from inside its own function queues it once more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vkick.guest.cpu import GuestCpu
from vkick.guest.timer import guest_timer


@dataclass(slots=True, eq=False)
class DelayedWork:
    """include/linux/workqueue.h: struct delayed_work (``pending``: WORK_STRUCT_PENDING).
    ``func(work, vcpu)`` runs on the kworker's vCPU."""

    func: Callable[[DelayedWork, Any], None]
    owner: Any = None  # container_of(work, …)
    pending: bool = False


def schedule_delayed_work(dwork: DelayedWork, delay: int, cpu: GuestCpu) -> bool:
    """kernel/workqueue.c: schedule_delayed_work → queue_delayed_work_on(WORK_CPU_UNBOUND,
    system_wq) from ``cpu``: run ``dwork`` on this CPU's kworker after ``delay`` jiffies.
    False if it was already pending."""
    if dwork.pending:
        return False
    dwork.pending = True

    def run(vcpu: Any) -> None:
        process_one_work(dwork, vcpu)

    if delay:
        guest_timer(cpu, delay, run)  # delayed_work_timer_fn → __queue_work
    else:
        cpu.push("call", run)
    return True


def process_one_work(dwork: DelayedWork, vcpu: Any) -> None:
    """kernel/workqueue.c: process_one_work — clear PENDING, run the function  [guest
    process: kworker]"""
    dwork.pending = False
    dwork.func(dwork, vcpu)
