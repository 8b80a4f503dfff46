"""net/core/dev.c: NAPI — interrupt mitigation by polling in softirq context.

A device's interrupt handler schedules its NAPI instance (``napi_schedule_prep`` +
``__napi_schedule``) and masks its own interrupts; ``net_rx_action`` (NET_RX_SOFTIRQ) then
polls each scheduled instance with its weight, within a budget of ``netdev_budget`` packets
per softirq run.  A poll that used less than its weight completes (``napi_complete_done``)
and the driver re-enables interrupts; one that used all of it stays scheduled and is polled
again — unless a napi_disable is waiting for it: then the poll completes it.  Covered:
napi_schedule_prep, __napi_schedule, napi_complete_done, napi_poll (with __napi_poll),
net_rx_action, napi_enable, napi_disable, local_bh_enable.  Left out: GRO, busy polling,
threaded NAPI, netpoll (NPSVC), ``napi_defer_hard_irqs`` / ``gro_flush_timeout`` (0 by
default), the 2-jiffy time limit.

``__napi_schedule`` lists an instance on the softnet data of the CPU that schedules it (the
CPU taking its interrupt, or the one running a work item that re-enables it), so
``napi.sd`` is the CPU whose poll list holds it — and so the CPU its poll runs on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from vkick.guest.softirq import NET_RX_SOFTIRQ, irq_exit, raise_softirq_irqoff, softirq_done

NAPI_POLL_WEIGHT: Final = 64
NETDEV_BUDGET: Final = 300


@dataclass(slots=True, eq=False)
class SoftnetData:
    """net/core/dev.c: struct softnet_data (one per guest CPU): the NAPI poll list, and
    net_rx_action's in-progress state (vkick: a softirq run spans several guest steps)."""

    guest: Any  # the GuestCpu
    poll_list: deque[NapiStruct] = field(default_factory=deque)
    running: list[NapiStruct] = field(default_factory=list)  # net_rx_action's local list
    repoll: list[NapiStruct] = field(default_factory=list)
    budget: int = 0
    time_squeeze: int = 0
    step: Any = None  # net_rx_action's continuation action (built once, below)

    def __post_init__(self) -> None:
        self.guest.softnet = self  # per_cpu(softnet_data, cpu)
        self.step = ("call", lambda v: _net_rx_step(v, self))


@dataclass(slots=True, eq=False)
class NapiStruct:
    """include/linux/netdevice.h: struct napi_struct (state bits SCHED, MISSED, DISABLE).

    ``sd``: the softnet data whose poll list holds the instance (or last held it).
    """

    poll: Callable[[NapiStruct, int], int]
    sd: SoftnetData
    weight: int = NAPI_POLL_WEIGHT
    sched: bool = False  # NAPI_STATE_SCHED
    missed: bool = False  # NAPI_STATE_MISSED
    disable: bool = False  # NAPI_STATE_DISABLE (napi_disable waits for SCHED)
    on_list: bool = False  # on a poll list (napi->poll_list not empty)
    name: str = ""
    owner: Any = None  # the driver queue (container_of(napi, struct receive_queue, napi))

    def __repr__(self) -> str:
        return f"<napi {self.name} sched={self.sched} missed={self.missed}>"


def napi_schedule_prep(n: NapiStruct) -> bool:
    """net/core/dev.c: napi_schedule_prep — set SCHED; if it was already set, set MISSED
    instead (the running poll will run once more) and return False.  While napi_disable
    waits (DISABLE), nobody may schedule: False."""
    if n.disable:
        return False
    if n.sched:
        n.missed = True
        return False
    n.sched = True
    return True


def __napi_schedule(n: NapiStruct, sd: SoftnetData) -> None:
    """net/core/dev.c: __napi_schedule — add to this CPU's poll list (``sd``: the softnet
    data of the CPU running the caller), raise NET_RX there."""
    if not n.on_list:
        n.on_list = True
        n.sd = sd
        sd.poll_list.append(n)
    raise_softirq_irqoff(sd.guest, NET_RX_SOFTIRQ)


def napi_complete_done(n: NapiStruct, work_done: int) -> bool:
    """net/core/dev.c: napi_complete_done → False if the instance must be polled again.

    Clear SCHED — unless MISSED was set meanwhile: then stay scheduled and reschedule (on
    this CPU: the one running the poll).
    """
    if n.on_list:
        n.on_list = False
        _unlink(n)
    if n.missed:
        n.missed = False
        __napi_schedule(n, n.sd)
        return False
    n.sched = False
    return True


def _unlink(n: NapiStruct) -> None:
    sd = n.sd
    for lst in (sd.poll_list, sd.running, sd.repoll):
        if n in lst:
            lst.remove(n)


def napi_poll(n: NapiStruct, repoll: list[NapiStruct]) -> int:
    """net/core/dev.c: napi_poll → __napi_poll — poll with the full weight; an instance
    that used all of it did not complete and goes on ``repoll`` — unless a napi_disable is
    waiting (DISABLE): then it is completed here (napi_complete), so the disable can take
    SCHED even while every poll uses the whole weight."""
    n.on_list = False
    work = n.poll(n, n.weight) if n.sched else 0
    if work < n.weight:
        return work
    if n.disable:  # napi_disable_pending
        napi_complete_done(n, 0)  # napi_complete
        return work
    n.on_list = True
    repoll.append(n)
    return work


def net_rx_action(vcpu: Any, sd: SoftnetData) -> None:
    """net/core/dev.c: net_rx_action — the NET_RX_SOFTIRQ handler  [guest softirq]

    Take the poll list and poll instance after instance until it is empty or the budget
    is used; then put back what is left (the rest, newly scheduled ones, the repoll list)
    and raise the softirq again if that is not empty.  Each poll is one guest step: its
    CPU time passes before the next one, with interrupts enabled.
    """
    sd.budget = NETDEV_BUDGET
    sd.running = list(sd.poll_list)
    sd.poll_list.clear()
    if sd.repoll:  # left empty by the last run's end
        sd.repoll = []
    _net_rx_step(vcpu, sd)


def _net_rx_step(vcpu: Any, sd: SoftnetData) -> None:
    guest = sd.guest
    running = sd.running
    if running and sd.budget > 0:
        n = running.pop(0)
        queued = guest.front_queued
        sd.budget = budget = sd.budget - napi_poll(n, sd.repoll)
        queued = guest.front_queued - queued
        if queued:
            # The poll goes on after a preemption window (GuestCpu.preempt_then): the next
            # step (which re-checks the budget) waits until it has finished.
            guest.actions.insert(queued, sd.step)
            guest.front_queued += 1
            return
        if budget > 0:
            guest.run_next(sd.step)
            return
    if sd.budget <= 0:
        sd.time_squeeze += 1
    running = sd.running
    repoll = sd.repoll
    if running or repoll:
        sd.poll_list = deque(running + list(sd.poll_list) + repoll)
        sd.running = []
        sd.repoll = []
    # else: only what was scheduled meanwhile is left, already on the poll list.
    if sd.poll_list:
        raise_softirq_irqoff(guest, NET_RX_SOFTIRQ)
    softirq_done(vcpu)


def napi_enable(n: NapiStruct) -> None:
    """net/core/dev.c: napi_enable — the instance may be scheduled again: clear the SCHED
    bit that napi_disable took (or netif_napi_add left set)."""
    n.sched = False


def napi_disable(n: NapiStruct) -> bool:
    """net/core/dev.c: napi_disable — stop the instance: set DISABLE (nobody may schedule
    it now), then take SCHED; True once taken (DISABLE cleared again)  [guest process]

    Differs from the kernel: one attempt per call.  False: a poll holds SCHED, the caller
    must ``msleep(1)`` and call again (DISABLE stays set meanwhile, as in the kernel's loop).
    """
    n.disable = True
    if n.sched:
        return False
    n.sched = True
    n.disable = False
    return True


def local_bh_enable(vcpu: Any) -> None:
    """include/linux/bottom_half.h: local_bh_enable — run softirqs raised meanwhile (in
    process context: as at an interrupt exit)."""
    irq_exit(vcpu)
