"""net/core/dev.c: NAPI — interrupt mitigation by polling in softirq context.

A device's interrupt handler schedules its NAPI instance (``napi_schedule_prep`` +
``__napi_schedule``) and masks its own interrupts; ``net_rx_action`` (NET_RX_SOFTIRQ) then
polls each scheduled instance with its weight, within a budget of ``netdev_budget`` packets
per softirq run.  A poll that used less than its weight completes (``napi_complete_done``)
and the driver re-enables interrupts; one that used all of it stays scheduled and is polled
again.  Covered: napi_schedule_prep, __napi_schedule, napi_complete_done, napi_poll,
net_rx_action, napi_enable, local_bh_enable.  Left out: GRO, busy polling, threaded NAPI,
``napi_defer_hard_irqs`` / ``gro_flush_timeout`` (0 by default), the 2-jiffy time limit.

Each :class:`NapiStruct` belongs to the softnet data of the (guest) CPU its interrupt is
affine to, so "this CPU" in ``__napi_schedule`` is ``napi.sd``.
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
    step: Any = None  # the continuation action, built once


@dataclass(slots=True, eq=False)
class NapiStruct:
    """include/linux/netdevice.h: struct napi_struct (state bits SCHED and MISSED)."""

    poll: Callable[[NapiStruct, int], int]
    sd: SoftnetData
    weight: int = NAPI_POLL_WEIGHT
    sched: bool = False  # NAPI_STATE_SCHED
    missed: bool = False  # NAPI_STATE_MISSED
    on_list: bool = False  # on a poll list (napi->poll_list not empty)
    name: str = ""
    owner: Any = None  # the driver queue (container_of(napi, struct receive_queue, napi))

    def __repr__(self) -> str:
        return f"<napi {self.name} sched={self.sched} missed={self.missed}>"


def napi_schedule_prep(n: NapiStruct) -> bool:
    """net/core/dev.c: napi_schedule_prep — set SCHED; if it was already set, set MISSED
    instead (the running poll will run once more) and return False."""
    if n.sched:
        n.missed = True
        return False
    n.sched = True
    return True


def __napi_schedule(n: NapiStruct) -> None:
    """net/core/dev.c: __napi_schedule — add to this CPU's poll list, raise NET_RX."""
    sd = n.sd
    if not n.on_list:
        n.on_list = True
        sd.poll_list.append(n)
    raise_softirq_irqoff(sd.guest, NET_RX_SOFTIRQ)


def napi_complete_done(n: NapiStruct, work_done: int) -> bool:
    """net/core/dev.c: napi_complete_done → False if the instance must be polled again.

    Clear SCHED — unless MISSED was set meanwhile: then stay scheduled and reschedule.
    """
    if n.on_list:
        n.on_list = False
        _unlink(n)
    if n.missed:
        n.missed = False
        __napi_schedule(n)
        return False
    n.sched = False
    return True


def _unlink(n: NapiStruct) -> None:
    sd = n.sd
    for lst in (sd.poll_list, sd.running, sd.repoll):
        if n in lst:
            lst.remove(n)


def napi_poll(n: NapiStruct, repoll: list[NapiStruct]) -> int:
    """net/core/dev.c: napi_poll — poll with the full weight; an instance that used all of
    it did not complete and goes on ``repoll``."""
    n.on_list = False
    work = n.poll(n, n.weight) if n.sched else 0
    if work < n.weight:
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
    sd.repoll = []
    _net_rx_step(vcpu, sd)


def _net_rx_step(vcpu: Any, sd: SoftnetData) -> None:
    if sd.running:
        n = sd.running.pop(0)
        sd.budget -= napi_poll(n, sd.repoll)
        if sd.budget > 0:
            if sd.step is None:
                sd.step = ("call", lambda v: _net_rx_step(v, sd))
            sd.guest.run_next(sd.step)
            return
        sd.time_squeeze += 1
    remaining = sd.running + list(sd.poll_list) + sd.repoll
    sd.running = []
    sd.repoll = []
    sd.poll_list = deque(remaining)
    if remaining:
        raise_softirq_irqoff(sd.guest, NET_RX_SOFTIRQ)
    softirq_done(vcpu)


def napi_enable(n: NapiStruct) -> None:
    """include/linux/netdevice.h: napi_enable — the instance may be scheduled (clears the
    SCHED bit napi_disable / netif_napi_add leave set)."""
    n.sched = False
    n.missed = False


def local_bh_enable(vcpu: Any) -> None:
    """include/linux/bottom_half.h: local_bh_enable — run softirqs raised meanwhile (in
    process context: as at an interrupt exit)."""
    irq_exit(vcpu)
